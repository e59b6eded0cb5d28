"""Images, their boxes and their captions, ready for a model: the input side of jobs.evaluate and
jobs.embed.

DATA is what jobs.prepare reads (a COCO-format folder, a manifest, WebDataset shards, a sharded
manifest) or a prepared dataset. The
driver reads only metadata: image ids, caption texts, box lists. Image bytes are read and decoded
by Ray Data tasks, which hand the model actors square uint8 pixels at the model's input size, so
the driver never holds an image and memory is bounded by Ray Data's blocks in flight, however
large the set. A bad image is not an error: its row carries a reject reason, as in preparation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
from PIL import Image

from harmoclip.config import PrepareConfig
from harmoclip.pixels import squash
from harmoclip.storage import join, resolve

from . import dataset_of
from .dataset import DatasetError, read_dataset_manifest, shard_files
from .images import Rejected, read_checked, to_rgb
from .prepare import DATASET_FILE
from .regions import GT_BOX_TYPE, BoxCounts, normalise_xywh, propose
from .shards import FIRST_ROW, image_rows
from .sources import (IMAGE_ROW_SCHEMA, SHARDED_MANIFEST, WEBDATASET, Source, blank_caption, categories, find_source,
                      read_image_rows)

MAX_PIXELS = PrepareConfig().max_pixels
BOX_TYPE = pa.list_(pa.float32(), 4)  # normalised x0, y0, x1, y1
# One row per image before decoding. `boxes` are normalised (a prepared dataset's); `gt_boxes`
# and `proposals` are pixel xywh (a COCO folder's) and are normalised once the size is known.
IMAGE_INPUT_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("image_uri", pa.string()), ("image", pa.binary()),
    ("boxes", pa.list_(GT_BOX_TYPE)), ("gt_boxes", IMAGE_ROW_SCHEMA.field("gt_boxes").type),
    ("proposals", IMAGE_ROW_SCHEMA.field("proposals").type),
    ("reject_reason", pa.string()), ("reject_detail", pa.string()),
])
CAPTION_SCHEMA = pa.schema([("sample_id", pa.string()), ("image_id", pa.string()), ("caption", pa.string()),
                            ("reject_reason", pa.string()), ("reject_detail", pa.string())])


@dataclass
class InferenceInput:
    """Where the images are (a lazy Ray Dataset of IMAGE_INPUT_SCHEMA rows, not yet read) and
    what is known without reading them."""

    images: ray.data.Dataset
    captions: pa.Table  # CAPTION_SCHEMA, one row per caption, in source order
    categories: list[dict]  # COCO categories (id, name, optional isthing); empty without instances
    num_images: int
    has_gt_boxes: bool
    source: dict = field(default_factory=dict)  # what DATA was, for the output's record


def is_prepared(uri: str) -> bool:
    filesystem, path = resolve(join(uri, DATASET_FILE))
    return filesystem.get_file_info(path).type.name == "File"


def _caption_rows(image_rows: pa.Table) -> pa.Table:
    rows = []
    for image in image_rows.select(["image_key", "captions", "reject_reason", "reject_detail"]).to_pylist():
        for caption in image["captions"]:
            text = caption["caption"]
            reason, detail = image["reject_reason"], image["reject_detail"]
            if reason is None:
                reason, detail = blank_caption(text) or (None, None)
            rows.append({"sample_id": caption["sample_id"], "image_id": image["image_key"], "caption": text,
                         "reject_reason": reason, "reject_detail": detail})
    return pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA)


def _as_image_input(batch: pa.Table) -> pa.Table:
    """IMAGE_ROWS_SCHEMA rows (pipeline.shards) -> IMAGE_INPUT_SCHEMA rows, the source's bytes kept."""
    return pa.table({
        "image_id": batch["image_key"], "image_uri": batch["image_uri"], "image": batch["image"],
        "boxes": pa.nulls(batch.num_rows, pa.list_(GT_BOX_TYPE)), "gt_boxes": batch["gt_boxes"],
        "proposals": batch["proposals"], "reject_reason": batch["reject_reason"],
        "reject_detail": batch["reject_detail"],
    }, schema=IMAGE_INPUT_SCHEMA)


def _from_shards(source: Source, batch_size: int) -> InferenceInput:
    """WebDataset shards or a sharded manifest, read by Ray Data tasks; only the captions and ids
    come here. Images are sorted into input order (their first caption's), as the consumers expect."""
    rows = image_rows(source, batch_size=batch_size)
    metadata = [t for t in rows.dataset.select_columns(["image_key", "captions", "gt_boxes", "reject_reason",
                                                        "reject_detail", FIRST_ROW])
                .iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
    metadata = (pa.concat_tables(metadata).sort_by(FIRST_ROW) if metadata
                else IMAGE_ROW_SCHEMA.empty_table().append_column(FIRST_ROW, pa.array([], pa.int64())))
    images = rows.dataset.sort(FIRST_ROW).map_batches(_as_image_input, batch_format="pyarrow", batch_size=None)
    return InferenceInput(images, _caption_rows(metadata), [], rows.num_images,
                          has_gt_boxes=bool(metadata.num_rows and pc.sum(pc.is_valid(metadata["gt_boxes"])).as_py()),
                          source={"captions": source.captions, "images": None, "instances": None,
                                  "kind": source.kind})


def _from_source(uri: str, proposals: Optional[str], batch_size: int) -> InferenceInput:
    source = find_source(uri)
    if source.kind in (WEBDATASET, SHARDED_MANIFEST):
        if proposals:
            raise DatasetError(f"{uri} is a {source.kind.replace('_', ' ')}: --proposals applies to a COCO folder")
        return _from_shards(source, batch_size)
    rows = read_image_rows(source, proposals)
    images = pa.table({
        "image_id": rows["image_key"], "image_uri": rows["image_uri"],
        "image": pa.nulls(rows.num_rows, pa.binary()), "boxes": pa.nulls(rows.num_rows, pa.list_(GT_BOX_TYPE)),
        "gt_boxes": rows["gt_boxes"], "proposals": rows["proposals"],
        "reject_reason": rows["reject_reason"], "reject_detail": rows["reject_detail"],
    }, schema=IMAGE_INPUT_SCHEMA)
    return InferenceInput(dataset_of(images, batch_size), _caption_rows(rows), categories(source.instances),
                          images.num_rows, has_gt_boxes=source.instances is not None,
                          source={"captions": source.captions, "images": source.images,
                                  "instances": source.instances})


def _first_row_per_image(batch: pa.Table, first_samples: pa.Array) -> pa.Table:
    """A prepared dataset repeats the image on each caption's row: keep one row per image
    (`first_samples`: the sample ids of each image's first row)."""
    rows = batch.filter(pc.is_in(batch["sample_id"], value_set=first_samples))
    return pa.table({
        "image_id": rows["image_id"], "image_uri": rows["image_uri"], "image": rows["image"],
        "boxes": rows["gt_boxes"], "gt_boxes": pa.nulls(rows.num_rows, IMAGE_INPUT_SCHEMA.field("gt_boxes").type),
        "proposals": pa.nulls(rows.num_rows, IMAGE_INPUT_SCHEMA.field("proposals").type),
        "reject_reason": pa.nulls(rows.num_rows, pa.string()), "reject_detail": pa.nulls(rows.num_rows, pa.string()),
    }, schema=IMAGE_INPUT_SCHEMA)


def _from_prepared(uri: str) -> InferenceInput:
    manifest = read_dataset_manifest(uri)
    filesystem, files = shard_files(uri)
    metadata = pa.concat_tables(pq.read_table(file, filesystem=filesystem,
                                              columns=["sample_id", "image_id", "caption"]) for file in files)
    first_samples, seen = [], set()
    for sample, image in zip(metadata["sample_id"].to_pylist(), metadata["image_id"].to_pylist()):
        if image not in seen:
            seen.add(image)
            first_samples.append(sample)
    captions = metadata.append_column("reject_reason", pa.nulls(metadata.num_rows, pa.string())) \
        .append_column("reject_detail", pa.nulls(metadata.num_rows, pa.string()))
    images = ray.data.read_parquet(files, filesystem=filesystem,
                                   columns=["sample_id", "image_id", "image_uri", "image", "gt_boxes"]) \
        .map_batches(_first_row_per_image, batch_format="pyarrow", batch_size=None,
                     fn_kwargs={"first_samples": pa.array(first_samples, pa.string())})
    return InferenceInput(images, captions.cast(CAPTION_SCHEMA), manifest.get("categories", []), len(seen),
                          has_gt_boxes=manifest.get("source", {}).get("instances") is not None,
                          source={"prepared": uri})


def check_inference_input(uri: str) -> None:
    """Refuse a DATA that is neither a prepared dataset nor raw data find_source recognises, before
    a job starts Ray: a mistyped path is the user's to fix, and needs no cluster to find."""
    if not is_prepared(uri):
        find_source(uri)


def read_inference_input(uri: str, proposals: Optional[str] = None, batch_size: int = 64) -> InferenceInput:
    """DATA as InferenceInput; `proposals` (a COCO detections file) only applies to a COCO folder."""
    if is_prepared(uri):
        if proposals:
            raise DatasetError(f"{uri} is a prepared dataset: --proposals applies to a COCO folder")
        return _from_prepared(uri)
    return _from_source(uri, proposals, batch_size)


def _boxes(row: dict, image: Image.Image, regions: PrepareConfig) -> tuple[list, list, list]:
    """(normalised xyxy boxes, category ids or None, scores) of one decoded image. Ground truth
    keeps every box with its category; other methods are capped and filtered as in preparation."""
    if regions.regions == "gt":
        if row["boxes"] is not None:
            found = [((b["x0"], b["y0"], b["x1"], b["y1"]), b["category_id"]) for b in row["boxes"]]
        else:
            kept = normalise_xywh(row["gt_boxes"] or [], image.width, image.height, 0.0, BoxCounts())
            found = [(tuple(b[:4]), b[4]["category_id"]) for b in kept]
        return [box for box, _ in found], [label for _, label in found], [1.0] * len(found)
    proposed = propose({"gt_boxes": None, "proposals": row["proposals"], "width": image.width,
                        "height": image.height}, regions, BoxCounts(), image=image)
    return ([(p["x0"], p["y0"], p["x1"], p["y1"]) for p in proposed], [None] * len(proposed),
            [p["score"] for p in proposed])


def _crop(image: Image.Image, box: tuple, size: int) -> np.ndarray:
    x0, y0, x1, y1 = box
    left, top = x0 * image.width, y0 * image.height
    return squash(image.crop((left, top, max(x1 * image.width, left + 1), max(y1 * image.height, top + 1))), size)


DECODED_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("image_uri", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("pixels", pa.binary()),  # image_size x image_size x 3 uint8
    ("crops", pa.binary()),  # boxes x image_size x image_size x 3 uint8, when asked for
    ("boxes", pa.list_(BOX_TYPE)), ("box_labels", pa.list_(pa.int32())), ("box_scores", pa.list_(pa.float32())),
    ("reject_reason", pa.string()), ("reject_detail", pa.string()),
])


def decode_stage(batch: pa.Table, image_size: int, regions: Optional[PrepareConfig], crops: bool = False) -> pa.Table:
    """Ray Data task: read and check each image, find its boxes (`regions.regions`: gt,
    felzenszwalb, grid or file; None for no boxes) and squash it (and, with `crops`, each box's
    crop) to the model's input size. A bad image keeps its row, with null pixels and a reason."""
    columns: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names}
    for row in batch.to_pylist():
        reason, detail = row["reject_reason"], row["reject_detail"]
        pixels = crop_pixels = boxes = labels = scores = width = height = None
        try:
            if reason:
                raise Rejected(reason, detail)
            image = to_rgb(read_checked(row["image_uri"], MAX_PIXELS, row["image"]))
            width, height = image.size
            pixels = squash(image, image_size).tobytes()
            if regions:
                boxes, labels, scores = _boxes(row, image, regions)
                if crops:
                    crop_pixels = b"".join(_crop(image, box, image_size).tobytes() for box in boxes)
        except Rejected as rejected:
            reason, detail = rejected.reason, rejected.detail
        for name, value in (("image_id", row["image_id"]), ("image_uri", row["image_uri"]), ("width", width),
                            ("height", height), ("pixels", pixels), ("crops", crop_pixels), ("boxes", boxes),
                            ("box_labels", labels), ("box_scores", scores), ("reject_reason", reason),
                            ("reject_detail", detail)):
            columns[name].append(value)
    return pa.table(columns, schema=DECODED_SCHEMA)

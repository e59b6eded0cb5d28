"""The image rows of any source as a Ray Dataset, no source file parsed in the job's process, and
the readers of the two sources that Ray Data reads in parallel: WebDataset shards and sharded
manifests.

- **WebDataset** (what img2dataset writes): `.tar` shards of samples `KEY.jpg` (or .jpeg, .png,
  .webp), `KEY.txt` and/or `KEY.json`, read by Ray Data's own reader (`ray.data.read_webdataset`,
  raw bytes, no decoding there). The caption is the `.txt`, else the `.json`'s `caption_column`
  field (a string, or a list of strings for several captions); the `.json`'s optional `boxes`
  (`[{"bbox": [x, y, w, h], "category_id": N}, ...]`, pixels of the upright image, COCO's
  convention; `iscrowd` ones left out) become the image's ground-truth boxes. One image row per
  sample, keyed `SHARD/KEY` (SHARD: the .tar's name).
- **Sharded manifest**: many `.jsonl`, `.csv` or `.parquet` manifest files in a folder or prefix.
  `ray.data.read_binary_files` hands each file to a task that parses it as a single manifest is
  parsed; a Ray Data groupby on the image key gathers an image's captions from every file, in
  (file, line) order, so a sharded manifest gives the rows its concatenation would.

Ray Data tasks read and parse them: the job's own process opens none of their files. Order: every
image row gets `first_row`,
the position of its first caption among all the source's caption rows, which `pipeline.prepare`
writes in. It is a function of the input alone: rows are sorted by their order key (WebDataset:
shard URI, then sample key; manifests: the image key, as `read_image_rows` sorts), and the driver
needs only each row's key and caption count to give it (the read rows are materialized first, as
the prepared ones are later). A COCO folder or a single manifest is one document, which one Ray
task parses (`read_image_rows`, sorted by image key) and hands on in blocks.
"""

from __future__ import annotations

import functools
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.context import ShuffleStrategy

from harmoclip.storage import is_remote, resolve

from . import table_blocks
from .sources import (IMAGE_ROW_SCHEMA, SHARDED_MANIFEST, WEBDATASET, Source, SourceError, categories,
                      empty_image_path, image_row, is_crowd, manifest_pairs, parse_manifest, read_image_rows, xywh)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # a sample's image: the first of these it has
BOXES_FIELD = "boxes"
ORDER, CAPTIONS_N, FIRST_ROW = "order", "captions_n", "first_row"
SHARED_BLOCK_BYTES = 256 * 1024  # above Ray's 100 KiB limit for results handed back inline
# IMAGE_ROW_SCHEMA, the source's image bytes (WebDataset; null where the image is read from its
# URI) and the position of the row's first caption.
IMAGE_ROWS_SCHEMA = IMAGE_ROW_SCHEMA.append(pa.field("image", pa.binary())).append(pa.field(FIRST_ROW, pa.int64()))
_KEYED_SCHEMA = IMAGE_ROW_SCHEMA.append(pa.field("image", pa.binary())).append(pa.field(ORDER, pa.string())) \
    .append(pa.field(CAPTIONS_N, pa.int64()))
_CAPTION_ROW_SCHEMA = pa.schema([("image_key", pa.string()), ("image_uri", pa.string()), ("caption", pa.string()),
                                 ("file", pa.string()), ("line", pa.int64())])


@dataclass
class ImageRows:
    """A source's image rows (IMAGE_ROWS_SCHEMA), not necessarily in `first_row` order."""

    dataset: ray.data.Dataset
    rows_in: int  # caption rows: what `rows_written + rows_rejected` must come to
    num_images: int
    categories: list[dict] = field(default_factory=list)  # a COCO folder's (instances.json), else none


def image_rows(source: Source, proposals_uri: Optional[str] = None, batch_size: int = 64) -> ImageRows:
    """The image rows of any source, each with its `first_row`. `proposals_uri` (COCO detection
    results) applies to a COCO folder only, as in `read_image_rows`."""
    if source.kind == WEBDATASET:
        return _numbered(_webdataset(source), source)
    if source.kind == SHARDED_MANIFEST:
        return _numbered(_sharded_manifest(source), source)
    blocks = _document_blocks.remote(source, proposals_uri, batch_size)
    try:
        rows_in, num_images, coco_categories = ray.get(next(blocks))
    except ray.exceptions.RayTaskError as err:  # a bad or missing file: what the task raised, as itself
        raise err.cause from None
    return ImageRows(ray.data.from_arrow_refs(list(blocks)), rows_in, num_images, coco_categories)


@ray.remote(num_returns="streaming")
def _document_blocks(source: Source, proposals_uri: Optional[str], rows_per_block: int) -> Iterator[Any]:
    """A COCO folder or a single manifest is one document (captions.json, instances.json, a .jsonl):
    this Ray task parses it, so the job's process never holds it, and yields first `(caption rows,
    images, categories)`, then the image rows (IMAGE_ROWS_SCHEMA, in `first_row` order) in blocks
    of `rows_per_block` rows or more. The blocks belong to the caller, so Ray re-runs this task if a node holding
    some of them is lost."""
    table = read_image_rows(source, proposals_uri)
    counts = pc.list_value_length(table["captions"]).fill_null(0).to_numpy(zero_copy_only=False)
    table = (table.append_column("image", pa.nulls(table.num_rows, pa.binary()))
             .append_column(FIRST_ROW, pa.array(np.cumsum(counts) - counts, pa.int64())))
    yield int(counts.sum()), table.num_rows, categories(source.instances)
    # Blocks of at least SHARED_BLOCK_BYTES: Ray hands a smaller task result to its owner inline,
    # into the owner's own memory, so 64-row blocks of a large document would all sit in the job's
    # process until the job ends; larger ones wait in the object store, which spills to disk.
    rows = max(rows_per_block, -(-SHARED_BLOCK_BYTES * table.num_rows // max(table.nbytes, 1)))
    for block in table_blocks(table, rows):  # not `yield from`: Ray sends values into this generator
        yield block


def _paths(source: Source) -> tuple[Any, list[str]]:
    filesystem, _ = resolve(source.shards[0])
    return filesystem, [resolve(uri)[1] for uri in source.shards]


def _uri(path: str, source: Source) -> str:
    """The URI of a path Ray Data read (the filesystem's own path: `bucket/key` on S3)."""
    return "s3://" + path.removeprefix("s3://") if is_remote(source.captions) else path


# -- WebDataset ------------------------------------------------------------------------------------

def _webdataset(source: Source) -> ray.data.Dataset:
    filesystem, paths = _paths(source)
    suffixes = [*IMAGE_SUFFIXES, "txt", "json"]  # the rest of a sample (.npy, ...) is not kept
    return _raising_source_errors(
        ray.data.read_webdataset(paths, filesystem=filesystem, decoder=None, suffixes=suffixes)
        .map_batches(_webdataset_rows, batch_format="pandas", fn_kwargs={"source": source}))


def _raising_source_errors(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """A SourceError raised in a task reaches the driver as itself, not as Ray Data's UserCodeException."""
    dataset.context.raise_original_map_exception = True
    return dataset


def _webdataset_rows(batch, source: Source) -> pa.Table:
    rows = []
    for sample in batch.to_dict("records"):
        shard_uri = _uri(sample["__url__"], source)
        rows.append(webdataset_row(sample, shard_uri, source))
    return pa.Table.from_pylist(rows, schema=_KEYED_SCHEMA)


def _bytes(value: Any) -> Optional[bytes]:
    return bytes(value) if isinstance(value, (bytes, bytearray)) else None  # a missing member: NaN or None


def _json_boxes(meta: dict, where: str) -> list[dict]:
    boxes = meta[BOXES_FIELD]
    if not isinstance(boxes, list):
        raise ValueError(f"{where} '{BOXES_FIELD}' must be a list, got {type(boxes).__name__}")
    for index, box in enumerate(boxes):
        bbox = box.get("bbox") if isinstance(box, dict) else None
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
                and isinstance(box.get("category_id"), int)):
            raise ValueError(f"{where} '{BOXES_FIELD}'[{index}] must be {{\"bbox\": [x, y, w, h], "
                             f"\"category_id\": N}}, got {box!r}")
    return [xywh(box, "category_id", 0) for box in boxes if not is_crowd(box)]


def webdataset_row(sample: dict, shard_uri: str, source: Source) -> dict:
    """One WebDataset sample (`__key__` and raw member bytes by suffix) -> its image row, keyed.
    What is wrong with it becomes the row's reject reason: `missing_image` (no image member),
    `bad_annotation` (a .json that is not a JSON object, a caption field or boxes of the wrong
    shape, a .txt that is not UTF-8) or `missing_caption` (neither a .txt nor the .json field)."""
    key = str(sample["__key__"])
    shard = shard_uri.rsplit("/", 1)[-1]
    suffix = next((s for s in IMAGE_SUFFIXES if _bytes(sample.get(s)) is not None), None)
    uri = f"{shard_uri}#{key}" + (f".{suffix}" if suffix else "")
    field = source.caption_column
    captions: list = [None]
    gt_boxes, reject = None, None
    try:
        meta: dict = {}
        if (raw := _bytes(sample.get("json"))) is not None:
            try:
                meta = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise ValueError(f"{key}.json is not valid JSON") from None
            if not isinstance(meta, dict):
                raise ValueError(f"{key}.json must be a JSON object, got {type(meta).__name__}")
        if (text := _bytes(sample.get("txt"))) is not None:
            try:
                captions = [text.decode("utf-8")]
            except UnicodeDecodeError:
                raise ValueError(f"{key}.txt is not UTF-8 text") from None
        elif field in meta:
            value = meta[field]
            if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                captions = list(value)
            elif isinstance(value, str):
                captions = [value]
            else:
                raise ValueError(f"{key}.json '{field}' must be a string or a non-empty list of strings, "
                                 f"got {value!r}")
        if BOXES_FIELD in meta:
            gt_boxes = _json_boxes(meta, f"{key}.json")
        if suffix is None:
            reject = ("missing_image", f"{shard_uri}: sample {key} has no image "
                                       f"({', '.join('.' + s for s in IMAGE_SUFFIXES)})")
        elif captions == [None]:
            reject = ("missing_caption", f"{shard_uri}: sample {key} has no .txt and no '{field}' in a .json")
    except ValueError as err:
        reject = ("bad_annotation", f"{shard_uri}: {err}")
    row = image_row(source, f"{shard}/{key}", uri, captions, gt_boxes, None, reject)
    row["image"] = None if reject else _bytes(sample.get(suffix))
    row[ORDER] = f"{shard_uri}\0{key}"
    row[CAPTIONS_N] = len(captions)
    return row


# -- sharded manifest ------------------------------------------------------------------------------

def _sharded_manifest(source: Source) -> ray.data.Dataset:
    filesystem, paths = _paths(source)
    captions = _raising_source_errors(
        ray.data.read_binary_files(paths, filesystem=filesystem, include_paths=True)
        .map_batches(_manifest_captions, batch_format="pyarrow", batch_size=1, fn_kwargs={"source": source}))
    # Grouped by a sort (range partitions, plain tasks) rather than the default hash shuffle, whose
    # aggregator actors take the better part of a minute to start on a small machine.
    captions.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return captions.groupby("image_key").map_groups(_manifest_image_row, batch_format="pyarrow",
                                                    fn_kwargs={"source": source})


def _manifest_captions(batch: pa.Table, source: Source) -> pa.Table:
    """Manifest files -> one row per (image, caption), with its file and line."""
    rows = []
    for data, path in zip(batch["bytes"].to_pylist(), batch["path"].to_pylist()):
        uri = _uri(path, source)
        pairs = manifest_pairs(parse_manifest(data, uri), uri, source.image_column, source.caption_column)
        rows += [{"image_key": key, "image_uri": image, "caption": None if caption is None else str(caption),
                  "file": uri, "line": line} for line, (key, image, caption) in enumerate(pairs)]
    return pa.Table.from_pylist(rows, schema=_CAPTION_ROW_SCHEMA)


def _manifest_image_row(group: pa.Table, source: Source) -> pa.Table:
    """One image's caption rows (from any files, in any order) -> its image row, keyed."""
    group = group.sort_by([("file", "ascending"), ("line", "ascending")])
    key = group["image_key"][0].as_py()
    row = image_row(source, key, group["image_uri"][0].as_py(), group["caption"].to_pylist(), None, None,
                    reject=empty_image_path(key))
    row.update({"image": None, ORDER: key, CAPTIONS_N: group.num_rows})
    return pa.Table.from_pylist([row], schema=_KEYED_SCHEMA)


# -- numbering -------------------------------------------------------------------------------------

def _numbered(dataset: ray.data.Dataset, source: Source) -> ImageRows:
    """Keyed image rows -> IMAGE_ROWS_SCHEMA rows with `first_row`: the rows are read once
    (materialized); the driver sorts only the keys and caption counts."""
    try:
        dataset = dataset.materialize()
    except (SourceError, tarfile.TarError) as err:  # a manifest without the column, a broken .tar
        cause = getattr(err, "cause", None) or err  # what the task raised (Ray appends its own lines)
        text = str(cause.args[0] if cause.args else cause).splitlines()[0]
        raise SourceError(text if isinstance(cause, SourceError) else
                          f"cannot read {source.captions}: a .tar shard is damaged ({text})") from None
    keys = [t for t in dataset.select_columns([ORDER, CAPTIONS_N]).iter_batches(
        batch_format="pyarrow", batch_size=None) if t.num_rows]
    keys = pa.concat_tables(keys).sort_by(ORDER) if keys else pa.table({ORDER: pa.array([], pa.string()),
                                                                         CAPTIONS_N: pa.array([], pa.int64())})
    orders = np.asarray(keys[ORDER].to_pylist(), dtype=object)
    if len(orders) > 1 and (orders[1:] == orders[:-1]).any():
        raise RuntimeError(f"two image rows share the order key {orders[1:][orders[1:] == orders[:-1]][0]!r}")
    counts = keys[CAPTIONS_N].to_numpy()
    lookup = ray.put((orders, np.cumsum(counts) - counts))
    dataset = dataset.map_batches(_with_first_row, batch_format="pyarrow", batch_size=None,
                                  fn_kwargs={"lookup": lookup})
    return ImageRows(dataset, int(counts.sum()), len(orders))


@functools.lru_cache(maxsize=2)
def _lookup(ref: ray.ObjectRef) -> tuple[np.ndarray, np.ndarray]:
    return ray.get(ref)


def _with_first_row(batch: pa.Table, lookup: ray.ObjectRef) -> pa.Table:
    orders, first_rows = _lookup(lookup)
    keys = np.asarray(batch[ORDER].to_pylist(), dtype=object)
    found = np.searchsorted(orders, keys)
    assert (orders[np.minimum(found, len(orders) - 1)] == keys).all(), "an image row without an order key"
    return (batch.drop_columns([ORDER, CAPTIONS_N])
            .append_column(FIRST_ROW, pa.array(first_rows[found], pa.int64()))).cast(IMAGE_ROWS_SCHEMA)

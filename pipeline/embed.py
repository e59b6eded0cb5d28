"""Embedding export: a model's image, caption and region embeddings of a whole dataset as Parquet.

Layout of OUT (local or s3://), described in docs/design.md:
  images/part-NNNNN.parquet      one row per image: ids, size, boxes, image and region embeddings
  captions/part-NNNNN.parquet    one row per caption: ids, text, caption embedding
  rejects/rejects-00000.parquet  every image or caption left out, with its reason
  embeddings.json                model, dimension, dtype, counts, config; written last
Images and captions are two tables joined by `image_id`, so an image's embedding is stored once
however many captions it has. The model runs in Ray Data; its output streams back here in input
order and this process cuts the shards, so the same input, model and config write the same bytes,
progress is printed as batches arrive, and rejects are collected in the same pass. What comes back
is embeddings only (about 1 KB per vector in float16), not images. The order written is the
input's, not the streams': caption rows carry their position and are put back in it (`InOrder`),
and images are checked against the order of their captions (a stream out of order fails the job
rather than writing other bytes).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from harmoclip import ModelConfig
from harmoclip.config import EmbedConfig, InferenceConfig, PrepareConfig
from harmoclip.model import model_shape
from harmoclip.storage import join, resolve, write_bytes

from .embedders import caption_embeddings, image_embeddings
from .inference_data import InferenceInput
from .prepare import REJECTS_DIR, REJECTS_SCHEMA, InOrder, ShardWriter, check_destination
from .progress import Progress

EMBEDDINGS_FILE = "embeddings.json"
IMAGE_COLUMNS = ("image_id", "image_uri", "width", "height")


class _InputOrder:
    """Checks that images come back in input order: an image's place is that of its first caption
    (captions are listed image by image, in input order; an image without one is not checked)."""

    def __init__(self, caption_image_ids: pa.ChunkedArray) -> None:
        self.place: dict[str, int] = {}
        for position, image_id in enumerate(caption_image_ids.to_pylist()):
            self.place.setdefault(image_id, position)
        self.last = -1

    def check(self, image_ids: list[str]) -> None:
        for image_id in image_ids:
            place = self.place.get(image_id, self.last)
            if place < self.last:
                raise RuntimeError(f"image {image_id} came back from the model out of input order")
            self.last = place


def _image_columns(config: EmbedConfig) -> list[str]:
    columns = list(IMAGE_COLUMNS)
    if "image" in config.parts:
        columns.append("image_embedding")
    if "regions" in config.parts:
        columns += ["boxes", "box_labels", "box_scores", "region_embeddings"]
    return columns


def _embed_images(data: InferenceInput, model: ModelConfig, config: EmbedConfig, inference: InferenceConfig,
                  out: str) -> tuple[dict[str, Any], list[dict], set[str]]:
    """Writes images/; returns (counts, reject rows, ids of the images written)."""
    regions = (PrepareConfig(regions=config.regions, proposals=config.proposals, max_regions=config.max_regions,
                             min_region_size=config.min_region_size) if "regions" in config.parts else None)
    writer, progress = ShardWriter(join(out, "images"), config.rows_per_shard), Progress("images", data.num_images)
    in_order = _InputOrder(data.captions["image_id"])
    reject_rows, written, boxes = [], set(), 0
    for batch in image_embeddings(data, model, inference, regions=regions, dtype=config.dtype).iter_batches(
            batch_format="pyarrow", batch_size=None):
        progress.add(batch.num_rows)
        in_order.check(batch["image_id"].to_pylist())
        reject_rows += [{"image_id": r["image_id"], "image_uri": r["image_uri"], "stage": "image",
                         "reason": r["reject_reason"], "detail": r["reject_detail"]}
                        for r in batch.filter(pc.is_valid(batch["reject_reason"])).to_pylist()]
        accepted = batch.filter(pc.is_null(batch["reject_reason"]))
        written.update(accepted["image_id"].to_pylist())
        boxes += int(pc.sum(pc.list_value_length(accepted["boxes"])).as_py() or 0) if regions else 0
        writer.write(accepted.select(_image_columns(config)))
    counts = {"images_in": data.num_images, "images_written": len(written), "images_rejected": len(reject_rows),
              "image_shards": writer.close(), "boxes": boxes}
    return counts, reject_rows, written


def _embed_captions(data: InferenceInput, model: ModelConfig, config: EmbedConfig, inference: InferenceConfig,
                    out: str, images_written: set[str] | None) -> tuple[dict[str, Any], list[dict]]:
    """Writes captions/. Captions of an image that was read and rejected are rejected with it."""
    captions = data.captions
    reasons, details = captions["reject_reason"].to_pylist(), captions["reject_detail"].to_pylist()
    if images_written is not None:
        for row, image_id in enumerate(captions["image_id"].to_pylist()):
            if reasons[row] is None and image_id not in images_written:
                reasons[row], details[row] = "image_rejected", f"image {image_id} was rejected (see its own row)"
    captions = captions.set_column(captions.schema.get_field_index("reject_reason"), "reject_reason",
                                   pa.array(reasons, pa.string())) \
        .set_column(captions.schema.get_field_index("reject_detail"), "reject_detail", pa.array(details, pa.string()))
    kept = captions.filter(pc.is_null(captions["reject_reason"]))
    rejected = captions.filter(pc.is_valid(captions["reject_reason"]))
    reject_rows = [{"sample_id": r["sample_id"], "image_id": r["image_id"], "caption": r["caption"], "stage": "caption",
                    "reason": r["reject_reason"], "detail": r["reject_detail"]} for r in rejected.to_pylist()]
    writer = ShardWriter(join(out, "captions"), config.rows_per_shard)
    progress, in_order = Progress("captions", kept.num_rows), InOrder("position")
    if kept.num_rows:
        rows = kept.select(["sample_id", "image_id", "caption"]).append_column(
            "position", pa.array(range(kept.num_rows), pa.int64()))
        for batch in caption_embeddings(rows, model, inference, dtype=config.dtype).iter_batches(
                batch_format="pyarrow", batch_size=None):
            progress.add(batch.num_rows)
            writer.write(in_order.add(batch))
    in_order.close(kept.num_rows)
    return {"captions_in": captions.num_rows, "captions_written": kept.num_rows,
            "captions_rejected": rejected.num_rows, "caption_shards": writer.close()}, reject_rows


def export_embeddings(data: InferenceInput, data_uri: str, model: ModelConfig, out: str, config: EmbedConfig,
                      inference: InferenceConfig, overwrite: bool = False) -> dict[str, Any]:
    """Embed DATA with the model and write OUT; returns the `embeddings.json` content."""
    check_destination(out, overwrite)
    if "regions" in config.parts and config.regions == "gt" and not data.has_gt_boxes:
        raise ValueError(f"--regions gt needs ground-truth boxes, and {data_uri} has none (a COCO folder with "
                         f"instances.json, or a dataset prepared from one); use --regions grid or felzenszwalb")
    started = time.perf_counter()
    counts: dict[str, Any] = {}
    rejects: list[dict] = []
    images_written = None
    if {"image", "regions"} & set(config.parts):
        print(f"embedding {data.num_images} images ...", flush=True)
        image_counts, image_rejects, images_written = _embed_images(data, model, config, inference, out)
        counts.update(image_counts)
        rejects += image_rejects
        if image_counts["images_written"] + image_counts["images_rejected"] != data.num_images:
            raise RuntimeError(f"image accounting is off: {image_counts}")
    if "text" in config.parts:
        print(f"embedding {data.captions.num_rows} captions ...", flush=True)
        caption_counts, caption_rejects = _embed_captions(data, model, config, inference, out, images_written)
        counts.update(caption_counts)
        rejects += caption_rejects
    counts["rejected_by_reason"] = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    filesystem, path = resolve(join(out, REJECTS_DIR))
    filesystem.create_dir(path, recursive=True)
    pq.write_table(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), f"{path}/rejects-00000.parquet",
                   filesystem=filesystem)
    record = {
        "model": {"name": model.name, "checkpoint": model.init_from, "pretrained": model.pretrained},
        "dimension": model_shape(model)[1], "dtype": config.dtype, "parts": list(config.parts),
        "data": data_uri, "source": data.source, "counts": counts,
        "config": {"embed": dataclasses.asdict(config), "inference": dataclasses.asdict(inference)},
        "seconds": round(time.perf_counter() - started, 1),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_bytes(join(out, EMBEDDINGS_FILE), json.dumps(record, indent=2, sort_keys=True).encode())
    return record

"""Evaluation inputs (images with their captions and ground-truth boxes) and batch inference on Ray Data.

DATA is either a COCO-format folder (the `make_synthetic` layout) or a prepared dataset; both
become one row per image. Embedding runs in a Ray Data actor pool that loads the model once per
actor, so evaluation scales like preparation and runs the same on a laptop or a cluster.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from ray.data import ActorPoolStrategy
import torch
from PIL import Image

from harmoclip import HarmoCLIP, MethodConfig, ModelConfig, create_clip
from harmoclip.model import pool_regions
from harmoclip.storage import join, resolve

from . import report_progress_to_log
from .dataset import read_dataset_manifest, shard_files
from .images import Rejected, load_image
from .prepare import DATASET_FILE
from .regions import BoxCounts, normalise_xywh
from .sources import categories, find_source, read_image_rows

EVAL_ROW_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("image", pa.binary()),
    ("captions", pa.list_(pa.string())),
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))), ("labels", pa.list_(pa.int32())),
])


@dataclass
class EvalSet:
    rows: pa.Table  # EVAL_ROW_SCHEMA, one row per image
    categories: list[dict]  # COCO categories: id, name, optional isthing
    skipped: dict[str, int]  # images left out, by reason


def _is_prepared(uri: str) -> bool:
    filesystem, path = resolve(join(uri, DATASET_FILE))
    return filesystem.get_file_info(path).type.name == "File"


def _from_coco(uri: str) -> EvalSet:
    source = find_source(uri)
    rows, skipped = [], defaultdict(int)
    for image in read_image_rows(source).to_pylist():
        try:
            if image["reject_reason"]:
                raise Rejected(image["reject_reason"], image["reject_detail"])
            data, width, height = load_image(image["image_uri"], 89_478_485, 4096, "png")
        except Rejected as rejected:
            skipped[rejected.reason] += 1
            continue
        kept = normalise_xywh(image["gt_boxes"] or [], width, height, 0.0, BoxCounts())
        rows.append({"image_id": image["image_key"], "image": data,
                     "captions": [c["caption"] for c in image["captions"] if c["caption"] and c["caption"].strip()],
                     "boxes": [list(b[:4]) for b in kept], "labels": [b[4]["category_id"] for b in kept]})
    return EvalSet(pa.Table.from_pylist(rows, schema=EVAL_ROW_SCHEMA), categories(source.instances), dict(skipped))


def _from_prepared(uri: str) -> EvalSet:
    manifest = read_dataset_manifest(uri)
    filesystem, files = shard_files(uri)
    by_image: dict[str, dict[str, Any]] = {}
    for file in files:
        table = pq.read_table(file, filesystem=filesystem, columns=["image_id", "image", "caption", "gt_boxes"])
        for row in table.to_pylist():
            entry = by_image.setdefault(row["image_id"], {
                "image_id": row["image_id"], "image": row["image"], "captions": [],
                "boxes": [[b["x0"], b["y0"], b["x1"], b["y1"]] for b in row["gt_boxes"] or []],
                "labels": [b["category_id"] for b in row["gt_boxes"] or []]})
            entry["captions"].append(row["caption"])
    return EvalSet(pa.Table.from_pylist(list(by_image.values()), schema=EVAL_ROW_SCHEMA),
                   manifest.get("categories", []), {})


def load_eval_set(uri: str) -> EvalSet:
    return _from_prepared(uri) if _is_prepared(uri) else _from_coco(uri)


def squash_pixels(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """The whole image resized to size x size: no crop, so no ground-truth box is cut off."""
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0
    return ((pixels - np.array(mean, np.float32)) / np.array(std, np.float32)).transpose(2, 0, 1)


class Embedder:
    """Ray Data actor, one model per actor: for each image row its global embedding, RoIAlign
    region features, crop-and-encode features and the embeddings of its captions."""

    def __init__(self, model: ModelConfig) -> None:
        torch.set_grad_enabled(False)
        self.model = HarmoCLIP(create_clip(model), MethodConfig()).eval()
        self.tokenizer = open_clip.get_tokenizer(model.name)
        preprocess = self.model.clip.visual.preprocess_cfg
        self.size, self.mean, self.std = self.model.image_size[0], preprocess["mean"], preprocess["std"]

    def _encode(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.stack([squash_pixels(im, self.size, self.mean, self.std) for im in images]))

    def __call__(self, batch: pa.Table) -> pa.Table:
        images = [Image.open(io.BytesIO(data)).convert("RGB") for data in batch["image"].to_pylist()]
        boxes = batch["boxes"].to_pylist()
        features = self.model.encode_image(self._encode(images))
        slots = max(1, max(len(b) for b in boxes))
        box_tensor = torch.zeros(len(images), slots, 4)
        box_mask = torch.zeros(len(images), slots, dtype=torch.bool)
        for i, image_boxes in enumerate(boxes):
            if image_boxes:
                box_tensor[i, : len(image_boxes)] = torch.tensor(image_boxes)
                box_mask[i, : len(image_boxes)] = True
        regions = pool_regions(features.dense, box_tensor, box_mask)
        crops = [image.crop((x0 * image.width, y0 * image.height, max(x1 * image.width, x0 * image.width + 1),
                             max(y1 * image.height, y0 * image.height + 1)))
                 for image, image_boxes in zip(images, boxes) for x0, y0, x1, y1 in image_boxes]
        crop_features = self.model.encode_image(self._encode(crops), dense=False).global_ if crops else None
        captions = batch["captions"].to_pylist()
        flat = [caption for per_image in captions for caption in per_image]
        text_features = self.model.encode_text(self.tokenizer(flat))[0] if flat else None
        region_lists, crop_lists, text_lists, box_offset, text_offset = [], [], [], 0, 0
        for i, (image_boxes, image_captions) in enumerate(zip(boxes, captions)):
            region_lists.append(regions[i, : len(image_boxes)].tolist())
            crop_lists.append(crop_features[box_offset: box_offset + len(image_boxes)].tolist() if image_boxes else [])
            text_lists.append(text_features[text_offset: text_offset + len(image_captions)].tolist()
                              if image_captions else [])
            box_offset += len(image_boxes)
            text_offset += len(image_captions)
        nested = pa.list_(pa.list_(pa.float32()))
        return pa.table({"image_features": pa.array(features.global_.tolist(), pa.list_(pa.float32())),
                         "region_features": pa.array(region_lists, nested),
                         "crop_features": pa.array(crop_lists, nested),
                         "text_features": pa.array(text_lists, nested)})


@dataclass
class Embeddings:
    images: torch.Tensor  # (N, D)
    texts: torch.Tensor  # (T, D)
    text_to_image: torch.Tensor  # (T,)
    regions: torch.Tensor  # (M, D) RoIAlign on the dense map
    crops: torch.Tensor  # (M, D) crop-and-encode
    labels: torch.Tensor  # (M,) category ids


def _stack(dataset: ray.data.Dataset, column: str, nested: bool = False) -> torch.Tensor:
    values = [v for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None)
              for v in batch[column].to_pylist()]
    if nested:
        values = [v for per_image in values for v in per_image]
    return torch.tensor(values, dtype=torch.float32)


def embed(eval_set: EvalSet, model: ModelConfig, batch_size: int = 64, actors: int = 1) -> Embeddings:
    """Embed every image, box and caption of the set in one Ray Data actor pool (order preserved)."""
    rows = eval_set.rows
    chunks = [rows.slice(i, batch_size) for i in range(0, rows.num_rows, batch_size)]
    dataset = ray.data.from_arrow(chunks).map_batches(
        Embedder, batch_format="pyarrow", batch_size=batch_size, compute=ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"model": model})
    dataset.context.execution_options.preserve_order = True
    report_progress_to_log(dataset)
    dataset = dataset.materialize()
    text_to_image = [i for i, per_image in enumerate(rows["captions"].to_pylist()) for _ in per_image]
    return Embeddings(
        images=_stack(dataset, "image_features"),
        texts=_stack(dataset, "text_features", nested=True),
        text_to_image=torch.tensor(text_to_image, dtype=torch.long),
        regions=_stack(dataset, "region_features", nested=True),
        crops=_stack(dataset, "crop_features", nested=True),
        labels=torch.tensor([label for per_image in rows["labels"].to_pylist() for label in per_image], dtype=torch.long),
    )

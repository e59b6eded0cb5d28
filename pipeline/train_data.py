"""Prepared Parquet -> model batches, as a Ray Data stage feeding Ray Train workers.

Decoding, resizing, box remapping and slot padding all happen here, in Ray Data tasks, so the
training step only moves ready tensors. Images are centre-cropped to a square and resized to the
model's size (open_clip's eval transform); boxes are remapped into the crop, clipped, and dropped
when less than `MIN_BOX_SIDE` of them is left.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.fs as pafs
import ray.data
from PIL import Image

from harmoclip.batch import stable_key
from harmoclip.model import register_tiny_configs
from harmoclip.storage import join, resolve

from .prepare import DATASET_FILE, SCHEMA_VERSION

MIN_BOX_SIDE = 0.02
LEXEME_KEY_FIELD = {"root_lemma": "lemma", "phrase_lemma": "phrase_lemma"}


class DatasetError(ValueError):
    """The prepared dataset is missing, unfinished, or was made for another model."""


def read_dataset_manifest(uri: str) -> dict[str, Any]:
    filesystem, path = resolve(join(uri, DATASET_FILE))
    try:
        with filesystem.open_input_stream(path) as stream:
            manifest = json.loads(stream.read())
    except FileNotFoundError as err:
        raise DatasetError(f"{uri} has no {DATASET_FILE}: not a prepared dataset, or its preparation did not "
                           "finish (run python -m jobs.prepare)") from err
    except OSError as err:
        raise DatasetError(f"cannot read {uri}/{DATASET_FILE}: {err}") from err
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(f"{uri}: schema version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}")
    return manifest


def shard_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    filesystem, path = resolve(uri)
    files = sorted(info.path for info in filesystem.get_file_info(pafs.FileSelector(path))
                   if info.base_name.startswith("part-") and info.base_name.endswith(".parquet"))
    if not files:
        raise DatasetError(f"{uri} has no part-*.parquet shards (0 rows were written?)")
    return filesystem, files


@dataclass(frozen=True)
class BatchSpec:
    """What the model needs from a row: fixed sizes, normalisation, lexeme keys."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_regions: int
    max_lexemes: int
    context_length: int
    negative_key: str = "root_lemma"
    lexeme_tokenizer: Optional[str] = None  # set for the separate_text lexeme mode


def crop_window(width: int, height: int) -> tuple[float, float, float, float]:
    """The centred square crop as normalised (x0, y0, w, h) of the original image."""
    side = min(width, height)
    return (width - side) / 2 / width, (height - side) / 2 / height, side / width, side / height


def remap_boxes(regions: list[dict], window: tuple[float, float, float, float], limit: int) -> np.ndarray:
    """Normalised original-image boxes -> boxes of the crop; clipped; tiny leftovers dropped."""
    if not regions:
        return np.zeros((0, 4), np.float32)
    x0, y0, w, h = window
    boxes = np.array([[r["x0"], r["y0"], r["x1"], r["y1"]] for r in regions], np.float64)
    boxes = np.clip((boxes - [x0, y0, x0, y0]) / [w, h, w, h], 0.0, 1.0)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIDE)
    return boxes[keep][:limit].astype(np.float32)


def load_pixels(image_bytes: bytes, spec: BatchSpec) -> np.ndarray:
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    x0, y0, w, h = crop_window(image.width, image.height)
    left, top = round(x0 * image.width), round(y0 * image.height)
    side = min(image.width, image.height)
    image = image.crop((left, top, left + side, top + side)).resize((spec.image_size, spec.image_size),
                                                                     Image.Resampling.BICUBIC)
    pixels = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
    return (pixels - np.array(spec.mean, np.float32)[:, None, None]) / np.array(spec.std, np.float32)[:, None, None]


def to_model_batch(batch: pa.Table, spec: BatchSpec) -> dict[str, np.ndarray]:
    """Ray Data stage: prepared rows -> the fixed-size arrays of `HarmoCLIP.forward`."""
    rows = batch.select(["image", "width", "height", "tokens", "lexemes", "regions"]).to_pylist()
    n, k, l = len(rows), spec.max_regions, spec.max_lexemes
    out = {
        "images": np.zeros((n, 3, spec.image_size, spec.image_size), np.float32),
        "tokens": np.zeros((n, spec.context_length), np.int64),
        "boxes": np.zeros((n, k, 4), np.float32),
        "box_mask": np.zeros((n, k), bool),
        "lexeme_spans": np.zeros((n, l, 2), np.int64),
        "lexeme_mask": np.zeros((n, l), bool),
        "lexeme_keys": np.zeros((n, l), np.int64),
    }
    lexeme_texts: list[list[str]] = []
    key_field = LEXEME_KEY_FIELD[spec.negative_key]
    for i, row in enumerate(rows):
        out["images"][i] = load_pixels(row["image"], spec)
        out["tokens"][i] = row["tokens"]
        boxes = remap_boxes(row["regions"], crop_window(row["width"], row["height"]), k)
        out["boxes"][i, : len(boxes)] = boxes
        out["box_mask"][i, : len(boxes)] = True
        lexemes = row["lexemes"][:l]
        for j, lexeme in enumerate(lexemes):
            out["lexeme_spans"][i, j] = (lexeme["tok_start"], lexeme["tok_end"])
            out["lexeme_keys"][i, j] = stable_key(lexeme[key_field])
        out["lexeme_mask"][i, : len(lexemes)] = True
        lexeme_texts.append([lexeme["text"] for lexeme in lexemes] + [""] * (l - len(lexemes)))
    if spec.lexeme_tokenizer:
        register_tiny_configs()
        tokenizer = open_clip.get_tokenizer(spec.lexeme_tokenizer)
        flat = [text for texts in lexeme_texts for text in texts]
        out["lexeme_tokens"] = tokenizer(flat).numpy().reshape(n, l, -1) if n else np.zeros((0, l, spec.context_length), np.int64)
    return out


def training_dataset(uri: str, spec: BatchSpec, batch_size: int) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """The prepared dataset at `uri` as a lazy Ray Dataset of model batches, plus its dataset.json."""
    manifest = read_dataset_manifest(uri)
    prepared_context = manifest["tokenizer"]["context_length"]
    if prepared_context != spec.context_length:
        raise DatasetError(f"{uri} was tokenized with context length {prepared_context} "
                           f"({manifest['tokenizer']['model']}), the model needs {spec.context_length}: "
                           f"re-run jobs.prepare with --tokenizer <model>")
    filesystem, files = shard_files(uri)
    dataset = ray.data.read_parquet(files, filesystem=filesystem).map_batches(
        to_model_batch, batch_format="pyarrow", batch_size=batch_size, fn_kwargs={"spec": spec})
    return dataset, manifest

"""Prepared Parquet -> model batches, read and decoded by Ray Data tasks for one training worker.

`pipeline.sampling` decides which rows a worker trains on and in which order; here Ray Data reads
exactly those rows (one task per shuffle window, each row group read once), decodes them and
builds the fixed-size arrays, so the training step only moves ready tensors. Images are
centre-cropped to a square and resized to the model's size (open_clip's eval transform); boxes are
remapped into the crop, clipped, and dropped when less than `MIN_BOX_SIDE` of them is left.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator, Optional

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch
from PIL import Image
from spacy.lang.en.stop_words import STOP_WORDS

from harmoclip.batch import stable_key
from harmoclip.model import register_tiny_configs
from harmoclip.storage import join, resolve
from harmoclip.validation import check_boxes, check_lexeme_spans

from . import report_progress_to_log
from .dataset import DatasetError, read_dataset_manifest, shard_files
from .sampling import DatasetIndex, Schedule, build_index

MIN_BOX_SIDE = 0.02
LEXEME_KEY_FIELD = {"root_lemma": "lemma", "phrase_lemma": "phrase_lemma"}
TRAINING_COLUMNS = ["image_id", "image", "width", "height", "tokens", "lexemes", "regions"]
ANCHOR_COLUMNS = ["anchor_image_features", "anchor_text_features"]  # written by pipeline.anchor_targets


@dataclass(frozen=True)
class BatchSpec:
    """What the model needs from a row: fixed sizes, normalisation, lexeme keys."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_regions: int
    max_lexemes: int
    context_length: int
    tokenizer: str  # open_clip model name whose tokenizer made `tokens`
    negative_key: str = "root_lemma"
    lexeme_unit: str = "noun_chunk"
    separate_text: bool = False  # also tokenize each lexeme as its own text
    anchor_targets: Optional[str] = None  # GR anchor targets folder (pipeline.anchor_targets), read with the rows

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


@lru_cache(maxsize=4)
def _tokenizer(name: str):
    register_tiny_configs()
    return open_clip.get_tokenizer(name)


def content_words(lexeme: dict, tokenizer_name: str) -> list[dict]:
    """A noun chunk's content words as lexemes of their own ('large red circle' -> large, red,
    circle), each with its BPE span and keyed by its lemma; spaCy stop words ('two', 'top') are
    left out. The tokenizer splits text into words before BPE, so a word's tokens are the ones it
    gets alone. A chunk whose words and lemmas do not line up stays one lexeme (root-keyed)."""
    words, lemmas = lexeme["text"].split(), lexeme["phrase_lemma"].split()
    lengths = [len(_tokenizer(tokenizer_name).encode(word)) for word in words]
    if len(words) != len(lemmas) or sum(lengths) != lexeme["tok_end"] - lexeme["tok_start"]:
        return [{**lexeme, "key": lexeme["lemma"]}]
    units, start = [], lexeme["tok_start"]
    for word, lemma, length in zip(words, lemmas, lengths):
        if lemma.isalpha() and lemma not in STOP_WORDS and length:
            units.append({"text": word, "key": lemma, "tok_start": start, "tok_end": start + length})
        start += length
    return units


def lexeme_units(lexemes: list[dict], spec: BatchSpec) -> list[dict]:
    """The row's lexemes as the method's units, each with its negative `key`."""
    if spec.lexeme_unit == "word":
        return [unit for lexeme in lexemes for unit in content_words(lexeme, spec.tokenizer)]
    return [{**lexeme, "key": lexeme[LEXEME_KEY_FIELD[spec.negative_key]]} for lexeme in lexemes]


def to_model_batch(batch: pa.Table, spec: BatchSpec) -> dict[str, np.ndarray]:
    """Prepared rows -> the fixed-size arrays of `HarmoCLIP.forward` (plus `image_ids`)."""
    rows = batch.select(TRAINING_COLUMNS).to_pylist()  # (anchor target columns are read as arrays below)
    n, k, l = len(rows), spec.max_regions, spec.max_lexemes
    out = {
        "images": np.zeros((n, 3, spec.image_size, spec.image_size), np.float32),
        "tokens": np.zeros((n, spec.context_length), np.int64),
        "image_ids": np.zeros(n, np.int64),
        "boxes": np.zeros((n, k, 4), np.float32),
        "box_mask": np.zeros((n, k), bool),
        "lexeme_spans": np.zeros((n, l, 2), np.int64),
        "lexeme_mask": np.zeros((n, l), bool),
        "lexeme_keys": np.zeros((n, l), np.int64),
        "lexemes_over_cap": np.zeros(n, np.int64),  # lexeme units cut by max_lexemes (counted, not trained on)
    }
    if spec.anchor_targets:
        for name in ANCHOR_COLUMNS:
            column = batch.column(name).combine_chunks()
            out[name] = column.flatten().to_numpy().reshape(n, column.type.list_size)
    lexeme_texts: list[list[str]] = []
    for i, row in enumerate(rows):
        out["images"][i] = load_pixels(row["image"], spec)
        out["tokens"][i] = row["tokens"]
        out["image_ids"][i] = stable_key(row["image_id"])
        boxes = remap_boxes(row["regions"], crop_window(row["width"], row["height"]), k)
        out["boxes"][i, : len(boxes)] = boxes
        out["box_mask"][i, : len(boxes)] = True
        units = lexeme_units(row["lexemes"], spec)
        out["lexemes_over_cap"][i] = max(0, len(units) - l)
        units = units[:l]
        for j, unit in enumerate(units):
            out["lexeme_spans"][i, j] = (unit["tok_start"], unit["tok_end"])
            out["lexeme_keys"][i, j] = stable_key(unit["key"])
        out["lexeme_mask"][i, : len(units)] = True
        lexeme_texts.append([unit["text"] for unit in units] + [""] * (l - len(units)))
    # The model's own checks would read back from the GPU on every step; here they cost nothing,
    # and an error can name the prepared row's image.
    image_names = [str(row["image_id"]) for row in rows]
    check_boxes(torch.from_numpy(out["boxes"]), torch.from_numpy(out["box_mask"]), image_names)
    if spec.separate_text:
        flat = [text for texts in lexeme_texts for text in texts]
        out["lexeme_tokens"] = (_tokenizer(spec.tokenizer)(flat).numpy().reshape(n, l, -1) if n
                                else np.zeros((0, l, spec.context_length), np.int64))
    else:
        check_lexeme_spans(torch.from_numpy(out["lexeme_spans"]), torch.from_numpy(out["lexeme_mask"]),
                           torch.from_numpy(out["tokens"]), image_names)
    return out


def check_compatible(uri: str, manifest: dict[str, Any], spec: BatchSpec) -> None:
    prepared_context = manifest["tokenizer"]["context_length"]
    if prepared_context != spec.context_length:
        raise DatasetError(f"{uri} was tokenized with context length {prepared_context} "
                           f"({manifest['tokenizer']['model']}), the model needs {spec.context_length}: "
                           f"re-run jobs.prepare with --tokenizer <model>")


def training_index(uri: str, spec: BatchSpec) -> tuple[DatasetIndex, dict[str, Any]]:
    """The prepared dataset's index for `pipeline.sampling`, and its dataset.json."""
    manifest = read_dataset_manifest(uri)
    check_compatible(uri, manifest, spec)
    filesystem, files = shard_files(uri)
    return build_index(filesystem, files), manifest


def read_window(item: pa.Table, data: str, files: tuple[str, ...], spec: BatchSpec,
                batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: the rows of one shuffle window, in plan order, as model batches.

    Each row group the window touches is read once (only the columns training needs)."""
    filesystem, _ = resolve(data)
    window = item.to_pylist()[0]
    file_of, group_of, row_of = (np.asarray(window[key]) for key in ("file", "group", "row"))
    parts, positions = [], []
    for file_number in np.unique(file_of):
        groups = np.unique(group_of[file_of == file_number])
        tables, shape = _read_groups(filesystem, files[file_number], groups, TRAINING_COLUMNS)
        if spec.anchor_targets:  # the mirror shard: same row groups, same rows
            targets = _read_mirror_groups(filesystem, files[file_number], shape, spec.anchor_targets, groups)
            tables = [pa.Table.from_arrays(t.columns + a.columns, t.column_names + a.column_names)
                      for t, a in zip(tables, targets)]
        for group, table in zip(groups, tables):
            wanted = np.flatnonzero((file_of == file_number) & (group_of == group))
            parts.append(table.take(pa.array(row_of[wanted])))
            positions.append(wanted)
    rows = pa.concat_tables(parts).take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))
    for start in range(0, rows.num_rows, batch_size):
        yield to_model_batch(rows.slice(start, batch_size), spec)


def _read_groups(filesystem, path: str, groups: np.ndarray, columns: list[str]) -> tuple[list[pa.Table], list[int]]:
    """Row groups `groups` of one Parquet file, each read once, only `columns`; and the rows of
    every row group of the file (its shape, which an anchor-targets mirror must have)."""
    with filesystem.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        shape = [group.num_rows for group in _row_groups(parquet.metadata)]
        return [parquet.read_row_group(int(group), columns=list(columns)) for group in groups], shape


def _read_mirror_groups(filesystem, shard: str, shape: list[int], folder: str, groups: np.ndarray) -> list[pa.Table]:
    """Row groups `groups` of `shard`'s mirror in the anchor targets `folder`, refused unless the
    mirror has exactly the shard's row groups, `shape` (targets made before the data was re-prepared)."""
    mirror = join(folder, shard.rsplit("/", 1)[-1])
    with filesystem.open_input_file(resolve(mirror)[1]) as handle:
        parquet = pq.ParquetFile(handle)
        if [group.num_rows for group in _row_groups(parquet.metadata)] != shape:
            raise DatasetError(f"{mirror} does not mirror {shard} row for row: stale anchor targets, delete {folder}")
        return [parquet.read_row_group(int(group), columns=ANCHOR_COLUMNS) for group in groups]


def _row_groups(metadata: pq.FileMetaData) -> list[pq.RowGroupMetaData]:
    return [metadata.row_group(i) for i in range(metadata.num_row_groups)]


def worker_batches(data: str, index: DatasetIndex, schedule: Schedule, rank: int, start_step: int, end_step: int,
                   spec: BatchSpec) -> ray.data.Dataset:
    """Worker `rank`'s batches for steps [start_step, end_step), across epochs, as one lazy,
    order-preserving Ray Dataset: one read task per shuffle window, each yielding whole batches
    of `schedule.batch_size` rows."""
    windows = [{"file": index.file_of_row[rows].tolist(), "group": index.group_of_row[rows].tolist(),
                "row": index.row_in_group[rows].tolist()}
               for rows in schedule.windows(rank, start_step, end_step)]
    dataset = ray.data.from_items(windows, override_num_blocks=max(1, len(windows))).map_batches(
        read_window, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"data": data, "files": index.files, "spec": spec, "batch_size": schedule.batch_size})
    dataset.context.execution_options.preserve_order = True
    return report_progress_to_log(dataset)

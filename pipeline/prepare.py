"""The preparation pipeline: image rows -> decode -> regions -> one row per caption -> lexemes -> Parquet.

Streaming: the prepared rows pass through this process once, block by block, as Ray Data's
streaming executor hands them on (`write_prepared`): each block goes into the shards, the rejects
file and the counts, then is dropped. Nothing is materialized, so the job holds a few blocks and a
few numbers whatever the size of the input, and the blocks already written are released (with the
lineage Ray keeps to rebuild them) as it goes.

Determinism: every caption row carries `row`, its position in the source (images in the order
`pipeline.shards.image_rows` numbers them, a function of the input alone; each image's captions
in order). Blocks are put back in `row` order (`InOrder`) before anything is written, and this
process writes the shards itself, `part-00000-0.parquet`, ... of `rows_per_shard` rows, so the bytes
are a function of the input and config alone, whatever the number of actors or the load. (Ray
Data's Parquet writer is not used: it hands each shard to
`pyarrow.dataset.write_dataset(use_threads=True)`, which writes a table's record batches in
whatever order its threads finish.) A destination that already holds anything is refused unless
`overwrite`, which deletes it first; `dataset.json` is written last, so a dataset without it is
incomplete (a run that fails half-way leaves the shards written so far, and no `dataset.json`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from typing import Any, Iterable

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
import spacy
from ray.data import ActorPoolStrategy

from harmoclip.config import PrepareConfig
from harmoclip.model import register_tiny_configs
from harmoclip.storage import is_remote, join, resolve

from .images import decode_stage
from .lexemes import LEXEME_TYPE, LexemeParser
from .regions import GT_BOX_TYPE, REGION_TYPE, region_stage
from .shards import image_rows
from .sources import Source, SourceError, blank_caption

SCHEMA_VERSION = 1
DATASET_FILE = "dataset.json"
REJECTS_DIR = "rejects"
REJECTS_ROW_GROUP = 10_000  # rows per row group of the rejects file
IMAGE_LEVEL_REASONS = {"unknown_image_id", "empty_image_path", "missing_image", "unreadable_image",
                       "empty_image_file", "corrupt_image", "zero_size_image", "too_many_pixels",
                       "fetch_timeout", "fetch_failed", "bad_annotation"}

SCHEMA_V1 = pa.schema([
    ("sample_id", pa.string()), ("image_id", pa.string()), ("image_uri", pa.string()),
    ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
    ("caption", pa.string()), ("caption_index", pa.int32()), ("tokens", pa.list_(pa.int32())),
    ("lexemes", pa.list_(LEXEME_TYPE)), ("regions", pa.list_(REGION_TYPE)), ("gt_boxes", pa.list_(GT_BOX_TYPE)),
])
REJECTS_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("image_id", pa.string()), ("image_uri", pa.string()),
    ("caption_index", pa.int32()), ("caption", pa.string()), ("stage", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()),
])
COUNTER_COLUMNS = ("boxes_clipped", "boxes_dropped", "lexemes_truncated")
ROW = "row"  # a caption row's position among all the source's caption rows: the order of everything written


class DestinationError(ValueError):
    """The output location cannot be used (already holds data, or unreachable)."""


def explode_stage(batch: pa.Table) -> pa.Table:
    """Image rows -> one row per caption. Image-level counters go to the first caption's row only,
    so summing a column over the output counts each image once."""
    rows = []
    for image in batch.to_pylist():
        for n, caption in enumerate(image["captions"]):
            text = caption["caption"]
            reason, detail = image["reject_reason"], image["reject_detail"]
            if reason is None:
                reason, detail = blank_caption(text) or (None, None)
            rows.append({
                "sample_id": caption["sample_id"], "image_id": image["image_key"], "image_uri": image["image_uri"],
                "image": None if reason else image["image"], "width": image["width"], "height": image["height"],
                "caption": text, "caption_index": caption["caption_index"],
                "regions": image["regions"], "gt_boxes": image["gt_boxes"],
                "boxes_clipped": image["boxes_clipped"] if n == 0 else 0,
                "boxes_dropped": image["boxes_dropped"] if n == 0 else 0,
                "reject_reason": reason, "reject_detail": detail, ROW: image["first_row"] + n,
            })
    schema = pa.schema([f for f in SCHEMA_V1 if f.name not in ("tokens", "lexemes")]
                       + [pa.field("boxes_clipped", pa.int32()), pa.field("boxes_dropped", pa.int32()),
                          pa.field("reject_reason", pa.string()), pa.field("reject_detail", pa.string()),
                          pa.field(ROW, pa.int64())])
    return pa.Table.from_pylist(rows, schema=schema)


class ShardWriter:
    """Tables in, `DIR/part-00000<suffix>.parquet`, ... of `rows_per_shard` rows each out, in the
    order they came in, each file written whole by `pq.write_table` (one writer, so its bytes
    depend only on its rows)."""

    def __init__(self, uri: str, rows_per_shard: int, suffix: str = "", row_group_size: int | None = None) -> None:
        self.filesystem, self.path = resolve(uri)
        self.rows_per_shard, self.suffix, self.row_group_size = rows_per_shard, suffix, row_group_size
        self.pending, self.shards = [], 0

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        buffered = pa.concat_tables(self.pending)
        while buffered.num_rows >= self.rows_per_shard:
            self._flush(buffered.slice(0, self.rows_per_shard))
            buffered = buffered.slice(self.rows_per_shard)
        self.pending = [buffered] if buffered.num_rows else []

    def close(self) -> int:
        if self.pending:
            self._flush(pa.concat_tables(self.pending))
            self.pending = []
        return self.shards

    def _flush(self, table: pa.Table) -> None:
        if self.shards == 0:
            self.filesystem.create_dir(self.path, recursive=True)
        pq.write_table(table, f"{self.path}/part-{self.shards:05d}{self.suffix}.parquet", filesystem=self.filesystem,
                       row_group_size=self.row_group_size)
        self.shards += 1


class InOrder:
    """Put a stream of tables back in order: each row's `column` holds its position 0, 1, 2, ...
    in the output. `add` returns the rows that are now next, in position order (without the
    column), and holds back only those behind a gap; a stream already in order passes straight
    through. So what is written is a function of the positions alone, not of arrival order."""

    def __init__(self, column: str) -> None:
        self.column, self.pending, self.next = column, [], 0

    def add(self, table: pa.Table) -> pa.Table:
        self.pending.append(table)
        buffered = pa.concat_tables(self.pending)
        buffered = buffered.take(pc.sort_indices(buffered[self.column]))
        positions = buffered[self.column].to_numpy()
        # Positions are unique, so sorted ones run next, next + 1, ... up to the first gap.
        ready = int(np.count_nonzero(positions == np.arange(self.next, self.next + len(positions))))
        self.next += ready
        self.pending = [buffered.slice(ready)] if ready < buffered.num_rows else []
        return buffered.slice(0, ready).drop_columns([self.column])

    def close(self, expected: int) -> None:
        if self.pending or self.next != expected:
            raise RuntimeError(f"{self.column}: {self.next} of {expected} rows came back in order, "
                               f"{sum(t.num_rows for t in self.pending)} held behind a gap")


def check_destination(out: str, overwrite: bool) -> None:
    """Fail fast (seconds) on an unreachable store, a missing bucket, or a non-empty destination."""
    try:
        filesystem, path = resolve(out)
        if is_remote(out):
            bucket = path.split("/", 1)[0]
            if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise DestinationError(f"{out}: bucket {bucket!r} does not exist")
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.File:
            raise DestinationError(f"{out} is a file; --out must be a directory")
        if info.type == pafs.FileType.Directory:
            existing = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
            if existing and not overwrite:
                what = "a prepared dataset" if any(i.base_name == DATASET_FILE for i in existing) else "files"
                raise DestinationError(f"{out} already holds {what}; choose a new --out or pass --overwrite "
                                       "(which deletes it first, so old and new shards never mix)")
            if existing:
                filesystem.delete_dir(path)
    except OSError as err:
        raise DestinationError(f"cannot use {out}: {err}") from err


class Tally:
    """The counts of `dataset.json`, kept as the caption rows stream past in `row` order: a few
    numbers, whatever the size of the input (an image's captions are consecutive rows, so a new
    image among the written rows is a change of `image_id`)."""

    def __init__(self, rows_in: int) -> None:
        self.rows_in, self.rows_written, self.images_written = rows_in, 0, 0
        self.reasons: Counter = Counter()
        self.lexemes = self.captions_without_lexemes = self.regions = 0
        self.counters = dict.fromkeys(COUNTER_COLUMNS, 0)
        self.last_image: str | None = None

    def add(self, rows: pa.Table, accepted: pa.Table) -> None:
        """`rows`: the next caption rows, all of them; `accepted`: those without a reject reason."""
        self.reasons.update(r for r in rows["reject_reason"].to_pylist() if r)
        for name in COUNTER_COLUMNS:
            self.counters[name] += int(pc.sum(rows[name]).as_py() or 0)
        lexeme_counts = pc.list_value_length(accepted["lexemes"]).fill_null(0).to_numpy()
        self.rows_written += accepted.num_rows
        self.lexemes += int(lexeme_counts.sum())
        self.captions_without_lexemes += int((lexeme_counts == 0).sum())
        self.regions += int(pc.sum(pc.list_value_length(accepted["regions"])).as_py() or 0)
        for image_id in accepted["image_id"].to_pylist():
            self.images_written += image_id != self.last_image
            self.last_image = image_id

    def counts(self) -> dict[str, Any]:
        return {
            "rows_in": self.rows_in, "rows_written": self.rows_written, "rows_rejected": sum(self.reasons.values()),
            "rejected_by_reason": dict(sorted(self.reasons.items())), "images_written": self.images_written,
            "lexemes": self.lexemes, "captions_without_lexemes": self.captions_without_lexemes,
            "regions": self.regions, **self.counters,
        }


class RejectsWriter:
    """Rejected caption rows in, `rejects/rejects-00000.parquet` out, written as they come in row
    groups of `REJECTS_ROW_GROUP` rows: one file however many rows are rejected, its bytes a
    function of the rows alone, and never more than a row group of them held here."""

    def __init__(self, out: str) -> None:
        filesystem, path = resolve(join(out, REJECTS_DIR))
        filesystem.create_dir(path, recursive=True)
        self.file = pq.ParquetWriter(f"{path}/rejects-00000.parquet", REJECTS_SCHEMA, filesystem=filesystem)
        self.pending: list[pa.Table] = []

    def write(self, rejected: pa.Table) -> None:
        """`rejected`: caption rows (explode_stage's and the lexeme stage's columns) with a reason."""
        stage = ["image" if r in IMAGE_LEVEL_REASONS else "caption" for r in rejected["reject_reason"].to_pylist()]
        self.pending.append(pa.table({
            "sample_id": rejected["sample_id"], "image_id": rejected["image_id"], "image_uri": rejected["image_uri"],
            "caption_index": rejected["caption_index"], "caption": rejected["caption"],
            "stage": pa.array(stage, pa.string()), "reason": rejected["reject_reason"],
            "detail": rejected["reject_detail"]}, schema=REJECTS_SCHEMA))
        buffered = pa.concat_tables(self.pending)
        while buffered.num_rows >= REJECTS_ROW_GROUP:
            self.file.write_table(buffered.slice(0, REJECTS_ROW_GROUP).combine_chunks())
            buffered = buffered.slice(REJECTS_ROW_GROUP)
        self.pending = [buffered] if buffered.num_rows else []

    def close(self) -> None:
        if self.pending:
            self.file.write_table(pa.concat_tables(self.pending).combine_chunks())
        self.file.close()


def write_prepared(blocks: Iterable[pa.Table], out: str, config: PrepareConfig, rows_in: int) -> dict[str, Any]:
    """Prepared caption rows (with `row` and `reject_reason`), in blocks in any order -> the shards
    (`rows_per_shard` rows, a row group per `batch_size`) and the rejects, both in `row` order, as
    the blocks stream past; returns the counts. Only blocks behind a gap in `row` are held."""
    in_order = InOrder(ROW)
    shards = ShardWriter(out, config.rows_per_shard, suffix="-0", row_group_size=config.batch_size)
    rejects, tally = RejectsWriter(out), Tally(rows_in)
    for block in blocks:
        rows = in_order.add(block)
        accepted = rows.filter(pc.is_null(rows["reject_reason"]))
        tally.add(rows, accepted)
        shards.write(accepted.select(SCHEMA_V1.names).cast(SCHEMA_V1))
        rejects.write(rows.filter(pc.is_valid(rows["reject_reason"])))
    in_order.close(rows_in)  # every row came back exactly once: rows_written + rows_rejected == rows_in
    shards.close()
    rejects.close()
    return tally.counts()


def _context_length(tokenizer: str) -> int:
    register_tiny_configs()
    return open_clip.get_tokenizer(tokenizer).context_length


def _write_manifest(out: str, manifest: dict) -> None:
    filesystem, path = resolve(join(out, DATASET_FILE))
    with filesystem.open_output_stream(path) as stream:
        stream.write(json.dumps(manifest, indent=2, sort_keys=True).encode())


def prepare(source: Source, out: str, config: PrepareConfig, overwrite: bool = False) -> dict[str, Any]:
    """Run the pipeline on the current Ray cluster; returns the `dataset.json` content."""
    check_destination(out, overwrite)
    images = image_rows(source, config.proposals, config.batch_size)
    rows_in = images.rows_in
    if rows_in == 0:
        raise SourceError(f"{source.captions}: no captions found")

    dataset = (
        images.dataset
        .map_batches(decode_stage, batch_format="pyarrow", batch_size=config.batch_size,
                     fn_kwargs={"max_pixels": config.max_pixels, "max_side": config.max_side,
                                "image_format": config.image_format, "fetch_timeout": config.fetch_timeout,
                                "fetch_retries": config.fetch_retries})
        .map_batches(region_stage, batch_format="pyarrow", batch_size=config.batch_size,
                     fn_kwargs={"config": config})
        .map_batches(explode_stage, batch_format="pyarrow", batch_size=config.batch_size)
        .map_batches(LexemeParser, batch_format="pyarrow", batch_size=config.batch_size,
                     compute=ActorPoolStrategy(size=config.lexeme_actors),
                     fn_constructor_kwargs={"spacy_pipeline": config.spacy_pipeline,
                                            "tokenizer_name": config.tokenizer})
    )
    # The context this dataset was made with, which every stage above shares: blocks come back in
    # the order they were read (source order for a COCO folder or a manifest), so InOrder below has
    # little to hold back. The order written does not rest on it.
    dataset.context.execution_options.preserve_order = True
    counts = write_prepared(dataset.iter_batches(batch_format="pyarrow", batch_size=None), out, config, rows_in)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "source": {"captions": source.captions, "images": source.images, "instances": source.instances,
                   "kind": source.kind, "shards": len(source.shards)},
        "counts": counts,
        "tokenizer": {"model": config.tokenizer, "context_length": _context_length(config.tokenizer)},
        "spacy": {"pipeline": config.spacy_pipeline, "version": spacy.util.get_package_version(config.spacy_pipeline)},
        "regions": {"method": config.regions, "max_regions": config.max_regions,
                    "min_region_size": config.min_region_size, "proposals": config.proposals},
        "categories": [{"id": c["id"], "name": c["name"], **({"isthing": c["isthing"]} if "isthing" in c else {})}
                       for c in images.categories],
        "config": asdict(config),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_manifest(out, manifest)
    return manifest

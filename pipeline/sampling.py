"""Which prepared rows each training worker reads, in which order, every epoch: a pure function.

A prepared dataset has one row per (image, caption), an image's captions next to each other.
Training must draw *images*: an epoch holds every image once, with one of its captions chosen by
the seed, so no batch (on any worker) holds two captions of one image. And the order must never
depend on timing or load: it is computed here, from (seed, epoch, number of workers) and the
dataset's index alone, before any data is read. Ray Data then only reads and decodes what the
plan names (`pipeline.train_data.worker_batches`).

How an epoch is laid out (all draws from one `numpy.random.Generator` seeded with (seed, epoch)):
1. each image's caption row is drawn uniformly among its rows;
2. the dataset is cut into pieces (row groups of the Parquet shards, split further on small data
   so every worker gets several) and the pieces are shuffled;
3. pieces are dealt to workers in turn, so each worker reads its own pieces and nothing twice;
4. each worker's chosen rows are shuffled within windows of `shuffle_window` rows;
5. every worker trains `steps` batches of `batch_size` (the smallest worker's count), so all
   workers run the same number of steps and DDP never waits on a worker that ran out.
Resuming at step k of an epoch skips the first k batches by position, without reading them; a
worker reads all its remaining epochs as one stream of windows, so epochs follow each other
without a pause.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

# Pieces per worker to aim for on small data (a piece smaller than a row group re-reads it).
PIECES_PER_WORKER = 8


@dataclass(frozen=True)
class DatasetIndex:
    """Where every prepared row lives and which image it shows (a few bytes per row)."""

    files: tuple[str, ...]
    file_of_row: np.ndarray  # (R,) int32: index into files
    group_of_row: np.ndarray  # (R,) int32: row group within the file
    row_in_group: np.ndarray  # (R,) int64
    image_of_row: np.ndarray  # (R,) int64: image number, 0..images-1, in image id order

    @property
    def rows(self) -> int:
        return len(self.file_of_row)

    @property
    def images(self) -> int:
        return int(self.image_of_row.max()) + 1 if self.rows else 0


def build_index(filesystem: pafs.FileSystem, files: list[str]) -> DatasetIndex:
    """Read only the row-group layout and the `image_id` column of every shard."""
    file_of_row, group_of_row, row_in_group, image_ids = [], [], [], []
    for number, path in enumerate(files):
        with filesystem.open_input_file(path) as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.metadata.num_row_groups):
                count = parquet.metadata.row_group(group).num_rows
                file_of_row.append(np.full(count, number, np.int32))
                group_of_row.append(np.full(count, group, np.int32))
                row_in_group.append(np.arange(count, dtype=np.int64))
            image_ids.extend(parquet.read(columns=["image_id"])["image_id"].to_pylist())
    _, image_of_row = np.unique(np.array(image_ids, dtype=object).astype(str), return_inverse=True)
    concat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
    return DatasetIndex(tuple(files), concat(file_of_row, np.int32), concat(group_of_row, np.int32),
                        concat(row_in_group, np.int64), image_of_row.astype(np.int64))


@dataclass(frozen=True)
class EpochPlan:
    """One epoch: per worker, the prepared rows it trains on in order (`steps * batch_size` each)."""

    epoch: int
    steps: int
    rows: tuple[np.ndarray, ...]  # per worker: row numbers of the index, in training order
    window_rows: int  # rows shuffled together: a multiple of the batch size

    def batches(self, rank: int, batch_size: int, start_step: int = 0) -> np.ndarray:
        """Row numbers of worker `rank`'s batches from `start_step` on, shape (steps - start, B)."""
        return self.rows[rank][start_step * batch_size:].reshape(-1, batch_size)


def _pieces(index: DatasetIndex, world_size: int) -> np.ndarray:
    """A piece number for every row: row groups, split into equal parts on small datasets."""
    group_key = index.file_of_row.astype(np.int64) * (1 << 31) + index.group_of_row
    _, group_of_row = np.unique(group_key, return_inverse=True)
    piece_rows = max(1, index.rows // (PIECES_PER_WORKER * world_size))
    within = index.row_in_group // piece_rows
    return np.unique(group_of_row.astype(np.int64) * (1 << 31) + within, return_inverse=True)[1]


def epoch_plan(index: DatasetIndex, seed: int, epoch: int, world_size: int, batch_size: int,
               shuffle_window: int) -> EpochPlan:
    """The plan of one epoch (see the module docstring); identical on every worker and every run.
    `shuffle_window` is rounded up to whole batches, so a window always yields full batches."""
    window = -(-shuffle_window // batch_size) * batch_size
    rng = np.random.default_rng([seed, epoch])
    # 1. One caption row per image. Rows of an image are contiguous after a stable sort by image.
    by_image = np.argsort(index.image_of_row, kind="stable")
    counts = np.bincount(index.image_of_row, minlength=index.images)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    chosen = np.zeros(index.rows, bool)
    chosen[by_image[first + rng.integers(0, counts)]] = True
    # 2-3. Pieces shuffled, then dealt to workers in turn.
    piece_of_row = _pieces(index, world_size)
    order = rng.permutation(int(piece_of_row.max()) + 1)
    rank_of_piece = np.empty_like(order)
    rank_of_piece[order] = np.arange(len(order)) % world_size
    position_of_piece = np.empty_like(order)
    position_of_piece[order] = np.arange(len(order))
    per_worker = []
    for rank in range(world_size):
        mine = np.flatnonzero(chosen & (rank_of_piece[piece_of_row] == rank))
        mine = mine[np.argsort(position_of_piece[piece_of_row[mine]], kind="stable")]
        # 4. Shuffle within windows.
        for start in range(0, len(mine), window):
            mine[start:start + window] = rng.permutation(mine[start:start + window])
        per_worker.append(mine)
    # 5. The same number of full batches on every worker.
    steps = min(len(rows) for rows in per_worker) // batch_size
    return EpochPlan(epoch, steps, tuple(rows[:steps * batch_size] for rows in per_worker), window)


@dataclass(frozen=True)
class Schedule:
    """Global step -> (epoch, step within the epoch), from the plans' step counts."""

    index: DatasetIndex
    seed: int
    world_size: int
    batch_size: int
    shuffle_window: int

    def plan(self, epoch: int) -> EpochPlan:
        return epoch_plan(self.index, self.seed, epoch, self.world_size, self.batch_size, self.shuffle_window)

    def steps_in_epochs(self, epochs: int) -> int:
        return sum(self.plan(epoch).steps for epoch in range(epochs))

    def locate(self, step: int) -> tuple[int, int]:
        """The epoch that global step `step` (0-based: steps already done) falls in, and its offset."""
        epoch = 0
        while True:
            steps = self.plan(epoch).steps
            if steps == 0:
                raise ValueError("an epoch has no full batch: fewer images than one global batch")
            if step < steps:
                return epoch, step
            step -= steps
            epoch += 1

    def epoch_starts(self, end_step: int) -> list[int]:
        """The global step (0-based) at which each epoch begins, for every epoch before `end_step`."""
        starts, step, epoch = [], 0, 0
        while step < end_step:
            starts.append(step)
            step += self.plan(epoch).steps
            epoch += 1
        return starts

    def windows(self, rank: int, start_step: int, end_step: int) -> Iterator[np.ndarray]:
        """Row numbers of worker `rank`'s shuffle windows covering steps [start_step, end_step) in
        order, across epochs; each window is whole batches of this worker's rows."""
        epoch, offset = self.locate(start_step)
        left = end_step - start_step
        while left > 0:
            plan = self.plan(epoch)
            batches = plan.batches(rank, self.batch_size, offset)[:left]
            rows = batches.reshape(-1)
            for start in range(0, len(rows), plan.window_rows):
                yield rows[start:start + plan.window_rows]
            left -= len(batches)
            epoch, offset = epoch + 1, 0

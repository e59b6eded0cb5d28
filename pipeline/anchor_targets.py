"""GR's anchor targets, computed once per prepared dataset instead of by a frozen model every step.

GR's `anchor` mode compares each step's global image and text embeddings with those the
*starting* model gives the same inputs. The training feed applies no random augmentation (a fixed
centre crop and resize, the stored tokens), so those targets are a fixed function of the row:
one Ray Data pass over the prepared shards computes them with the starting weights and writes
`DATA/anchor_targets/<identity>/part-*.parquet`, row for row and row group for row group the
mirror of the prepared shards, so the training reader fetches a row's targets with the same
(file, group, row) address as the row itself. `anchor.json`, written last, records what made
them: the starting weights' content hash, the model, the pixel pipeline and the prepared
dataset's manifest hash. Training reuses a folder only when all of these match; a folder whose
record differs (the dataset was re-prepared in place) is refused as stale.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import torch

from harmoclip import ModelConfig, create_clip
from harmoclip.storage import join, read_text, resolve, write_bytes

from . import report_progress_to_log
from .dataset import DatasetError
from .prepare import DATASET_FILE
from .train_data import ANCHOR_COLUMNS, BatchSpec, load_pixels

ANCHOR_FOLDER = "anchor_targets"
ANCHOR_FILE = "anchor.json"
ROWS_PER_FORWARD = 64


def weights_hash(clip: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and values): the same for the same
    weights however they were stored or named on disk."""
    digest = hashlib.sha256()
    for name, tensor in sorted(clip.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def anchor_identity(data: str, start: ModelConfig, spec: BatchSpec, clip: torch.nn.Module) -> dict[str, Any]:
    """Everything the targets depend on."""
    return {"weights_sha256": weights_hash(clip), "model": start.name, "image_size": spec.image_size,
            "mean": list(spec.mean), "std": list(spec.std), "context_length": spec.context_length,
            "dataset_sha256": hashlib.sha256(read_text(join(data, DATASET_FILE)).encode()).hexdigest()}


class _TargetWriter:
    """Ray Data actor: the starting model, loaded once; writes the targets of one shard per call."""

    def __init__(self, start: ModelConfig, seed: int, spec: BatchSpec, out: str, device: str) -> None:
        self.device = torch.device(device)
        self.clip = starting_clip(start, seed).eval().to(self.device)
        self.spec, self.out = spec, out

    def __call__(self, item: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        source = str(item["file"][0])
        filesystem, target_path = resolve(join(self.out, source.rsplit("/", 1)[-1]))
        rows = 0
        with filesystem.open_input_file(source) as handle:
            parquet = pq.ParquetFile(handle)
            with filesystem.open_output_stream(target_path) as stream:
                writer = None
                for group in range(parquet.num_row_groups):
                    table = self._targets(parquet.read_row_group(group, columns=["image", "tokens"]))
                    writer = writer or pq.ParquetWriter(stream, table.schema)
                    writer.write_table(table, row_group_size=max(1, table.num_rows))  # one group per source group
                    rows += table.num_rows
                if writer:
                    writer.close()
        return {"file": item["file"], "rows": np.array([rows])}

    @torch.no_grad()
    def _targets(self, table: pa.Table) -> pa.Table:
        images, texts = [], []
        for start in range(0, table.num_rows, ROWS_PER_FORWARD):
            chunk = table.slice(start, ROWS_PER_FORWARD).to_pydict()
            pixels = torch.from_numpy(np.stack([load_pixels(b, self.spec) for b in chunk["image"]])).to(self.device)
            tokens = torch.as_tensor(np.asarray(chunk["tokens"], np.int64)).to(self.device)
            images.append(self.clip.encode_image(pixels, normalize=True).float().cpu().numpy())
            texts.append(self.clip.encode_text(tokens, normalize=True).float().cpu().numpy())
        dim = self.clip.visual.output_dim
        arrays = [np.concatenate(part) if part else np.zeros((0, dim), np.float32) for part in (images, texts)]
        return pa.table({name: pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1])
                         for name, array in zip(ANCHOR_COLUMNS, arrays)})


def starting_clip(start: ModelConfig, seed: int) -> torch.nn.Module:
    """The starting model as a training worker builds it (random weights depend on the seed)."""
    torch.manual_seed(seed)
    return create_clip(start)


def ensure_anchor_targets(data: str, files: list[str], start: ModelConfig, seed: int, spec: BatchSpec,
                          gpu: bool = False) -> str:
    """The anchor targets of `data` for the starting weights `start`: reused when a folder with
    the same identity exists, else computed (one Ray Data task per shard). Returns the folder."""
    identity = anchor_identity(data, start, spec, starting_clip(start, seed))
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = join(data, ANCHOR_FOLDER, f"{start.name}-{key}")
    filesystem, path = resolve(join(folder, ANCHOR_FILE))
    if filesystem.get_file_info(path).type.name != "NotFound":
        recorded = json.loads(read_text(join(folder, ANCHOR_FILE)))
        if recorded["identity"] != identity:
            raise DatasetError(f"{folder} holds anchor targets made for other inputs "
                               f"({', '.join(k for k in identity if recorded['identity'].get(k) != identity[k])} "
                               f"differ): delete it to recompute")
        return folder
    print(f"computing GR anchor targets once for {len(files)} shard(s) of {data} (starting model {start.name}) "
          f"-> {folder}", flush=True)
    filesystem.create_dir(resolve(folder)[1], recursive=True)
    shards = ray.data.from_items([{"file": f} for f in files], override_num_blocks=len(files))
    written = report_progress_to_log(shards).map_batches(
        _TargetWriter, batch_size=1, compute=ray.data.ActorPoolStrategy(size=1), num_gpus=1 if gpu else 0,
        fn_constructor_kwargs={"start": start, "seed": seed, "spec": spec, "out": folder,
                               "device": "cuda" if gpu else "cpu"})
    rows = {str(row["file"]).rsplit("/", 1)[-1]: int(row["rows"]) for row in written.take_all()}
    write_bytes(join(folder, ANCHOR_FILE), json.dumps({"identity": identity, "rows": rows}, indent=2,
                                                      sort_keys=True).encode())
    return folder

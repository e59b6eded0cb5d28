"""Batch inference on Ray Data: model actors that embed decoded images (with their boxes) and
captions, and the two streams that run them.

An actor loads the model once and is fed by CPU decode tasks (pipeline.inference_data), so with
`--gpu` the GPU only runs the model while decoding scales over the cluster's CPUs. Embeddings
leave the actors as Arrow fixed-size lists: consumers read them as (rows, dim) arrays without a
Python list per number. A set of a few images can skip the actors: the `*_in_process` twins run
the same calls on the same batches in the calling process.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
import torch
from ray.data import ActorPoolStrategy

from harmoclip import HarmoCLIP, ModelConfig, create_clip
from harmoclip.config import InferenceConfig, PrepareConfig
from harmoclip.model import INFERENCE_METHOD, ImageFeatures, model_shape, pad_boxes, pool_regions
from harmoclip.pixels import normalise

from . import dataset_of
from .inference_data import InferenceInput, decode_stage

DTYPES = {"float32": (np.float32, pa.float32()), "float16": (np.float16, pa.float16())}


def embedding_type(dim: int, dtype: str = "float32") -> pa.DataType:
    return pa.list_(DTYPES[dtype][1], dim)


def to_arrow(features: torch.Tensor, dtype: str) -> pa.FixedSizeListArray:
    """(rows, dim) tensor -> fixed-size list array, one list per row."""
    values = features.float().cpu().numpy().astype(DTYPES[dtype][0]).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(values), features.shape[1])


def _in_place(values: pa.Array, accepted: list[bool]) -> pa.Array:
    """`values` (one per accepted row) spread over all rows, null where a row was rejected."""
    positions, next_value = [], 0
    for keep in accepted:
        positions.append(next_value if keep else None)
        next_value += keep
    return values.take(pa.array(positions, pa.int64()))


def to_numpy(column: pa.ChunkedArray | pa.Array, nested: bool = False) -> np.ndarray:
    """A fixed-size list column (or, `nested`, a list of them per row) -> (rows, dim) float32."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if nested:
        array = pc.list_flatten(array)
    dim = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


class _ModelActor:
    """One model per actor, on the GPU when Ray gave the actor one."""

    def __init__(self, model: ModelConfig, dtype: str, threads: int) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads)  # Ray would give the actor's torch one thread per logical CPU it holds
        self.model = HarmoCLIP(create_clip(model), INFERENCE_METHOD).eval().to(self.device)
        self.dtype, self.type = dtype, embedding_type(model_shape(model)[1], dtype)

    def _arrow(self, features: Optional[torch.Tensor]) -> pa.Array:
        return to_arrow(features, self.dtype) if features is not None else pa.array([], self.type)


class ImageEmbedder(_ModelActor):
    """Decoded image rows -> their global embedding and, for their boxes, RoIAlign region
    embeddings (and crop-and-encode embeddings when the rows carry crops). Rejected rows pass
    through with null embeddings."""

    def __init__(self, model: ModelConfig, regions: bool, crops: bool = False, dtype: str = "float32",
                 threads: int = 1) -> None:
        super().__init__(model, dtype, threads)
        preprocess = self.model.clip.visual.preprocess_cfg
        self.mean, self.std = preprocess["mean"], preprocess["std"]
        self.size, self.regions, self.crops = self.model.image_size[0], regions, crops

    def encode(self, pixels: torch.Tensor, dense: bool) -> ImageFeatures:
        """The model's image features (the one place the image tower runs)."""
        return self.model.encode_image(pixels, dense=dense)

    def _pixels(self, blobs: list[bytes]) -> torch.Tensor:
        """uint8 HWC blobs -> normalised float NCHW on the model's device."""
        pixels = np.frombuffer(b"".join(blobs), np.uint8).reshape(-1, self.size, self.size, 3)
        return normalise(torch.from_numpy(pixels.copy()).to(self.device), self.mean, self.std)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        valid = pc.is_valid(batch["pixels"])
        accepted, rows = valid.to_pylist(), batch.filter(valid)
        features = self.encode(self._pixels(rows["pixels"].to_pylist()), dense=self.regions) if rows.num_rows else None
        out = batch.drop_columns(["pixels", "crops"]).append_column(
            "image_embedding", _in_place(self._arrow(features.global_ if features else None), accepted))
        if self.regions:
            out = out.append_column("region_embeddings", _in_place(self._per_image(rows, self._regions(rows, features)),
                                                                   accepted))
            if self.crops:
                out = out.append_column("crop_embeddings", _in_place(self._per_image(rows, self._crops(rows)), accepted))
        return out

    def _per_image(self, rows: pa.Table, flat: Optional[torch.Tensor]) -> pa.Array:
        """Box features in row order -> one list per row (its boxes)."""
        counts = pc.list_value_length(rows["boxes"]).fill_null(0).to_numpy(zero_copy_only=False)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        return pa.ListArray.from_arrays(offsets, self._arrow(flat if flat is not None and flat.numel() else None))

    def _regions(self, rows: pa.Table, features) -> Optional[torch.Tensor]:
        boxes = rows["boxes"].to_pylist()
        if features is None or not any(boxes):
            return None
        box_tensor, box_mask = (t.to(self.device) for t in pad_boxes(boxes))
        return pool_regions(features.dense, box_tensor, box_mask)[box_mask]

    def _crops(self, rows: pa.Table) -> Optional[torch.Tensor]:
        blobs = [blob for blob in rows["crops"].to_pylist() if blob]
        return self.encode(self._pixels(blobs), dense=False).global_ if blobs else None


class TextEmbedder(_ModelActor):
    """Caption rows -> `caption_embedding`."""

    def __init__(self, model: ModelConfig, dtype: str = "float32", threads: int = 1) -> None:
        super().__init__(model, dtype, threads)
        self.tokenizer = open_clip.get_tokenizer(model.name)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.append_column("caption_embedding", to_arrow(self.encode(batch["caption"].to_pylist()), self.dtype))

    def encode(self, captions: list[str]) -> torch.Tensor:
        """The model's caption embeddings (the one place the text tower runs)."""
        return self.model.encode_text(self.tokenizer(captions).to(self.device))[0]


def actor_pool_size(actors: Optional[int], gpu: bool) -> tuple[int, Optional[int]]:
    """(fewest, most) model actors per stage; most None: no cap of ours.

    `--actors N` is exactly N. With `--gpu` and no `--actors`, Ray Data's own autoscaling pool: one
    actor to start, more while batches wait for one and the cluster has a GPU free for another. We
    set no cap: the cluster bounds it, nodes its autoscaler adds included, so on a cluster whose
    GPU workers scale from 0 the pool grows as they join instead of staying at the GPUs present
    when the job started (none there). Without `--gpu`, one actor: its torch already uses every
    core of its node (_threads), and more CPU actors would split those cores, not add any. Pure, so
    the tests check it without Ray.
    """
    if actors is not None:
        if actors < 1:
            raise ValueError(f"--actors must be >= 1, got {actors}")
        return actors, actors
    return (1, None) if gpu else (1, 1)


def _actor_pool(config: InferenceConfig) -> dict:
    fewest, most = actor_pool_size(config.actors, config.gpu)
    pool = ActorPoolStrategy(size=fewest) if most == fewest else ActorPoolStrategy(min_size=fewest, max_size=most)
    return {"compute": pool, "num_gpus": 1 if config.gpu else 0}


def _threads(config: InferenceConfig) -> int:
    """On CPU an actor's torch gets this node's cores shared among the actors: Ray would hold it to
    one thread per logical CPU it reserves, and reserving them all would leave none for the decode
    tasks that feed it."""
    return max(1, len(os.sched_getaffinity(0)) // actor_pool_size(config.actors, config.gpu)[0])


def _image_stage(model: ModelConfig, config: InferenceConfig, regions: Optional[PrepareConfig], crops: bool,
                 dtype: str) -> tuple[dict, dict]:
    """(decode_stage keyword arguments, ImageEmbedder constructor arguments): one home for both
    ways of running the image stage."""
    return ({"image_size": model_shape(model)[0], "regions": regions, "crops": crops},
            {"model": model, "regions": regions is not None, "crops": crops, "dtype": dtype,
             "threads": _threads(config)})


def image_embeddings(data: InferenceInput, model: ModelConfig, config: InferenceConfig,
                     regions: Optional[PrepareConfig] = None, crops: bool = False, dtype: str = "float32",
                     embedder: type = ImageEmbedder) -> ray.data.Dataset:
    """Lazy stream, one row per input image in input order: ids, size, boxes, `image_embedding`
    and, with `regions`, `region_embeddings` (and `crop_embeddings` with `crops`); rejected
    images keep their row with null embeddings and a reject reason."""
    decode, construct = _image_stage(model, config, regions, crops, dtype)
    dataset = (data.images
               .map_batches(decode_stage, batch_format="pyarrow", batch_size=config.batch_size, fn_kwargs=decode)
               .map_batches(embedder, batch_format="pyarrow", batch_size=config.batch_size,
                            fn_constructor_kwargs=construct, **_actor_pool(config)))
    dataset.context.execution_options.preserve_order = True
    return dataset


def image_embeddings_in_process(data: InferenceInput, model: ModelConfig, config: InferenceConfig,
                                regions: Optional[PrepareConfig] = None, crops: bool = False,
                                dtype: str = "float32", embedder: type = ImageEmbedder) -> Iterator[pa.Table]:
    """image_embeddings' batches computed in this process: the same decode and model calls on the
    same batches (consecutive `config.batch_size` rows in input order), without a model actor.
    For a set so small that starting an actor (a process that imports torch and loads the model)
    costs more than embedding it. Leaves this process's torch threads as they are."""
    decode, construct = _image_stage(model, config, regions, crops, dtype)
    run = embedder(**{**construct, "threads": torch.get_num_threads()})
    data.images.context.execution_options.preserve_order = True
    for batch in data.images.iter_batches(batch_format="pyarrow", batch_size=config.batch_size):
        yield run(decode_stage(batch, **decode))


def caption_embeddings(captions: pa.Table, model: ModelConfig, config: InferenceConfig, dtype: str = "float32",
                       embedder: type = TextEmbedder) -> ray.data.Dataset:
    """Lazy stream of `captions` (sample_id, image_id, caption) with `caption_embedding`, in order."""
    dataset = dataset_of(captions, config.batch_size).map_batches(
        embedder, batch_format="pyarrow", batch_size=config.batch_size,
        fn_constructor_kwargs={"model": model, "dtype": dtype, "threads": _threads(config)}, **_actor_pool(config))
    dataset.context.execution_options.preserve_order = True
    return dataset


def caption_embeddings_in_process(captions: pa.Table, model: ModelConfig, config: InferenceConfig,
                                  dtype: str = "float32", embedder: type = TextEmbedder) -> Iterator[pa.Table]:
    """caption_embeddings' batches computed in this process (see image_embeddings_in_process)."""
    run = embedder(model=model, dtype=dtype, threads=torch.get_num_threads())
    for start in range(0, captions.num_rows, config.batch_size):
        yield run(captions.slice(start, config.batch_size))

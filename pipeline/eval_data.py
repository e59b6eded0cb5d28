"""The embeddings an evaluation needs, gathered from the Ray Data inference streams as arrays.

Images stream through decode tasks and a model actor pool (pipeline.embedders); only their
embeddings come back to the driver, as (rows, dim) arrays. A set of fewer than IN_PROCESS_BELOW
images is embedded in the driver by the same code instead. Captions are matched to their image by
id, not by position, so no ordering of the streams can misalign them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from harmoclip import ModelConfig
from harmoclip.config import InferenceConfig, PrepareConfig

from .dataset import DatasetError
from .embedders import (ImageEmbedder, TextEmbedder, caption_embeddings, caption_embeddings_in_process,
                         image_embeddings, image_embeddings_in_process, to_numpy)
from .inference_data import InferenceInput
from .progress import Progress

# Sets of fewer images are embedded in the job's own process (when no --gpu or --actors asks for
# actors): two model actors (images, captions) cost a few seconds each to start, more than such a
# set's work, and a sweep evaluates every rung of every trial. Same calls on the same batches.
IN_PROCESS_BELOW = 64


@dataclass
class Embeddings:
    images: torch.Tensor  # (N, D)
    texts: torch.Tensor  # (T, D)
    text_to_image: torch.Tensor  # (T,) index into images
    regions: torch.Tensor  # (M, D) RoIAlign on the dense map
    crops: torch.Tensor  # (M, D) crop-and-encode
    labels: torch.Tensor  # (M,) category ids
    skipped: dict[str, int] = field(default_factory=dict)  # images and captions left out, by reason


def gather(data: InferenceInput, model: ModelConfig, config: InferenceConfig,
           image_embedder: type = ImageEmbedder, text_embedder: type = TextEmbedder,
           in_process_below: int = IN_PROCESS_BELOW) -> Embeddings:
    """Every image's global embedding, every ground-truth box's region (and crop) embedding and
    every caption's embedding. Rejected images and empty captions are left out and counted; so
    are the captions of a left-out image. Through Ray Data's model actors, or in this process for
    fewer than `in_process_below` images on CPU with no --actors (the same numbers, bit for bit, at
    the same torch thread count)."""
    in_process = data.num_images < in_process_below and not config.gpu and config.actors is None
    if in_process:
        print(f"{data.num_images} images: embedding them in this process (model actors from "
              f"{in_process_below} images, or with --actors/--gpu)", flush=True)
    skipped: Counter = Counter()
    image_ids, images, regions, crops, labels = [], [], [], [], []
    progress = Progress("images embedded", data.num_images)
    image_stage = {"regions": PrepareConfig(regions="gt"), "crops": True, "embedder": image_embedder}
    stream = (image_embeddings_in_process(data, model, config, **image_stage) if in_process else
              image_embeddings(data, model, config, **image_stage).iter_batches(batch_format="pyarrow",
                                                                                batch_size=None))
    for batch in stream:
        progress.add(batch.num_rows)
        skipped.update(r for r in batch["reject_reason"].to_pylist() if r)
        batch = batch.filter(pc.is_null(batch["reject_reason"]))
        image_ids += batch["image_id"].to_pylist()
        images.append(to_numpy(batch["image_embedding"]))
        regions.append(to_numpy(batch["region_embeddings"], nested=True))
        crops.append(to_numpy(batch["crop_embeddings"], nested=True))
        labels.append(pc.list_flatten(batch["box_labels"]).to_numpy(zero_copy_only=False))
    if not image_ids:
        raise DatasetError(f"no usable image to evaluate on (left out: {dict(skipped)})")
    index_of = {image_id: i for i, image_id in enumerate(image_ids)}

    captions = data.captions
    skipped.update(r for r in captions["reject_reason"].to_pylist() if r)
    captions = captions.filter(pc.is_null(captions["reject_reason"]))
    kept = pc.is_in(captions["image_id"], value_set=pa.array(image_ids, pa.string()))
    skipped["image_rejected"] += captions.num_rows - pc.sum(kept).as_py() if captions.num_rows else 0
    captions = captions.filter(kept)
    texts, text_to_image = [], []
    progress = Progress("captions embedded", captions.num_rows)
    caption_stream = (caption_embeddings_in_process(captions, model, config, embedder=text_embedder) if in_process
                      else caption_embeddings(captions, model, config, embedder=text_embedder).iter_batches(
                          batch_format="pyarrow", batch_size=None))
    for batch in caption_stream:
        progress.add(batch.num_rows)
        texts.append(to_numpy(batch["caption_embedding"]))
        text_to_image += [index_of[image_id] for image_id in batch["image_id"].to_pylist()]

    def stack(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0)

    return Embeddings(images=stack(images), texts=stack(texts),
                      text_to_image=torch.tensor(text_to_image, dtype=torch.long), regions=stack(regions),
                      crops=stack(crops), labels=torch.from_numpy(np.concatenate(labels).astype(np.int64)),
                      skipped={reason: count for reason, count in sorted(skipped.items()) if count})

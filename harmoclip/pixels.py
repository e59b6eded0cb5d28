"""The pixels a model reads of a whole image at inference: the image squashed, never cropped.

open_clip's eval transform centre-crops a non-square image to a square, which cuts away the boxes
near its edges. Box classification and heatmaps must see every part of the image, so the whole
image is resized to the model's square input (aspect ratio not kept) and normalised with the
model's own mean and std. Evaluation and prediction both use these functions, so what
jobs.evaluate measures is what jobs.predict users get. The two steps are separate because a
pipeline squashes where it decodes (small uint8 arrays travel well) and normalises where the
model runs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from open_clip.model import CLIP
from PIL import Image


def squash(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8: the whole image in RGB, resized to size x size (bicubic)."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> float32 (N, 3, S, S), scaled to [0, 1] and normalised, on pixels' device."""
    mean_ = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std_ = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() / 255.0 - mean_) / std_


def squash_batch(images: Sequence[Image.Image], clip: CLIP) -> torch.Tensor:
    """(N, 3, S, S) input of `clip` for whole images: squashed to its image size, normalised with
    its preprocess mean and std."""
    preprocess = clip.visual.preprocess_cfg
    size = clip.visual.image_size[0]
    pixels = torch.from_numpy(np.stack([squash(image, size) for image in images]))
    return normalise(pixels, preprocess["mean"], preprocess["std"])

"""Checks on model inputs that would otherwise turn into NaNs or silently wrong features.

Each names the sample and slot, so a bad row in a prepared dataset can be found.
"""

from __future__ import annotations

from typing import Sequence

import torch

BOX_FORMAT = "(boxes are normalised [x0, y0, x1, y1])"


def _first_bad(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def _sample(index: int, names: Sequence[str] | None) -> str:
    """'sample 2', or 'sample 2 (image 000123.jpg)' when the caller knows the batch's image ids."""
    return f"sample {index}" + (f" (image {names[index]})" if names is not None else "")


def check_boxes(boxes: torch.Tensor, box_mask: torch.Tensor, sample_names: Sequence[str] | None = None) -> None:
    """Valid boxes are finite, normalised xyxy within [0, 1], with x1 > x0 and y1 > y0."""
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or box_mask.shape != boxes.shape[:2]:
        raise ValueError(f"boxes must be (B, K, 4) with a (B, K) box_mask, got {tuple(boxes.shape)} "
                         f"and {tuple(box_mask.shape)}")
    for reason, bad in _box_problems(boxes).items():
        bad = bad & box_mask
        if bad.any():
            sample, slot = _first_bad(bad)
            raise ValueError(f"box {slot} of {_sample(sample, sample_names)} {reason}: "
                             f"{boxes[sample, slot].tolist()} {BOX_FORMAT}")


def image_boxes(boxes: Sequence[Sequence[float]]) -> torch.Tensor:
    """The boxes of one image as a checked (K, 4) float32 tensor: at least one, each four numbers
    and valid as in `check_boxes`. Errors name the box by its index in `boxes`."""
    if len(boxes) == 0:
        raise ValueError("no boxes: give at least one normalised [x0, y0, x1, y1] box")
    for index, box in enumerate(boxes):
        if len(box) != 4:
            raise ValueError(f"box {index} has {len(box)} numbers, not 4: {list(box)} {BOX_FORMAT}")
    tensor = torch.tensor([[float(v) for v in box] for box in boxes], dtype=torch.float32)
    for reason, bad in _box_problems(tensor).items():
        if bad.any():
            index = int(bad.nonzero()[0, 0])
            raise ValueError(f"box {index} {reason}: {tensor[index].tolist()} {BOX_FORMAT}")
    return tensor


def _box_problems(boxes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per box of a (..., 4) tensor, whether it breaks each rule, keyed by the words an error uses."""
    boxes = boxes.detach()
    x0, y0, x1, y1 = boxes.unbind(-1)
    return {
        "is not finite": ~torch.isfinite(boxes).all(-1),
        "is outside [0, 1]": (boxes < 0).any(-1) | (boxes > 1).any(-1),
        "has x1 <= x0": x1 <= x0,
        "has y1 <= y0": y1 <= y0,
    }


def check_lexeme_spans(spans: torch.Tensor, span_mask: torch.Tensor, tokens: torch.Tensor,
                       sample_names: Sequence[str] | None = None) -> None:
    """A valid span `[start, end)` is non-empty and lies between the start and end-of-text tokens."""
    if spans.ndim != 3 or spans.shape[-1] != 2 or span_mask.shape != spans.shape[:2]:
        raise ValueError(f"lexeme_spans must be (B, L, 2) with a (B, L) lexeme_mask, got "
                         f"{tuple(spans.shape)} and {tuple(span_mask.shape)}")
    end_of_text = tokens.argmax(dim=-1, keepdim=True)
    checks = {
        "is empty": spans[..., 1] <= spans[..., 0],
        "starts before the first caption token": spans[..., 0] < 1,
        "ends after the caption's last token": spans[..., 1] > end_of_text,
    }
    for reason, bad in checks.items():
        bad = bad & span_mask
        if bad.any():
            sample, slot = _first_bad(bad)
            raise ValueError(f"lexeme {slot} of {_sample(sample, sample_names)} {reason}: "
                             f"span {spans[sample, slot].tolist()}")

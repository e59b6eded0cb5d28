"""Checks on model inputs that would otherwise turn into NaNs or silently wrong features.

Each names the sample and slot, so a bad row in a prepared dataset can be found.
"""

from __future__ import annotations

import torch


def _first_bad(bad: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in bad.nonzero()[0])


def check_boxes(boxes: torch.Tensor, box_mask: torch.Tensor) -> None:
    """Valid boxes are finite, normalised xyxy within [0, 1], with x1 > x0 and y1 > y0."""
    if boxes.ndim != 3 or boxes.shape[-1] != 4 or box_mask.shape != boxes.shape[:2]:
        raise ValueError(f"boxes must be (B, K, 4) with a (B, K) box_mask, got {tuple(boxes.shape)} "
                         f"and {tuple(box_mask.shape)}")
    x0, y0, x1, y1 = boxes.detach().unbind(-1)
    checks = {
        "is not finite": ~torch.isfinite(boxes.detach()).all(-1),
        "is outside [0, 1]": (boxes.detach() < 0).any(-1) | (boxes.detach() > 1).any(-1),
        "has x1 <= x0": x1 <= x0,
        "has y1 <= y0": y1 <= y0,
    }
    for reason, bad in checks.items():
        bad = bad & box_mask
        if bad.any():
            sample, slot = _first_bad(bad)
            raise ValueError(f"box {slot} of sample {sample} {reason}: {boxes[sample, slot].tolist()} "
                             "(boxes are normalised [x0, y0, x1, y1])")


def check_lexeme_spans(spans: torch.Tensor, span_mask: torch.Tensor, tokens: torch.Tensor) -> None:
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
            raise ValueError(f"lexeme {slot} of sample {sample} {reason}: span {spans[sample, slot].tolist()}")

"""Bad boxes and spans are named errors; empty lexemes/regions are defined zeros, never NaN."""

from __future__ import annotations

import pytest
import torch

from harmoclip import HarmoCLIP, HarmoCLIPLoss, MethodConfig


@pytest.mark.parametrize("box, reason", [
    ([0.5, 0.1, 0.4, 0.9], "x1 <= x0"),
    ([0.1, 0.5, 0.4, 0.5], "y1 <= y0"),
    ([0.1, 0.1, 1.2, 0.9], r"outside \[0, 1\]"),
    ([-0.1, 0.1, 0.2, 0.9], r"outside \[0, 1\]"),
    ([0.1, float("nan"), 0.2, 0.9], "not finite"),
])
def test_bad_box_names_sample_and_slot(model: HarmoCLIP, batch, box, reason):
    batch["boxes"][2, 0] = torch.tensor(box)
    batch["box_mask"][2, 0] = True
    with pytest.raises(ValueError, match=rf"box 0 of sample 2 (is|has) {reason}"):
        model(batch)


def test_bad_lexeme_span_names_sample_and_slot(model: HarmoCLIP, batch):
    batch["lexeme_spans"][1, 0] = torch.tensor([5, 5])
    batch["lexeme_mask"][1, 0] = True
    with pytest.raises(ValueError, match="lexeme 0 of sample 1 is empty"):
        model(batch)
    batch["lexeme_spans"][1, 0] = torch.tensor([3, model.context_length])
    with pytest.raises(ValueError, match="lexeme 0 of sample 1 ends after the caption"):
        model(batch)


def _finite_backward(model: HarmoCLIP, batch) -> dict:
    losses = HarmoCLIPLoss(model.method)(model(batch))
    losses["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name
    return losses


def test_caption_without_lexemes_just_drops_out(model: HarmoCLIP, batch):
    batch["lexeme_mask"][0] = False
    losses = _finite_backward(model, batch)
    assert losses["lrc_lexemes"] == batch["lexeme_mask"].sum().item()
    assert losses["lrc"] > 0


# GR over regions (the default anchor mode uses none), so that it can run out of regions.
REGION_GR = MethodConfig(gr_mode="contrastive", lambda_gr=1.0)


def test_batch_without_lexemes_gives_zero_lrc_and_says_so(model: HarmoCLIP, batch):
    model.method = REGION_GR
    batch["lexeme_mask"][:] = False
    losses = _finite_backward(model, batch)
    assert losses["lrc"].item() == 0.0 and losses["lrc_empty"] == 1.0
    assert torch.isfinite(losses["loss"]) and losses["gr"] > 0


def test_batch_without_regions_gives_zero_lrc_and_gr(model: HarmoCLIP, batch):
    model.method = REGION_GR
    batch["box_mask"][:] = False
    losses = _finite_backward(model, batch)
    assert losses["lrc"].item() == 0.0 and losses["gr"].item() == 0.0
    assert losses["lrc_empty"] == 1.0 and losses["gr_empty"] == 1.0
    assert losses["loss"].item() == pytest.approx(losses["gc"].item())


def test_negative_lambda_is_rejected():
    with pytest.raises(ValueError, match="lambda_lrc must be >= 0"):
        MethodConfig(lambda_lrc=-1)

"""Each loss against a value worked out by hand, and the masking rules of DESIGN section 2."""

from __future__ import annotations

import math

import pytest
import torch
from open_clip.loss import ClipLoss

from harmoclip import HarmoCLIP, HarmoCLIPLoss, MethodConfig
from harmoclip.losses import global_region_alignment, lexeme_region_contrastive


def ce(logits: list[float], target: int) -> float:
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def normalize(v: list[float]) -> list[float]:
    n = math.hypot(*v)
    return [x / n for x in v]


REGIONS = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])
REGION_MASK = torch.ones(2, 2, dtype=torch.bool)
LEXEMES = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
LEXEME_MASK = torch.ones(2, 1, dtype=torch.bool)
GLOBAL = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def test_gc_is_clip_loss_by_hand():
    image, text = GLOBAL, torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    out = {"image_features": image, "text_features": text, "logit_scale": torch.tensor(2.0)}
    got = HarmoCLIPLoss(MethodConfig(lambda_lrc=0, lambda_gr=0))(out)
    image_to_text = (ce([1.2, 2.0], 0) + ce([1.6, 0.0], 1)) / 2
    text_to_image = (ce([1.2, 1.6], 0) + ce([2.0, 0.0], 1)) / 2
    assert got["gc"].item() == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-6)
    assert got["loss"].item() == got["gc"].item()


def test_lrc_max_pooling_by_hand():
    method = MethodConfig(lrc_temperature=0.5)  # scale 2
    loss, stats = lexeme_region_contrastive(LEXEMES, LEXEME_MASK, torch.tensor([[1], [2]]), REGIONS,
                                            REGION_MASK, torch.tensor(100.0), method)
    # lexeme 0 scores image 0 by max(1, 0) = 1 and image 1 by max(0.6, -1) = 0.6; lexeme 1: 1 and 0.8
    lexeme_to_image = (ce([2.0, 1.2], 0) + ce([2.0, 1.6], 1)) / 2
    # matched regions: (1, 0) in image 0, (0.6, 0.8) in image 1; against lexemes (1, 0), (0, 1)
    region_to_lexeme = (ce([2.0, 0.0], 0) + ce([1.2, 1.6], 1)) / 2
    assert loss.item() == pytest.approx((lexeme_to_image + region_to_lexeme) / 2, rel=1e-6)
    assert stats["lrc_lexemes"] == 2 and stats["lrc_empty"] == 0


def test_lrc_softmax_pooling_by_hand():
    method = MethodConfig(lrc_temperature=0.5, region_pooling="softmax", region_pooling_temperature=0.5,
                          lrc_region_to_lexeme=False)
    loss, _ = lexeme_region_contrastive(LEXEMES, LEXEME_MASK, torch.tensor([[1], [2]]), REGIONS,
                                        REGION_MASK, torch.tensor(100.0), method)

    def pooled(cosines: list[float]) -> float:
        weights = [math.exp(c / 0.5) for c in cosines]
        return sum(w * c for w, c in zip(weights, cosines)) / sum(weights)

    s00, s01 = pooled([1, 0]), pooled([0.6, -1])
    s10, s11 = pooled([0, 1]), pooled([0.8, 0])
    expected = (ce([2 * s00, 2 * s01], 0) + ce([2 * s10, 2 * s11], 1)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def _fused_by_hand(temperature: float) -> list[list[float]]:
    fused = []
    for regions, query in (([[1, 0], [0, 1]], [1, 0]), ([[0.6, 0.8], [-1, 0]], [0, 1])):
        weights = [math.exp((r[0] * query[0] + r[1] * query[1]) / temperature) for r in regions]
        total = sum(weights)
        fused.append(normalize([sum(w * r[d] for w, r in zip(weights, regions)) / total for d in (0, 1)]))
    return fused


def test_gr_contrastive_by_hand():
    method = MethodConfig(gr_attention_temperature=1.0)
    loss, stats = global_region_alignment(GLOBAL, GLOBAL, REGIONS, REGION_MASK, torch.tensor(2.0), method)
    (a0, a1), (b0, b1) = _fused_by_hand(1.0)
    # texts are (1, 0) and (0, 1): fused . text picks a coordinate
    fused_to_text = (ce([2 * a0, 2 * a1], 0) + ce([2 * b0, 2 * b1], 1)) / 2
    text_to_fused = (ce([2 * a0, 2 * b0], 0) + ce([2 * a1, 2 * b1], 1)) / 2
    assert loss.item() == pytest.approx((fused_to_text + text_to_fused) / 2, rel=1e-6)
    assert stats["gr_images"] == 2


def test_gr_consistency_by_hand():
    method = MethodConfig(gr_attention_temperature=1.0, gr_mode="consistency")
    loss, _ = global_region_alignment(GLOBAL, GLOBAL, REGIONS, REGION_MASK, torch.tensor(2.0), method)
    (a0, _), (_, b1) = _fused_by_hand(1.0)
    assert loss.item() == pytest.approx(((1 - a0) + (1 - b1)) / 2, rel=1e-6)


def test_same_key_lexemes_are_not_negatives():
    method = MethodConfig(lrc_temperature=0.5)
    shared, _ = lexeme_region_contrastive(LEXEMES, LEXEME_MASK, torch.tensor([[7], [7]]), REGIONS,
                                          REGION_MASK, torch.tensor(1.0), method)
    distinct, _ = lexeme_region_contrastive(LEXEMES, LEXEME_MASK, torch.tensor([[7], [8]]), REGIONS,
                                            REGION_MASK, torch.tensor(1.0), method)
    # with one key, each lexeme's only candidate (image and lexeme) is its own: nothing to contrast
    assert shared.item() == 0.0
    assert distinct.item() > 0.1


def test_zero_lambdas_equal_clip_loss_exactly(model: HarmoCLIP, batch):
    model.method = MethodConfig(lambda_lrc=0.0, lambda_gr=0.0)
    out = model(batch)
    total = HarmoCLIPLoss(model.method)(out)["loss"]
    reference = ClipLoss()(model.clip.encode_image(batch["images"], normalize=True),
                           model.clip.encode_text(batch["tokens"], normalize=True),
                           model.clip.logit_scale.exp())
    assert "region_features" not in out  # the baseline pays for no dense map
    assert torch.equal(total, reference)


def _grad_norms(model: HarmoCLIP) -> tuple[float, float]:
    clip = model.clip
    image = clip.visual.conv1.weight.grad
    text = clip.token_embedding.weight.grad
    return (0.0 if image is None else image.abs().sum().item(), 0.0 if text is None else text.abs().sum().item())


@pytest.mark.parametrize("term", ["lrc", "gr", "loss"])
def test_gradients_reach_both_towers(model: HarmoCLIP, batch, term):
    losses = HarmoCLIPLoss(model.method)(model(batch))
    losses[term].backward()
    image_grad, text_grad = _grad_norms(model)
    assert image_grad > 0 and text_grad > 0


def _pad(batch: dict[str, torch.Tensor], extra_regions: int, extra_lexemes: int) -> dict[str, torch.Tensor]:
    """The same batch with garbage in new, masked-out region and lexeme slots."""
    b, gen = dict(batch), torch.Generator().manual_seed(5)
    n = batch["boxes"].shape[0]
    junk_boxes = torch.rand(n, extra_regions, 4, generator=gen) * 3 - 1  # even invalid: masked slots are ignored
    b["boxes"] = torch.cat([batch["boxes"], junk_boxes], 1)
    b["box_mask"] = torch.cat([batch["box_mask"], torch.zeros(n, extra_regions, dtype=torch.bool)], 1)
    b["lexeme_spans"] = torch.cat([batch["lexeme_spans"], torch.randint(0, 9, (n, extra_lexemes, 2), generator=gen)], 1)
    b["lexeme_mask"] = torch.cat([batch["lexeme_mask"], torch.zeros(n, extra_lexemes, dtype=torch.bool)], 1)
    b["lexeme_keys"] = torch.cat([batch["lexeme_keys"], batch["lexeme_keys"][:, :extra_lexemes]], 1)
    return b


@pytest.mark.parametrize("method", [MethodConfig(), MethodConfig(region_pooling="softmax", gr_mode="consistency")])
def test_masked_slots_change_nothing(model: HarmoCLIP, batch, method):
    model.method = method
    loss = HarmoCLIPLoss(method)
    with torch.no_grad():
        before = loss(model(batch))
        after = loss(model(_pad(batch, extra_regions=3, extra_lexemes=2)))
    for term in ("loss", "gc", "lrc", "gr"):
        assert after[term].item() == pytest.approx(before[term].item(), rel=1e-5, abs=1e-6), term


def test_region_dropout_of_one_image_only_removes_it(model: HarmoCLIP, batch):
    """An image with no regions leaves LRC and GR defined; its lexemes are counted as skipped."""
    batch["box_mask"][0] = False
    losses = HarmoCLIPLoss(model.method)(model(batch))
    assert torch.isfinite(losses["loss"])
    assert losses["gr_images"] == batch["images"].shape[0] - 1
    assert losses["lrc_lexemes_without_regions"] == batch["lexeme_mask"][0].sum().item()

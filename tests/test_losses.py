"""Each loss against a value worked out by hand, and the masking rules of docs/method.md."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from open_clip.loss import ClipLoss

from harmoclip import HarmoCLIP, HarmoCLIPLoss, MethodConfig
from harmoclip.losses import global_region_alignment, lexeme_region_contrastive

# The hand computations below are of LRC in both directions and of contrastive GR, the literal
# reading of the paper; the shipped defaults differ (docs/method.md), so each test names its method.
LITERAL = MethodConfig(lexeme_unit="noun_chunk", lrc_region_to_lexeme=True, gr_mode="contrastive", lambda_gr=1.0)


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
IDS = torch.tensor([0, 1])


def test_gc_is_clip_loss_by_hand():
    image, text = GLOBAL, torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    out = {"image_features": image, "text_features": text, "logit_scale": torch.tensor(2.0)}
    got = HarmoCLIPLoss(MethodConfig(lambda_lrc=0, lambda_gr=0))(out)
    image_to_text = (ce([1.2, 2.0], 0) + ce([1.6, 0.0], 1)) / 2
    text_to_image = (ce([1.2, 1.6], 0) + ce([2.0, 0.0], 1)) / 2
    assert got["gc"].item() == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-6)
    assert got["loss"].item() == got["gc"].item()


def test_lrc_max_pooling_by_hand():
    loss, stats = lexeme_region_contrastive(LEXEMES, LEXEME_MASK, torch.tensor([[1], [2]]), REGIONS,
                                            REGION_MASK, IDS, torch.tensor(2.0), LITERAL)
    # lexeme 0 scores image 0 by max(1, 0) = 1 and image 1 by max(0.6, -1) = 0.6; lexeme 1: 1 and 0.8
    lexeme_to_image = (ce([2.0, 1.2], 0) + ce([2.0, 1.6], 1)) / 2
    # matched regions: (1, 0) in image 0, (0.6, 0.8) in image 1; against lexemes (1, 0), (0, 1)
    region_to_lexeme = (ce([2.0, 0.0], 0) + ce([1.2, 1.6], 1)) / 2
    assert loss.item() == pytest.approx((lexeme_to_image + region_to_lexeme) / 2, rel=1e-6)
    assert stats["lrc_lexemes"] == 2 and stats["lrc_empty"] == 0


def test_lrc_softmax_pooling_by_hand():
    method = MethodConfig(region_pooling="softmax", region_pooling_temperature=0.5, lrc_region_to_lexeme=False)
    loss, _ = lexeme_region_contrastive(LEXEMES, LEXEME_MASK, torch.tensor([[1], [2]]), REGIONS,
                                        REGION_MASK, IDS, torch.tensor(2.0), method)

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
    method = replace(LITERAL, gr_attention_temperature=1.0)
    loss, stats = global_region_alignment(GLOBAL, GLOBAL, REGIONS, REGION_MASK, IDS, torch.tensor(2.0), method)
    (a0, a1), (b0, b1) = _fused_by_hand(1.0)
    # texts are (1, 0) and (0, 1): fused . text picks a coordinate
    fused_to_text = (ce([2 * a0, 2 * a1], 0) + ce([2 * b0, 2 * b1], 1)) / 2
    text_to_fused = (ce([2 * a0, 2 * b0], 0) + ce([2 * a1, 2 * b1], 1)) / 2
    assert loss.item() == pytest.approx((fused_to_text + text_to_fused) / 2, rel=1e-6)
    assert stats["gr_images"] == 2


def test_gr_consistency_by_hand():
    method = MethodConfig(gr_attention_temperature=1.0, gr_mode="consistency")
    loss, _ = global_region_alignment(GLOBAL, GLOBAL, REGIONS, REGION_MASK, IDS, torch.tensor(2.0), method)
    (a0, _), (_, b1) = _fused_by_hand(1.0)
    assert loss.item() == pytest.approx(((1 - a0) + (1 - b1)) / 2, rel=1e-6)


def ce_without(logits: list[float], target: int, excluded: set[int]) -> float:
    """Cross-entropy over the entries not in `excluded` (the target never is)."""
    kept = [i for i in range(len(logits)) if i not in excluded]
    return ce([logits[i] for i in kept], kept.index(target))


# Three rows: rows 0 and 1 are two captions of one image (id 5), row 2 another image (id 7).
SIB_IDS = torch.tensor([5, 5, 7])
SIB_IMAGES = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
SIB_TEXTS = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]])
SIB_REGIONS = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])
SIB_LEXEMES = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 1.0]]])


def test_gc_two_captions_of_one_image_are_not_negatives_by_hand():
    out = {"image_features": SIB_IMAGES, "text_features": SIB_TEXTS, "logit_scale": torch.tensor(2.0),
           "image_ids": SIB_IDS}
    got = HarmoCLIPLoss(MethodConfig(lambda_lrc=0, lambda_gr=0))(out)["gc"].item()
    # logits per image: 2 * images @ texts.T; row 0 does not see caption 1, row 1 not caption 0
    image_to_text = (ce_without([1.2, 2.0, 0.0], 0, {1}) + ce_without([1.2, 2.0, 0.0], 1, {0})
                     + ce([1.6, 0.0, 2.0], 2)) / 3
    text_to_image = (ce_without([1.2, 1.2, 1.6], 0, {1}) + ce_without([2.0, 2.0, 0.0], 1, {0})
                     + ce([0.0, 0.0, 2.0], 2)) / 3
    assert got == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-6)
    unmasked = HarmoCLIPLoss(MethodConfig(lambda_lrc=0, lambda_gr=0))({**out, "image_ids": torch.arange(3)})
    assert unmasked["gc"].item() > got + 0.1  # without ids, the sibling caption is a (wrong) negative


def test_lrc_two_captions_of_one_image_are_not_negatives_by_hand():
    loss, _ = lexeme_region_contrastive(SIB_LEXEMES, torch.ones(3, 1, dtype=torch.bool), torch.tensor([[1], [2], [3]]),
                                        SIB_REGIONS, torch.ones(3, 2, dtype=torch.bool), SIB_IDS, torch.tensor(2.0),
                                        LITERAL)
    # lexeme -> rows (max-pooled cosines x 2); a lexeme of row 0 never competes with row 1, and back
    lexeme_to_image = (ce_without([2.0, 2.0, 1.2], 0, {1}) + ce_without([2.0, 2.0, 1.6], 1, {0})
                       + ce([2.0, 2.0, 1.6], 2)) / 3
    # matched regions (1, 0), (0, 1), (0.6, 0.8) against the lexemes (1, 0), (0, 1), (0, 1)
    region_to_lexeme = (ce_without([2.0, 0.0, 0.0], 0, {1}) + ce_without([0.0, 2.0, 2.0], 1, {0})
                        + ce([1.2, 1.6, 1.6], 2)) / 3
    assert loss.item() == pytest.approx((lexeme_to_image + region_to_lexeme) / 2, rel=1e-6)


def test_gr_two_captions_of_one_image_are_not_negatives_by_hand():
    loss, _ = global_region_alignment(SIB_IMAGES, SIB_TEXTS, SIB_REGIONS, torch.ones(3, 2, dtype=torch.bool), SIB_IDS,
                                      torch.tensor(2.0), replace(LITERAL, gr_attention_temperature=1.0))
    (a0, a1), (b0, b1) = _fused_by_hand(1.0)  # rows 0 and 1 fuse like the first image above, row 2 like the second
    fused = [(a0, a1), (a0, a1), (b0, b1)]
    texts = SIB_TEXTS.tolist()
    logits = [[2 * (f[0] * t[0] + f[1] * t[1]) for t in texts] for f in fused]
    fused_to_text = (ce_without(logits[0], 0, {1}) + ce_without(logits[1], 1, {0}) + ce(logits[2], 2)) / 3
    columns = [[logits[r][c] for r in range(3)] for c in range(3)]  # caption c against every fused row
    text_to_fused = (ce_without(columns[0], 0, {1}) + ce_without(columns[1], 1, {0}) + ce(columns[2], 2)) / 3
    assert loss.item() == pytest.approx((fused_to_text + text_to_fused) / 2, rel=1e-6)


def test_gr_distribution_two_captions_of_one_image_are_not_negatives_by_hand():
    """Distribution mode: both softmaxes (the global image's target and the fused regions') run over
    the batch's captions without the other captions of the row's own image."""
    method = MethodConfig(gr_attention_temperature=1.0, gr_mode="distribution")
    loss, _ = global_region_alignment(SIB_IMAGES, SIB_TEXTS, SIB_REGIONS, torch.ones(3, 2, dtype=torch.bool), SIB_IDS,
                                      torch.tensor(2.0), method)
    (a0, a1), (b0, b1) = _fused_by_hand(1.0)
    fused, texts, images = [(a0, a1), (a0, a1), (b0, b1)], SIB_TEXTS.tolist(), SIB_IMAGES.tolist()

    def softmax_without(values: list[float], excluded: set[int]) -> list[float]:
        total = sum(math.exp(v) for i, v in enumerate(values) if i not in excluded)
        return [0.0 if i in excluded else math.exp(v) / total for i, v in enumerate(values)]

    expected = 0.0
    for row, excluded in ((0, {1}), (1, {0}), (2, set())):  # rows 0 and 1 show image 5
        target = softmax_without([2 * (images[row][0] * t[0] + images[row][1] * t[1]) for t in texts], excluded)
        predicted = softmax_without([2 * (fused[row][0] * t[0] + fused[row][1] * t[1]) for t in texts], excluded)
        expected += sum(p * math.log(p / q) for p, q in zip(target, predicted) if p > 0)
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)
    unmasked, _ = global_region_alignment(SIB_IMAGES, SIB_TEXTS, SIB_REGIONS, torch.ones(3, 2, dtype=torch.bool),
                                          torch.tensor([5, 6, 7]), torch.tensor(2.0), method)
    assert abs(unmasked.item() - loss.item()) > 1e-3  # the masking changes the loss


def test_gc_with_unique_ids_is_clip_loss_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    scale = torch.tensor(14.3)
    ours = HarmoCLIPLoss(MethodConfig(lambda_lrc=0, lambda_gr=0))(
        {"image_features": image, "text_features": text, "logit_scale": scale,
         "image_ids": torch.randperm(1000, generator=gen)[:16]})
    assert torch.equal(ours["gc"], ClipLoss()(image, text, scale))


def test_gr_distribution_by_hand():
    method = MethodConfig(gr_attention_temperature=1.0, gr_mode="distribution")
    loss, _ = global_region_alignment(GLOBAL, GLOBAL, REGIONS, REGION_MASK, IDS, torch.tensor(2.0), method)
    fused = _fused_by_hand(1.0)

    def softmax(values: list[float]) -> list[float]:
        total = sum(math.exp(v) for v in values)
        return [math.exp(v) / total for v in values]

    expected = 0.0
    for row, (f0, f1) in enumerate(fused):
        target = softmax([2.0 if row == 0 else 0.0, 2.0 if row == 1 else 0.0])  # global image . captions
        predicted = softmax([2 * f0, 2 * f1])  # fused regions . captions (captions are the unit axes)
        expected += sum(p * math.log(p / q) for p, q in zip(target, predicted))
    assert loss.item() == pytest.approx(expected / 2, rel=1e-5)


@pytest.mark.parametrize("mode", ["contrastive", "consistency", "distribution"])
def test_gr_detach_options_keep_gr_off_the_global_embeddings(mode):
    image, text = GLOBAL.clone().requires_grad_(True), GLOBAL.clone().requires_grad_(True)
    method = MethodConfig(gr_mode=mode, gr_detach_query=True, gr_detach_text=True)
    loss, _ = global_region_alignment(image, text, REGIONS.clone().requires_grad_(True), REGION_MASK, IDS,
                                      torch.tensor(2.0), method)
    loss.backward()
    assert image.grad is None and text.grad is None
    attached, _ = global_region_alignment(image, text, REGIONS, REGION_MASK, IDS, torch.tensor(2.0),
                                          MethodConfig(gr_mode=mode))
    attached.backward()
    assert image.grad is not None and image.grad.abs().sum() > 0  # the query carries gradient unless detached


def test_lrc_detach_text_moves_only_the_image_side(model: HarmoCLIP, batch):
    model.method = MethodConfig(lambda_gr=0.0, lrc_detach_text=True)
    HarmoCLIPLoss(model.method)(model(batch))["lrc"].backward()
    image_grad, text_grad = _grad_norms(model)
    assert image_grad > 0 and text_grad == 0


def test_learnable_temperatures_are_parameters_outside_the_saved_model(model: HarmoCLIP, batch):
    method = replace(LITERAL, lrc_learnable_temperature=True, gr_learnable_temperature=True)
    wrapped = HarmoCLIP(model.clip, method)
    assert set(wrapped.loss_parameters()) == {"lrc_logit_scale", "gr_logit_scale"}
    assert wrapped.lrc_logit_scale.item() == model.clip.logit_scale.item()
    losses = HarmoCLIPLoss(method)(wrapped(batch))
    losses["loss"].backward()
    assert wrapped.lrc_logit_scale.grad.abs() > 0 and wrapped.gr_logit_scale.grad.abs() > 0
    assert not any(k.endswith(("lrc_logit_scale", "gr_logit_scale")) for k in wrapped.clip.state_dict())


def test_gr_anchor_keeps_global_embeddings_near_the_starting_model_by_hand(model: HarmoCLIP, batch):
    method = MethodConfig(lambda_lrc=0.0, gr_mode="anchor")
    anchored = HarmoCLIP(model.clip, method)
    assert not method.needs_regions and set(anchored.loss_parameters()) == set()
    assert HarmoCLIPLoss(method)(anchored(batch))["gr"].item() == pytest.approx(0.0, abs=1e-6)  # starts equal
    with torch.no_grad():
        anchored.clip.visual.proj.mul_(-1.0)  # the trained model drifts: its image embeddings flip
    out = anchored(batch)
    image, anchor_image = out["image_features"], out["anchor_image_features"]
    assert torch.allclose(image, -anchor_image, atol=1e-6)  # the anchor did not move with it
    gr = HarmoCLIPLoss(method)(out)["gr"].item()
    assert gr == pytest.approx(2.0, abs=1e-5)  # image: 1 - cos = 2 for every row; text: 0
    text_only = MethodConfig(lambda_lrc=0.0, gr_mode="anchor", gr_anchor="text")
    assert HarmoCLIPLoss(text_only)(out)["gr"].item() == pytest.approx(0.0, abs=1e-5)


def test_same_key_lexemes_are_not_negatives():
    method, scale = LITERAL, torch.tensor(2.0)
    shared, _ = lexeme_region_contrastive(LEXEMES, LEXEME_MASK, torch.tensor([[7], [7]]), REGIONS,
                                          REGION_MASK, IDS, scale, method)
    distinct, _ = lexeme_region_contrastive(LEXEMES, LEXEME_MASK, torch.tensor([[7], [8]]), REGIONS,
                                            REGION_MASK, IDS, scale, method)
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


@pytest.mark.parametrize("method", [MethodConfig(), LITERAL, MethodConfig(region_pooling="softmax", gr_mode="consistency")])
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
    regional = HarmoCLIP(model.clip, LITERAL)
    losses = HarmoCLIPLoss(LITERAL)(regional(batch))
    assert torch.isfinite(losses["loss"])
    assert losses["gr_images"] == batch["images"].shape[0] - 1
    assert losses["lrc_lexemes_without_regions"] == batch["lexeme_mask"][0].sum().item()

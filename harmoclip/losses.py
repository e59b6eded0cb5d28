"""The three HarmoCLIP losses: GC (global contrastive), LRC (lexeme-region), GR (global-region).

GC is open_clip's `ClipLoss`. LRC and GR follow DESIGN section 2; every reading of the paper we
had to make is a `MethodConfig` field. Masks decide what takes part, never zero-padding: an image
without regions or a caption without lexemes simply drops out of LRC/GR, and when nothing is left
the loss is an exact 0 (still on the graph) with a counter saying so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from .config import MethodConfig
from .distributed import gather_batch, rank_and_world_size

# Fills for masked entries *before* any multiplication by a temperature: -inf there would turn
# into NaN gradients (0 * inf). Cosines are >= -1, so -2 is never the max of a non-empty set.
_MASKED_COSINE = -2.0
_MASKED_LOGIT = -1e4


def _zero_on_graph(*tensors: torch.Tensor) -> torch.Tensor:
    """An exact 0 that still depends on the inputs, so DDP sees every parameter used."""
    return sum(t.sum() for t in tensors) * 0.0


def _region_scores(sim: torch.Tensor, region_mask: torch.Tensor, pooling: str, temperature: float) -> torch.Tensor:
    """Pool lexeme-region cosines (M, N, K) over each image's valid regions -> (M, N)."""
    if pooling == "max":
        return sim.masked_fill(~region_mask, _MASKED_COSINE).amax(-1)
    weights = torch.softmax((sim / temperature).masked_fill(~region_mask, _MASKED_LOGIT), dim=-1)
    return (weights * sim).sum(-1)


def lexeme_region_contrastive(
    lexemes: torch.Tensor,
    lexeme_mask: torch.Tensor,
    lexeme_keys: torch.Tensor,
    regions: torch.Tensor,
    region_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    method: MethodConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """LRC over a (gathered) batch of N images: lexemes (N, L, D), regions (N, K, D), unit norm.

    Lexeme -> images: a lexeme of image i scores image j by pooling its cosines with j's regions;
    the target is i, and images holding a lexeme with the same key are not negatives.
    Region -> lexemes: the region of i that best matches the lexeme is contrasted against all
    lexemes of the batch, same-key lexemes again excluded. The loss is the mean of the two.
    """
    has_regions = region_mask.any(dim=1)
    query_mask = lexeme_mask & has_regions[:, None]
    image_of, slot_of = query_mask.nonzero(as_tuple=True)
    stats = {
        "lrc_lexemes": float(image_of.numel()),
        "lrc_lexemes_without_regions": float((lexeme_mask & ~has_regions[:, None]).sum()),
        "lrc_empty": float(image_of.numel() == 0),
    }
    if image_of.numel() == 0:
        return _zero_on_graph(lexemes, regions, logit_scale), stats

    scale = logit_scale if method.lrc_temperature is None else 1.0 / method.lrc_temperature
    queries = lexemes[image_of, slot_of]  # (M, D)
    query_keys = lexeme_keys[image_of, slot_of]  # (M,)
    sim = torch.einsum("md,nkd->mnk", queries, regions)
    scores = _region_scores(sim, region_mask[None], method.region_pooling, method.region_pooling_temperature)
    is_target = F.one_hot(image_of, num_classes=regions.shape[0]).bool()
    shares_key = ((lexeme_keys[None] == query_keys[:, None, None]) & lexeme_mask[None]).any(-1)
    not_candidate = (shares_key & ~is_target) | ~has_regions[None]
    lexeme_to_image = F.cross_entropy((scale * scores).masked_fill(not_candidate, float("-inf")), image_of)
    if not method.lrc_region_to_lexeme:
        return lexeme_to_image, stats

    own_sim = sim[torch.arange(len(image_of), device=sim.device), image_of]  # (M, K)
    best_region = own_sim.masked_fill(~region_mask[image_of], _MASKED_COSINE).argmax(-1)
    matched = regions[image_of, best_region]  # (M, D)
    same_key = query_keys[:, None] == query_keys[None, :]
    eye = torch.eye(len(image_of), dtype=torch.bool, device=sim.device)
    logits = (scale * matched @ queries.T).masked_fill(same_key & ~eye, float("-inf"))
    region_to_lexeme = F.cross_entropy(logits, torch.arange(len(image_of), device=sim.device))
    return (lexeme_to_image + region_to_lexeme) / 2, stats


def fuse_regions(image_global: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Attention over an image's valid regions with its global embedding as query -> (N, D), unit norm."""
    attention = (torch.einsum("nkd,nd->nk", regions, image_global) / temperature).masked_fill(~region_mask, _MASKED_LOGIT)
    fused = torch.einsum("nk,nkd->nd", torch.softmax(attention, dim=-1), regions)
    return F.normalize(fused, dim=-1)


def global_region_alignment(
    image_global: torch.Tensor,
    text_global: torch.Tensor,
    regions: torch.Tensor,
    region_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    method: MethodConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GR over a (gathered) batch: the fused regions of each image with regions, either
    contrasted with the batch's captions (both directions) or pulled to the stop-gradient global
    image embedding, per `method.gr_mode`."""
    has_regions = region_mask.any(dim=1)
    images = has_regions.nonzero(as_tuple=True)[0]
    stats = {"gr_images": float(images.numel()), "gr_empty": float(images.numel() == 0)}
    if images.numel() == 0:
        return _zero_on_graph(image_global, regions, logit_scale), stats
    fused = fuse_regions(image_global[images], regions[images], region_mask[images],
                         method.gr_attention_temperature)
    if method.gr_mode == "consistency":
        return (1 - (fused * image_global[images].detach()).sum(-1)).mean(), stats
    fused_to_text = F.cross_entropy(logit_scale * fused @ text_global.T, images)
    text_to_fused = F.cross_entropy(logit_scale * text_global[images] @ fused.T,
                                    torch.arange(len(images), device=fused.device))
    return (fused_to_text + text_to_fused) / 2, stats


class HarmoCLIPLoss(nn.Module):
    """`L = GC + lambda_lrc * LRC + lambda_gr * GR` over the batch gathered from all workers.

    Returns a dict with the total under "loss", each term, and float counters ("lrc_empty" is
    1 when no lexeme could take part, so LRC contributed 0).
    """

    def __init__(self, method: MethodConfig | None = None) -> None:
        super().__init__()
        self.method = method or MethodConfig()

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        rank, world_size = rank_and_world_size()
        clip_loss = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world_size)
        logit_scale = outputs["logit_scale"]
        gc = clip_loss(outputs["image_features"], outputs["text_features"], logit_scale)
        result: dict[str, torch.Tensor | float] = {"loss": gc, "gc": gc}
        if not self.method.needs_regions:
            return result

        gathered = {key: gather_batch(outputs[key]) for key in (
            "image_features", "text_features", "region_features", "region_mask",
            "lexeme_features", "lexeme_mask", "lexeme_keys")}
        total = gc
        if self.method.lambda_lrc > 0:
            lrc, stats = lexeme_region_contrastive(
                gathered["lexeme_features"], gathered["lexeme_mask"], gathered["lexeme_keys"],
                gathered["region_features"], gathered["region_mask"], logit_scale, self.method)
            total = total + self.method.lambda_lrc * lrc
            result.update(lrc=lrc, **stats)
        if self.method.lambda_gr > 0:
            gr, stats = global_region_alignment(
                gathered["image_features"], gathered["text_features"], gathered["region_features"],
                gathered["region_mask"], logit_scale, self.method)
            total = total + self.method.lambda_gr * gr
            result.update(gr=gr, **stats)
        result["loss"] = total
        return result

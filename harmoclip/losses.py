"""The three HarmoCLIP losses: GC (global contrastive), LRC (lexeme-region), GR (global-region).

GC is open_clip's `ClipLoss`, with one change: two rows of the same image (a dataset with several
captions per image) are never each other's negatives. LRC and GR follow docs/method.md; every
reading of the paper we had to make is a `MethodConfig` field. Masks decide what takes part, never
zero-padding: an image without regions or a caption without lexemes simply drops out of LRC/GR,
and when nothing is left the loss is an exact 0 (still on the graph) with a counter saying so.

Every loss works on the batch gathered from all workers (`harmoclip.distributed`), so the rows of
one image are recognised as siblings even when they sit on different workers.
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


def siblings(image_ids: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: rows i != j that show the same image (never each other's negatives)."""
    same = image_ids[:, None] == image_ids[None, :]
    return same & ~torch.eye(len(image_ids), dtype=torch.bool, device=image_ids.device)


class SameImageClipLoss(ClipLoss):
    """open_clip's `ClipLoss` (gathered, `local_loss=False`) with sibling rows masked out of both
    softmaxes. With unique image ids the mask is all False and the result is `ClipLoss`'s, bit
    for bit (masked_fill with an empty mask changes nothing)."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                image_ids: torch.Tensor) -> torch.Tensor:
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale)
        not_negative = siblings(image_ids)
        logits_per_image = logits_per_image.masked_fill(not_negative, float("-inf"))
        logits_per_text = logits_per_text.masked_fill(not_negative, float("-inf"))
        labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


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
    image_ids: torch.Tensor,
    scale: torch.Tensor,
    method: MethodConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """LRC over a (gathered) batch of N rows: lexemes (N, L, D), regions (N, K, D), unit norm;
    `scale` is the inverse temperature.

    Lexeme -> images: a lexeme of row i scores row j by pooling its cosines with j's regions; the
    target is i; rows holding a lexeme with the same key, and other rows of i's image, are not
    negatives. Region -> lexemes: the region of i that best matches the lexeme is contrasted
    against all lexemes of the batch, same-key lexemes and lexemes of i's sibling rows excluded.
    The loss is the mean of the two.
    """
    has_regions = region_mask.any(dim=1)
    query_mask = lexeme_mask & has_regions[:, None]
    row_of, slot_of = query_mask.nonzero(as_tuple=True)
    stats = {
        "lrc_lexemes": float(row_of.numel()),
        "lrc_lexemes_without_regions": float((lexeme_mask & ~has_regions[:, None]).sum()),
        "lrc_empty": float(row_of.numel() == 0),
    }
    if row_of.numel() == 0:
        return _zero_on_graph(lexemes, regions, scale), stats

    sibling_rows = siblings(image_ids)
    queries = lexemes[row_of, slot_of]  # (M, D)
    query_keys = lexeme_keys[row_of, slot_of]  # (M,)
    sim = torch.einsum("md,nkd->mnk", queries, regions)
    scores = _region_scores(sim, region_mask[None], method.region_pooling, method.region_pooling_temperature)
    is_target = F.one_hot(row_of, num_classes=regions.shape[0]).bool()
    shares_key = ((lexeme_keys[None] == query_keys[:, None, None]) & lexeme_mask[None]).any(-1)
    not_candidate = (shares_key & ~is_target) | sibling_rows[row_of] | ~has_regions[None]
    lexeme_to_image = F.cross_entropy((scale * scores).masked_fill(not_candidate, float("-inf")), row_of)
    if not method.lrc_region_to_lexeme:
        return lexeme_to_image, stats

    own_sim = sim[torch.arange(len(row_of), device=sim.device), row_of]  # (M, K)
    best_region = own_sim.masked_fill(~region_mask[row_of], _MASKED_COSINE).argmax(-1)
    matched = regions[row_of, best_region]  # (M, D)
    excluded = (query_keys[:, None] == query_keys[None, :]) | sibling_rows[row_of][:, row_of]
    eye = torch.eye(len(row_of), dtype=torch.bool, device=sim.device)
    logits = (scale * matched @ queries.T).masked_fill(excluded & ~eye, float("-inf"))
    region_to_lexeme = F.cross_entropy(logits, torch.arange(len(row_of), device=sim.device))
    return (lexeme_to_image + region_to_lexeme) / 2, stats


def fuse_regions(query: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Attention over an image's valid regions with `query` (N, D) -> (N, D), unit norm."""
    attention = (torch.einsum("nkd,nd->nk", regions, query) / temperature).masked_fill(~region_mask, _MASKED_LOGIT)
    fused = torch.einsum("nk,nkd->nd", torch.softmax(attention, dim=-1), regions)
    return F.normalize(fused, dim=-1)


def global_region_alignment(
    image_global: torch.Tensor,
    text_global: torch.Tensor,
    regions: torch.Tensor,
    region_mask: torch.Tensor,
    image_ids: torch.Tensor,
    scale: torch.Tensor,
    method: MethodConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GR over a (gathered) batch: the regions of each row with regions, fused by attention with
    its global image embedding as query, meet the global view as `method.gr_mode` says (see
    `MethodConfig.gr_mode`). Captions of sibling rows are never negatives."""
    has_regions = region_mask.any(dim=1)
    rows = has_regions.nonzero(as_tuple=True)[0]
    stats = {"gr_images": float(rows.numel()), "gr_empty": float(rows.numel() == 0)}
    if rows.numel() == 0:
        return _zero_on_graph(image_global, regions, scale), stats
    query = image_global[rows].detach() if method.gr_detach_query else image_global[rows]
    fused = fuse_regions(query, regions[rows], region_mask[rows], method.gr_attention_temperature)
    if method.gr_mode == "consistency":
        return (1 - (fused * image_global[rows].detach()).sum(-1)).mean(), stats

    texts = text_global.detach() if method.gr_detach_text else text_global
    not_negative = siblings(image_ids)[rows]  # (R, N): fused row r vs caption n
    if method.gr_mode == "distribution":
        # A finite fill: KL multiplies the target's zeros by these log-probabilities.
        fused_to_text = (scale * fused @ texts.T).masked_fill(not_negative, _MASKED_LOGIT)
        with torch.no_grad():
            target = torch.softmax((scale * image_global[rows] @ text_global.T).masked_fill(not_negative, _MASKED_LOGIT), -1)
        return F.kl_div(torch.log_softmax(fused_to_text, dim=-1), target, reduction="batchmean"), stats
    fused_to_text = (scale * fused @ texts.T).masked_fill(not_negative, float("-inf"))
    text_to_fused = (scale * texts[rows] @ fused.T).masked_fill(not_negative[:, rows], float("-inf"))
    positions = torch.arange(len(rows), device=fused.device)
    return (F.cross_entropy(fused_to_text, rows) + F.cross_entropy(text_to_fused, positions)) / 2, stats


def global_anchor(outputs: dict[str, torch.Tensor], sides: str) -> torch.Tensor:
    """GR's anchor mode: mean over the (gathered) batch of `1 - cos` between each global image
    and/or text embedding (`sides`: both, image, text) and the frozen starting model's embedding
    of the same input, summed over the sides."""
    chosen = ("image", "text") if sides == "both" else (sides,)
    return sum((1 - (gather_batch(outputs[f"{side}_features"]) * gather_batch(outputs[f"anchor_{side}_features"]))
                .sum(-1)).mean() for side in chosen)


class HarmoCLIPLoss(nn.Module):
    """`L = lambda_gc * GC + lambda_lrc * LRC + lambda_gr * GR` over the batch gathered from all workers.

    Takes `HarmoCLIP.forward`'s outputs; `image_ids` (B,) int64 marks rows of the same image
    (missing: every row is its own image). Returns a dict with the total under "loss", each term,
    and float counters ("lrc_empty" is 1 when no lexeme could take part, so LRC contributed 0).
    """

    def __init__(self, method: MethodConfig | None = None) -> None:
        super().__init__()
        self.method = method or MethodConfig()

    def terms(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        """Each loss term, unweighted, and the counters (used to log per-term gradient norms)."""
        rank, world_size = rank_and_world_size()
        image_ids = outputs.get("image_ids")
        if image_ids is None:  # direct callers: every row (on every worker) is its own image
            local = outputs["image_features"].shape[0]
            image_ids = torch.arange(local, device=outputs["image_features"].device) + rank * local
        all_ids = gather_batch(image_ids)
        clip_loss = SameImageClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world_size)
        logit_scale = outputs["logit_scale"]
        result: dict[str, torch.Tensor | float] = {
            "gc": clip_loss(outputs["image_features"], outputs["text_features"], logit_scale, all_ids)}
        if self.method.needs_anchor:
            result["gr"] = global_anchor(outputs, self.method.gr_anchor)
        if not self.method.needs_regions:
            return result

        gathered = {key: gather_batch(outputs[key]) for key in (
            "image_features", "text_features", "region_features", "region_mask",
            "lexeme_features", "lexeme_mask", "lexeme_keys")}
        if self.method.lambda_lrc > 0:
            lrc_scale = (outputs.get("lrc_logit_scale", logit_scale) if self.method.lrc_temperature is None
                         else logit_scale.new_tensor(1.0 / self.method.lrc_temperature))
            lexemes = gathered["lexeme_features"].detach() if self.method.lrc_detach_text else gathered["lexeme_features"]
            lrc, stats = lexeme_region_contrastive(
                lexemes, gathered["lexeme_mask"], gathered["lexeme_keys"],
                gathered["region_features"], gathered["region_mask"], all_ids, lrc_scale, self.method)
            result.update(lrc=lrc, **stats)
        if self.method.lambda_gr > 0 and not self.method.needs_anchor:
            gr, stats = global_region_alignment(
                gathered["image_features"], gathered["text_features"], gathered["region_features"],
                gathered["region_mask"], all_ids, outputs.get("gr_logit_scale", logit_scale), self.method)
            result.update(gr=gr, **stats)
        return result

    def weighted(self, terms: dict[str, torch.Tensor | float]) -> dict[str, torch.Tensor]:
        """Each present term times its lambda."""
        weights = {"gc": self.method.lambda_gc, "lrc": self.method.lambda_lrc, "gr": self.method.lambda_gr}
        return {name: weights[name] * terms[name] for name in weights if name in terms}

    def forward(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        terms = self.terms(outputs)
        terms["loss"] = sum(self.weighted(terms).values())
        return terms

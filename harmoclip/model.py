"""HarmoCLIP: an unchanged open_clip CLIP plus the dense and per-token read-outs the losses need.

No parameter is added ("no architecture change"): region features come from the same weights,
reading the last vision block without self-attention (CLIPSelf/FineCLIP) and RoIAlign-pooling the
resulting dense map; lexeme features come from the text tower's per-token outputs. So any
checkpoint this wrapper trains is a plain open_clip checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer, text_global_pool
from torch import nn
from torchvision.ops import roi_align

from .config import MethodConfig, ModelConfig
from .checkpoint import weights_of_run
from .storage import fetch_to_local, is_remote
from .validation import check_boxes, check_lexeme_spans

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))
HUB_PREFIX = "hf-hub:"  # open_clip fetches these models' configs from the Hugging Face hub


def register_tiny_configs() -> None:
    """Make this project's tiny architectures known to `open_clip.create_model` by name."""
    if not set(TINY_MODELS) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def check_model_name(name: str) -> None:
    """Refuse a model name open_clip neither knows (with this project's tiny configs) nor fetches
    from a hub: a misspelt name is the user's to fix, so it is a ValueError naming the flag (exit 2
    in the jobs), not open_clip's RuntimeError listing every model."""
    register_tiny_configs()
    if not name.startswith(HUB_PREFIX) and open_clip.get_model_config(name) is None:
        raise ValueError(f"--model {name}: not an open_clip model (python -c 'import open_clip; "
                         f"print(open_clip.list_models())' lists them; tiny ones: {', '.join(TINY_MODELS)})")


def model_shape(model: ModelConfig) -> tuple[int, int]:
    """(square input side, embedding dimension) of a model, read from its open_clip config without
    loading weights: decode tasks resize to the side before any model is loaded."""
    register_tiny_configs()
    config = open_clip.get_model_config(model.name)
    if config is None:
        raise ValueError(f"unknown open_clip model {model.name!r} (see open_clip.list_models())")
    size = model.image_size or config["vision_cfg"]["image_size"]
    return int(size if isinstance(size, int) else size[0]), int(config["embed_dim"])


def create_clip(config: ModelConfig) -> CLIP:
    """An open_clip model; `pretrained` may be a hub tag, a local file or an s3:// URI, and
    `init_from` a jobs.train run/checkpoint folder or weights file (local or s3://)."""
    check_model_name(config.name)
    pretrained = weights_of_run(config.init_from, config.name) if config.init_from else config.pretrained
    if pretrained and (is_remote(pretrained) or Path(pretrained).suffix):
        pretrained = fetch_to_local(pretrained)
    return open_clip.create_model(config.name, pretrained=pretrained, force_image_size=config.image_size)


@dataclass
class ImageFeatures:
    global_: torch.Tensor  # (B, D), unit norm
    dense: Optional[torch.Tensor]  # (B, D, H/p, W/p), unit norm per location; None if not asked


def pool_regions(dense: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
    """RoIAlign 1x1 of each valid normalised xyxy box on the dense map -> (B, K, D), unit norm.

    Masked boxes are never pooled; their rows are zeros and must be read through `box_mask`.
    """
    batch, dim, height, width = dense.shape
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=boxes.device)
    batch_index, box_index = box_mask.nonzero(as_tuple=True)
    rois = torch.cat([batch_index[:, None].float(), boxes[batch_index, box_index].float() * scale], dim=1)
    # RoIAlign in float32 even when the dense map is bfloat16: bf16 holds integers exactly only up
    # to 256, so a batch index above that (or a coordinate on a large map) would pick the wrong
    # image or place. The pooled features go back to the map's dtype.
    pooled = roi_align(dense.float(), rois, output_size=1, spatial_scale=1.0,
                       sampling_ratio=-1, aligned=True).flatten(1).to(dense.dtype)
    regions = dense.new_zeros(batch, boxes.shape[1], dim)
    regions[batch_index, box_index] = F.normalize(pooled, dim=-1)
    return regions


def pad_boxes(boxes: Sequence[Sequence[Sequence[float]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image lists of normalised xyxy boxes -> (B, K, 4) boxes and their (B, K) mask, K the
    longest list: the input pool_regions takes."""
    slots = max((len(image_boxes) for image_boxes in boxes), default=0)
    box_tensor = torch.zeros(len(boxes), slots, 4)
    box_mask = torch.zeros(len(boxes), slots, dtype=torch.bool)
    for i, image_boxes in enumerate(boxes):
        if len(image_boxes):
            box_tensor[i, : len(image_boxes)] = torch.tensor(image_boxes)
            box_mask[i, : len(image_boxes)] = True
    return box_tensor, box_mask


def pool_token_spans(tokens: torch.Tensor, spans: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
    """Mean of token features over each `[start, end)` span -> (B, L, D), unit norm; masked rows 0."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    inside = (positions >= spans[..., :1]) & (positions < spans[..., 1:]) & span_mask[..., None]
    weights = inside.to(tokens.dtype)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)
    return F.normalize(torch.einsum("blc,bcd->bld", weights, tokens), dim=-1) * span_mask[..., None]


def _value_path(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """The attention block with every token attending only to itself: out_proj(value(x))."""
    attn = block.attn
    dim = attn.embed_dim
    weight = attn.in_proj_weight[2 * dim:] if attn._qkv_same_embed_dim else attn.v_proj_weight
    bias = attn.in_proj_bias[2 * dim:] if attn.in_proj_bias is not None else None
    return attn.out_proj(F.linear(x, weight, bias))


def _project(x: torch.Tensor, projection: nn.Module | torch.Tensor | None) -> torch.Tensor:
    if projection is None:
        return x
    if isinstance(projection, nn.Linear):
        return projection(x)
    return x @ projection


# What inference builds HarmoCLIP with: no GR anchor, the frozen copy of the weights that only a
# training step reads (evaluate, embed and predict never build it).
INFERENCE_METHOD = MethodConfig(lambda_gr=0.0)


class HarmoCLIP(nn.Module):
    """Wraps an open_clip `CLIP` with a ViT image tower; its `clip` attribute is the model saved."""

    def __init__(self, clip: CLIP, method: MethodConfig | None = None, check_inputs: bool = True,
                 anchor_from_batch: bool = False) -> None:
        """`check_inputs`: validate boxes and lexeme spans on every forward, naming the bad sample.
        Each check reads a result back from the device, so a GPU waits on every step; the trainer
        turns it off because its batches were checked on the CPU where Ray Data built them.

        `anchor_from_batch`: GR's anchor targets come with the batch (`anchor_image_features`,
        `anchor_text_features`, computed once per dataset by pipeline.anchor_targets), so no frozen
        copy of the model is built and a step runs no second forward pass. Without it, anchor
        mode keeps a frozen copy (for direct callers with in-memory batches)."""
        super().__init__()
        if not isinstance(clip, CLIP):
            raise ValueError(f"HarmoCLIP needs an open_clip CLIP model, got {type(clip).__name__}")
        visual = clip.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"HarmoCLIP needs a ViT image tower, got {type(visual).__name__}")
        if visual.attn_pool is not None or visual.final_ln_after_pool:
            raise ValueError("ViT towers with attentional pooling or final_ln_after_pool are not supported")
        if not isinstance(visual.patch_dropout, nn.Identity):
            raise ValueError("patch dropout must be off: it removes the tokens the dense map is made of")
        last = visual.transformer.resblocks[-1]
        if not isinstance(last, ResidualAttentionBlock) or not visual.transformer.batch_first:
            raise ValueError("the last vision block must be a batch-first open_clip ResidualAttentionBlock")
        self.clip = clip
        self.method = method or MethodConfig()
        self.check_inputs = check_inputs
        # Optional loss temperatures of LRC and GR: training parameters, not part of the model
        # that is saved (checkpoints stay plain open_clip weights); initialised as CLIP's.
        for name, wanted in (("lrc_logit_scale", self.method.lrc_learnable_temperature),
                             ("gr_logit_scale", self.method.gr_learnable_temperature)):
            if wanted:
                setattr(self, name, nn.Parameter(clip.logit_scale.detach().clone()))
        # GR's anchor mode: a frozen copy of the starting weights (never trained, never saved).
        self.anchor = (copy.deepcopy(clip).eval().requires_grad_(False)
                       if self.method.needs_anchor and not anchor_from_batch else None)

    def loss_parameters(self) -> dict[str, torch.Tensor]:
        """The trained parameters outside `clip` (learnable LRC/GR temperatures), for the training state."""
        return {name: param for name, param in self.named_parameters()
                if not name.startswith(("clip.", "anchor."))}

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.clip.visual.image_size)

    def encode_image(self, images: torch.Tensor, dense: bool = True) -> ImageFeatures:
        """Global embedding as `clip.encode_image`, plus (if asked) the dense map.

        The trunk up to the last block is shared; the last block runs twice, once as usual for
        the global embedding and once without self-attention for the dense map.
        """
        visual = self.clip.visual
        x = visual._embeds(images)
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1]
        pooled, _ = visual._pool(last(x))
        global_ = F.normalize(_project(pooled, visual.proj), dim=-1)
        if not dense:
            return ImageFeatures(global_, None)
        y = x + last.ls_1(_value_path(last, last.ln_1(x)))
        y = y + last.ls_2(last.mlp(last.ln_2(y)))
        patches = _project(visual.ln_post(y[:, 1:]), visual.proj)
        grid_h, grid_w = images.shape[-2] // visual.patch_size[0], images.shape[-1] // visual.patch_size[1]
        dense_map = patches.reshape(images.shape[0], grid_h, grid_w, -1).permute(0, 3, 1, 2)
        return ImageFeatures(global_, F.normalize(dense_map, dim=1))

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(global embedding as `clip.encode_text`, unit norm; projected per-token features)."""
        clip = self.clip
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding.to(cast_dtype)
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        pooled = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        global_ = F.normalize(_project(pooled, clip.text_projection), dim=-1)
        return global_, _project(x, clip.text_projection)

    def encode_lexemes_as_texts(self, lexeme_tokens: torch.Tensor, lexeme_mask: torch.Tensor) -> torch.Tensor:
        """The `separate_text` mode: every valid lexeme encoded as its own text -> (B, L, D)."""
        batch, slots, _ = lexeme_tokens.shape
        features = lexeme_tokens.new_zeros(batch, slots, self.clip.text_projection.shape[-1], dtype=torch.float32)
        if lexeme_mask.any():
            encoded, _ = self.encode_text(lexeme_tokens[lexeme_mask])
            features = features.to(encoded.dtype)
            features[lexeme_mask] = encoded
        return features

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Everything `HarmoCLIPLoss` needs, from one batch dict (see docs/api.md, 'Batch format').

        Inputs: images (B,3,H,W); tokens (B,C); optional image_ids (B,) int64 (rows of one image
        are never each other's negatives); and when regions are on: boxes (B,K,4)
        normalised xyxy, box_mask (B,K), lexeme_spans (B,L,2) token [start, end), lexeme_mask
        (B,L), lexeme_keys (B,L) int64, lexeme_tokens (B,L,C) for the separate_text mode.
        """
        needs_regions = self.method.needs_regions
        image = self.encode_image(batch["images"], dense=needs_regions)
        text_global, text_tokens = self.encode_text(batch["tokens"])
        out = {"image_features": image.global_, "text_features": text_global,
               "logit_scale": self.clip.logit_scale.exp()}
        if "image_ids" in batch:
            out["image_ids"] = batch["image_ids"]
        if self.anchor is not None:
            with torch.no_grad():
                out["anchor_image_features"] = self.anchor.encode_image(batch["images"], normalize=True)
                out["anchor_text_features"] = self.anchor.encode_text(batch["tokens"], normalize=True)
        elif self.method.needs_anchor:
            missing = [k for k in ("anchor_image_features", "anchor_text_features") if k not in batch]
            if missing:
                raise KeyError(f"GR anchor mode with anchor_from_batch needs {missing} in the batch "
                               "(pipeline.anchor_targets computes them)")
            out.update(anchor_image_features=batch["anchor_image_features"],
                       anchor_text_features=batch["anchor_text_features"])
        if not needs_regions:
            return out
        for name, param in self.loss_parameters().items():
            out[name] = param.exp()
        box_mask = batch["box_mask"].bool()
        lexeme_mask = batch["lexeme_mask"].bool()
        if self.check_inputs:
            check_boxes(batch["boxes"], box_mask)
        if self.method.lexeme_embedding == "separate_text":
            lexemes = self.encode_lexemes_as_texts(batch["lexeme_tokens"], lexeme_mask)
        else:
            if self.check_inputs:
                check_lexeme_spans(batch["lexeme_spans"], lexeme_mask, batch["tokens"])
            lexemes = pool_token_spans(text_tokens, batch["lexeme_spans"], lexeme_mask)
        out.update(
            region_features=pool_regions(image.dense, batch["boxes"], box_mask),
            region_mask=box_mask,
            lexeme_features=lexemes,
            lexeme_mask=lexeme_mask,
            lexeme_keys=batch["lexeme_keys"],
        )
        return out

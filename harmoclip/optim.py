"""AdamW with open_clip's weight-decay split, linear warm-up + cosine decay, and the optimizer step."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .distributed import rank_and_world_size


def adamw(model: nn.Module, lr: float, weight_decay: float, l2sp: float = 0.0) -> torch.optim.AdamW:
    """Gains, biases, embeddings of position/class and logit_scale get no weight decay (as open_clip).

    With `l2sp` > 0 the decayed weights decay towards their values *now* (the starting weights,
    so build the optimizer before loading a checkpoint) with that coefficient instead of towards
    zero: L2-SP in AdamW's decoupled form, `p -= lr * l2sp * (p - p_start)`. AdamW applies the
    `-lr * l2sp * p` half; a step post-hook adds `lr * l2sp * p_start` back after every step.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0},
                                   {"params": decay, "weight_decay": l2sp or weight_decay}],
                                  lr=lr, betas=(0.9, 0.98), eps=1e-6)
    if l2sp > 0:
        start = [param.detach().clone() for param in decay]

        def towards_start(optimizer: torch.optim.Optimizer, *_: object) -> None:
            group = optimizer.param_groups[1]
            with torch.no_grad():
                for param, start_value in zip(group["params"], start):
                    param.add_(start_value, alpha=group["lr"] * group["weight_decay"])

        optimizer.register_step_post_hook(towards_start)
    return optimizer


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_gradients(loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, grad_clip: float) -> torch.Tensor | None:
    """Backward, clip, step, schedule, and clamp logit scales at 100 as open_clip's trainer does.

    Returns the global gradient norm before clipping (a tensor, so reading it is the caller's
    choice of host sync), or None when clipping is off."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip else None
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("logit_scale"):
                param.clamp_(0, math.log(100))
    return norm


def term_gradient_norms(terms: dict[str, torch.Tensor], model: nn.Module) -> dict[str, float]:
    """The gradient norm of each (weighted) loss term over the model's parameters, before clipping.

    Each term gets its own `autograd.grad` pass on the retained graph (this leaves `.grad` and
    DDP's reducer alone). On several workers the gradients are averaged first, as DDP averages the
    real ones, so the norms are those of the update every worker applies."""
    params = [p for p in model.parameters() if p.requires_grad]
    _, world_size = rank_and_world_size()
    norms = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
        if world_size > 1:
            dist.all_reduce(flat)
            flat /= world_size
        norms[name] = float(flat.norm())
    return norms

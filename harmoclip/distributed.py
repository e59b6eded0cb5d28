"""Gathering a batch's tensors from all `torch.distributed` workers.

Every worker computes each loss over the whole gathered batch (open_clip's `local_loss=False`),
so a run on N workers optimises the same objective as one worker on the concatenated batch.
Float tensors are gathered with gradient, so each worker's features get the gradient of every
worker's loss (the same scheme as open_clip's `gather_with_grad`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    torch's all_gather backward on gloo is an all-to-all that sends each gradient's memory as if
    it were contiguous; a permuted gradient (einsum's, for region features when nothing else
    uses them) then reaches the workers scrambled. Found by the 2-worker parameter test.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return gradient.contiguous()


def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all workers along dim 0 (identity on a single process)."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor
    if tensor.is_floating_point():
        return _ContiguousGradient.apply(torch.cat(dist_fn.all_gather(tensor.contiguous()), dim=0))
    as_int = tensor.to(torch.int64) if tensor.dtype == torch.bool else tensor.contiguous()
    parts = [torch.empty_like(as_int) for _ in range(world_size)]
    dist.all_gather(parts, as_int)
    return torch.cat(parts, dim=0).to(tensor.dtype)

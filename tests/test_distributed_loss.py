"""Two gloo workers each holding half a batch optimise exactly the one-process objective, and
reach the same parameters."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from open_clip.loss import ClipLoss
from torch.nn.parallel import DistributedDataParallel

from harmoclip import HarmoCLIP, HarmoCLIPLoss, MethodConfig, ModelConfig, create_clip
from harmoclip.batch import synthetic_batch
from harmoclip.optim import adamw, apply_gradients, warmup_cosine

FEATURE_KEYS = ("image_features", "text_features", "region_features", "lexeme_features")


def make_outputs(n: int = 8, k: int = 3, l: int = 2, d: int = 6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    outputs = {
        "image_features": F.normalize(torch.randn(n, d, generator=gen), dim=-1),
        "text_features": F.normalize(torch.randn(n, d, generator=gen), dim=-1),
        "region_features": F.normalize(torch.randn(n, k, d, generator=gen), dim=-1),
        "lexeme_features": F.normalize(torch.randn(n, l, d, generator=gen), dim=-1),
        "region_mask": torch.rand(n, k, generator=gen) > 0.3,
        "lexeme_mask": torch.rand(n, l, generator=gen) > 0.3,
        # few distinct keys, so same-key pairs span both workers' halves
        "lexeme_keys": torch.randint(0, 3, (n, l), generator=gen),
        "logit_scale": torch.tensor(5.0),
        # rows 0 and 4 (one on each worker) and rows 2 and 7 show the same image
        "image_ids": torch.tensor([10, 11, 12, 13, 10, 15, 16, 12]),
    }
    outputs["region_mask"][5] = False  # one image without regions, on the second worker
    return outputs


def run_loss(outputs: dict[str, torch.Tensor], method: MethodConfig) -> tuple[dict, dict]:
    leaves = {k: (v.clone().requires_grad_(True) if k in FEATURE_KEYS else v) for k, v in outputs.items()}
    losses = HarmoCLIPLoss(method)(leaves)
    losses["loss"].backward()
    values = {k: float(v.detach()) if torch.is_tensor(v) else v for k, v in losses.items()}
    return values, {k: leaves[k].grad for k in FEATURE_KEYS}


# Both readings of LRC and region-based GR; lexeme -> image LRC alone is the case where a
# region feature's gradient arrives permuted (see harmoclip.distributed._ContiguousGradient).
METHODS = {"both_ways_gr": MethodConfig(lambda_lrc=0.7, lambda_gr=1.3, gr_mode="contrastive", lrc_region_to_lexeme=True),
           "lexeme_to_image": MethodConfig(lambda_lrc=0.7, lambda_gr=0.0, lrc_region_to_lexeme=False)}


def _half(outputs: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    half = outputs["image_features"].shape[0] // world_size
    return {k: (v if k == "logit_scale" else v[rank * half:(rank + 1) * half]) for k, v in outputs.items()}


def _clip_losses(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GC on this rank's half, with unique image ids, next to open_clip's own distributed ClipLoss
    on the same half (both gather the other rank's features)."""
    local = _half(make_outputs(), rank, world_size)
    image, text, half = local["image_features"], local["text_features"], local["image_features"].shape[0]
    ours = HarmoCLIPLoss(MethodConfig(lambda_lrc=0.0, lambda_gr=0.0))(
        {"image_features": image, "text_features": text, "logit_scale": local["logit_scale"],
         "image_ids": torch.arange(rank * half, (rank + 1) * half)})["gc"]
    theirs = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world_size)(
        image, text, local["logit_scale"])
    return ours.detach(), theirs.detach()


def _worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    """Every two-process case of this file in one process group (each start of a pair of processes
    that import torch costs seconds): each method's losses and feature gradients on this rank's
    half, GC next to open_clip's ClipLoss, and STEPS optimizer steps under DDP."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        results = {name: run_loss(_half(make_outputs(), rank, world_size), method) for name, method in METHODS.items()}
        results["clip_loss"] = _clip_losses(rank, world_size)
        results["params"] = _train_steps(world_size, rank)
        torch.save(results, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """What each of two gloo processes computed (`_worker`), rank 0 first."""
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(2, str(tmp / "init"), str(tmp / "result")), nprocs=2, join=True)
    return [torch.load(tmp / f"result.{rank}") for rank in range(2)]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_gloo_workers_match_one_process(two_ranks, name):
    method = METHODS[name]
    unmasked, _ = run_loss({**make_outputs(), "image_ids": torch.arange(8)}, method)
    single_values, single_grads = run_loss(make_outputs(), method)
    assert abs(unmasked["gc"] - single_values["gc"]) > 1e-3  # the sibling rows matter to the loss
    for rank, results in enumerate(two_ranks):
        values, grads = results[name]
        for key in ("loss", "gc", "lrc", "gr", "lrc_lexemes", "gr_images"):
            if key not in single_values:
                continue
            assert abs(values[key] - single_values[key]) < 1e-5, (rank, key)
        # Each worker's local features get the summed gradient of both workers' (identical)
        # losses; DDP then averages parameter gradients over the 2 workers, giving the
        # one-process gradient. So local grad / world_size == the one-process grad slice.
        for key in FEATURE_KEYS:
            expected = single_grads[key][rank * 4:(rank + 1) * 4]
            assert torch.allclose(grads[key] / 2, expected, atol=1e-6), (rank, key)


def test_two_gloo_workers_with_unique_ids_give_open_clips_clip_loss_bit_for_bit(two_ranks):
    for rank, results in enumerate(two_ranks):
        ours, theirs = results["clip_loss"]
        assert torch.equal(ours, theirs), (rank, ours.item(), theirs.item())


STEPS, GLOBAL_BATCH = 3, 8


def _train_steps(world_size: int, rank: int) -> dict[str, torch.Tensor]:
    """STEPS optimizer steps of harmo-micro on the same global batches, this rank's half of each."""
    torch.manual_seed(0)
    model = HarmoCLIP(create_clip(ModelConfig(name="harmo-micro")), MethodConfig())
    ddp = DistributedDataParallel(model) if world_size > 1 else model
    optimizer = adamw(model, 2e-3, 0.1)
    scheduler = warmup_cosine(optimizer, 1, STEPS)
    loss_fn = HarmoCLIPLoss(model.method)
    share = GLOBAL_BATCH // world_size
    for step in range(STEPS):
        batch = synthetic_batch("harmo-micro", model.image_size, batch_size=GLOBAL_BATCH, max_regions=3,
                                max_lexemes=2, seed=step)
        batch["image_ids"] = torch.tensor([0, 1, 2, 3, 0, 5, 6, 2])  # siblings across the two halves
        local = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
        apply_gradients(loss_fn(ddp(local))["loss"], model, optimizer, scheduler, 1.0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_two_workers_reach_the_parameters_of_one_on_the_same_global_batches(two_ranks):
    single = _train_steps(1, 0)
    torch.manual_seed(0)
    initial = HarmoCLIP(create_clip(ModelConfig(name="harmo-micro"))).state_dict()
    for rank, results in enumerate(two_ranks):
        for name, value in results["params"].items():
            assert torch.allclose(value, single[name], rtol=1e-4, atol=1e-5), (rank, name)
    assert any(not torch.equal(single[name], initial[name]) for name in single)  # training moved them

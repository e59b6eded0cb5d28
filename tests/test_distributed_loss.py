"""Two gloo workers each holding half a batch optimise exactly the one-process objective."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from harmoclip import HarmoCLIPLoss, MethodConfig

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


def _worker(rank: int, world_size: int, init_file: str, result_file: str, method: MethodConfig) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        outputs = make_outputs()
        half = outputs["image_features"].shape[0] // world_size
        local = {k: (v if k == "logit_scale" else v[rank * half:(rank + 1) * half]) for k, v in outputs.items()}
        torch.save(run_loss(local, method), f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_workers_match_one_process(tmp_path):
    method = MethodConfig(lambda_lrc=0.7, lambda_gr=1.3)
    unmasked, _ = run_loss({**make_outputs(), "image_ids": torch.arange(8)}, method)
    single_values, single_grads = run_loss(make_outputs(), method)
    assert abs(unmasked["gc"] - single_values["gc"]) > 1e-3  # the sibling rows matter to the loss
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "result"), method), nprocs=2, join=True)
    for rank in range(2):
        values, grads = torch.load(tmp_path / f"result.{rank}")
        for key in ("loss", "gc", "lrc", "gr", "lrc_lexemes", "gr_images"):
            assert abs(values[key] - single_values[key]) < 1e-5, (rank, key)
        # Each worker's local features get the summed gradient of both workers' (identical)
        # losses; DDP then averages parameter gradients over the 2 workers, giving the
        # one-process gradient. So local grad / world_size == the one-process grad slice.
        for key in FEATURE_KEYS:
            expected = single_grads[key][rank * 4:(rank + 1) * 4]
            assert torch.allclose(grads[key] / 2, expected, atol=1e-6), (rank, key)

"""The smallest real end-to-end run: HarmoCLIP training steps on one synthetic batch.

Prints GC, LRC and GR per step so a fresh install can be checked in seconds; the full embedded
default (data -> prepare -> train -> evaluate) is `jobs.demo`.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from harmoclip import HarmoCLIP, HarmoCLIPLoss, create_clip
from harmoclip.batch import synthetic_batch
from harmoclip.cli import add_method_arguments, add_model_arguments, method_from_args, model_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.smoke", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps on the batch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast, as jobs.train runs with --gpu")
    add_model_arguments(parser)
    add_method_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = build_parser().parse_args(argv)

    torch.manual_seed(args.seed)
    method = method_from_args(args)
    device = torch.device(args.device)
    model = HarmoCLIP(create_clip(model_from_args(args)), method).to(device)
    loss_fn = HarmoCLIPLoss(method)
    batch = {k: v.to(device) for k, v in synthetic_batch(args.model_name, model.image_size,
                                                         batch_size=args.batch_size, seed=args.seed).items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    print(f"model {args.model_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"batch {args.batch_size}, lambda_lrc={method.lambda_lrc}, lambda_gr={method.lambda_gr}, "
          f"{device}{' bf16' if args.bf16 else ''}")
    print(f"{'step':>4} {'total':>8} {'GC':>8} {'LRC':>8} {'GR':>8} {'s/step':>7}")
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16):
            losses = loss_fn(model(batch))
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        values = {k: float(losses[k].detach()) if k in losses else 0.0 for k in ("loss", "gc", "lrc", "gr")}
        if not all(math.isfinite(v) for v in values.values()):
            raise FloatingPointError(f"step {step}: a loss is not finite: {values}")
        print(f"{step:>4} {values['loss']:8.4f} {values['gc']:8.4f} {values['lrc']:8.4f} {values['gr']:8.4f} "
              f"{time.perf_counter() - start:7.3f}", flush=True)
    return values


if __name__ == "__main__":
    main()

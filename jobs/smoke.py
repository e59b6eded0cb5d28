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
from harmoclip.cli import (HelpFormatter, add_bool_argument, add_deprecated_alias, add_method_arguments,
                           add_model_arguments, device_is_gpu, method_from_args, model_from_args)
from jobs.common import add_verbose_argument, set_verbose, user_errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.smoke", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="Optimizer steps on the batch")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="Training samples per worker per step (one process here: the synthetic batch)")
    parser.add_argument("--seed", type=int, default=0, help="Random seed of the weights and of the synthetic batch")
    add_bool_argument(parser, "--gpu", help="Use GPUs: run on the first CUDA device (else the CPU)")
    add_deprecated_alias(parser, "--device", "--gpu", dest="gpu", type=device_is_gpu)
    add_bool_argument(parser, "--bf16", help="bfloat16 autocast, as jobs.train runs with --gpu")
    add_model_arguments(parser)
    add_method_arguments(parser)
    add_verbose_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    with user_errors(ValueError, OSError):  # a bad flag value, model name or weights file: exit 2
        if args.steps < 1 or args.batch_size < 1:
            raise ValueError(f"--steps and --batch-size must be >= 1, got {args.steps} and {args.batch_size}")
        torch.manual_seed(args.seed)
        method = method_from_args(args)
        if args.gpu and not torch.cuda.is_available():
            raise ValueError("--gpu: no CUDA device is visible here")
        device = torch.device("cuda" if args.gpu else "cpu")
        clip = create_clip(model_from_args(args))
    model = HarmoCLIP(clip, method).to(device)
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

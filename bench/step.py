"""Train-step time of HarmoCLIP vs GC-only (plain CLIP fine-tuning) on the same model and batch.

A step is forward + loss + backward + AdamW update. The two variants are measured interleaved
(one step each, in turn) so machine noise hits both alike; the table shows medians after warm-up
and the ratio HarmoCLIP / GC-only (target <= 1.10).

    .venv/bin/python -m bench.step [--models harmo-tiny ViT-B-16] [--steps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from harmoclip import HarmoCLIP, HarmoCLIPLoss, MethodConfig, ModelConfig, create_clip
from harmoclip.batch import synthetic_batch
from harmoclip.optim import adamw, apply_gradients, warmup_cosine


def _step_fn(model_name: str, method: MethodConfig, batch: dict, seed: int):
    torch.manual_seed(seed)
    model = HarmoCLIP(create_clip(ModelConfig(name=model_name)), method)
    loss_fn = HarmoCLIPLoss(method)
    optimizer = adamw(model, lr=1e-5, weight_decay=0.1)
    scheduler = warmup_cosine(optimizer, warmup_steps=10, total_steps=1000)

    def step() -> float:
        start = time.perf_counter()
        apply_gradients(loss_fn(model(batch))["loss"], model, optimizer, scheduler, grad_clip=1.0)
        return time.perf_counter() - start

    return step


def measure(model_name: str, batch_size: int, regions: int, lexemes: int, warmup: int, steps: int) -> dict:
    image_size = HarmoCLIP(create_clip(ModelConfig(name=model_name))).image_size
    batch = synthetic_batch(model_name, image_size, batch_size=batch_size, max_regions=regions,
                            max_lexemes=lexemes, seed=0)
    batch["box_mask"][:] = True  # the full K boxes per image: the worst case
    variants = {"gc_only": MethodConfig(lambda_lrc=0.0, lambda_gr=0.0), "harmoclip": MethodConfig()}
    step_fns = {name: _step_fn(model_name, method, batch, seed=0) for name, method in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + steps):
        elapsed = {name: fn() for name, fn in step_fns.items()}
        if i >= warmup:
            for name, seconds in elapsed.items():
                times[name].append(seconds)
        print(f"  {model_name} step {i + 1}/{warmup + steps}{' (warm-up)' if i < warmup else ''}: "
              + ", ".join(f"{n} {s:.3f}s" for n, s in elapsed.items()), flush=True)
    gc_only, harmo = statistics.median(times["gc_only"]), statistics.median(times["harmoclip"])
    return {"model": model_name, "image": f"{image_size[0]}px", "gc_only_s": gc_only,
            "harmoclip_s": harmo, "ratio": harmo / gc_only}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["harmo-tiny", "ViT-B-16"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--regions", type=int, default=20, help="K boxes per image")
    parser.add_argument("--lexemes", type=int, default=8, help="max lexemes per caption")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"K={args.regions}, L<={args.lexemes}")
    rows = [measure(m, args.batch_size, args.regions, args.lexemes, args.warmup, args.steps) for m in args.models]
    print("\n| model | image | GC-only step (s) | HarmoCLIP step (s) | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['image']} | {r['gc_only_s']:.3f} | {r['harmoclip_s']:.3f} | {r['ratio']:.3f} |")


if __name__ == "__main__":
    main()

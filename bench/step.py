"""Train-step time of HarmoCLIP vs GC-only (plain CLIP fine-tuning) on the same model and batch.

A step is forward + loss + backward + AdamW update, as jobs.train runs it: with GR's anchor mode
the starting model's embeddings come with the batch (cached once per dataset by
pipeline.anchor_targets; here computed once before timing), so no frozen model runs in the step.
The two variants are measured interleaved
(one step each, in turn) so machine noise hits both alike; the table shows medians after warm-up,
the ratio HarmoCLIP / GC-only (target <= 1.10), samples/s, and on a GPU with --bf16 the model
FLOPs utilisation: torch's FLOP count of one HarmoCLIP step / step time / the GPU's bf16 peak.

    .venv/bin/python -m bench.step [--models harmo-tiny ViT-B-16] [--steps 5] [--device cuda --bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from harmoclip import HarmoCLIP, HarmoCLIPLoss, MethodConfig, ModelConfig, create_clip
from harmoclip.batch import synthetic_batch
from harmoclip.optim import adamw, apply_gradients, warmup_cosine
from harmoclip.presets import DEFAULT_METHOD, METHOD_PRESETS


# Dense bf16 tensor-core peaks (TFLOP/s) of common training GPUs, from the vendors' data sheets
# (SXM parts; without sparsity): the denominator of model FLOPs utilisation.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}


def bf16_peak_tflops(device: torch.device) -> float | None:
    """The GPU's bf16 peak from BF16_PEAK_TFLOPS by its name, or None (a CPU, an unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def _step_fn(model_name: str, method: MethodConfig, batch: dict, seed: int, device: torch.device, bf16: bool):
    torch.manual_seed(seed)
    model = HarmoCLIP(create_clip(ModelConfig(name=model_name)), method, anchor_from_batch=True).to(device)
    loss_fn = HarmoCLIPLoss(method)
    optimizer = adamw(model, lr=1e-5, weight_decay=0.1, l2sp=method.l2sp)
    scheduler = warmup_cosine(optimizer, warmup_steps=10, total_steps=1000)

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(batch))["loss"]
        apply_gradients(loss, model, optimizer, scheduler, grad_clip=1.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return step


def step_flops(step) -> int:
    """FLOPs of one step (forward + backward, matmuls and convolutions) counted by torch."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure(model_name: str, batch_size: int, regions: int, lexemes: int, warmup: int, steps: int,
            device: torch.device = torch.device("cpu"), bf16: bool = False) -> dict:
    image_size = HarmoCLIP(create_clip(ModelConfig(name=model_name))).image_size
    batch = synthetic_batch(model_name, image_size, batch_size=batch_size, max_regions=regions,
                            max_lexemes=lexemes, seed=0)
    batch["box_mask"][:] = True  # the full K boxes per image: the worst case
    batch = {k: v.to(device) for k, v in batch.items()}
    torch.manual_seed(0)
    start = create_clip(ModelConfig(name=model_name)).to(device).eval()
    with torch.no_grad():  # the cached anchor targets the training feed would bring
        batch.update(anchor_image_features=start.encode_image(batch["images"], normalize=True),
                     anchor_text_features=start.encode_text(batch["tokens"], normalize=True))
    del start
    variants = {"gc_only": METHOD_PRESETS["gc_only"], "harmoclip": METHOD_PRESETS[DEFAULT_METHOD]}
    step_fns = {name: _step_fn(model_name, method, batch, 0, device, bf16) for name, method in variants.items()}
    flops = step_flops(step_fns["harmoclip"])
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + steps):
        elapsed = {name: fn() for name, fn in step_fns.items()}
        if i >= warmup:
            for name, seconds in elapsed.items():
                times[name].append(seconds)
        print(f"  {model_name} step {i + 1}/{warmup + steps}{' (warm-up)' if i < warmup else ''}: "
              + ", ".join(f"{n} {s:.3f}s" for n, s in elapsed.items()), flush=True)
    gc_only, harmo = statistics.median(times["gc_only"]), statistics.median(times["harmoclip"])
    peak = bf16_peak_tflops(device)
    return {"model": model_name, "image": f"{image_size[0]}px", "batch": batch_size, "gc_only_s": gc_only,
            "harmoclip_s": harmo, "ratio": harmo / gc_only, "gc_only_samples_s": batch_size / gc_only,
            "harmoclip_samples_s": batch_size / harmo, "harmoclip_tflops": flops / harmo / 1e12,
            "mfu": flops / harmo / (peak * 1e12) if peak and bf16 else None}


def format_rows(rows: list[dict]) -> str:
    lines = ["| model | image | batch | GC-only step (s) | HarmoCLIP step (s) | ratio | GC-only samples/s "
             "| HarmoCLIP samples/s | HarmoCLIP TFLOP/s | MFU (bf16 peak) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['model']} | {r['image']} | {r['batch']} | {r['gc_only_s']:.3f} | {r['harmoclip_s']:.3f} "
                     f"| {r['ratio']:.3f} | {r['gc_only_samples_s']:.1f} | {r['harmoclip_samples_s']:.1f} "
                     f"| {r['harmoclip_tflops']:.2f} | {mfu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["harmo-tiny", "ViT-B-16"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--regions", type=int, default=20, help="K boxes per image")
    parser.add_argument("--lexemes", type=int, default=8, help="max lexemes per caption")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (MFU is reported against the bf16 peak)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}{' bf16' if args.bf16 else ''}, "
          f"batch {args.batch_size}, K={args.regions}, L<={args.lexemes}")
    rows = [measure(m, args.batch_size, args.regions, args.lexemes, args.warmup, args.steps, device, args.bf16)
            for m in args.models]
    print("\n" + format_rows(rows))
    return rows


if __name__ == "__main__":
    main()

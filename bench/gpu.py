"""The GPU check: every CUDA path of the project in one run, one table (run by bench/gpu.sh).

1. jobs.smoke on the GPU with bf16 autocast: finite losses.
2. bench.step on ViT-B-16 at 224 px, batch 128, bf16: GC-only and HarmoCLIP samples/s, their
   ratio (target <= 1.10) and model FLOPs utilisation against the GPU's bf16 peak.
3. bench.train with one GPU worker: Ray-Data-fed vs in-memory samples/s (target >= 0.9), and the
   CPUs the cluster leaves for the feed.
4. bench.evaluate on the GPU: the Ray Data embedding stage vs the in-process forward (target >= 0.8).

`--dry-run` runs the same four steps on the CPU with tiny sizes (about two minutes on 2 cores), so
the script is exercised by the test suite and cannot rot between GPU sessions. The table is
printed and, when $OUT is set, written to $OUT/gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

import ray
import torch

from bench import evaluate as evaluate_bench
from bench import step as step_bench
from bench import train as train_bench
from jobs import smoke
from jobs.common import quiet_libraries


@dataclass(frozen=True)
class Sizes:
    model: str
    step_batch: int
    step_warmup: int
    step_steps: int
    train_images: int
    train_steps: int
    train_batch: int
    eval_images: tuple[int, int]
    eval_side: int
    eval_batch: int
    eval_repeats: int  # timed (small, large) pairs of bench.evaluate, the median kept


FULL = Sizes(model="ViT-B-16", step_batch=128, step_warmup=3, step_steps=10, train_images=2048, train_steps=40,
             train_batch=128, eval_images=(256, 1024), eval_side=480, eval_batch=128, eval_repeats=3)
DRY = Sizes(model="harmo-micro", step_batch=4, step_warmup=1, step_steps=1, train_images=12, train_steps=3,
            train_batch=4, eval_images=(4, 400), eval_side=48, eval_batch=4, eval_repeats=1)
# The dry run times one bench.evaluate pair far apart (about 9 s of work between them on 2 cores)
# rather than three pairs 92 images apart: each run starts a model actor, and that start-up's
# noise (a second or two) swamped a 2 s difference, twice in a row in one run of 2026-12-03.
# What a measured figure can possibly be: a rate is > 0, a ratio of two such rates is within a factor
# of 100 of 1, a loss is finite. A figure outside fails its row (the script then exits 1), so a
# broken measurement never reads as a result. (A factor of 20 was too tight: on the dry run's
# harmo-micro at 48 px the in-process forward ran 1,869 img/s and the Ray Data stage 86, a real
# ratio of 0.046 set by Ray's per-batch cost, in a fresh-clone CI run of 2026-12-02.)
SANE = {"rate": (0.0, float("inf")), "ratio": (0.01, 100.0), "loss": (float("-inf"), float("inf"))}


def impossible(figures: dict[str, tuple[str, float]]) -> list[str]:
    """The figures (name -> (kind, value)) that cannot be right, as 'name = value' texts."""
    bad = []
    for name, (kind, value) in figures.items():
        low, high = SANE[kind]
        if not math.isfinite(value) or not low < value < high:
            bad.append(f"{name} = {value:g}")
    return bad


def _quietly(function, *args, **kwargs):
    """Run a bench step with its own printing captured: the script prints one table."""
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


def run(dry_run: bool) -> list[tuple[str, str, str, float, list[str]]]:
    """(check, measured, target, seconds, impossible figures) rows."""
    sizes = DRY if dry_run else FULL
    device = "cpu" if dry_run else "cuda"
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device visible to torch; use --dry-run on a CPU machine")
    rows = []

    start = time.perf_counter()
    losses = _quietly(smoke.main, ["--model", sizes.model, "--gpu", str(device == "cuda"), "--bf16", "--steps", "3",
                                   "--batch-size", str(sizes.step_batch)])
    rows.append(("jobs.smoke, bf16, 3 steps", f"loss {losses['loss']:.3f} (gc {losses['gc']:.3f}, lrc "
                 f"{losses['lrc']:.3f}, gr {losses['gr']:.3f})", "finite", time.perf_counter() - start,
                 impossible({k: ("loss", losses[k]) for k in ("loss", "gc", "lrc", "gr")})))

    start = time.perf_counter()
    step = _quietly(step_bench.measure, sizes.model, sizes.step_batch, 20, 8, sizes.step_warmup, sizes.step_steps,
                    torch.device(device), True)
    mfu = f", MFU {100 * step['mfu']:.1f}% of bf16 peak" if step["mfu"] is not None else ", MFU n/a (no known peak)"
    rows.append((f"bench.step {sizes.model} {step['image']}, batch {sizes.step_batch}, bf16",
                 f"GC-only {step['gc_only_samples_s']:.1f}/s, HarmoCLIP {step['harmoclip_samples_s']:.1f}/s, "
                 f"ratio {step['ratio']:.3f}{mfu}", "ratio <= 1.10", time.perf_counter() - start,
                 impossible({"GC-only": ("rate", step["gc_only_samples_s"]),
                             "HarmoCLIP": ("rate", step["harmoclip_samples_s"]), "ratio": ("ratio", step["ratio"])})))

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train = _quietly(train_bench.measure, tmp, sizes.train_images, sizes.train_steps, sizes.train_batch,
                         sizes.model, [1], not dry_run)
    (_, memory, _), (feed, fed, ratio) = train
    rows.append((f"bench.train {sizes.model}, 1 worker, batch {sizes.train_batch}",
                 f"in-memory {memory:.1f}/s, Ray-fed {fed:.1f}/s, ratio {ratio:.2f} ({feed.rsplit(', ', 1)[1]})",
                 "ratio >= 0.9", time.perf_counter() - start,
                 impossible({"in-memory": ("rate", memory), "Ray-fed": ("rate", fed), "ratio": ("ratio", ratio)})))

    start = time.perf_counter()
    evaluation = _quietly(evaluate_bench.main, ["--models", sizes.model, "--images", *map(str, sizes.eval_images),
                                                "--image-side", str(sizes.eval_side), "--batch-size",
                                                str(sizes.eval_batch), "--repeats", str(sizes.eval_repeats),
                                                *([] if dry_run else ["--gpu"])])[0]
    rows.append((f"bench.evaluate {sizes.model}, {sizes.eval_side}px, batch {sizes.eval_batch}",
                 f"forward {evaluation.forward:.1f} img/s, Ray Data stage {evaluation.stage:.1f} img/s, ratio "
                 f"{evaluation.ratio:.2f}, start-up {evaluation.startup:.1f} s", "ratio >= 0.8",
                 time.perf_counter() - start,
                 impossible({"forward": ("rate", evaluation.forward), "Ray Data stage": ("rate", evaluation.stage),
                             "ratio": ("ratio", evaluation.ratio)})))
    return rows


def table(rows: list[tuple[str, str, str, float, list[str]]], dry_run: bool) -> str:
    device = "CPU (dry run, tiny sizes: the numbers mean nothing)" if dry_run else torch.cuda.get_device_name(0)
    lines = [f"GPU check {time.strftime('%Y-%m-%d')} on {device}; torch {torch.__version__} "
             f"(CUDA {torch.version.cuda}), Ray {ray.__version__}, Python {platform.python_version()}, "
             f"{len(os.sched_getaffinity(0))} CPU cores", "",
             "| check | measured | target | s | figures |", "|---|---|---|---|---|"]
    lines += [f"| {check} | {measured} | {target} | {seconds:.0f} | "
              f"{'FAIL, impossible: ' + ', '.join(bad) if bad else 'possible'} |"
              for check, measured, target, seconds, bad in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny sizes")
    args = parser.parse_args(argv)
    if not ray.is_initialized():
        ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
    quiet_libraries()
    rows = run(args.dry_run)
    result = table(rows, args.dry_run)
    print(result)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu.md"), "w") as handle:
            handle.write(result + "\n")
    sys.stdout.flush()
    if any(bad for *_, bad in rows):
        raise SystemExit("error: a measured figure is impossible (see the figures column): the check failed")
    return result


if __name__ == "__main__":
    main()

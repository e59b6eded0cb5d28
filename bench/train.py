"""Training throughput: Ray-Data-fed Ray Train vs the same loop on pre-decoded in-memory tensors,
and 1 vs 2 workers, on the synthetic shapes set (harmo-tiny unless --model says otherwise: a
bigger model shows how the fixed per-batch cost of the feed shrinks against the step).

Ray runs report `wall_samples_per_s`: samples trained since the end of the first step divided by
the wall time, data waits included. The in-memory loop runs the same model, loss, optimizer and
step function in one process over batches decoded beforehand. Target: Ray-fed >= 0.95 of it.

    .venv/bin/python -m bench.train [--images 600] [--steps 150] [--model harmo-tiny] [--workers 1 2] [--gpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import numpy as np
import ray
import torch

from harmoclip import HarmoCLIP, HarmoCLIPLoss, MethodConfig, ModelConfig, create_clip
from harmoclip.config import PrepareConfig, TrainConfig
from harmoclip.optim import adamw, apply_gradients, warmup_cosine
from jobs import train as train_job
from pipeline.prepare import prepare
from pipeline.sources import find_source
from pipeline.synthetic import write_shapes_dataset
from pipeline.sampling import Schedule
from pipeline.train_data import training_index, worker_batches

def in_memory_rate(data: str, model_config: ModelConfig, method: MethodConfig, train: TrainConfig) -> float:
    """Samples/s of the training step alone on batches decoded beforehand, on the device a Ray
    Train worker would use (the GPU, with bf16 autocast, when train.gpu)."""
    device = torch.device("cuda" if train.gpu else "cpu")
    torch.manual_seed(train.seed)
    clip = create_clip(model_config)
    spec = train_job.batch_spec(clip, model_config, method, train)
    index, _ = training_index(data, spec)
    schedule = Schedule(index, train.seed, 1, train.batch_size, train.shuffle_window)
    batches = [{k: torch.as_tensor(np.asarray(v)).to(device) for k, v in b.items()}
               for b in worker_batches(data, index, schedule, 0, 0, schedule.plan(0).steps, spec).iter_batches(
                   batch_size=train.batch_size, batch_format="numpy")]
    model = HarmoCLIP(clip, method).to(device)
    loss_fn = HarmoCLIPLoss(method)
    optimizer = adamw(model, train.lr, train.weight_decay, method.l2sp)
    scheduler = warmup_cosine(optimizer, train.warmup_steps, train.steps)

    def step(batch: dict) -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=train.gpu):
            loss = loss_fn(model(batch))["loss"].float()
        apply_gradients(loss, model, optimizer, scheduler, train.grad_clip)

    step(batches[0])  # warm-up
    start = time.perf_counter()
    for index_in_run in range(1, train.steps):
        step(batches[index_in_run % len(batches)])
    if train.gpu:
        torch.cuda.synchronize()
    return (train.steps - 1) * train.batch_size / (time.perf_counter() - start)


def measure(tmp: str, images: int, steps: int, batch_size: int, model_name: str, workers: list[int],
            gpu: bool) -> list[tuple[str, float, float]]:
    """(feed, samples/s, ratio vs in-memory) rows, all measured in this call."""
    model_config = ModelConfig(name=model_name)
    method = MethodConfig()
    write_shapes_dataset(f"{tmp}/shapes", images=images, seed=0)
    prepare(find_source(f"{tmp}/shapes"), f"{tmp}/prepared", PrepareConfig(regions="grid", tokenizer=model_name))
    base = TrainConfig(steps=steps, batch_size=batch_size, checkpoint_every=steps, log_every=steps, gpu=gpu,
                       mlflow_uri=f"sqlite:///{tmp}/mlflow.db")
    memory = in_memory_rate(f"{tmp}/prepared", model_config, method, base)
    rows = [("in-memory tensors, 1 process", memory, 1.0)]
    for count in workers:
        train = dataclasses.replace(base, workers=count)
        rate = train_job.run(f"{tmp}/prepared", f"{tmp}/run-{count}", model_config, method, train)["wall_samples_per_s"]
        feed_cpus = ray.cluster_resources().get("CPU", 0) - count
        rows.append((f"Ray Data -> Ray Train, {count} {'GPU ' if gpu else ''}worker(s), "
                     f"{feed_cpus:.0f} CPUs left for the feed", rate, rate / memory))
    return rows


def format_rows(rows: list[tuple[str, float, float]]) -> str:
    return "\n".join(["| feed | samples/s | ratio vs in-memory |", "|---|---|---|",
                      *(f"| {name} | {rate:.1f} | {ratio:.2f} |" for name, rate, ratio in rows)])


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="harmo-tiny", help="open_clip model name (random weights)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to run")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 (the in-memory loop too)")
    args = parser.parse_args(argv)
    if not ray.is_initialized():
        ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(tmp, args.images, args.steps, args.batch_size, args.model, args.workers, args.gpu)
    print(f"\n{args.model}, HarmoCLIP loss, {args.batch_size} samples per worker per step, {args.steps} steps, "
          f"{os.cpu_count()} cores{', GPU bf16' if args.gpu else ''}")
    print(format_rows(rows))
    return rows


if __name__ == "__main__":
    main()

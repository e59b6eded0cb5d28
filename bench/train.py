"""Training throughput: Ray-Data-fed Ray Train vs the same loop on pre-decoded in-memory tensors,
and 1 vs 2 workers, on the synthetic shapes set (harmo-tiny unless --model says otherwise: a
bigger model shows how the fixed per-batch cost of the feed shrinks against the step).

Ray runs report `wall_samples_per_s`: samples trained since the end of the first step divided by
the wall time, data waits included. The in-memory loop runs the same model, loss, optimizer and
step function in one process over batches decoded beforehand. Target: Ray-fed >= 0.95 of it.

    .venv/bin/python -m bench.train [--images 600] [--steps 150] [--model harmo-tiny]
"""

from __future__ import annotations

import argparse
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
    torch.manual_seed(train.seed)
    clip = create_clip(model_config)
    spec = train_job.batch_spec(clip, model_config, method, train)
    index, _ = training_index(data, spec)
    schedule = Schedule(index, train.seed, 1, train.batch_size, train.shuffle_window)
    batches = [{k: torch.as_tensor(np.asarray(v)) for k, v in b.items()}
               for b in worker_batches(data, index, schedule, 0, 0, schedule.plan(0).steps, spec).iter_batches(
                   batch_size=train.batch_size, batch_format="numpy")]
    model = HarmoCLIP(clip, method)
    loss_fn = HarmoCLIPLoss(method)
    optimizer = adamw(model, train.lr, train.weight_decay)
    scheduler = warmup_cosine(optimizer, train.warmup_steps, train.steps)
    apply_gradients(loss_fn(model(batches[0]))["loss"], model, optimizer, scheduler, train.grad_clip)  # warm-up
    start = time.perf_counter()
    for step in range(1, train.steps):
        apply_gradients(loss_fn(model(batches[step % len(batches)]))["loss"], model, optimizer, scheduler,
                        train.grad_clip)
    return (train.steps - 1) * train.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--model", default="harmo-tiny", help="open_clip model name (random weights)")
    args = parser.parse_args()
    model_config = ModelConfig(name=args.model)
    ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, log_to_driver=False)
    method = MethodConfig()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_shapes_dataset(f"{tmp}/shapes", images=args.images, seed=0)
        prepare(find_source(f"{tmp}/shapes"), f"{tmp}/prepared", PrepareConfig(regions="grid", tokenizer=args.model))
        base = TrainConfig(steps=args.steps, batch_size=args.batch_size, checkpoint_every=args.steps,
                           log_every=args.steps, mlflow_uri=f"sqlite:///{tmp}/mlflow.db")
        memory = in_memory_rate(f"{tmp}/prepared", model_config, method, base)
        rows.append(("in-memory tensors, 1 process", memory, 1.0))
        for workers in (1, 2):
            train = TrainConfig(**{**base.__dict__, "workers": workers})
            result = train_job.run(f"{tmp}/prepared", f"{tmp}/run-{workers}", model_config, method, train)
            rate = result["wall_samples_per_s"]
            rows.append((f"Ray Data -> Ray Train, {workers} worker(s)", rate, rate / memory))
    print(f"\n{args.model}, HarmoCLIP loss, {args.batch_size} samples per worker per step, {args.steps} steps, "
          f"{os.cpu_count()} cores")
    print("| feed | samples/s | ratio vs in-memory |\n|---|---|---|")
    for name, rate, ratio in rows:
        print(f"| {name} | {rate:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()

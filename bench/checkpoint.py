"""What a checkpoint costs a training run on S3: no checkpoints but the last, checkpoints uploaded
synchronously (the step waits), and asynchronously (the default: Ray Train uploads in a
background thread while training goes on).

All three runs train the same model for the same steps against an S3 server (moto, in this
process, on 127.0.0.1); the cost of one checkpoint step is the run's extra wall time over the
no-checkpoint run, divided by its extra checkpoints. A real bucket adds network time, which
the synchronous mode pays on every checkpoint step and the asynchronous one hides behind the
next steps.

    .venv/bin/python -m bench.checkpoint [--model ViT-S-32] [--steps 12] [--every 3]
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time

import boto3
import ray

from harmoclip import MethodConfig, ModelConfig
from harmoclip.config import PrepareConfig, TrainConfig
from jobs.common import free_port
from jobs import train as train_job
from pipeline.prepare import prepare
from pipeline.sources import find_source
from pipeline.synthetic import write_shapes_dataset


def start_s3() -> object:
    """A moto S3 server on a free port, with the environment pointing every client at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench-checkpoints")
    return server


def checkpoint_megabytes(prefix: str) -> float:
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    objects = s3.list_objects_v2(Bucket="bench-checkpoints", Prefix=prefix)["Contents"]
    newest = max(re.search(r"/(checkpoint_\d+)/", o["Key"]).group(1) for o in objects
                 if re.search(r"/checkpoint_\d+/", o["Key"]))
    return sum(o["Size"] for o in objects if f"/{newest}/" in o["Key"]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-S-32", help="open_clip model name (random weights)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3, help="checkpoint every this many steps")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    server = start_s3()
    ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_shapes_dataset(f"{tmp}/shapes", images=64, seed=0, size=96)
        prepare(find_source(f"{tmp}/shapes"), f"{tmp}/prepared", PrepareConfig(regions="grid", tokenizer=args.model))
        for name, every, upload in (("last step only", args.steps, "sync"), ("sync", args.every, "sync"),
                                    ("async (default)", args.every, "async")):
            train = TrainConfig(steps=args.steps, batch_size=args.batch_size, checkpoint_every=every,
                                checkpoint_upload=upload, log_every=args.every, grad_norms=False,
                                mlflow_uri=f"sqlite:///{tmp}/mlflow.db")
            prefix = f"{upload}-{every}"
            out = f"s3://bench-checkpoints/{prefix}"
            start = time.perf_counter()
            train_job.run(f"{tmp}/prepared", out, ModelConfig(name=args.model), MethodConfig(), train)
            rows.append((name, time.perf_counter() - start, args.steps // every - 1, checkpoint_megabytes(prefix)))
    server.stop()
    baseline = rows[0][1]
    print(f"\n{args.model}, {args.steps} steps of {args.batch_size} samples, {os.cpu_count()} cores, S3 = moto on "
          f"127.0.0.1; one checkpoint = {rows[0][3]:.0f} MB")
    print("| checkpoints | run wall s | ratio vs last step only | extra checkpoints | cost per checkpoint step s |\n"
          "|---|---|---|---|---|")
    for name, wall, extra, _ in rows:
        cost = f"{(wall - baseline) / extra:.2f}" if extra else "-"
        print(f"| {name} | {wall:.1f} | {wall / baseline:.3f} | {extra} | {cost} |")


if __name__ == "__main__":
    main()

"""What bench.evaluate and bench.embed share: a Ray Data inference stage timed against the same
model's forward over the same decoded batches in one process.

The in-process baseline decodes every image first (outside the clock) with the stage's own decode
function, then times only the model: `encode_image` on the batches (dense map and RoIAlign when the
stage pools regions, the crops too when it encodes them), with all of this machine's cores. A
stage is timed end to end at two sizes (three times; medians); the difference gives its steady
rate (images/s) and the rest its fixed start-up (Ray Data planning, actor start, model load): start-up = T(small) -
small / rate. The baseline is measured before and after the stage and the faster one is kept,
so a busy moment on the machine does not flatter the stage.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch

from harmoclip import HarmoCLIP, ModelConfig, create_clip
from harmoclip.config import PrepareConfig
from harmoclip.model import INFERENCE_METHOD, model_shape, pad_boxes, pool_regions
from harmoclip.pixels import normalise
from pipeline.inference_data import decode_stage, read_inference_input
from pipeline.synthetic import write_shapes_dataset

GT = PrepareConfig(regions="gt")


@dataclass
class Row:
    model: str
    what: str
    forward: float  # images/s, in-process forward
    stage: float  # images/s, the Ray Data stage's steady rate
    startup: float  # s, the stage's fixed cost

    @property
    def ratio(self) -> float:
        return self.stage / self.forward


def _tensor(blobs: list[bytes], size: int, mean: list[float], std: list[float], device: torch.device) -> torch.Tensor:
    pixels = np.frombuffer(b"".join(blobs), np.uint8).reshape(-1, size, size, 3)
    return normalise(torch.from_numpy(pixels.copy()).to(device), mean, std)


def forward_rate(data: str, model: ModelConfig, batch_size: int, crops: bool, gpu: bool = False) -> float:
    """Images/s of the model alone on pre-decoded batches already on its device (one warm-up
    batch first)."""
    device = torch.device("cuda" if gpu else "cpu")
    size = model_shape(model)[0]
    decoded = [decode_stage(batch, size, GT, crops)
               for batch in read_inference_input(data, batch_size=batch_size).images.iter_batches(
                   batch_format="pyarrow", batch_size=batch_size)]
    harmo = HarmoCLIP(create_clip(model), INFERENCE_METHOD).eval().to(device)
    preprocess = harmo.clip.visual.preprocess_cfg
    mean, std = preprocess["mean"], preprocess["std"]
    inputs = []
    for batch in decoded:
        box_tensor, box_mask = pad_boxes(batch["boxes"].to_pylist())
        crop_pixels = _tensor([c for c in batch["crops"].to_pylist() if c], size, mean, std, device) if crops else None
        inputs.append((_tensor(batch["pixels"].to_pylist(), size, mean, std, device), box_tensor.to(device),
                       box_mask.to(device), crop_pixels))

    def run(images: torch.Tensor, box_tensor: torch.Tensor, box_mask: torch.Tensor, crop_pixels) -> None:
        features = harmo.encode_image(images, dense=True)
        pool_regions(features.dense, box_tensor, box_mask)
        if crop_pixels is not None:
            harmo.encode_image(crop_pixels, dense=False)

    with torch.inference_mode():
        run(*inputs[0])
        start = time.perf_counter()
        for batch in inputs:
            run(*batch)
        if gpu:
            torch.cuda.synchronize()
    return sum(len(batch[0]) for batch in inputs) / (time.perf_counter() - start)


def steady_rate(run_stage: Callable[[int], None], small: int, large: int, repeats: int = 3) -> tuple[float, float]:
    """(images/s, start-up s) of a stage from its wall time on `small` and on `large` images:
    the median over `repeats` pairs, after one untimed run on `small` (the first run also pays for
    cold worker imports). On a 2-core machine one pair can be off by a second either way: a pair
    whose larger run was not slower says nothing about the rate and is left out; when every pair
    is, the sizes are too close for this machine's noise and that is an error, never a rate."""
    run_stage(small)
    rates, startups = [], []
    for _ in range(repeats):
        times = {}
        for images in (small, large):
            start = time.perf_counter()
            run_stage(images)
            times[images] = time.perf_counter() - start
        if times[large] > times[small]:
            rates.append((large - small) / (times[large] - times[small]))
            startups.append(times[small] - small / rates[-1])
    if not rates:
        raise RuntimeError(f"the stage took no longer on {large} images than on {small} in {repeats} tries: "
                           "start-up noise swamps the work; time it on sets further apart (--images)")
    return statistics.median(rates), statistics.median(startups)


def first_images(data: str, count: int) -> str:
    """The path of a COCO folder holding only the first `count` images of `data` (same files)."""
    subset = Path(f"{data}-{count}")
    if not subset.exists():
        subset.mkdir()
        (subset / "images").symlink_to(Path(data, "images").resolve())
        for name in ("captions.json", "instances.json"):
            document = json.loads(Path(data, name).read_text())
            document["images"] = sorted(document["images"], key=lambda im: im["file_name"])[:count]
            kept = {image["id"] for image in document["images"]}
            document["annotations"] = [a for a in document["annotations"] if a["image_id"] in kept]
            Path(subset, name).write_text(json.dumps(document))
    return str(subset)


def print_table(title: str, rows: list[Row], stage_name: str) -> None:
    print(f"\n{title}; {len(os.sched_getaffinity(0))} cores")
    print(f"| model | work per image | in-process forward (images/s) | {stage_name} steady (images/s) | ratio "
          f"| {stage_name} start-up (s) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.model} | {row.what} | {row.forward:.1f} | {row.stage:.1f} | {row.ratio:.2f} | {row.startup:.1f} |")



def boxes_per_image(data: str) -> float:
    instances = json.loads(Path(data, "instances.json").read_text())
    return len(instances["annotations"]) / len(instances["images"])


def compare(args: argparse.Namespace, crops: bool, stage: Callable[[str, ModelConfig, str], Callable[[int], None]],
            what: str) -> list[Row]:
    """For each of args.models on a fresh shapes set of args.images[1] images: the in-process
    forward (before and after, the faster kept) and the stage's steady rate and start-up.
    `stage(data, model, tmp)` returns a function that runs the stage on the first N images."""
    small, large = args.images
    if not ray.is_initialized():
        ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/shapes"
        write_shapes_dataset(data, images=large, seed=0, size=args.image_side, captions_per_image=1)
        for name in args.models:
            model = ModelConfig(name=name)
            forward = forward_rate(data, model, args.batch_size, crops=crops, gpu=args.gpu)
            rate, startup = steady_rate(stage(data, model, tmp), small, large, args.repeats)
            forward = max(forward, forward_rate(data, model, args.batch_size, crops=crops, gpu=args.gpu))
            rows.append(Row(name, what.format(boxes=boxes_per_image(data)), forward, rate, startup))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["harmo-tiny", "ViT-S-32"],
                        help="open_clip model names (random weights)")
    parser.add_argument("--images", nargs=2, type=int, default=[64, 192], metavar=("SMALL", "LARGE"),
                        help="the two set sizes the stage is timed on")
    parser.add_argument("--image-side", type=int, default=320, help="side of the synthetic images (PNG)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed (small, large) pairs; the median is kept")
    parser.add_argument("--gpu", action="store_true", help="model actors on a GPU (the baseline too)")

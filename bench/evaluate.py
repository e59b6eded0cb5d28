"""Evaluation throughput: jobs.evaluate's image embedding stage (Ray Data decode tasks feeding a
model actor) against the same model's forward on the same decoded batches in one process.

The stage is what `pipeline.eval_data.gather` runs for the images (its embeddings read back as
arrays, as gather does): read, check and squash each
image and its ground-truth box crops, then the image tower with the dense map, RoIAlign on every
box and the crops encoded as images. Target: >= 0.8 of the in-process forward on a model whose
forward outweighs decoding (ViT-S-32 here); the tiny model shows the feed's own cost. See
bench/inference.py for how the steady rate and the fixed start-up are separated.

    .venv/bin/python -m bench.evaluate [--models harmo-tiny ViT-S-32] [--images 64 192] [--gpu]
"""

from __future__ import annotations

import argparse
from typing import Callable

from bench.inference import GT, Row, add_arguments, compare, first_images, print_table
from harmoclip import ModelConfig
from harmoclip.config import InferenceConfig
from pipeline.embedders import image_embeddings, to_numpy
from pipeline.inference_data import read_inference_input


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    config = InferenceConfig(batch_size=args.batch_size, gpu=args.gpu)

    def stage(data: str, model: ModelConfig, tmp: str) -> Callable[[int], None]:
        def run(images: int) -> None:
            inputs = read_inference_input(first_images(data, images), batch_size=args.batch_size)
            for batch in image_embeddings(inputs, model, config, regions=GT, crops=True).iter_batches(
                    batch_format="pyarrow", batch_size=None):
                to_numpy(batch["image_embedding"]), to_numpy(batch["region_embeddings"], nested=True)
        return run

    rows = compare(args, True, stage, "image + dense map, {boxes:.1f} boxes (RoIAlign + crops)")
    print_table(f"jobs.evaluate image stage, {args.image_side}px PNG, batch {args.batch_size}, "
                f"{args.images[0]} vs {args.images[1]} images, {'GPU' if args.gpu else 'CPU'}", rows, "Ray Data stage")
    return rows


if __name__ == "__main__":
    main()

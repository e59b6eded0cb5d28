"""Embedding export throughput: jobs.embed end to end (Ray Data decode tasks, a model actor,
Parquet shards written) against the same model's forward on the same decoded batches in one
process.

Images and their ground-truth boxes (`--what image,regions --regions gt`): the image tower with
the dense map and RoIAlign on every box, no crops. Target: >= 0.9 of the in-process forward on a
model whose forward outweighs decoding (ViT-S-32 here); the tiny model shows the feed's own
cost. See bench/inference.py for how the steady rate and the fixed start-up are separated.

    .venv/bin/python -m bench.embed [--models harmo-tiny ViT-S-32] [--images 64 192] [--gpu]
"""

from __future__ import annotations

import argparse
from typing import Callable

from bench.inference import Row, add_arguments, compare, first_images, print_table
from harmoclip import ModelConfig
from harmoclip.config import EmbedConfig, InferenceConfig
from pipeline.embed import export_embeddings
from pipeline.inference_data import read_inference_input


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    inference = InferenceConfig(batch_size=args.batch_size, gpu=args.gpu)
    config = EmbedConfig(what="image,regions", regions="gt")

    def stage(data: str, model: ModelConfig, tmp: str) -> Callable[[int], None]:
        def run(images: int) -> None:
            inputs = read_inference_input(first_images(data, images), batch_size=args.batch_size)
            export_embeddings(inputs, data, model, f"{tmp}/out", config, inference, overwrite=True)
        return run

    rows = compare(args, False, stage, "image + dense map, {boxes:.1f} boxes (RoIAlign)")
    print_table(f"jobs.embed, {args.image_side}px PNG, batch {args.batch_size}, {args.images[0]} vs "
                f"{args.images[1]} images, {'GPU' if args.gpu else 'CPU'}", rows, "jobs.embed")
    return rows


if __name__ == "__main__":
    main()

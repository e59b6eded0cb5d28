"""Embed a dataset with a trained model: image, caption and region embeddings as Parquet.

DATA is a COCO-format folder, a manifest (.jsonl/.csv/.parquet with image and caption columns)
or a prepared dataset, local or s3://. Ray Data reads and decodes the images in CPU tasks and
runs the model in --actors actors (one GPU each with --gpu), on a local Ray or the cluster the
job was submitted to. OUT (local or s3://) gets images/ (one row per image: image_id, image_uri,
width, height, image_embedding, boxes, box_labels, box_scores, region_embeddings), captions/
(one row per caption: sample_id, image_id, caption, caption_embedding), rejects/ (every image or
caption left out, with its reason) and embeddings.json (model, dimension, dtype, counts, config),
written last. Embeddings are unit-norm fixed-size float lists: cosine similarity is a dot product.
A non-empty OUT is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
from typing import Any

from harmoclip.cli import (HelpFormatter, INFERENCE_FLAGS, add_bool_argument, add_config_arguments,
                           add_deprecated_alias, add_inference_model_arguments, config_from_args,
                           inference_model_from_args)
from harmoclip.config import EmbedConfig, InferenceConfig
from jobs.common import add_verbose_argument, init_ray, set_verbose, user_errors
from pipeline.dataset import DatasetError
from pipeline.embed import export_embeddings
from pipeline.inference_data import check_inference_input, read_inference_input
from pipeline.prepare import DestinationError
from pipeline.sources import SourceError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.embed", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_inference_model_arguments(parser)
    parser.add_argument("--data", required=True,
                        help="Dataset to read: a COCO-format folder, manifest or prepared dataset (local or s3://)")
    parser.add_argument("--out", required=True, help="Where to write: OUT, the output folder (local or s3://)")
    add_bool_argument(parser, "--overwrite", help="Replace what --out holds (it is deleted first)")
    add_config_arguments(parser, EmbedConfig)
    add_config_arguments(parser, InferenceConfig, flags=INFERENCE_FLAGS)
    add_deprecated_alias(parser, "--batch-size", "--rows-per-batch", dest="batch_size", type=int)
    add_verbose_argument(parser)
    return parser


def summary(record: dict[str, Any], out: str) -> str:
    counts = record["counts"]
    lines = [f"{record['model']['name']} ({record['dimension']}-d, {record['dtype']}) in {record['seconds']} s:"]
    if "images_in" in counts:
        lines.append(f"  images:   {counts['images_written']} written, {counts['images_rejected']} rejected "
                     f"(of {counts['images_in']}); {counts['boxes']} boxes")
    if "captions_in" in counts:
        lines.append(f"  captions: {counts['captions_written']} written, {counts['captions_rejected']} rejected "
                     f"(of {counts['captions_in']})")
    if counts["rejected_by_reason"]:
        lines.append("  rejected: " + ", ".join(f"{n} {reason}" for reason, n in counts["rejected_by_reason"].items()))
    lines.append(f"wrote {out}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    with user_errors(DatasetError, DestinationError, SourceError, ValueError, FileNotFoundError):
        model = inference_model_from_args(args)
        config, inference = config_from_args(args, EmbedConfig), config_from_args(args, InferenceConfig)
        check_inference_input(args.data)
        init_ray()
        data = read_inference_input(args.data, proposals=config.proposals, batch_size=inference.batch_size)
        record = export_embeddings(data, args.data, model, args.out, config, inference, overwrite=args.overwrite)
    print(summary(record, args.out))
    return record


if __name__ == "__main__":
    main()

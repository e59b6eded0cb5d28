"""Prepare image-caption data for HarmoCLIP: lexemes (spaCy), region proposals, Parquet schema v1.

SRC is a COCO-format folder (images/, captions.json, optional instances.json), or a manifest
(.jsonl / .csv / .parquet with an image path-or-URI column and a caption column; relative paths
are relative to the manifest; http(s) URLs are fetched), or the real COCO layout given with
--images/--captions/--instances, or WebDataset shards (a .tar, or a folder or prefix of them:
KEY.jpg with KEY.txt or a caption in KEY.json), or a folder or prefix of manifest files.
SRC and DST may be local paths or s3:// URIs (AWS_ENDPOINT_URL selects an S3-compatible store).
Bad rows never stop the job: they are written to DST/rejects/ with the reason, and
DST/dataset.json counts rows in = rows written + rows rejected.
"""

from __future__ import annotations

import argparse
import json

from harmoclip.cli import (HelpFormatter, PREPARE_FLAGS, add_bool_argument, add_config_arguments, add_deprecated_alias,
                          config_from_args)
from harmoclip.config import PrepareConfig
from jobs.common import add_verbose_argument, init_ray, set_verbose, user_errors
from pipeline.prepare import DestinationError, prepare
from pipeline.sources import SourceError, find_source


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--input", help="Raw data to prepare: SRC, a COCO folder, a manifest file, a WebDataset .tar, "
                                         "or a folder or prefix of .tar shards or manifest files (local path or "
                                         "s3:// URI)")
    parser.add_argument("--out", required=True, help="Where to write: DST, the prepared dataset folder (local path or "
                                                     "s3:// URI)")
    parser.add_argument("--images", help="Image folder of the real COCO layout (with --captions), local or s3://")
    parser.add_argument("--captions", help="real COCO layout: captions_*.json")
    parser.add_argument("--instances", help="COCO instances_*.json (ground-truth boxes for --regions gt and evaluation)")
    parser.add_argument("--image-column", default="image", help="manifest column with the image path or URI")
    parser.add_argument("--caption-column", default="caption",
                        help="manifest column with the caption (WebDataset: the field of KEY.json read when a "
                             "sample has no KEY.txt)")
    add_bool_argument(parser, "--overwrite",
                      help="Replace what --out holds: a dataset already at DST is deleted first (never a mix of old "
                           "and new)")
    add_config_arguments(parser, PrepareConfig, flags=PREPARE_FLAGS)
    add_deprecated_alias(parser, "--batch-size", "--rows-per-batch", dest="batch_size", type=int)
    add_verbose_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    with user_errors(SourceError, DestinationError, ValueError):
        if not args.input and not args.captions:
            raise SourceError("give --input SRC, or --images and --captions for the real COCO layout")
        config = config_from_args(args, PrepareConfig)
        source = find_source(args.input or "", images=args.images, captions=args.captions,
                             instances=args.instances, image_column=args.image_column,
                             caption_column=args.caption_column)
        init_ray()
        manifest = prepare(source, args.out, config, overwrite=args.overwrite)
    print(json.dumps(manifest["counts"], indent=2))
    print(f"wrote {args.out}")
    return manifest


if __name__ == "__main__":
    main()

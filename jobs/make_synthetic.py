"""Write the synthetic "shapes" data set (the embedded default) as a real COCO folder.

DIR gets images/<id>.png, captions.json (COCO captions) and instances.json (COCO boxes over 48
"<color> <shape>" categories), so it goes through `jobs.prepare` exactly like COCO does.
The same arguments always give byte-identical files. DIR may be a local path or an s3:// URI
(AWS_ENDPOINT_URL selects an S3-compatible store).
"""

from __future__ import annotations

import argparse
import json

from harmoclip.cli import HelpFormatter, add_deprecated_alias
from jobs.common import add_verbose_argument, set_verbose, user_errors
from pipeline.synthetic import write_shapes_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.make_synthetic", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="Where to write: DIR, a folder (local path or s3:// URI); existing files of the same "
                             "name are replaced")
    count = parser.add_mutually_exclusive_group(required=True)  # required, and given by the old --images too
    count.add_argument("--num-images", type=int, metavar="N", help="Number of images to write (>= 1)")
    add_deprecated_alias(count, "--images", "--num-images", dest="num_images", type=int)
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="Random seed (>= 0); the same seed and arguments give identical files (default: 0)")
    parser.add_argument("--size", type=int, default=64, metavar="PX",
                        help="side of the square images in pixels (>= 32, default: 64)")
    parser.add_argument("--captions-per-image", type=int, default=5, metavar="C",
                        help="captions written per image, different from each other where possible (default: 5)")
    add_verbose_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, int]:
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    with user_errors(ValueError, OSError):  # a bad count or size, or a --out that cannot be written
        counts = write_shapes_dataset(args.out, args.num_images, seed=args.seed, size=args.size,
                                      captions_per_image=args.captions_per_image)
    print(json.dumps(counts, indent=2))
    print(f"wrote {args.out}")
    return counts


if __name__ == "__main__":
    main()

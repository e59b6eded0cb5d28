"""Write the synthetic "shapes" data set (the embedded default) as a real COCO folder.

DIR gets images/<id>.png, captions.json (COCO captions) and instances.json (COCO boxes over 48
"<color> <shape>" categories), so it goes through `jobs.prepare` exactly like COCO does.
The same arguments always give byte-identical files. DIR may be a local path or an s3:// URI
(AWS_ENDPOINT_URL selects an S3-compatible store).
"""

from __future__ import annotations

import argparse
import json

from pipeline.synthetic import write_shapes_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.make_synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (local path or s3:// URI); existing files of the same name are replaced")
    parser.add_argument("--images", type=int, required=True, metavar="N", help="number of images to write (>= 1)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="random seed (>= 0); the same seed and arguments give identical files (default: 0)")
    parser.add_argument("--size", type=int, default=64, metavar="PX",
                        help="side of the square images in pixels (>= 32, default: 64)")
    parser.add_argument("--captions-per-image", type=int, default=5, metavar="C",
                        help="captions written per image, different from each other where possible (default: 5)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        counts = write_shapes_dataset(args.out, args.images, seed=args.seed, size=args.size,
                                      captions_per_image=args.captions_per_image)
    except ValueError as err:
        parser.error(str(err))
    print(json.dumps(counts, indent=2))
    print(f"wrote {args.out}")
    return counts


if __name__ == "__main__":
    main()

"""Label the boxes of an image with labels of your own, and see where a phrase is, with a model.

    python -m jobs.predict --checkpoint RUN --image photo.png --boxes boxes.json --labels "red circle,blue square"
    python -m jobs.predict --checkpoint RUN --image s3://bucket/x.jpg --regions felzenszwalb \\
        --classes classes.txt --query "a red circle" --out outputs/predict

The image (local or s3://) is read and checked as jobs.evaluate reads images, then the whole of
it is squashed to the model's input size (no crop, so no box is cut away). Boxes: --boxes BOXES.json,
a JSON list of pixel boxes [x, y, w, h] as COCO writes them (x, y: the top-left corner), or of
objects carrying one under "bbox" (a COCO annotations or detection-results list; other keys are
ignored); or --regions felzenszwalb|grid, proposals computed as jobs.prepare computes them; by
default the whole image is one box. Each box is scored against every label as jobs.evaluate scores
ground-truth boxes: RoIAlign of the box on the model's dense map, cosine with the label's
prompt-template ensemble, then the softmax over the labels of logit_scale x cosine (the model's
learned scale). Scores sum to 1 over the labels given: they rank those labels, they do not say
that any of them is in the box. --query TEXT (one or more) measures the cosine of the text, as
written, with every location of the dense map.

Writes to --out (local or s3://): predictions.json (the image and its size, the model, labels and
templates, per box its pixel box [x, y, w, h] and top-k labels with scores, per query its heatmap
file, the max / min cosine, where the max is and the whole cosine grid), predictions.png (the
image with each box numbered, with its best label and score) and, per query, query-N.png (N = 1,
2, ... in the order given: the cosine grid over the image, upsampled bilinearly). Prints a table
of the boxes and their best labels. A bad input (a missing or damaged image, a bad box file, a box
outside the image, an empty label list or one naming a label twice) exits with code 2 and
`error: ...` on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Any

import numpy as np
from PIL import Image

from harmoclip.cli import (HelpFormatter, add_bool_argument, add_deprecated_alias, add_inference_model_arguments,
                          add_regions_argument, device_is_gpu, inference_model_from_args)
from harmoclip.config import PrepareConfig
from harmoclip.metrics import DEFAULT_TEMPLATES, check_class_names
from harmoclip.predict import BoxLabels, Predictor
from harmoclip.storage import join, read_text, write_bytes
from jobs.common import add_verbose_argument, set_verbose, user_errors
from jobs.drawing import BOX_COLOURS, image_figure, png_bytes, show_boxes, show_heatmap
from jobs.evaluate import CLASSES_HELP, TEMPLATES_HELP, read_templates, read_vocabulary
from pipeline.images import Rejected, read_checked, to_rgb
from pipeline.regions import BoxCounts, propose

WHOLE_IMAGE = "the whole image"
BOX_HELP = ('a JSON list of pixel boxes [x, y, w, h] (COCO style: x, y is the top-left corner), or of objects '
            'with such a "bbox" (a COCO annotations or detection-results list; other keys ignored); local or s3://')


def read_image(uri: str) -> Image.Image:
    """The image in RGB (transparency white), read and checked as evaluation reads images: a
    missing, empty, damaged or too large file is an error naming it."""
    try:
        return to_rgb(read_checked(uri, PrepareConfig.max_pixels))
    except Rejected as rejected:
        raise ValueError(rejected.detail) from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_boxes(uri: str, width: int, height: int) -> list[tuple[float, float, float, float]]:
    """Normalised [x0, y0, x1, y1] boxes from a BOXES.json of pixel [x, y, w, h] boxes (see
    BOX_HELP). A box reaching outside the image is an error, not clipped: it says the boxes were
    made for another image or in another convention."""
    try:
        document = json.loads(read_text(uri))
    except json.JSONDecodeError as err:
        raise ValueError(f"{uri} is not valid JSON: {err}") from None
    if not isinstance(document, list):
        raise ValueError(f"{uri}: expected {BOX_HELP.split('; ')[0]}, got a JSON {type(document).__name__}")
    if not document:
        raise ValueError(f"{uri} holds no boxes")
    boxes = []
    for index, item in enumerate(document):
        box = item.get("bbox") if isinstance(item, dict) else item
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            raise ValueError(f"{uri}: box {index} must be [x, y, w, h] (4 finite numbers, pixels), got {item!r}")
        x, y, w, h = box
        if w <= 0 or h <= 0:
            raise ValueError(f"{uri}: box {index} [x, y, w, h] = {box} has a width or height <= 0")
        if x < 0 or y < 0 or x + w > width or y + h > height:
            raise ValueError(f"{uri}: box {index} [x, y, w, h] = {box} reaches outside the {width}x{height} image")
        boxes.append((x / width, y / height, (x + w) / width, (y + h) / height))
    return boxes


def proposed_boxes(image: Image.Image, method: str, max_regions: int) -> list[tuple[float, float, float, float]]:
    """Region proposals of the image, computed as jobs.prepare computes them."""
    regions = propose({}, PrepareConfig(regions=method, max_regions=max_regions), BoxCounts(), image=image)
    if not regions:
        raise ValueError(f"--regions {method} found no region in the image; pass --boxes or --regions grid")
    return [(r["x0"], r["y0"], r["x1"], r["y1"]) for r in regions]


def read_labels(args: argparse.Namespace) -> list[str]:
    """--labels split on commas (blank entries dropped), or --classes; checked for blanks and repeats."""
    labels = ([name.strip() for name in args.labels.split(",") if name.strip()] if args.labels is not None
              else read_vocabulary(args.classes))
    check_class_names(labels, "label list")
    return labels


def pixel_box(box: tuple[float, float, float, float], width: int, height: int) -> list[float]:
    """Normalised [x0, y0, x1, y1] -> pixel [x, y, w, h], to 2 decimals."""
    x0, y0, x1, y1 = box
    return [round(x0 * width, 2), round(y0 * height, 2), round((x1 - x0) * width, 2), round((y1 - y0) * height, 2)]


def query_record(query: str, heat: np.ndarray, number: int, width: int, height: int) -> dict[str, Any]:
    """What predictions.json says of one query: its file, the extremes, where the max is (the centre
    of its cell, in pixels of the original image) and the whole cosine grid."""
    row, column = np.unravel_index(int(heat.argmax()), heat.shape)
    return {"query": query, "heatmap": f"query-{number}.png", "max": float(heat.max()), "min": float(heat.min()),
            "peak": [round((column + 0.5) * width / heat.shape[1], 2), round((row + 0.5) * height / heat.shape[0], 2)],
            "similarity": heat.tolist()}


def boxes_figure(image: Image.Image, labelled: list[BoxLabels], title: str) -> bytes:
    figure, axes = image_figure(image)
    show_boxes(axes[0, 0], image, [b.box for b in labelled],
               [f"{n}: {b.top[0].label} {b.top[0].score:.2f}" for n, b in enumerate(labelled, 1)],
               [BOX_COLOURS[n % len(BOX_COLOURS)] for n in range(len(labelled))])
    axes[0, 0].set_title(title, fontsize=9)
    return png_bytes(figure)


def heatmap_figure(image: Image.Image, heat: np.ndarray, query: str) -> bytes:
    figure, axes = image_figure(image)
    shown = show_heatmap(axes[0, 0], image, heat)
    figure.colorbar(shown, ax=axes[0, 0], shrink=0.8, label="cosine similarity")
    axes[0, 0].set_title(f'"{query}": cosine per location', fontsize=9)
    return png_bytes(figure)


def format_table(predictions: dict[str, Any]) -> str:
    p = predictions
    lines = [f"image {p['image']} ({p['width']}x{p['height']}): {len(p['boxes'])} boxes from {p['boxes_from']}, "
             f"{len(p['labels'])} labels; model {p['model']['name']}; score = softmax over the labels of "
             f"{p['logit_scale']:.1f} x cosine",
             "| box | x, y, w, h (px) | best label | score | next |", "|---|---|---|---|---|"]
    for box in p["boxes"]:
        best, *rest = box["top"]
        pixels = ", ".join(f"{v:g}" for v in box["box"])
        following = ", ".join(f"{t['label']} {t['score']:.3f}" for t in rest[:2])
        lines.append(f"| {box['index']} | {pixels} | {best['label']} | {best['score']:.3f} | {following} |")
    lines += [f"query \"{q['query']}\": cosine max {q['max']:.3f} at ({q['peak'][0]:g}, {q['peak'][1]:g}), "
              f"min {q['min']:.3f} -> {q['heatmap']}" for q in p["queries"]]
    return "\n".join(lines)


def predict(args: argparse.Namespace) -> dict[str, Any]:
    """Check every input before the model is loaded (a large model takes a while), then label,
    draw and write."""
    labels = read_labels(args)
    templates = read_templates(args.templates) if args.templates else list(DEFAULT_TEMPLATES)
    image = read_image(args.image)
    width, height = image.size
    if args.boxes:
        boxes, boxes_from = read_boxes(args.boxes, width, height), args.boxes
    elif args.regions:
        boxes, boxes_from = proposed_boxes(image, args.regions, args.max_regions), f"--regions {args.regions}"
    else:
        boxes, boxes_from = [(0.0, 0.0, 1.0, 1.0)], WHOLE_IMAGE
    model = inference_model_from_args(args)
    predictor = Predictor(model, "cuda" if args.gpu else "cpu")
    labelled = predictor.classify(image, boxes, labels, args.top_k, templates)
    heatmaps = [predictor.heatmap(image, query) for query in args.query]
    predictions = {
        "image": args.image, "width": width, "height": height, "model": dataclasses.asdict(model),
        "labels": labels, "templates": templates, "boxes_from": boxes_from, "logit_scale": predictor.logit_scale,
        "score": "softmax over the labels of logit_scale x cosine(RoIAlign box feature, label embedding)",
        "boxes": [{"index": n, "box": pixel_box(b.box, width, height),
                   "top": [dataclasses.asdict(t) for t in b.top]} for n, b in enumerate(labelled, 1)],
        "queries": [query_record(q, heat, n, width, height)
                    for n, (q, heat) in enumerate(zip(args.query, heatmaps), 1)],
        "figure": "predictions.png",
    }
    write_bytes(join(args.out, "predictions.json"), json.dumps(predictions, indent=2).encode())
    title = f"{os.path.basename(args.image)}: best of {len(labels)} labels per box ({model.name})"
    write_bytes(join(args.out, "predictions.png"), boxes_figure(image, labelled, title))
    for query, heat, record in zip(args.query, heatmaps, predictions["queries"]):
        write_bytes(join(args.out, record["heatmap"]), heatmap_figure(image, heat, query))
    return predictions


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.predict", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_inference_model_arguments(parser)
    parser.add_argument("--image", required=True, help="One image: a local path or s3:// URI")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--boxes", default=None, metavar="BOXES.json", help=f"the boxes to label: {BOX_HELP}")
    add_regions_argument(where, None, "Here grid or felzenszwalb, computed as jobs.prepare does, labelled instead of "
                                      "--boxes (default, without --boxes either: the whole image as one box).",
                         choices=("grid", "felzenszwalb"))
    parser.add_argument("--max-regions", type=int, default=PrepareConfig.max_regions,
                        help="At most this many regions per image, with --regions (default: %(default)s), best "
                             "first: felzenszwalb's largest segments, grid's coarse levels (its 4 levels have 30 "
                             "cells)")
    vocabulary = parser.add_mutually_exclusive_group(required=True)
    vocabulary.add_argument("--labels", default=None,
                            help='Class names given inline, comma-separated, e.g. "red circle,blue square"')
    vocabulary.add_argument("--classes", default=None, metavar="FILE",
                            help=f"{CLASSES_HELP}; a COCO instances file works: the labels each box is scored "
                                 "against")
    add_deprecated_alias(vocabulary, "--labels-file", "--classes", dest="classes")
    parser.add_argument("--templates", default=None, metavar="FILE", help=TEMPLATES_HELP)
    parser.add_argument("--query", nargs="+", action="extend", default=[], metavar="TEXT",
                        help="phrases to find: one heatmap each (repeat the flag or give several)")
    parser.add_argument("--top-k", type=int, default=5, help="labels kept per box, best first (default: %(default)s)")
    parser.add_argument("--out", default="outputs/predict",
                        help="Where to write predictions.json and the figures: a folder, local or s3:// (default: "
                             "%(default)s)")
    add_bool_argument(parser, "--gpu", help="Use GPUs: run the model on the first CUDA device (default: the CPU)")
    add_deprecated_alias(parser, "--device", "--gpu", dest="gpu", type=device_is_gpu)
    add_verbose_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    with user_errors(ValueError, OSError):
        predictions = predict(args)
    print(format_table(predictions))
    written = ["predictions.json", "predictions.png", *(q["heatmap"] for q in predictions["queries"])]
    print(f"wrote {', '.join(join(args.out, name) for name in written)}")
    return predictions


if __name__ == "__main__":
    main()

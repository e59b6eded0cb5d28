"""Evaluate a checkpoint: image-text retrieval and box classification, with the protocol printed.

--checkpoint is a run folder or checkpoint folder of jobs.train (it holds harmoclip.json and
open_clip_weights.pt), or an open_clip weights file with --model; --model with --pretrained
measures a base open_clip model instead. DATA is a COCO-format folder (images/, captions.json,
instances.json) or a prepared dataset, local or s3://. Images are read and decoded by Ray Data
tasks and embedded by --actors model actors (one GPU each with --gpu); only embeddings reach this
process (a local Ray is started if none is running).

Retrieval: image->text and text->image R@1/5/10 over all images and captions of DATA (an image
has several captions; I2T counts a hit if any of them is in the top k). Box classification:
every ground-truth box, its feature by RoIAlign on the dense map (and, for reference, by
cropping and encoding the box), cosine against class-name embeddings averaged over prompt
templates; top-1/top-5 micro accuracy and mean per-class accuracy (thing/stuff split when the
categories carry `isthing`). harmony = harmonic mean of mean R@1 and box top-1.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import open_clip
import torch

from harmoclip import HarmoCLIP, ModelConfig, create_clip
from harmoclip.checkpoint import model_to_use
from harmoclip.model import INFERENCE_METHOD
from harmoclip.cli import HelpFormatter, INFERENCE_FLAGS, add_config_arguments, add_deprecated_alias, \
    add_inference_model_arguments, config_from_args, inference_model_from_args
from harmoclip.config import InferenceConfig
from harmoclip.metrics import (DEFAULT_TEMPLATES, box_classification, class_text_embeddings, harmony, retrieval_recall,
                               vocabulary_labels)
from harmoclip.storage import read_text, write_bytes
from jobs.common import add_verbose_argument, init_ray, set_verbose, user_errors
from pipeline.dataset import DatasetError
from pipeline.eval_data import gather
from pipeline.inference_data import check_inference_input, read_inference_input
from pipeline.sources import SourceError, crowd_boxes


CLASSES_HELP = "Vocabulary: class names, one per line, or a COCO categories json (local or s3://)"
TEMPLATES_HELP = ("Prompt templates, one per line, each with {} for the class name (local or s3://); default: the "
                  "6 built-in templates")


def read_vocabulary(uri: str) -> list[str]:
    """Class names, one per line (blank lines and surrounding spaces ignored), or a COCO
    categories json: a list of {"name": ...} or a document with a "categories" list."""
    text = read_text(uri)
    if uri.endswith(".json"):
        document = json.loads(text)
        entries = document.get("categories") if isinstance(document, dict) else document
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
            raise ValueError(f"{uri}: expected a COCO categories list ([{{\"name\": ...}}, ...]) or a document "
                             f"with one under \"categories\"")
        return [str(e["name"]) for e in entries]
    return _nonblank_lines(text)


def read_templates(uri: str) -> list[str]:
    """Prompt templates, one per line, each with a `{}` where the class name goes."""
    return _nonblank_lines(read_text(uri))


def _nonblank_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def evaluate(checkpoint: str | ModelConfig, data: str, model_name: str | None = None,
             config: InferenceConfig = InferenceConfig(), classes: str | None = None,
             templates: str | None = None) -> dict[str, Any]:
    """`checkpoint`: a run/checkpoint folder or weights file (see harmoclip.checkpoint.model_to_use),
    or the ModelConfig to use; `classes`: a vocabulary file (see read_vocabulary) instead of the
    dataset's categories; `templates`: a prompt-template file instead of DEFAULT_TEMPLATES."""
    model = checkpoint if isinstance(checkpoint, ModelConfig) else model_to_use(checkpoint, model_name, None)
    vocabulary = read_vocabulary(classes) if classes else None
    prompt_templates = read_templates(templates) if templates else list(DEFAULT_TEMPLATES)
    inputs = read_inference_input(data, batch_size=config.batch_size)
    if not inputs.categories:
        raise DatasetError(f"{data} has no categories (COCO instances): box classification needs them")
    name_of = {c["id"]: c["name"] for c in inputs.categories}
    if vocabulary and not set(name_of.values()) & set(vocabulary):
        raise ValueError(f"{classes}: none of its {len(vocabulary)} names is a category of {data}")
    embeddings = gather(inputs, model, config)

    harmo = HarmoCLIP(create_clip(model), INFERENCE_METHOD).eval()
    tokenizer = open_clip.get_tokenizer(model.name)
    names = vocabulary or [c["name"] for c in inputs.categories]
    labels, kept = vocabulary_labels([name_of[int(label)] for label in embeddings.labels], names)
    with torch.no_grad():
        class_embeddings = class_text_embeddings(lambda texts: harmo.encode_text(tokenizer(texts))[0], names,
                                                 prompt_templates)
    is_thing = (torch.tensor([bool(c["isthing"]) for c in inputs.categories])
                if vocabulary is None and all("isthing" in c for c in inputs.categories) else None)

    results: dict[str, Any] = {
        "retrieval": retrieval_recall(embeddings.images, embeddings.texts, embeddings.text_to_image),
        "box": {**box_classification(embeddings.regions[kept], class_embeddings, labels, is_thing=is_thing),
                "crop": box_classification(embeddings.crops[kept], class_embeddings, labels, is_thing=is_thing)},
    }
    for scores in (results["box"], results["box"]["crop"]):  # per class by name, the classes with boxes
        counts = scores.pop("per_class")
        scores["per_class"] = {name: {"boxes": boxes, "top1": hits / boxes}
                               for name, boxes, hits in zip(names, counts["boxes"], counts["top1_hits"]) if boxes}
    results["harmony"] = harmony(results)
    image_size = harmo.image_size[0]
    results["protocol"] = {
        "data": data, "checkpoint": model.init_from or model.pretrained, "model": model.name,
        "images": int(embeddings.images.shape[0]), "captions": int(embeddings.texts.shape[0]),
        "boxes": int(labels.numel()), "boxes_left_out": int((~kept).sum()), "classes": len(names),
        "vocabulary": classes or "the dataset's categories", "image_size": image_size,
        "image_transform": f"whole image resized to {image_size}x{image_size} (no crop)",
        "templates": prompt_templates,
        "box_feature": "RoIAlign 1x1 (aligned) on the dense map; 'crop': box crop encoded as an image",
        "left_out": embeddings.skipped,
    }
    if inputs.source.get("instances"):  # a prepared dataset left them out when it was made
        results["protocol"]["crowd_boxes_not_scored"] = crowd_boxes(inputs.source["instances"])
    return results


def format_table(results: dict[str, Any]) -> str:
    p, r, b = results["protocol"], results["retrieval"], results["box"]
    lines = [
        f"data {p['data']}: {p['images']} images, {p['captions']} captions, {p['boxes']} boxes"
        + (f" ({p['boxes_left_out']} left out: class not in the vocabulary)" if p.get("boxes_left_out") else "")
        + f", {p['classes']} classes from {p.get('vocabulary', 'the dataset')}; {p['model']} at {p['image_size']} px, "
        f"{p['image_transform']}; {len(p['templates'])} prompt templates"
        + (f"; left out: {', '.join(f'{n} {reason}' for reason, n in p['left_out'].items())}" if p.get("left_out")
           else ""),
        "| metric | value |", "|---|---|",
        *(f"| retrieval {d} R@{k} | {100 * r[d][f'r{k}']:.1f} |" for d in ("i2t", "t2i") for k in (1, 5, 10)),
        *(f"| box {name} (RoIAlign) | {100 * b[key]:.1f} |" for key, name in
          (("top1", "top-1 micro"), ("top5", "top-5 micro"), ("macc1", "top-1 mean per class"),
           ("macc5", "top-5 mean per class"))),
        f"| box top-1 micro (crop-and-encode) | {100 * b['crop']['top1']:.1f} |",
        f"| harmony (harmonic mean of mean R@1 and box top-1) | {100 * results['harmony']:.1f} |",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_inference_model_arguments(parser)
    parser.add_argument("--data", required=True,
                        help="Dataset to read: a COCO-format folder or a prepared dataset (local or s3://)")
    parser.add_argument("--out", default=None, help="Where to write results.json: a file path, local or s3://")
    parser.add_argument("--classes", default=None, metavar="FILE",
                        help=f"{CLASSES_HELP}, for box classification. Boxes of other categories are left out and "
                             "counted; names no box has act as distractors. Default: the dataset's categories")
    parser.add_argument("--templates", default=None, metavar="FILE", help=TEMPLATES_HELP)
    add_config_arguments(parser, InferenceConfig, flags=INFERENCE_FLAGS)
    add_deprecated_alias(parser, "--batch-size", "--rows-per-batch", dest="batch_size", type=int)
    add_verbose_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    with user_errors(DatasetError, SourceError, ValueError, FileNotFoundError):
        model = inference_model_from_args(args)
        check_inference_input(args.data)
        init_ray()
        results = evaluate(model, args.data, config=config_from_args(args, InferenceConfig), classes=args.classes,
                           templates=args.templates)
    print(format_table(results))
    if args.out:
        write_bytes(args.out, json.dumps(results, indent=2).encode())
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

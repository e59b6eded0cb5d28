"""Preparation throughput on the synthetic shapes set, or on a COCO folder of real photos (--coco).

1. Lexeme stage, captions/s per core, against raw `nlp.pipe` of the same spaCy pipeline (same
   disabled components) on one core over the same captions (target >= 0.90 of raw): our parser
   called directly, and on Ray Data with 1 and 2 actors, end to end (actor start-up included)
   and in the steady state (start-up cancelled by differencing runs over N and 3N captions).
2. Region stage, images/s per proposal method.
3. The whole `prepare` job, images/s.

    .venv/bin/python -m bench.prepare [--images 300]
    .venv/bin/python -m bench.prepare --coco ../shared/data/coco-real/eval --images 256   # real photos
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import pyarrow as pa
import ray
import spacy
from PIL import Image

from harmoclip.config import PrepareConfig
from pipeline.lexemes import LexemeParser
from pipeline.prepare import prepare
from pipeline.regions import BoxCounts, propose
from pipeline.sources import find_source, read_image_rows
from pipeline.synthetic import write_shapes_dataset

SPACY = PrepareConfig.spacy_pipeline
TOKENIZER = PrepareConfig.tokenizer


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def lexeme_rows(captions: list[str], repeat: int) -> dict[str, float]:
    captions = captions * repeat
    table = pa.table({"caption": captions, "reject_reason": pa.nulls(len(captions), pa.string())})
    nlp = spacy.load(SPACY, disable=["ner"])
    list(nlp.pipe(captions[:256]))  # warm-up
    raw = len(captions) / timed(lambda: list(nlp.pipe(captions, batch_size=256)))
    parser = LexemeParser(SPACY, TOKENIZER)
    batches = [table.slice(i, 256) for i in range(0, table.num_rows, 256)]
    direct = len(captions) / timed(lambda: [parser(b) for b in batches])

    def ray_seconds(rows: list[pa.Table], actors: int) -> float:
        dataset = ray.data.from_arrow(rows).map_batches(
            LexemeParser, batch_format="pyarrow", batch_size=256, compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={"spacy_pipeline": SPACY, "tokenizer_name": TOKENIZER})
        return timed(dataset.materialize)

    rates = {"raw nlp.pipe (1 core)": raw, "LexemeParser direct (1 core)": direct}
    for actors in (1, 2):
        # Each run starts its own actors (process start, torch/open_clip import, spaCy load): the
        # difference between a run over the captions and one over 3x them is the steady-state cost.
        once, thrice = ray_seconds(batches, actors), ray_seconds(batches * 3, actors)
        rates[f"Ray Data, {actors} actor(s), end to end, per core"] = len(captions) / once / actors
        rates[f"Ray Data, {actors} actor(s), steady state, per core"] = 2 * len(captions) / (thrice - once) / actors
    return rates


def region_rates(root: str, images: int) -> dict[str, float]:
    rows = read_image_rows(find_source(root)).to_pylist()[:images]
    decoded = []
    for row in rows:
        with open(row["image_uri"], "rb") as handle:
            data = handle.read()
        width, height = Image.open(io.BytesIO(data)).size
        decoded.append({**row, "image": data, "width": width, "height": height})
    rates = {}
    for method in ("gt", "grid", "felzenszwalb") if os.path.exists(f"{root}/instances.json") else ("grid", "felzenszwalb"):
        config = PrepareConfig(regions=method)
        rates[method] = len(decoded) / timed(lambda: [propose(r, config, BoxCounts()) for r in decoded])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--caption-repeats", type=int, default=4, help="repeat the caption list for stabler timings")
    parser.add_argument("--coco", default=None, metavar="DIR",
                        help="measure on every photo of this COCO folder (images/, captions.json; --images is then "
                             "ignored) instead of generated shapes; the whole-prepare rows compare grid and "
                             "felzenszwalb regions on its photos")
    args = parser.parse_args()
    ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.coco or f"{tmp}/shapes"
        if args.coco:
            args.images = len(read_image_rows(find_source(root)))  # the whole prepare reads them all
        else:
            write_shapes_dataset(root, images=args.images, seed=0, size=64)
        captions = [a["caption"] for a in json.load(open(f"{root}/captions.json"))["annotations"]]
        lexemes = lexeme_rows(captions, args.caption_repeats)
        regions = region_rates(root, args.images)
        prepare(find_source(root), f"{tmp}/warm-up", PrepareConfig(regions="grid"))  # worker processes, imports
        whole = {}
        for method in ("grid", "felzenszwalb") if args.coco else ("gt", "felzenszwalb"):
            seconds = timed(lambda: prepare(find_source(root), f"{tmp}/out-{method}", PrepareConfig(regions=method)))
            whole[method] = args.images / seconds

    raw = lexemes["raw nlp.pipe (1 core)"]
    print(f"\nLexeme stage, {len(captions) * args.caption_repeats} captions, {SPACY} (ner disabled in both)")
    print("| variant | captions/s | ratio vs raw nlp.pipe |\n|---|---|---|")
    for name, rate in lexemes.items():
        print(f"| {name} | {rate:.0f} | {rate / raw:.2f} |")
    print(f"\nRegion stage, {args.images} images {'of ' + args.coco if args.coco else 'of 64 px'}"
          "\n| method | images/s |\n|---|---|")
    for name, rate in regions.items():
        print(f"| {name} | {rate:.0f} |")
    print(f"\nWhole prepare (Ray Data, local, {os.cpu_count()} cores), {args.images} images, {len(captions)} captions")
    print("| regions | images/s |\n|---|---|")
    for name, rate in whole.items():
        print(f"| {name} | {rate:.1f} |")


if __name__ == "__main__":
    main()

"""The paper's regime at CPU scale, shared by jobs.demo and bench.harmony (a library, not a job).

HarmoCLIP fine-tunes a *pretrained* CLIP, and its claim is about that setting: region-level gains
without losing the base model's global alignment. So every comparison here starts from one base
model, pretrained GC-only on a separate synthetic corpus (other seed, other size), and fine-tunes
each arm from it with the same budget on the training set, then evaluates on validation.

Everything is cached under the output folder: data, prepared data and the base model are made
once; a fine-tuned run whose results.json exists is not trained again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Any, Callable

from harmoclip import MethodConfig, ModelConfig
from harmoclip.config import PrepareConfig, TrainConfig
from jobs import evaluate as evaluate_job
from jobs import train as train_job
from pipeline.prepare import prepare
from pipeline.sources import find_source
from pipeline.synthetic import write_shapes_dataset

GC_ONLY = MethodConfig(lambda_lrc=0.0, lambda_gr=0.0)


@dataclass(frozen=True)
class Regime:
    """Sizes and budgets of the base pretraining and of each fine-tuning arm."""

    model: str = "harmo-tiny"
    base_images: int = 1200
    base_seed: int = 99  # data and weights of the base: unrelated to the arms' seeds
    train_images: int = 1000
    val_images: int = 200
    regions: str = "felzenszwalb"  # training proposals; the base is GC-only and uses none
    base_train: TrainConfig = TrainConfig(steps=500, batch_size=32, lr=1e-3, warmup_steps=50,
                                          checkpoint_every=500, log_every=20, seed=99)
    finetune: TrainConfig = TrainConfig(steps=300, batch_size=32, lr=2e-4, warmup_steps=30,
                                        checkpoint_every=300, log_every=10)


def prepare_data(out: str, regime: Regime, say: Callable[[str], None] = print) -> dict[str, str]:
    """Synthetic COCO folders (base corpus, train, val) and the prepared base and train sets."""
    data = f"{out}/data"
    for split, images, seed in (("base", regime.base_images, regime.base_seed), ("train", regime.train_images, 0),
                                ("val", regime.val_images, 1)):
        if not os.path.exists(f"{data}/{split}/captions.json"):
            say(f"  writing {images} synthetic images -> {data}/{split}")
            write_shapes_dataset(f"{data}/{split}", images=images, seed=seed)
    for split, regions in (("base", "grid"), ("train", regime.regions)):
        if not os.path.exists(f"{data}/{split}-prepared/dataset.json"):
            say(f"  preparing {split} (Ray Data: spaCy lexemes, {regions} regions)")
            prepare(find_source(f"{data}/{split}"), f"{data}/{split}-prepared",
                    PrepareConfig(regions=regions, tokenizer=regime.model), overwrite=True)
    return {"base": f"{data}/base-prepared", "train": f"{data}/train-prepared", "val": f"{data}/val"}


def train_base(out: str, data: dict[str, str], regime: Regime, tracking_uri: str,
               say: Callable[[str], None] = print) -> str:
    """The GC-only base model (cached): `out/base`, a run folder `--init-from` accepts."""
    base = f"{out}/base"
    if not os.path.exists(f"{base}/open_clip_weights.pt"):
        say(f"  pretraining the base model GC-only for {regime.base_train.steps} steps on {data['base']}")
        train_job.run(data["base"], base, ModelConfig(name=regime.model), GC_ONLY,
                      replace(regime.base_train, mlflow_uri=tracking_uri))
    return base


def finetune_and_evaluate(run_dir: str, base: str, data: dict[str, str], method: MethodConfig, seed: int,
                          regime: Regime, tracking_uri: str) -> dict[str, Any]:
    """One arm from the base: train, evaluate on val, keep `run_dir/results.json` (cached)."""
    results_file = f"{run_dir}/results.json"
    if os.path.exists(results_file):
        with open(results_file) as handle:
            return json.load(handle)
    train_job.run(data["train"], run_dir, ModelConfig(name=regime.model, init_from=base), method,
                  replace(regime.finetune, seed=seed, mlflow_uri=tracking_uri))
    results = {**evaluate_job.evaluate(run_dir, data["val"]), "checkpoint": run_dir}
    with open(results_file, "w") as handle:
        json.dump(results, handle, indent=2)
    return results


def evaluate_base(base: str, data: dict[str, str]) -> dict[str, Any]:
    """The base model without fine-tuning, on val (cached beside it)."""
    results_file = f"{base}/results.json"
    if not os.path.exists(results_file):
        with open(results_file, "w") as handle:
            json.dump({**evaluate_job.evaluate(base, data["val"]), "checkpoint": base}, handle, indent=2)
    with open(results_file) as handle:
        return json.load(handle)


def mean_r1(results: dict[str, Any]) -> float:
    """The global number: mean of image->text and text->image R@1."""
    return (results["retrieval"]["i2t"]["r1"] + results["retrieval"]["t2i"]["r1"]) / 2

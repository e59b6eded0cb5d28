"""The paper's regime at CPU scale, shared by jobs.demo and bench.harmony (a library, not a job).

HarmoCLIP fine-tunes a *pretrained* CLIP, and its claim is about that setting: region-level gains
without losing the base model's global alignment. So every comparison here starts from one base
model, pretrained GC-only on a separate corpus, and fine-tunes each arm from it with the same
budget on the training set, then evaluates on validation.

Two kinds of data: synthetic shapes written here (base corpus, train and val drawn with other
seeds), or real photographs (`--real DIR`, a folder holding `corpus/` and `eval/` COCO folders
of real COCO photos): the base pretrains on `corpus/`, the arms fine-tune on the same
photos with felzenszwalb regions (no boxes needed), and `eval/` (with COCO instances) validates.

Everything is cached under the output folder: data, prepared data and the base model are made
once, and an arm whose results.json exists is not trained again. The caches are stamped with what
made them (DIR/regime.json, RUN/arm.json), so a folder made with other settings is refused rather
than silently reused. jobs.demo and bench.harmony lay runs out the same way (RUN =
DIR/runs/<config>/seed<k>), so `bench.harmony --out outputs/demo` extends a demo into a study.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from typing import Optional

from harmoclip import MethodConfig, ModelConfig
from harmoclip.model import check_model_name
from harmoclip.cli import add_config_arguments, add_regions_argument
from harmoclip.config import PrepareConfig, TrainConfig
from harmoclip.presets import METHOD_PRESETS
from jobs import evaluate as evaluate_job
from jobs import train as train_job
from pipeline.prepare import prepare
from pipeline.sources import find_source
from pipeline.synthetic import write_shapes_dataset

GC_ONLY = METHOD_PRESETS["gc_only"]
HOLDOUT_SEED, HOLDOUT_SIZE, HOLDOUT_CAPTIONS = 5, 96, 3
# The arms every comparison has: the baseline, the trade-off of earlier region methods (region
# supervision without the global loss), and HarmoCLIP as shipped.
ARMS = {name: METHOD_PRESETS[name] for name in ("gc_only", "region_only", "harmoclip")}


class RegimeMismatch(ValueError):
    """An output folder holds data, a base model or a run made with other settings."""


@dataclass(frozen=True)
class Regime:
    """Sizes and budgets of the base pretraining and of each fine-tuning arm."""

    model: str = "harmo-tiny"
    image_size: Optional[int] = None  # the model's own (64 px for harmo-tiny)
    real: Optional[str] = None  # a folder with corpus/ and eval/ COCO folders, instead of synthetic data
    base_images: int = 1200
    base_seed: int = 99  # data and weights of the base: unrelated to the arms' seeds
    train_images: int = 1000
    val_images: int = 200
    holdout_images: int = 300
    regions: str = "felzenszwalb"  # training proposals; the base is GC-only and uses none
    base_train: TrainConfig = TrainConfig(steps=500, batch_size=32, lr=1e-3, warmup_steps=50,
                                          checkpoint_every=500, log_every=20, seed=99)
    finetune: TrainConfig = TrainConfig(steps=300, batch_size=32, lr=2e-4, warmup_steps=30,
                                        checkpoint_every=300, log_every=10)


def _stamp(path: str, made_with: dict[str, Any]) -> None:
    """Record what made a cache, or refuse it when it was made with something else."""
    made_with = json.loads(json.dumps(made_with, default=str))
    if os.path.exists(path):
        with open(path) as handle:
            found = json.load(handle)
        if found != made_with:
            changed = sorted(k for k in set(found) | set(made_with) if found.get(k) != made_with.get(k))
            raise RegimeMismatch(f"{os.path.dirname(path)} was made with other settings ({', '.join(changed)} "
                                 f"differ, see {path}); use another --out")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(made_with, handle, indent=2, sort_keys=True)


# The real-photo regime (chosen in bench/RESULTS.md, "Real photographs"): the base needs a far
# larger budget than on shapes to rise above chance on COCO retrieval.
REAL_REGIME = Regime(model="harmo-tiny", image_size=None, base_train=replace(Regime.base_train, steps=2000,
                                                                              checkpoint_every=2000))


def check_real_folder(real: str) -> None:
    """A real-photo folder holds corpus/ (captions) and eval/ (captions and COCO instances)."""
    for need in ("corpus/captions.json", "eval/captions.json", "eval/instances.json"):
        if not os.path.exists(os.path.join(real, need)):
            raise RegimeMismatch(f"--real {real}: no {need} (expected corpus/ and eval/ COCO folders, eval/ with "
                                 "instances.json)")


def prepare_data(out: str, regime: Regime, say: Callable[[str], None] = print) -> dict[str, str]:
    """The base corpus, train and val folders, with the base and train sets prepared: synthetic
    (written here) or the real photos of `regime.real`."""
    _stamp(f"{out}/regime.json", {k: v for k, v in asdict(regime).items() if k != "finetune"})
    data = f"{out}/data"
    if regime.real:
        check_real_folder(regime.real)
        raw = {"base": f"{regime.real}/corpus", "train": f"{regime.real}/corpus", "val": f"{regime.real}/eval"}
    else:
        raw = {"base": f"{data}/base", "train": f"{data}/train", "val": f"{data}/val"}
        for split, images, seed in (("base", regime.base_images, regime.base_seed), ("train", regime.train_images, 0),
                                    ("val", regime.val_images, 1)):
            if not os.path.exists(f"{raw[split]}/captions.json"):
                say(f"  writing {images} synthetic images -> {raw[split]}")
                write_shapes_dataset(raw[split], images=images, seed=seed)
    for split, regions in (("base", "grid"), ("train", regime.regions)):
        if not os.path.exists(f"{data}/{split}-prepared/dataset.json"):
            say(f"  preparing {raw[split]} as {split} (Ray Data: spaCy lexemes, {regions} regions)")
            prepare(find_source(raw[split]), f"{data}/{split}-prepared",
                    PrepareConfig(regions=regions, tokenizer=regime.model), overwrite=True)
    return {"base": f"{data}/base-prepared", "train": f"{data}/train-prepared", "val": raw["val"]}


def train_base(out: str, data: dict[str, str], regime: Regime, tracking_uri: str,
               say: Callable[[str], None] = print) -> str:
    """The GC-only base model (cached): `out/base`, a run folder `--init-from` accepts."""
    base = f"{out}/base"
    if not os.path.exists(f"{base}/open_clip_weights.pt"):
        say(f"  pretraining the base model GC-only for {regime.base_train.steps} steps on {data['base']}")
        train_job.run(data["base"], base, ModelConfig(name=regime.model, image_size=regime.image_size), GC_ONLY,
                      replace(regime.base_train, mlflow_uri=tracking_uri))
    return base


def run_dir(out: str, config: str, seed: int) -> str:
    return f"{out}/runs/{config}/seed{seed}"


def finetune_and_evaluate(run: str, base: str, data: dict[str, str], method: MethodConfig, seed: int,
                          regime: Regime, tracking_uri: str) -> dict[str, Any]:
    """One arm from the base: train, evaluate on val, keep `run/results.json` (cached)."""
    finetune = replace(regime.finetune, seed=seed, mlflow_uri=None)
    _stamp(f"{run}/arm.json", {"method": asdict(method), "finetune": asdict(finetune)})
    if not os.path.exists(f"{run}/results.json"):
        train_job.run(data["train"], run, ModelConfig(name=regime.model, init_from=base, image_size=regime.image_size),
                      method,
                      replace(finetune, mlflow_uri=tracking_uri))
    return evaluate_cached(run, data["val"], f"{run}/results.json")


def evaluate_cached(run: str, data: str, results_file: str) -> dict[str, Any]:
    """jobs.evaluate of a run on a data set, kept in `results_file` (not redone when present)."""
    if not os.path.exists(results_file):
        with open(results_file, "w") as handle:
            json.dump({**evaluate_job.evaluate(run, data), "checkpoint": run}, handle, indent=2)
    with open(results_file) as handle:
        return json.load(handle)


def evaluate_base(base: str, data: dict[str, str]) -> dict[str, Any]:
    """The base model without fine-tuning, on val (cached beside it)."""
    return evaluate_cached(base, data["val"], f"{base}/results.json")


def write_holdout(out: str, regime: Regime) -> str:
    """A second validation set drawn differently (other seed, image size and captions per image),
    never used to choose anything: a check that a choice made on val generalises."""
    holdout = f"{out}/data/holdout"
    if not os.path.exists(f"{holdout}/captions.json"):
        write_shapes_dataset(holdout, images=regime.holdout_images, seed=HOLDOUT_SEED, size=HOLDOUT_SIZE,
                             captions_per_image=HOLDOUT_CAPTIONS)
    return holdout


def add_regime_arguments(parser: argparse.ArgumentParser) -> None:
    """The data sizes and the base pretraining, and TrainConfig's flags for the fine-tuning budget
    with the regime's values as defaults (set after the flags exist: argparse applies a parser
    default only to flags already added)."""
    parser.add_argument("--real", default=None, metavar="DIR",
                        help="real photos instead of synthetic shapes: a folder holding corpus/ (base pretraining "
                             "and fine-tuning) and eval/ (validation, with COCO instances), e.g. "
                             "a few thousand COCO photos")
    parser.add_argument("--model", default=Regime.model, help="open_clip model name of the base and every arm")
    parser.add_argument("--image-size", type=int, default=None, help="Input side in pixels (default: the model's)")
    parser.add_argument("--base-images", type=int, default=Regime.base_images, help="synthetic base corpus size")
    parser.add_argument("--base-steps", type=int, default=None,
                        help=f"base pretraining steps (default {Regime.base_train.steps}, "
                             f"{REAL_REGIME.base_train.steps} with --real)")
    parser.add_argument("--train-images", type=int, default=Regime.train_images, help="synthetic train set size")
    parser.add_argument("--val-images", type=int, default=Regime.val_images, help="synthetic val set size")
    add_regions_argument(parser, Regime.regions, f"Here those of the fine-tuning data (grid and felzenszwalb need no "
                                                 f"annotation; the GC-only base uses none). Default: {Regime.regions}.",
                         choices=("gt", "grid", "felzenszwalb"))
    add_config_arguments(parser, TrainConfig)
    parser.set_defaults(**{k: getattr(Regime.finetune, k) for k in ("steps", "batch_size", "lr", "warmup_steps",
                                                                   "checkpoint_every", "log_every")})


def regime_from_args(args: argparse.Namespace, finetune: TrainConfig) -> Regime:
    """The regime of the parsed flags; the base trains with the arms' batch size. A bad value is
    refused here, before any data is written or Ray starts."""
    for name in ("base_images", "train_images", "val_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(args, name)}")
    check_model_name(args.model)
    start = REAL_REGIME if args.real else Regime()
    base_steps = args.base_steps or start.base_train.steps
    return Regime(model=args.model, image_size=args.image_size,
                  real=os.path.abspath(args.real) if args.real else None, base_images=args.base_images,
                  train_images=args.train_images, val_images=args.val_images, regions=args.regions,
                  base_train=replace(start.base_train, steps=base_steps, checkpoint_every=base_steps,
                                     batch_size=finetune.batch_size),
                  finetune=finetune)


def mean_r1(results: dict[str, Any]) -> float:
    """The global number: mean of image->text and text->image R@1."""
    return (results["retrieval"]["i2t"]["r1"] + results["retrieval"]["t2i"]["r1"]) / 2

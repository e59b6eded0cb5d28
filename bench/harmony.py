"""The harmony study: does a configuration gain box classification without losing retrieval,
over several seeds, in the fine-tune regime (jobs.regime)?

Every config is fine-tuned from the same GC-only base for every seed through jobs.train and
evaluated on val through jobs.evaluate. DIR/harmony.json holds every run:
    {"baseline": "gc_only", "configs": {NAME: {"method": {...},
     "runs": [{"seed": 0, "checkpoint": RUN, "val": {jobs.evaluate keys}}, ...]}},
     "base_results": {"val": {...}}, "regime": {...}}
(with --holdout, every run and the base also get "holdout": the same keys on a second set)
and the printed table gives per config the mean and standard deviation over seeds of mean R@1
and box top-1, and the paired difference to gc_only (same seed) with a 95% t interval.
gc_only, region_only (LRC without GC) and harmoclip (the shipped defaults) are always run;
--configs adds others as NAME[:FIELD=VALUE,FIELD=VALUE] (MethodConfig fields, as in --help): a
NAME that is a preset of harmoclip.presets (paper, lrc_only, l2sp, ...) starts from that preset,
any other NAME from the shipped default. --wise CONFIG adds WiSE-FT arms CONFIG_wiseA: each run
of CONFIG blended with the base at alpha A (jobs.interpolate; --wise-alphas, default 0.25 0.5
0.75), evaluated, no training.
Runs already in DIR are kept, so an interrupted study continues where it stopped.

    .venv/bin/python -m bench.harmony --seeds 0 1 2 --configs paper lrc_only --wise lrc_only --out outputs/harmony
    .venv/bin/python -m bench.harmony --real COCO_DIR --seeds 0 1 2 --out outputs/real   # COCO_DIR: corpus/ and eval/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
import typing
from typing import Any

from scipy import stats

from harmoclip import MethodConfig
from harmoclip.cli import config_from_args, parse_field_value
from harmoclip.config import TrainConfig
from harmoclip.presets import DEFAULT_METHOD, METHOD_PRESETS
from jobs.common import add_verbose_argument, init_ray, set_verbose
from jobs.demo import examples
from jobs.interpolate import write_blends
from jobs.regime import (ARMS, RegimeMismatch, add_regime_arguments, evaluate_base, evaluate_cached,
                         finetune_and_evaluate, mean_r1, prepare_data, regime_from_args, run_dir, train_base,
                         write_holdout)

BASELINE = "gc_only"
WISE_ALPHAS = (0.25, 0.5, 0.75)


def parse_config(text: str) -> tuple[str, MethodConfig]:
    """`NAME[:field=value,...]` -> (NAME, the preset NAME, or the default, with those overrides)."""
    name, _, overrides = text.partition(":")
    hints = typing.get_type_hints(MethodConfig)
    fields = {f.name for f in dataclasses.fields(MethodConfig)}
    values = {}
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"error: --configs {text}: {key!r} is not a MethodConfig field ({sorted(fields)})")
        values[key] = parse_field_value(hints[key], value)
    return name, dataclasses.replace(METHOD_PRESETS.get(name, METHOD_PRESETS[DEFAULT_METHOD]), **values)


def paired(values: list[float], baseline: list[float]) -> tuple[float, float]:
    """Mean of the per-seed differences and the half-width of its 95% t interval."""
    diffs = [v - b for v, b in zip(values, baseline)]
    if len(diffs) < 2:
        return statistics.fmean(diffs), float("nan")
    return statistics.fmean(diffs), stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5


def summary_table(study: dict[str, Any], split: str = "val") -> str:
    """Per config: mean +- sd over seeds, and the paired difference to the baseline (points)."""
    base_runs = {run["seed"]: run[split] for run in study["configs"][BASELINE]["runs"] if split in run}
    metrics = {"mean R@1": mean_r1, "box top-1": lambda r: r["box"]["top1"],
               "box mean/class": lambda r: r["box"]["macc1"]}
    lines = ["| config | seeds | " + " | ".join(metrics) + " | "
             + " | ".join(f"d {m} vs gc_only (95% CI)" for m in metrics) + " |",
             "|---|---|" + "---|" * 2 * len(metrics)]
    if split in study.get("base_results", {}):
        base = study["base_results"][split]
        lines.append("| base (no fine-tuning) | - | " + " | ".join(f"{100 * f(base):.1f}" for f in metrics.values())
                     + " |" + " |" * len(metrics))
    sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan"))
    for name, config in study["configs"].items():
        runs = [r for r in config["runs"] if r["seed"] in base_runs and split in r]
        if not runs:
            continue
        values = {m: [100 * f(r[split]) for r in runs] for m, f in metrics.items()}
        row = f"| {name} | {len(runs)} | " + " | ".join(f"{statistics.fmean(v):.1f} ± {sd(v):.1f}"
                                                       for v in values.values()) + " |"
        if name == BASELINE:
            lines.append(row + " |" * len(metrics))
            continue
        diffs = [paired(values[m], [100 * f(base_runs[r["seed"]]) for r in runs]) for m, f in metrics.items()]
        lines.append(row + "".join(f" {d:+.1f} ± {h:.1f} |" for d, h in diffs))
    return "\n".join(lines)


def per_class_table(study: dict[str, Any], config: str = "harmoclip", top: int = 20, split: str = "val") -> str:
    """Box top-1 per class for the `top` classes with most boxes: gc_only vs `config`, means over
    their common seeds (points), and the paired difference."""
    def by_seed(name: str) -> dict[int, dict]:
        return {r["seed"]: r[split]["box"]["per_class"] for r in study["configs"].get(name, {}).get("runs", [])
                if split in r and "per_class" in r[split]["box"]}
    base, other = by_seed(BASELINE), by_seed(config)
    seeds = sorted(set(base) & set(other))
    if not seeds:
        return ""
    classes = sorted(base[seeds[0]], key=lambda name: -base[seeds[0]][name]["boxes"])[:top]
    lines = [f"| class | boxes | gc_only top-1 | {config} top-1 | difference |", "|---|---|---|---|---|"]
    for name in classes:
        a = statistics.fmean(100 * base[s][name]["top1"] for s in seeds)
        b = statistics.fmean(100 * other[s][name]["top1"] for s in seeds)
        lines.append(f"| {name} | {base[seeds[0]][name]['boxes']} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
    return f"per class, the {len(classes)} classes with most boxes (seeds {', '.join(map(str, seeds))}):\n" + \
        "\n".join(lines)


def write_examples(study: dict[str, Any], val: str, path: str, config: str = "harmoclip") -> bool:
    """examples.png (as jobs.demo draws it) from the seed-0 runs of gc_only and `config`."""
    runs = {name: next((r for r in study["configs"].get(name, {}).get("runs", []) if r["seed"] == 0), None)
            for name in (BASELINE, config)}
    if None in runs.values():
        return False
    examples(val, {"baseline": {**runs[BASELINE]["val"], "checkpoint": runs[BASELINE]["checkpoint"]},
                   "harmoclip": {**runs[config]["val"], "checkpoint": runs[config]["checkpoint"]}}, path)
    return True


def brief(results: dict[str, Any]) -> str:
    return (f"mean R@1 {100 * mean_r1(results):.1f}, box top-1 {100 * results['box']['top1']:.1f} "
            f"(mean/class {100 * results['box']['macc1']:.1f})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.harmony", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="study folder (data, base, runs, harmony.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds")
    parser.add_argument("--configs", nargs="*", default=[], help="extra configs, NAME:FIELD=VALUE,...")
    parser.add_argument("--only", nargs="*", default=None, help="run only these config names (others are kept)")
    parser.add_argument("--wise", nargs="*", default=[], metavar="CONFIG",
                        help="WiSE-FT arms: blend each run of CONFIG with the base at each --wise-alphas and "
                             "evaluate (no training)")
    parser.add_argument("--wise-alphas", type=float, nargs="+", default=list(WISE_ALPHAS), metavar="A",
                        help="weights of the fine-tuned run in the --wise blends (0: the base, 1: the run)")
    parser.add_argument("--holdout", action="store_true",
                        help="also evaluate every run on a second validation set drawn differently (other "
                             "seed, image size and captions per image), reported beside val, never used to choose")
    add_regime_arguments(parser)
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    out = os.path.abspath(args.out)
    regime = regime_from_args(args, config_from_args(args, TrainConfig))
    configs = {**ARMS, **dict(parse_config(text) for text in args.configs)}
    if set(args.wise) - set(configs):
        raise SystemExit(f"error: --wise {' '.join(args.wise)}: not a config of this study ({', '.join(configs)})")
    if not all(0 <= alpha <= 1 for alpha in args.wise_alphas):
        raise SystemExit(f"error: --wise-alphas {' '.join(map(str, args.wise_alphas))}: each must be in [0, 1]")
    if args.real and args.holdout:
        raise SystemExit("error: --holdout draws a synthetic second set; with --real, evaluate the study's "
                         "checkpoints on your own second set with jobs.evaluate")
    init_ray()
    try:
        return run_study(out, regime, configs, args.seeds, args.only, args.holdout, args.wise, args.wise_alphas)
    except RegimeMismatch as err:
        raise SystemExit(f"error: {err}") from err


def record_run(study: dict[str, Any], study_file: str, name: str, method: MethodConfig, record: dict[str, Any],
               **extra: Any) -> None:
    """Put one run into the study (replacing an earlier run of that seed) and save the study."""
    entry = study["configs"].setdefault(name, {"runs": []})
    entry.update(method=dataclasses.asdict(method), **extra)
    entry["runs"] = sorted([r for r in entry["runs"] if r["seed"] != record["seed"]] + [record],
                           key=lambda r: r["seed"])
    with open(study_file, "w") as handle:
        json.dump(study, handle, indent=2)


def run_study(out: str, regime, configs: dict[str, MethodConfig], seeds: list[int],
              only: list[str] | None, holdout: bool, wise: list[str] = (),
              wise_alphas: tuple[float, ...] = WISE_ALPHAS) -> dict[str, Any]:
    tracking_uri = f"sqlite:///{out}/mlflow.db"
    os.makedirs(out, exist_ok=True)
    study_file = f"{out}/harmony.json"
    study = {"baseline": BASELINE, "configs": {}}
    if os.path.exists(study_file):
        with open(study_file) as handle:
            study = json.load(handle)
    study["regime"] = dataclasses.asdict(regime)

    print(f"[1/3] data and the base model under {out}", flush=True)
    data = prepare_data(out, regime)
    base = train_base(out, data, regime, tracking_uri)
    holdout_data = write_holdout(out, regime) if holdout else None
    study["base_results"] = {"val": evaluate_base(base, data)}
    if holdout_data:
        study["base_results"]["holdout"] = evaluate_cached(base, holdout_data, f"{base}/holdout.json")
    # Seed-major: after the first seed every config has one paired point, so a long study can be
    # read (and steered) before it ends.
    todo = [(name, seed) for seed in seeds for name in configs if only is None or name in only]
    print(f"[2/3] {len(todo)} fine-tuning runs ({regime.finetune.steps} steps each) from {base}", flush=True)
    for number, (name, seed) in enumerate(todo, 1):
        started = time.monotonic()
        run = run_dir(out, name, seed)
        results = finetune_and_evaluate(run, base, data, configs[name], seed, regime, tracking_uri)
        record = {"seed": seed, "checkpoint": run, "val": results}
        if holdout_data:
            record["holdout"] = evaluate_cached(run, holdout_data, f"{run}/holdout.json")
        record_run(study, study_file, name, configs[name], record)
        print(f"  {number}/{len(todo)} {name} seed {seed}: {brief(results)} ({time.monotonic() - started:.0f} s)",
              flush=True)
        if name in wise:
            blends = {alpha: run_dir(out, f"{name}_wise{alpha:g}", seed) for alpha in wise_alphas}
            write_blends(run, {a: b for a, b in blends.items() if not os.path.exists(f"{b}/open_clip_weights.pt")})
            for alpha, blend in blends.items():
                blend_name = f"{name}_wise{alpha:g}"
                blended = {"seed": seed, "checkpoint": blend, "val": evaluate_cached(blend, data["val"],
                                                                                     f"{blend}/results.json")}
                if holdout_data:
                    blended["holdout"] = evaluate_cached(blend, holdout_data, f"{blend}/holdout.json")
                record_run(study, study_file, blend_name, configs[name], blended, wise={"of": name, "alpha": alpha})
                print(f"    WiSE-FT alpha {alpha:g} of {name} seed {seed}: {brief(blended['val'])}", flush=True)
    print("[3/3] summary on val (points; ± is the standard deviation over seeds, CI the 95% t interval of "
          f"the paired difference)\n{summary_table(study)}\n")
    if holdout_data:
        print(f"the same on the holdout set ({holdout_data}, never used to choose):\n"
              f"{summary_table(study, 'holdout')}\n")
    if table := per_class_table(study):
        print(table + "\n")
    if write_examples(study, data["val"], f"{out}/examples.png"):
        print(f"labelled val examples (seed 0, gc_only vs harmoclip): {out}/examples.png")
    print(study_file)
    return study


if __name__ == "__main__":
    main()

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
--configs adds others as NAME:FIELD=VALUE,FIELD=VALUE (MethodConfig fields, as in --help).
Runs already in DIR are kept, so an interrupted study continues where it stopped.

    .venv/bin/python -m bench.harmony --seeds 0 1 2 --configs lrc_only:lambda_gr=0 --out outputs/harmony
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
from jobs.common import add_verbose_argument, init_ray, set_verbose
from jobs.regime import (ARMS, RegimeMismatch, add_regime_arguments, evaluate_base, evaluate_cached,
                         finetune_and_evaluate, mean_r1, prepare_data, regime_from_args, run_dir, train_base,
                         write_holdout)

BASELINE = "gc_only"


def parse_config(text: str) -> tuple[str, MethodConfig]:
    """`NAME:field=value,field=value` -> (NAME, MethodConfig with those overrides)."""
    name, _, overrides = text.partition(":")
    hints = typing.get_type_hints(MethodConfig)
    fields = {f.name for f in dataclasses.fields(MethodConfig)}
    values = {}
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"error: --configs {text}: {key!r} is not a MethodConfig field ({sorted(fields)})")
        values[key] = parse_field_value(hints[key], value)
    return name, MethodConfig(**values)


def paired(values: list[float], baseline: list[float]) -> tuple[float, float]:
    """Mean of the per-seed differences and the half-width of its 95% t interval."""
    diffs = [v - b for v, b in zip(values, baseline)]
    if len(diffs) < 2:
        return statistics.fmean(diffs), float("nan")
    return statistics.fmean(diffs), stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5


def summary_table(study: dict[str, Any], split: str = "val") -> str:
    """Per config: mean +- sd over seeds, and the paired difference to the baseline (points)."""
    base_runs = {run["seed"]: run[split] for run in study["configs"][BASELINE]["runs"] if split in run}
    lines = ["| config | seeds | mean R@1 | box top-1 | d mean R@1 vs gc_only (95% CI) | d box top-1 (95% CI) |",
             "|---|---|---|---|---|---|"]
    if split in study.get("base_results", {}):
        base = study["base_results"][split]
        lines.append(f"| base (no fine-tuning) | - | {100 * mean_r1(base):.1f} | {100 * base['box']['top1']:.1f} | | |")
    for name, config in study["configs"].items():
        runs = [r for r in config["runs"] if r["seed"] in base_runs and split in r]
        if not runs:
            continue
        retrieval = [100 * mean_r1(r[split]) for r in runs]
        box = [100 * r[split]["box"]["top1"] for r in runs]
        sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan"))
        row = f"| {name} | {len(runs)} | {statistics.fmean(retrieval):.1f} ± {sd(retrieval):.1f} | " \
              f"{statistics.fmean(box):.1f} ± {sd(box):.1f} |"
        if name == BASELINE:
            lines.append(row + " | |")
            continue
        base_retrieval = [100 * mean_r1(base_runs[r["seed"]]) for r in runs]
        base_box = [100 * base_runs[r["seed"]]["box"]["top1"] for r in runs]
        (dr, hr), (db, hb) = paired(retrieval, base_retrieval), paired(box, base_box)
        lines.append(row + f" {dr:+.1f} ± {hr:.1f} | {db:+.1f} ± {hb:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.harmony", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="study folder (data, base, runs, harmony.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds")
    parser.add_argument("--configs", nargs="*", default=[], help="extra configs, NAME:FIELD=VALUE,...")
    parser.add_argument("--only", nargs="*", default=None, help="run only these config names (others are kept)")
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
    init_ray()
    try:
        return run_study(out, regime, configs, args.seeds, args.only, args.holdout)
    except RegimeMismatch as err:
        raise SystemExit(f"error: {err}") from err


def run_study(out: str, regime, configs: dict[str, MethodConfig], seeds: list[int],
              only: list[str] | None, holdout: bool) -> dict[str, Any]:
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
        entry = study["configs"].setdefault(name, {"runs": []})
        entry["method"] = dataclasses.asdict(configs[name])
        record = {"seed": seed, "checkpoint": run, "val": results}
        if holdout_data:
            record["holdout"] = evaluate_cached(run, holdout_data, f"{run}/holdout.json")
        entry["runs"] = sorted([r for r in entry["runs"] if r["seed"] != seed] + [record], key=lambda r: r["seed"])
        with open(study_file, "w") as handle:
            json.dump(study, handle, indent=2)
        print(f"  {number}/{len(todo)} {name} seed {seed}: mean R@1 {100 * mean_r1(results):.1f}, box top-1 "
              f"{100 * results['box']['top1']:.1f} ({time.monotonic() - started:.0f} s)", flush=True)
    print("[3/3] summary on val (points; ± is the standard deviation over seeds, CI the 95% t interval of "
          f"the paired difference)\n{summary_table(study)}\n")
    if holdout_data:
        print(f"the same on the holdout set ({holdout_data}, never used to choose):\n"
              f"{summary_table(study, 'holdout')}\n")
    print(study_file)
    return study


if __name__ == "__main__":
    main()

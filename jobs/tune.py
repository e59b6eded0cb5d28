"""Sweep the HarmoCLIP loss weights (and optionally the learning rate) with Ray Tune.

Each trial is a driver function that trains with Ray Train (a TorchTrainer per trial, as
jobs.train does) in rungs of a fixed LR schedule, evaluates the checkpoint of each rung on VAL
(--val-data) with jobs.evaluate's code, and reports retrieval R@1, box top-1 and harmony to Tune;
ASHA stops weak trials at a rung. MLflow gets a parent run for the sweep and a child run per trial
(params, per-step training metrics, evaluation metrics). SWEEP ends up holding summary.csv,
summary.md and pareto.png (retrieval R@1 against box top-1, the Pareto front highlighted, GC-only
marked), also logged to the parent run. Running the same command again resumes the sweep.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import tempfile
from dataclasses import replace
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from harmoclip.cli import (HelpFormatter, add_bool_argument, add_config_arguments, add_deprecated_alias,
                           add_method_arguments, add_model_arguments, config_from_args, method_from_args,
                           model_from_args)
from harmoclip.config import MethodConfig, TrainConfig, as_flat_dict
from harmoclip.presets import DEFAULT_METHOD, method_preset
from harmoclip.storage import is_remote, join, write_bytes
from jobs import evaluate as evaluate_job
from jobs import train as train_job
from jobs.common import (add_shared_fs_argument, add_verbose_argument, autoscaler_maximum, check_cluster_storage,
                         init_ray, quiet_libraries, run_storage, set_verbose, user_errors)
from jobs.tracking import RunTracker, default_tracking_uri
from pipeline.dataset import DatasetError, read_dataset_manifest
from pipeline.inference_data import check_inference_input

OBJECTIVES = {"harmony": "harmony", "retrieval": "retrieval_r1", "box": "box_top1"}
RUNGS = (4, 2, 1)  # ASHA rungs end at steps/4, steps/2 and steps
# The loss weights a sweep varies: each one's grid flag (its dest) and that flag's default values.
GRIDS = {"lambda_lrc": ("grid_lrc", [0.0, 1.0]), "lambda_gr": ("grid_gr", [0.0, 10.0])}


def rung_steps(steps: int, scheduler: str) -> list[int]:
    if scheduler == "none":
        return [steps]
    return sorted({max(1, steps // divisor) for divisor in RUNGS})


def make_scheduler(kind: str, steps: int) -> TrialScheduler:
    """ASHA counts rungs: a trial reports once per rung (Tune's training_iteration), so max_t is
    the number of rungs of a trial of `steps` steps and ASHA may stop it at any rung before the last."""
    if kind == "none":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="training_iteration", max_t=len(rung_steps(steps, kind)), grace_period=1,
                         reduction_factor=2)


def trial_train_config(args: argparse.Namespace) -> TrainConfig:
    """The training settings every trial shares. --epochs becomes its step count on --data here:
    a trial trains in rungs of steps, and run() given epochs would train them all at the first rung,
    leaving ASHA nothing to cut short."""
    train = config_from_args(args, TrainConfig)
    if train.epochs is None:
        return train
    steps = train_job.epochs_as_steps(args.data, train)
    print(f"--epochs {train.epochs}: {steps} steps per trial (rungs at {rung_steps(steps, args.scheduler)})",
          flush=True)
    return replace(train, steps=steps, epochs=None)


def trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: train to each rung's step count on one LR schedule, evaluate, report."""
    set_verbose(setup["verbose"])  # a trial runs in its own process, maybe on another node
    quiet_libraries()
    method = replace(setup["method"], **{name: config[name] for name in GRIDS if name in config})
    train: TrainConfig = setup["train"]
    train = replace(train, lr=config.get("lr", train.lr), schedule_steps=train.steps)
    out = join(setup["sweep"], "trials", tune.get_context().get_trial_id())
    for steps in rung_steps(train.steps, setup["scheduler"]):
        train_job.run(setup["data"], out, setup["model"], method, replace(train, steps=steps),
                      parent_run_id=setup["parent_run_id"])
        results = evaluate_job.evaluate(out, setup["val"])
        metrics = {"harmony": results["harmony"], "box_top1": results["box"]["top1"],
                   "retrieval_r1": (results["retrieval"]["i2t"]["r1"] + results["retrieval"]["t2i"]["r1"]) / 2,
                   "step": steps}
        tracker = RunTracker(setup["tracking_uri"], train.experiment, out, "", {})
        tracker.log({f"val_{k}": v for k, v in metrics.items() if k != "step"}, steps)
        tracker.finish()
        tune.report(metrics)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def swept_weights(args: argparse.Namespace) -> list[str]:
    """The loss weights the sweep varies: those whose own flag (--lambda-lrc, --lambda-gr) is not
    given, as a given one fixes its weight in every trial. A weight both fixed and gridded, or a
    sweep left with nothing to vary, is refused rather than one of the flags ignored."""
    fixed = [name for name in GRIDS if hasattr(args, name)]  # a method field flag reaches args only when given
    for name in fixed:
        if getattr(args, GRIDS[name][0]) is not None:
            raise ValueError(f"{_flag(name)} fixes {name} in every trial and {_flag(GRIDS[name][0])} sweeps it: "
                             f"pass one of them")
    if len(fixed) == len(GRIDS) and not args.tune_lr:
        raise ValueError(f"{' and '.join(_flag(name) for name in fixed)} fix every swept loss weight: nothing to "
                         f"sweep (leave one out, or add --tune-lr)")
    return [name for name in GRIDS if name not in fixed]


def weight_range(name: str, method: MethodConfig, factor: float) -> tuple[float, float]:
    """Random search's range for a loss weight: x/factor to x*factor around the method's own value
    (the shipped default where that is 0), log-uniform because the weights that work span orders of
    magnitude (LRC near 1, anchor GR near 10): the preset's weight is always inside."""
    centre = getattr(method, name) or getattr(method_preset(DEFAULT_METHOD), name)
    return centre / factor, centre * factor


def param_space(args: argparse.Namespace, method: MethodConfig) -> dict[str, Any]:
    """What Tune varies, checked before Ray starts: every grid point must be a valid method."""
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    swept = swept_weights(args)
    if args.search == "random":
        gridded = [_flag(GRIDS[name][0]) for name in GRIDS if getattr(args, GRIDS[name][0]) is not None]
        if gridded:
            raise ValueError(f"{', '.join(gridded)}: grid values, but --search random draws the weights; pass "
                             f"--search grid, or leave them out")
        if args.lambda_range <= 1:
            raise ValueError(f"--lambda-range must be > 1 (weights from x/range to x*range), got {args.lambda_range}")
        space = {name: tune.loguniform(*weight_range(name, method, args.lambda_range)) for name in swept}
    else:
        values = {name: getattr(args, GRIDS[name][0]) or GRIDS[name][1] for name in swept}
        for point in itertools.product(*values.values()):
            weights = dict(zip(values, point))
            try:
                replace(method, **weights)
            except ValueError as err:
                raise ValueError(f"grid point {weights}: {err}") from None
        space = {name: tune.grid_search(grid) for name, grid in values.items()}
    if args.tune_lr:
        space["lr"] = tune.loguniform(args.lr / 10, args.lr * 10)
    return space


def trial_count(space: dict[str, Any], samples: int) -> int:
    """The trials a sweep runs: every grid point `samples` times (random search: `samples`)."""
    count = samples
    for value in space.values():
        if isinstance(value, dict) and "grid_search" in value:
            count *= len(value["grid_search"])
    return count


def trial_concurrency(trials: int, workers: int, gpu: bool, max_concurrent: int | None = None,
                      most: dict[str, float] | None = None, now: dict[str, float] | None = None) -> int:
    """How many trials run at once. `most`: the resources the cluster can grow to, where Ray reports
    its autoscaler's configuration (jobs.common.autoscaler_maximum), else None; `now`: what it has
    at start (ray.cluster_resources()). Pure, so the tests check it without Ray.

    --max-concurrent wins. With --gpu the default is every trial of the sweep (fewer where `most`
    says how many GPU worker groups the cluster can ever hold), never what `now` holds: a cluster
    whose GPU workers scale from 0 starts with none. Each running trial's Ray Train workers ask for
    a GPU each, which is the demand Ray's autoscaler adds GPU nodes for; a trial beyond what the
    cluster can grow to waits for GPUs to free (Ray Train retries the start of its worker group),
    and cannot hold up the others, as GPU workers ask for no CPU and trial drivers for no GPU.
    Without --gpu, trials and their workers compete for the same CPUs: too many at once and the
    trial drivers hold the CPUs their workers wait for. So the default stays what the CPUs fit,
    `workers` + 2 each (the workers, the trial's driver and its data tasks), counted on `most`
    where known, else on `now` (on an autoscaling cluster that does not report its maximum, pass
    --max-concurrent for a CPU sweep).
    """
    if max_concurrent is not None:
        return max_concurrent
    if gpu:
        fits = trials if not most else int(most.get("GPU", 0) // workers)
    else:
        fits = int((most or now or {}).get("CPU", 1) // (workers + 2))
    return max(1, min(trials, fits))


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Whether each (retrieval, box) point is not dominated by another (both higher or equal, one higher)."""
    return [not any(o[0] >= p[0] and o[1] >= p[1] and o != p for o in points) for p in points]


def write_summary(rows: list[dict[str, Any]], folder: str) -> tuple[str, str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front([(r["retrieval_r1"], r["box_top1"]) for r in rows])
    for row, on_front in zip(rows, front):
        row["pareto"] = on_front
    columns = ["trial", "lambda_lrc", "lambda_gr", "lr", "step", "retrieval_r1", "box_top1", "harmony", "pareto"]
    csv_path, md_path, plot_path = (os.path.join(folder, n) for n in ("summary.csv", "summary.md", "pareto.png"))
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in sorted(rows, key=lambda r: -r["harmony"]):
        lines.append("| " + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c])
                                       for c in columns) + " |")
    with open(md_path, "w") as handle:
        handle.write("\n".join(lines) + "\n")

    fig, axis = plt.subplots(figsize=(6, 5))
    axis.scatter([r["retrieval_r1"] for r in rows], [r["box_top1"] for r in rows], c="tab:blue", label="trial")
    front_rows = sorted((r for r in rows if r["pareto"]), key=lambda r: r["retrieval_r1"])
    axis.plot([r["retrieval_r1"] for r in front_rows], [r["box_top1"] for r in front_rows], "-o", c="tab:orange",
              label="Pareto front")
    for row in rows:
        axis.annotate(f"({row['lambda_lrc']:.2g}, {row['lambda_gr']:.2g})", (row["retrieval_r1"], row["box_top1"]),
                      fontsize=7)
        if row["lambda_lrc"] == 0 and row["lambda_gr"] == 0:
            axis.scatter([row["retrieval_r1"]], [row["box_top1"]], marker="*", s=250, c="tab:red",
                         label="GC-only (lambda 0, 0)")
    axis.set(xlabel="retrieval: mean R@1 (I2T, T2I)", ylabel="box classification top-1",
             title="Sweep: global vs regional quality")
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plot_path, dpi=120)
    return csv_path, md_path, plot_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.tune", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data", required=True, help="Dataset to read: the prepared training dataset (local or s3://)")
    validation = parser.add_mutually_exclusive_group(required=True)  # required, and given by the old --val too
    validation.add_argument("--val-data", dest="val", metavar="VAL",
                            help="Validation dataset each rung is evaluated on: a COCO folder or prepared dataset "
                                 "(local or s3://)")
    add_deprecated_alias(validation, "--val", "--val-data", dest="val")
    parser.add_argument("--out", required=True,
                        help="Where to write: the SWEEP folder, local or s3:// (trial runs, summary, plot; s3:// on a "
                             "multi-node cluster)")
    parser.add_argument("--samples", type=int, default=1,
                        help="random search: trials; grid search: repeats of the whole grid")
    parser.add_argument("--search", choices=["grid", "random"], default="grid")
    parser.add_argument("--grid-lrc", type=float, nargs="+", default=None,
                        help=f"lambda_lrc values (grid; default {' '.join(map(str, GRIDS['lambda_lrc'][1]))})")
    parser.add_argument("--grid-gr", type=float, nargs="+", default=None,
                        help=f"lambda_gr values (grid; default {' '.join(map(str, GRIDS['lambda_gr'][1]))}, 10 being "
                             f"the default anchor GR's weight)")
    parser.add_argument("--lambda-range", type=float, default=10.0,
                        help="random search: each swept weight log-uniform from x/this to x*this around the "
                             "method's own weight x (the shipped default where that is 0)")
    add_bool_argument(parser, "--tune-lr", help="also sample the learning rate (log-uniform, x/10..x10)")
    parser.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                        help="Trials run at once (default: with --gpu, every trial of the sweep, the autoscaler adding "
                             "GPU nodes up to its maximum and the trials beyond waiting for GPUs; without --gpu, what "
                             "the cluster's CPUs fit, --workers + 2 each). Never sized from the GPUs present at "
                             "start; a resumed sweep keeps the value it started with")
    parser.add_argument("--scheduler", choices=["asha", "none"], default="asha")
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="harmony")
    add_model_arguments(parser)
    add_method_arguments(parser)
    add_config_arguments(parser, TrainConfig)
    add_shared_fs_argument(parser)
    add_verbose_argument(parser)
    parser.set_defaults(steps=200, checkpoint_every=50)
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    sweep = args.out.rstrip("/") if is_remote(args.out) else os.path.abspath(args.out)
    with user_errors(DatasetError, ValueError, FileNotFoundError, OSError):
        model = model_from_args(args)
        method = method_from_args(args)
        space = param_space(args, method)
        trials = trial_count(space, args.samples)
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
        read_dataset_manifest(args.data)  # missing or malformed inputs are named before Ray starts
        check_inference_input(args.val)
        train = trial_train_config(args)
        tracking_uri = train.mlflow_uri or default_tracking_uri(join(sweep, "trials"))
        train = replace(train, mlflow_uri=tracking_uri)
        init_ray()
        check_cluster_storage(args.out, args.shared_fs)
        storage_path, name, filesystem = run_storage(sweep)
        parent = RunTracker(tracking_uri, train.experiment, f"sweep:{sweep}", name,
                            {"sweep.search": args.search, "sweep.scheduler": args.scheduler,
                             "sweep.objective": args.objective, "sweep.samples": args.samples,
                             "sweep.varies": ",".join(space),
                             **as_flat_dict(model, method, train)}, artifact_storage=sweep)
        setup = {"data": args.data, "val": args.val, "sweep": sweep, "model": model, "method": method,
                 "train": train, "scheduler": args.scheduler, "tracking_uri": tracking_uri,
                 "parent_run_id": parent.run_id, "verbose": args.verbose}
        metric = OBJECTIVES[args.objective]
        trainable = tune.with_parameters(trial, setup=setup)
        # Tune saves the sweep's state (which trials finished) at most every 10 s by default; a
        # sweep stopped just after a trial finished would run that trial again. The state is a few
        # kB against trials of minutes: save it every 2 s.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
        experiment = f"{storage_path.rstrip('/')}/{name}"
        if tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
            print(f"resuming the sweep in {sweep}: finished trials are kept, unfinished ones continue from "
                  f"their checkpoints", flush=True)
            tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True,
                                       storage_filesystem=filesystem)
        else:
            concurrent = trial_concurrency(trials, train.workers, train.gpu, args.max_concurrent,
                                           most=autoscaler_maximum(), now=ray.cluster_resources())
            print(f"{trials} trial(s), up to {concurrent} at once"
                  + ("" if args.max_concurrent else " (--max-concurrent to change)"), flush=True)
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=args.samples,
                                            scheduler=make_scheduler(args.scheduler, train.steps),
                                            max_concurrent_trials=concurrent),
                run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                                          verbose=1 if args.verbose else 0),
            )
        grid = tuner.fit()

    rows, failed = trial_rows(grid, metric, method, train.lr)
    for line in failed:
        print(line, file=sys.stderr)
    if rows:
        report(rows, args.objective, sweep, parent, tracking_uri)
    parent.finish("FAILED" if failed else "FINISHED")
    if failed:  # a run failure, not a user error: the sweep did not do all it was asked to
        print(f"error: {len(failed)} of {len(grid)} trials failed (errors above)"
              + ("; the summary holds the others" if rows else "") + ". Running the same command again retries them",
              file=sys.stderr)
        raise SystemExit(1)
    return rows


def trial_rows(results: tune.ResultGrid, metric: str, method: MethodConfig,
               lr: float) -> tuple[list[dict[str, Any]], list[str]]:
    """A summary row per trial that reported the objective (the fixed weights and learning rate
    filled in from the sweep's own), and a line per trial that failed."""
    rows, failed = [], []
    for result in results:
        if result.error or not result.metrics or metric not in result.metrics:
            failed.append(f"trial {os.path.basename(result.path)} failed: {result.error or f'no {metric} reported'}")
            continue
        config = result.config
        weights = {name: config.get(name, getattr(method, name)) for name in GRIDS}
        rows.append({"trial": os.path.basename(result.path), **weights, "lr": config.get("lr", lr),
                     **{k: result.metrics[k] for k in ("step", "retrieval_r1", "box_top1", "harmony")}})
    return rows, failed


def report(rows: list[dict[str, Any]], objective: str, sweep: str, parent: RunTracker, tracking_uri: str) -> None:
    """The summary table, plot and best trial: written to SWEEP, logged to the parent run, printed."""
    metric = OBJECTIVES[objective]
    with tempfile.TemporaryDirectory() as local:
        paths = write_summary(rows, local)
        for path in paths:
            parent.log_artifact(path)
            with open(path, "rb") as handle:
                write_bytes(join(sweep, os.path.basename(path)), handle.read())
        with open(paths[1]) as handle:
            print(handle.read())
    best = max(rows, key=lambda r: r[metric])
    parent.log({f"best_{k}": best[k] for k in ("retrieval_r1", "box_top1", "harmony")}, step=0)
    print(f"best by {objective}: lambda_lrc={best['lambda_lrc']:.3g}, lambda_gr={best['lambda_gr']:.3g}; "
          f"summary and pareto.png in {sweep}; MLflow: {tracking_uri}")


if __name__ == "__main__":
    main()

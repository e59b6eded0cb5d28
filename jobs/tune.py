"""Sweep the HarmoCLIP loss weights (and optionally the learning rate) with Ray Tune.

Each trial is a driver function that trains with Ray Train (a TorchTrainer per trial, as
jobs.train does) in rungs of a fixed LR schedule, evaluates the checkpoint of each rung on VAL
with jobs.evaluate's code, and reports retrieval R@1, box top-1 and harmony to Tune; ASHA stops
weak trials at a rung. MLflow gets a parent run for the sweep and a child run per trial (params,
per-step training metrics, evaluation metrics). SWEEP ends up holding summary.csv, summary.md
and pareto.png (retrieval R@1 against box top-1, the Pareto front highlighted, GC-only marked),
also logged to the parent run. Running the same command again resumes the sweep.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from dataclasses import replace
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from harmoclip.cli import (add_config_arguments, add_method_arguments, add_model_arguments, config_from_args,
                          method_from_args, model_from_args)
from harmoclip.config import TrainConfig, as_flat_dict
from harmoclip.storage import is_remote, join, write_bytes
from jobs import evaluate as evaluate_job
from jobs import train as train_job
from jobs.common import (add_shared_fs_argument, add_verbose_argument, check_cluster_storage, init_ray,
                         quiet_libraries, run_storage, set_verbose, user_errors)
from jobs.tracking import RunTracker, default_tracking_uri
from pipeline.dataset import DatasetError

OBJECTIVES = {"harmony": "harmony", "retrieval": "retrieval_r1", "box": "box_top1"}
RUNGS = (4, 2, 1)  # ASHA rungs end at steps/4, steps/2 and steps


def rung_steps(steps: int, scheduler: str) -> list[int]:
    if scheduler == "none":
        return [steps]
    return sorted({max(1, steps // divisor) for divisor in RUNGS})


def trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """One Tune trial: train to each rung's step count on one LR schedule, evaluate, report."""
    set_verbose(setup["verbose"])  # a trial runs in its own process, maybe on another node
    quiet_libraries()
    method = replace(setup["method"], lambda_lrc=config["lambda_lrc"], lambda_gr=config["lambda_gr"])
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


def param_space(args: argparse.Namespace) -> dict[str, Any]:
    if args.search == "grid":
        space = {"lambda_lrc": tune.grid_search(args.grid_lrc), "lambda_gr": tune.grid_search(args.grid_gr)}
    else:
        space = {"lambda_lrc": tune.uniform(0.0, args.max_lambda), "lambda_gr": tune.uniform(0.0, args.max_lambda)}
    if args.tune_lr:
        space["lr"] = tune.loguniform(args.lr / 10, args.lr * 10)
    return space


def concurrent_trials(workers: int, gpu: bool) -> int:
    """Trials that fit at once: each needs its training workers plus a CPU for its driver."""
    resources = ray.cluster_resources()
    if gpu:
        return max(1, int(resources.get("GPU", 0) // workers))
    return max(1, int(resources.get("CPU", 1) // (workers + 2)))


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
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared training dataset (local or s3://)")
    parser.add_argument("--val", required=True, help="validation data: COCO folder or prepared dataset")
    parser.add_argument("--out", required=True,
                        help="SWEEP folder, local or s3:// (trial runs, summary, plot; s3:// on a multi-node cluster)")
    parser.add_argument("--samples", type=int, default=1,
                        help="random search: trials; grid search: repeats of the whole grid")
    parser.add_argument("--search", choices=["grid", "random"], default="grid")
    parser.add_argument("--grid-lrc", type=float, nargs="+", default=[0.0, 1.0], help="lambda_lrc values (grid)")
    parser.add_argument("--grid-gr", type=float, nargs="+", default=[0.0, 10.0],
                        help="lambda_gr values (grid; 10 is the default anchor GR's weight)")
    parser.add_argument("--max-lambda", type=float, default=2.0, help="random search: lambdas in [0, this]")
    parser.add_argument("--tune-lr", action="store_true", help="also sample the learning rate (log-uniform, x/10..x10)")
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
        method, train = method_from_args(args), config_from_args(args, TrainConfig)
        tracking_uri = train.mlflow_uri or default_tracking_uri(join(sweep, "trials"))
        train = replace(train, mlflow_uri=tracking_uri)
        init_ray()
        check_cluster_storage(args.out, args.shared_fs)
        storage_path, name, filesystem = run_storage(sweep)
        parent = RunTracker(tracking_uri, train.experiment, f"sweep:{sweep}", name,
                            {"sweep.search": args.search, "sweep.scheduler": args.scheduler,
                             "sweep.objective": args.objective, "sweep.samples": args.samples,
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
            scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=len(rung_steps(train.steps, "asha")),
                                       grace_period=1, reduction_factor=2)
                         if args.scheduler == "asha" else FIFOScheduler())
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(args),
                tune_config=tune.TuneConfig(metric=metric, mode="max", num_samples=args.samples, scheduler=scheduler,
                                            max_concurrent_trials=concurrent_trials(train.workers, train.gpu)),
                run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                                          verbose=1 if args.verbose else 0),
            )
        grid = tuner.fit()

    rows = []
    for result in grid:
        if result.error or not result.metrics or metric not in result.metrics:
            print(f"trial {result.path} failed: {result.error}", file=sys.stderr)
            continue
        config = result.config
        rows.append({"trial": os.path.basename(result.path), "lambda_lrc": config["lambda_lrc"],
                     "lambda_gr": config["lambda_gr"], "lr": config.get("lr", train.lr),
                     **{k: result.metrics[k] for k in ("step", "retrieval_r1", "box_top1", "harmony")}})
    if not rows:
        raise SystemExit("error: no trial finished; see the errors above")
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
    parent.finish()
    print(f"best by {args.objective}: lambda_lrc={best['lambda_lrc']:.3g}, lambda_gr={best['lambda_gr']:.3g}; "
          f"summary and pareto.png in {sweep}; MLflow: {tracking_uri}")
    return rows


if __name__ == "__main__":
    main()

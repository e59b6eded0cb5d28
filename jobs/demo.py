"""The embedded default, end to end on a local Ray: synthetic shapes data -> prepare -> train a
GC-only baseline and HarmoCLIP with the same budget from the same initial weights -> evaluate
both -> side-by-side table, plot and DIR/results.json. A few minutes on a 2-core CPU.

Either checkpoint can be re-evaluated on other data:
    python -m jobs.evaluate --checkpoint DIR/runs/harmoclip --data OTHER_COCO_FOLDER
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from typing import Any

from mlflow.tracking import MlflowClient

from harmoclip import MethodConfig, ModelConfig
from harmoclip.cli import add_config_arguments, config_from_args
from harmoclip.config import PrepareConfig, TrainConfig
from jobs import evaluate as evaluate_job
from jobs import train as train_job
from jobs.common import init_ray
from pipeline.prepare import prepare
from pipeline.sources import find_source
from pipeline.synthetic import write_shapes_dataset

DEMO_TRAIN = TrainConfig(steps=500, batch_size=32, lr=1e-3, warmup_steps=50, checkpoint_every=250, log_every=10)
HEADLINE = (("retrieval", "i2t", "r1"), ("retrieval", "i2t", "r5"), ("retrieval", "t2i", "r1"), ("retrieval", "t2i", "r5"),
            ("box", "top1"), ("box", "top5"), ("box", "macc1"), ("box", "crop", "top1"), ("harmony",))


def _get(results: dict, path: tuple[str, ...]) -> float:
    for key in path:
        results = results[key]
    return results


def side_by_side(results: dict[str, dict]) -> str:
    lines = ["| metric | GC-only baseline | HarmoCLIP | change |", "|---|---|---|---|"]
    for path in HEADLINE:
        base, harmo = _get(results["baseline"], path), _get(results["harmoclip"], path)
        lines.append(f"| {'.'.join(path)} | {100 * base:.1f} | {100 * harmo:.1f} | {100 * (harmo - base):+.1f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], histories: dict[str, dict[str, list]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, history in histories.items():
        for metric, style in (("loss", "-"), ("gc", "--")):
            if metric in history:
                steps, values = zip(*history[metric])
                curves.plot(steps, values, style, label=f"{name} {metric}")
    curves.set(xlabel="step", ylabel="training loss", title="Training losses")
    curves.legend()
    labels = [".".join(p) for p in HEADLINE]
    xs = range(len(labels))
    for offset, name in ((-0.2, "baseline"), (0.2, "harmoclip")):
        bars.bar([x + offset for x in xs], [100 * _get(results[name], p) for p in HEADLINE], width=0.4, label=name)
    bars.set_xticks(list(xs), labels, rotation=45, ha="right")
    bars.set(ylabel="%", title="Validation (synthetic shapes)")
    bars.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _history(tracking_uri: str, run_name: str) -> dict[str, list]:
    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name(DEMO_TRAIN.experiment).experiment_id],
                             filter_string=f"tags.`mlflow.runName` = '{run_name}'", max_results=1)[0]
    return {metric: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, metric),
                                                       key=lambda m: m.step)]
            for metric in ("loss", "gc", "lrc", "gr")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="folder for data, runs, results.json and the plot")
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--regions", default="felzenszwalb", choices=["felzenszwalb", "grid", "gt"],
                        help="training region proposals (felzenszwalb and grid need no annotation)")
    parser.add_argument("--model", default="harmo-tiny")
    add_config_arguments(parser, MethodConfig)
    add_config_arguments(parser, TrainConfig)
    parser.set_defaults(**{k: getattr(DEMO_TRAIN, k) for k in ("steps", "batch_size", "lr", "warmup_steps",
                                                               "checkpoint_every", "log_every")})
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    if os.path.exists(os.path.join(out, "results.json")):
        raise SystemExit(f"error: {out} already holds a finished demo; pick another --out")
    started = time.monotonic()
    init_ray()
    method, train = config_from_args(args, MethodConfig), config_from_args(args, TrainConfig)
    train = replace(train, mlflow_uri=train.mlflow_uri or f"sqlite:///{out}/mlflow.db")

    print(f"[1/4] synthetic shapes data -> {out}/data", flush=True)
    for split, images, seed in (("train", args.train_images, 0), ("val", args.val_images, 1)):
        if not os.path.exists(f"{out}/data/{split}/captions.json"):
            write_shapes_dataset(f"{out}/data/{split}", images=images, seed=seed)
    print(f"[2/4] prepare (Ray Data, regions={args.regions})", flush=True)
    if not os.path.exists(f"{out}/data/train-prepared/dataset.json"):
        prepare(find_source(f"{out}/data/train"), f"{out}/data/train-prepared",
                PrepareConfig(regions=args.regions, tokenizer=args.model), overwrite=True)

    results, histories = {}, {}
    model = ModelConfig(name=args.model)
    for name, run_method in (("baseline", replace(method, lambda_lrc=0.0, lambda_gr=0.0)), ("harmoclip", method)):
        print(f"[3/4] train {name} ({train.steps} steps, lambda_lrc={run_method.lambda_lrc}, "
              f"lambda_gr={run_method.lambda_gr})", flush=True)
        run_dir = f"{out}/runs/{name}"
        train_job.run(f"{out}/data/train-prepared", run_dir, model, run_method, train)
        print(f"[4/4] evaluate {name}", flush=True)
        results[name] = {**evaluate_job.evaluate(run_dir, f"{out}/data/val"), "checkpoint": run_dir}
        histories[name] = _history(train.mlflow_uri, name)

    table = side_by_side(results)
    plot(results, histories, f"{out}/demo.png")
    with open(f"{out}/results.json", "w") as handle:
        json.dump(results, handle, indent=2)
    print("\n" + evaluate_job.format_table(results["harmoclip"]).splitlines()[0])
    print(table)
    print(f"\nresults: {out}/results.json, plot: {out}/demo.png, MLflow: {train.mlflow_uri}")
    print(f"demo took {time.monotonic() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()

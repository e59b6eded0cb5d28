"""The embedded default, end to end on a local Ray, in the paper's regime: synthetic shapes data ->
prepare -> a base model pretrained GC-only on a separate corpus -> GC-only and HarmoCLIP
fine-tuned from it with the same budget (and the region-only ablation with --region-only) ->
evaluate all on val -> side-by-side table, plot and DIR/results.json. A few minutes on a 2-core CPU.
Data, the base model and finished arms are cached in DIR: an interrupted demo continues there.

Either checkpoint can be re-evaluated on other data:
    python -m jobs.evaluate --checkpoint DIR/runs/harmoclip/seed0 --data OTHER_COCO_FOLDER
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from typing import Any

from mlflow.tracking import MlflowClient

from harmoclip import MethodConfig
from harmoclip.cli import HelpFormatter, add_bool_argument, add_method_arguments, config_from_args, method_from_args
from harmoclip.config import TrainConfig
from harmoclip.predict import Predictor
from jobs import evaluate as evaluate_job
from jobs.common import add_verbose_argument, init_ray, set_verbose, user_errors
from jobs.drawing import image_figure, png_bytes, show_boxes
from jobs.predict import read_image
from jobs.regime import (GC_ONLY, RegimeMismatch, add_regime_arguments, check_real_folder, evaluate_base,
                         finetune_and_evaluate, mean_r1, prepare_data, regime_from_args, run_dir, train_base)
from pipeline.regions import BoxCounts, normalise_xywh
from pipeline.sources import categories, find_source, read_image_rows

HEADLINE = (("retrieval", "i2t", "r1"), ("retrieval", "i2t", "r5"), ("retrieval", "t2i", "r1"), ("retrieval", "t2i", "r5"),
            ("box", "top1"), ("box", "top5"), ("box", "macc1"), ("box", "crop", "top1"), ("harmony",))
ARM_LABELS = {"base": "base (no fine-tuning)", "baseline": "GC-only fine-tuned", "harmoclip": "HarmoCLIP fine-tuned",
              "region_only": "region-only fine-tuned"}
EXAMPLE_IMAGES = 4
RIGHT, WRONG = "#1a9850", "#d73027"


def _get(results: dict, path: tuple[str, ...]) -> float:
    for key in path:
        results = results[key]
    return results


def side_by_side(results: dict[str, dict]) -> str:
    arms = [arm for arm in ARM_LABELS if arm in results]
    lines = ["| metric | " + " | ".join(ARM_LABELS[a] for a in arms) + " | HarmoCLIP - GC-only |",
             "|---" * (len(arms) + 2) + "|"]
    for path in HEADLINE:
        values = [100 * _get(results[a], path) for a in arms]
        change = 100 * (_get(results["harmoclip"], path) - _get(results["baseline"], path))
        lines.append(f"| {'.'.join(path)} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {change:+.1f} |")
    lines.append("| mean R@1 | " + " | ".join(f"{100 * mean_r1(results[a]):.1f}" for a in arms)
                 + f" | {100 * (mean_r1(results['harmoclip']) - mean_r1(results['baseline'])):+.1f} |")
    return "\n".join(lines)


def plot(results: dict[str, dict], histories: dict[str, dict[str, list]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name, history in histories.items():
        for metric, style in (("loss", "-"), ("gc", "--")):
            if history.get(metric):
                steps, values = zip(*history[metric])
                curves.plot(steps, values, style, label=f"{ARM_LABELS[name]}: {metric}")
    curves.set(xlabel="fine-tuning step", ylabel="training loss", title="Fine-tuning from the base model")
    curves.legend(fontsize=8)
    arms = [arm for arm in ARM_LABELS if arm in results]
    labels = [".".join(p) for p in HEADLINE]
    width = 0.8 / len(arms)
    for number, arm in enumerate(arms):
        bars.bar([x + (number - (len(arms) - 1) / 2) * width for x in range(len(labels))],
                 [100 * _get(results[arm], p) for p in HEADLINE], width=width, label=ARM_LABELS[arm])
    bars.set_xticks(list(range(len(labels))), labels, rotation=45, ha="right")
    bars.set(ylabel="%", title="Validation (synthetic shapes)")
    bars.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def examples(val: str, results: dict[str, dict], path: str) -> None:
    """The ground-truth boxes of the first EXAMPLE_IMAGES val images (with boxes), labelled by the
    GC-only and the HarmoCLIP model side by side, each box by its best of all val categories as
    jobs.evaluate scores it: what box top-1 means, on pictures. Not chosen to flatter either model."""
    source = find_source(val)
    names = {category["id"]: category["name"] for category in categories(source.instances)}
    labels = list(names.values())
    samples = []
    for row in [row for row in read_image_rows(source).to_pylist() if row["gt_boxes"]][:EXAMPLE_IMAGES]:
        image = read_image(row["image_uri"])
        kept = normalise_xywh(row["gt_boxes"], image.width, image.height, 0.0, BoxCounts())
        samples.append((image, [box[:4] for box in kept], [names[box[4]["category_id"]] for box in kept]))
    figure, axes = image_figure(samples[0][0], rows=len(samples), columns=2, panel_inches=3.5)
    for column, arm in enumerate(("baseline", "harmoclip")):
        predictor = Predictor.from_checkpoint(results[arm]["checkpoint"])
        axes[0, column].set_title(f"{ARM_LABELS[arm]}\n(val box top-1 {100 * results[arm]['box']['top1']:.1f}%)",
                                  fontsize=10)
        for axis, (image, boxes, truths) in zip(axes[:, column], samples):
            best = [box.top[0].label for box in predictor.classify(image, boxes, labels, top_k=1)]
            show_boxes(axis, image, boxes, [label if label == truth else f"{label} (is {truth})"
                                            for label, truth in zip(best, truths)],
                       [RIGHT if label == truth else WRONG for label, truth in zip(best, truths)])
    figure.suptitle(f"Ground-truth boxes labelled with each model's best of the {len(labels)} val categories\n"
                    "green = right, red = wrong (the true category after 'is')", fontsize=10)
    with open(path, "wb") as handle:
        handle.write(png_bytes(figure))


def _history(tracking_uri: str, run_dir: str) -> dict[str, list]:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(TrainConfig.experiment)
    run = client.search_runs([experiment.experiment_id], filter_string=f"tags.`harmoclip.run` = '{run_dir}'",
                             max_results=1)[0]
    return {metric: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, metric),
                                                       key=lambda m: m.step)]
            for metric in ("loss", "gc", "lrc", "gr")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", default="outputs/demo",
                        help="Where to write: the folder for data, base, runs, results.json and the plot")
    add_regime_arguments(parser)
    add_bool_argument(parser, "--region-only", help="also fine-tune the region-only ablation")
    add_method_arguments(parser)
    add_verbose_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    set_verbose(args.verbose)
    out = os.path.abspath(args.out)
    if os.path.exists(os.path.join(out, "results.json")):  # finished before: show it, train nothing
        with open(os.path.join(out, "results.json")) as handle:
            results = json.load(handle)
        print(f"{out} holds a finished demo; its results (use another --out to run it again):\n\n"
              f"{side_by_side(results)}\n\nresults: {out}/results.json, plot: {out}/demo.png, labelled "
              f"examples: {out}/examples.png")
        return results
    started = time.monotonic()
    with user_errors(ValueError):  # a bad flag value, model name or --real folder, found before Ray starts
        method, finetune = method_from_args(args), config_from_args(args, TrainConfig)
        regime = regime_from_args(args, finetune)
        if regime.real:
            check_real_folder(regime.real)
    tracking_uri = finetune.mlflow_uri or f"sqlite:///{out}/mlflow.db"
    init_ray()
    with user_errors(RegimeMismatch):  # --out holds data, a base or runs made with other settings
        return _run(out, regime, method, finetune, tracking_uri, args.region_only, started)


def _run(out: str, regime, method: MethodConfig, finetune: TrainConfig, tracking_uri: str, region_only: bool,
         started: float) -> dict[str, Any]:
    kind = f"real photos of {regime.real}" if regime.real else "synthetic shapes data"
    print(f"[1/4] {kind} and Ray Data preparation -> {out}/data", flush=True)
    data = prepare_data(out, regime)
    print(f"[2/4] base model: GC-only pretraining on the separate base corpus -> {out}/base", flush=True)
    base = train_base(out, data, regime, tracking_uri)
    results: dict[str, Any] = {"base": evaluate_base(base, data)}
    arms = {"baseline": ("gc_only", GC_ONLY), "harmoclip": ("harmoclip", method)}
    if region_only:
        arms["region_only"] = ("region_only", replace(method, lambda_gc=0.0, lambda_gr=0.0))
    histories = {}
    for number, (name, (config, arm_method)) in enumerate(arms.items(), 1):
        print(f"[3/4] fine-tune {ARM_LABELS[name]} from the base ({finetune.steps} steps, lambda_gc="
              f"{arm_method.lambda_gc}, lambda_lrc={arm_method.lambda_lrc}, lambda_gr={arm_method.lambda_gr}), "
              f"then evaluate ({number}/{len(arms)})", flush=True)
        run = run_dir(out, config, finetune.seed)
        results[name] = finetune_and_evaluate(run, base, data, arm_method, finetune.seed, regime, tracking_uri)
        histories[name] = _history(tracking_uri, run)

    print("[4/4] table, plot and labelled examples", flush=True)
    table = side_by_side(results)
    plot(results, histories, f"{out}/demo.png")
    examples(data["val"], results, f"{out}/examples.png")
    with open(f"{out}/results.json", "w") as handle:
        json.dump(results, handle, indent=2)
    print("\n" + evaluate_job.format_table(results["harmoclip"]).splitlines()[0])
    print(table)
    print(f"\nresults: {out}/results.json, plot: {out}/demo.png, labelled examples: {out}/examples.png, "
          f"MLflow: {tracking_uri}")
    print(f"demo took {time.monotonic() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()

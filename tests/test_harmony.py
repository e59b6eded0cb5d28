"""The fine-tune regime end to end (small): jobs.demo, then bench.harmony extending it into a
study over two seeds in the same folder, reusing the demo's data, base model and seed-0 arms."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bench import harmony
from harmoclip import MethodConfig
from jobs import demo as demo_job
from jobs import evaluate as evaluate_job
from jobs.regime import Regime

SMALL = ["--base-images", "24", "--base-steps", "4", "--train-images", "24", "--val-images", "12", "--steps", "4",
         "--batch-size", "8", "--checkpoint-every", "4", "--log-every", "2", "--warmup-steps", "2", "--regions", "grid"]


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, demo_job.main(["--out", str(out), *SMALL, "--region-only"])


def test_demo_fine_tunes_every_arm_from_one_base(demo):
    out, results = demo
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == {"base", "baseline", "harmoclip", "region_only"}
    assert saved["base"]["checkpoint"] == str(out / "base")
    for name, config in (("baseline", "gc_only"), ("harmoclip", "harmoclip"), ("region_only", "region_only")):
        assert saved[name]["checkpoint"] == str(out / "runs" / config / "seed0")
        trained = json.loads((out / "runs" / config / "seed0" / "harmoclip.json").read_text())
        assert trained["model"]["init_from"] == str(out / "base")  # every arm fine-tunes the base
        assert trained["method"]["lambda_gc"] == (0.0 if name == "region_only" else 1.0)
    stamp = json.loads((out / "runs" / "harmoclip" / "seed0" / "arm.json").read_text())
    assert stamp["finetune"]["lr"] == Regime.finetune.lr  # flags not given keep the regime's values
    again = evaluate_job.evaluate(saved["harmoclip"]["checkpoint"], str(out / "data" / "val"))
    assert again["box"]["top1"] == saved["harmoclip"]["box"]["top1"]  # the demo's numbers are the checkpoint's
    assert (out / "demo.png").stat().st_size > 10_000
    assert results["baseline"]["protocol"]["model"] == "harmo-tiny"


def test_harmony_study_extends_the_demo_and_reports_paired_differences(demo, capsys):
    out, demo_results = demo
    base_weights = out / "base" / "open_clip_weights.pt"
    arm_weights = out / "runs" / "harmoclip" / "seed0" / "open_clip_weights.pt"
    stamps = base_weights.stat().st_mtime, arm_weights.stat().st_mtime
    study = harmony.main(["--out", str(out), *SMALL, "--seeds", "0", "1", "--only", "gc_only", "harmoclip"])
    assert (base_weights.stat().st_mtime, arm_weights.stat().st_mtime) == stamps  # reused, not retrained

    saved = json.loads((out / "harmony.json").read_text())
    assert saved["baseline"] == "gc_only" and set(saved["configs"]) == {"gc_only", "harmoclip"}
    runs = saved["configs"]["harmoclip"]["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert runs[0]["checkpoint"] == str(out / "runs" / "harmoclip" / "seed0")
    assert runs[0]["val"]["box"]["top1"] == demo_results["harmoclip"]["box"]["top1"]
    assert saved["configs"]["harmoclip"]["method"] == dataclasses.asdict(MethodConfig())
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("| harmoclip |"))
    gc = [r["val"] for r in saved["configs"]["gc_only"]["runs"]]
    expected = sum(100 * (r["val"]["box"]["top1"] - g["box"]["top1"]) for r, g in zip(runs, gc)) / 2
    assert f"{expected:+.1f} ±" in row  # the paired box difference, with its interval
    assert study["configs"]["harmoclip"]["runs"][1]["seed"] == 1


def test_a_folder_made_with_other_settings_is_refused(demo):
    out, _ = demo
    other = [*SMALL]
    other[other.index("--train-images") + 1] = "30"
    with pytest.raises(SystemExit, match="other settings .*train_images"):
        harmony.main(["--out", str(out), *other, "--seeds", "0"])


@pytest.mark.parametrize("text,message", [("x:lambda_lrc=0.5,gr_mode=distribution", None),
                                          ("x:no_such_field=1", "not a MethodConfig field"),
                                          ("x:gr_mode=sideways", "not one of")])
def test_config_overrides_are_parsed_by_field_type(text, message):
    if message is None:
        name, method = harmony.parse_config(text)
        assert name == "x" and method.lambda_lrc == 0.5 and method.gr_mode == "distribution"
    else:
        with pytest.raises((SystemExit, ValueError), match=message):
            harmony.parse_config(text)


def _results(r1: float, box: float) -> dict:
    return {"retrieval": {"i2t": {"r1": r1}, "t2i": {"r1": r1}}, "box": {"top1": box}}


def test_summary_reports_each_split_with_paired_differences():
    study = {"baseline": "gc_only", "base_results": {"holdout": _results(0.4, 0.1)}, "configs": {
        "gc_only": {"runs": [{"seed": s, "val": _results(0.5, 0.1), "holdout": _results(0.5, 0.1 + s / 100)}
                             for s in (0, 1)]},
        "x": {"runs": [{"seed": s, "val": _results(0.5, 0.2), "holdout": _results(0.4, 0.3 + s / 100)}
                       for s in (0, 1)]}}}
    table = harmony.summary_table(study, "holdout")
    assert "| base (no fine-tuning) | - | 40.0 | 10.0 | | |" in table
    assert "| x | 2 | 40.0 ± 0.0 | 30.5 ± 0.7 | -10.0 ± 0.0 | +20.0 ± 0.0 |" in table


def test_paired_interval_is_the_t_interval_of_the_differences():
    mean, half = harmony.paired([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])  # differences 2, 3, 4: sd 1
    assert mean == 3.0 and half == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2) = 4.3027

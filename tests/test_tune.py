"""An ASHA sweep on tiny data: a report per rung, MLflow parent and child, summary, Pareto plot; what
a sweep varies (ranges around the presets' weights, a lambda flag fixing its weight), --epochs as
rungs of steps, and a sweep whose trial fails exiting 1."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from harmoclip.cli import method_from_args
from harmoclip.presets import DEFAULT_METHOD, METHOD_PRESETS, method_preset
from jobs import tune as tune_job
from pipeline.synthetic import write_shapes_dataset


def test_pareto_front():
    points = [(0.5, 0.1), (0.4, 0.3), (0.3, 0.2), (0.5, 0.1)]
    assert tune_job.pareto_front(points) == [True, True, False, True]


def test_rungs_share_one_schedule():
    assert tune_job.rung_steps(200, "asha") == [50, 100, 200]
    assert tune_job.rung_steps(2, "asha") == [1, 2]
    assert tune_job.rung_steps(200, "none") == [200]


def _args(*flags: str):
    return tune_job.build_parser().parse_args(["--data", "d", "--val-data", "v", "--out", "o", *flags])


def _space(*flags: str) -> dict:
    args = _args(*flags)
    return tune_job.param_space(args, method_from_args(args))


@pytest.mark.parametrize("preset", sorted(METHOD_PRESETS))
def test_random_search_ranges_hold_the_presets_weights(preset):
    space = _space("--search", "random", "--method", preset)
    default = method_preset(DEFAULT_METHOD)
    for name in ("lambda_lrc", "lambda_gr"):
        weight = getattr(METHOD_PRESETS[preset], name) or getattr(default, name)  # a 0 weight: around the default
        assert space[name].lower < weight < space[name].upper, (name, space[name].lower, space[name].upper)
    # the shipped default itself: lambda_gr 10, once outside the old uniform [0, 2]
    shipped = _space("--search", "random")
    assert shipped["lambda_gr"].lower < default.lambda_gr == 10 < shipped["lambda_gr"].upper


def test_a_lambda_flag_fixes_its_weight_and_a_conflict_is_refused(tmp_path, capsys):
    args = _args("--lambda-gr", "5")
    assert set(tune_job.param_space(args, method_from_args(args))) == {"lambda_lrc"}  # only LRC is swept
    assert method_from_args(args).lambda_gr == 5.0  # ... and every trial trains with lambda_gr 5
    row, _ = tune_job.trial_rows([SimpleNamespace(error=None, path="t/trial_a", config={"lambda_lrc": 1.0},
                                                  metrics={"step": 2, "retrieval_r1": 0.1, "box_top1": 0.2,
                                                           "harmony": 0.3})], "harmony", method_from_args(args), 1e-3)
    assert (row[0]["lambda_lrc"], row[0]["lambda_gr"], row[0]["lr"]) == (1.0, 5.0, 1e-3)
    for flags, message in ((["--lambda-gr", "5", "--grid-gr", "0", "10"], "--lambda-gr fixes lambda_gr in every "
                                                                           "trial and --grid-gr sweeps it"),
                           (["--lambda-gr", "5", "--lambda-lrc", "1"], "nothing to sweep"),
                           (["--lambda-gc", "0", "--grid-lrc", "0", "1", "--grid-gr", "0"], "every loss weight is 0")):
        with pytest.raises(SystemExit) as refused:
            tune_job.main(["--data", str(tmp_path), "--val-data", str(tmp_path), "--out", str(tmp_path / "s"), *flags])
        assert refused.value.code == 2 and message in capsys.readouterr().err


def test_epochs_set_the_length_asha_cuts(prepared):
    """--epochs is counted in steps before the sweep: each rung trains part of it, and ASHA's max_t
    is the number of rungs (one report each), not epochs that the first rung would all train."""
    args = tune_job.build_parser().parse_args(["--data", prepared, "--val-data", "v", "--out", "o", "--epochs", "2",
                                               "--batch-size", "4"])
    train = tune_job.trial_train_config(args)
    assert (train.epochs, train.steps) == (None, 8)  # 16 images / 4 per step = 4 steps an epoch
    rungs = tune_job.rung_steps(train.steps, "asha")
    assert rungs == [2, 4, 8]
    scheduler = tune_job.make_scheduler("asha", train.steps)
    assert (scheduler._time_attr, scheduler._max_t) == ("training_iteration", len(rungs))  # one report per rung
    # ASHA decides after the first and second report (2 and 4 steps); no trial trains past 8.
    assert sorted(milestone for milestone, _ in scheduler._brackets[0]._rungs) == [1, 2]


def test_finished_and_failed_trials_are_told_apart():
    ok = SimpleNamespace(error=None, path="s/trial_ok", config={"lambda_lrc": 1.0, "lambda_gr": 0.0},
                         metrics={"step": 2, "retrieval_r1": 0.1, "box_top1": 0.2, "harmony": 0.3})
    crashed = SimpleNamespace(error=RuntimeError("boom"), path="s/trial_bad", config={}, metrics={})
    rows, failed = tune_job.trial_rows([ok, crashed], "harmony", method_preset(DEFAULT_METHOD), 1e-3)
    assert [r["trial"] for r in rows] == ["trial_ok"] and failed == ["trial trial_bad failed: boom"]


@pytest.fixture(scope="module")
def data(prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    write_shapes_dataset(str(root / "val"), images=8, seed=1, size=48, captions_per_image=2)
    return root


def test_an_asha_sweep_reports_every_rung_and_tracks_its_trial(prepared, data):
    # One trial here; two trials (one MLflow child each, their weights as params), a sweep stopped
    # and resumed, and results on s3:// are tested on the 2-node cluster, tests/test_cluster.py.
    sweep = data / "sweep"
    argv = ["--data", prepared, "--val-data", str(data / "val"), "--out", str(sweep),
            "--grid-lrc", "1", "--grid-gr", "0.5", "--model", "harmo-micro", "--steps", "2",
            "--batch-size", "4", "--checkpoint-every", "1", "--log-every", "1", "--scheduler", "asha"]
    rows = tune_job.main(argv)
    assert [(r["lambda_lrc"], r["lambda_gr"]) for r in rows] == [(1.0, 0.5)]

    client = MlflowClient(f"sqlite:///{sweep}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("harmoclip").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 1
    [child] = children
    assert (child.data.params["method.lambda_lrc"], child.data.params["method.lambda_gr"]) == ("1.0", "0.5")
    assert {"val_harmony", "val_box_top1", "val_retrieval_r1", "loss", "gc"} <= set(child.data.metrics)
    assert len(client.get_metric_history(child.info.run_id, "val_harmony")) == 2  # one per ASHA rung
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert artifacts == {"summary.csv", "summary.md", "pareto.png"}

    with open(sweep / "summary.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 1 and {"retrieval_r1", "box_top1", "harmony", "pareto"} <= set(table[0])
    with Image.open(sweep / "pareto.png") as image:
        assert image.size[0] > 300


def test_a_sweep_whose_trial_fails_exits_1_saying_how_many(prepared, data, capsys):
    argv = ["--data", prepared, "--val-data", str(data / "val"), "--out", str(data / "failing"), "--grid-lrc", "1",
            "--grid-gr", "0", "--model", "harmo-micro", "--steps", "1", "--batch-size", "4", "--scheduler", "none",
            "--inject-nan-at-step", "1", "--max-failures", "0"]
    with pytest.raises(SystemExit) as failed:
        tune_job.main(argv)
    assert failed.value.code == 1  # a failed run, not a user error (2)
    assert "error: 1 of 1 trials failed" in capsys.readouterr().err

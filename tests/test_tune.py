"""A 2-trial ASHA sweep on tiny data: MLflow parent and children, summary, Pareto plot, resume."""

from __future__ import annotations

import csv

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from jobs import tune as tune_job
from pipeline.synthetic import write_shapes_dataset


def test_pareto_front():
    points = [(0.5, 0.1), (0.4, 0.3), (0.3, 0.2), (0.5, 0.1)]
    assert tune_job.pareto_front(points) == [True, True, False, True]


def test_rungs_share_one_schedule():
    assert tune_job.rung_steps(200, "asha") == [50, 100, 200]
    assert tune_job.rung_steps(2, "asha") == [1, 2]
    assert tune_job.rung_steps(200, "none") == [200]


@pytest.fixture(scope="module")
def data(prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    write_shapes_dataset(str(root / "val"), images=8, seed=1, size=48, captions_per_image=2)
    return root


def test_two_trial_sweep_tracks_everything_and_resumes(prepared, data, capsys):
    sweep = data / "sweep"
    argv = ["--data", prepared, "--val", str(data / "val"), "--out", str(sweep),
            "--grid-lrc", "0", "1", "--grid-gr", "0.5", "--model", "harmo-micro", "--steps", "2",
            "--batch-size", "4", "--checkpoint-every", "1", "--log-every", "1", "--scheduler", "asha"]
    rows = tune_job.main(argv)
    assert sorted((r["lambda_lrc"], r["lambda_gr"]) for r in rows) == [(0.0, 0.5), (1.0, 0.5)]

    client = MlflowClient(f"sqlite:///{sweep}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("harmoclip").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    assert sorted(c.data.params["method.lambda_lrc"] for c in children) == ["0.0", "1.0"]
    assert all(c.data.params["method.lambda_gr"] == "0.5" for c in children)
    for child in children:
        assert {"val_harmony", "val_box_top1", "val_retrieval_r1", "loss", "gc"} <= set(child.data.metrics)
        assert len(client.get_metric_history(child.info.run_id, "val_harmony")) == 2  # one per ASHA rung
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert artifacts == {"summary.csv", "summary.md", "pareto.png"}

    with open(sweep / "summary.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2 and {"retrieval_r1", "box_top1", "harmony", "pareto"} <= set(table[0])
    with Image.open(sweep / "pareto.png") as image:
        assert image.size[0] > 300
    trial_runs = sorted(p.name for p in (sweep / "trials").iterdir())

    capsys.readouterr()
    again = tune_job.main(argv)
    assert "resuming the sweep" in capsys.readouterr().out
    assert sorted(r["harmony"] for r in again) == sorted(r["harmony"] for r in rows)
    assert sorted(p.name for p in (sweep / "trials").iterdir()) == trial_runs
    assert len(client.search_runs([client.get_experiment_by_name("harmoclip").experiment_id])) == 3
    for child in children:
        assert len(client.get_metric_history(child.info.run_id, "val_harmony")) == 2  # nothing re-trained

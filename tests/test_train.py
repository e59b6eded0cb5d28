"""Ray Train runs of a tiny model on a tiny prepared set: 2 gloo workers, resume, NaN, MLflow."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from ray.train import TrainingFailedError

import open_clip
from harmoclip import MethodConfig, ModelConfig, register_tiny_configs
from harmoclip.config import TrainConfig
from jobs import train as train_job

MODEL = ModelConfig(name="harmo-micro")


def _train(prepared: str, out, **overrides) -> dict:
    settings = dict(steps=12, batch_size=4, workers=2, lr=2e-3, warmup_steps=2, checkpoint_every=4, log_every=1,
                    mlflow_uri=f"sqlite:///{out.parent}/mlflow.db")
    return train_job.run(prepared, str(out), MODEL, MethodConfig(), TrainConfig(**{**settings, **overrides}))


def _history(tracking_uri: str, metric: str) -> list[float]:
    client = MlflowClient(tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("harmoclip").experiment_id])[0]
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)]


def test_two_gloo_workers_train_checkpoint_and_log(prepared, tmp_path):
    out = tmp_path / "run"
    result = _train(prepared, out)
    assert result["step"] == 12
    assert sorted(p.name for p in out.glob("checkpoint_*") if p.is_dir()) == ["checkpoint_000008", "checkpoint_000012"]
    losses = _history(result["tracking_uri"], "loss")
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the loss goes down
    client = MlflowClient(result["tracking_uri"])
    run = client.search_runs([client.get_experiment_by_name("harmoclip").experiment_id])[0]
    assert run.data.params["method.lambda_lrc"] == "1.0" and run.data.params["train.workers"] == "2"
    assert run.data.params["method.region_pooling"] == "max" and run.info.status == "FINISHED"
    assert {"gc", "lrc", "gr", "lr", "samples_per_s"} <= set(run.data.metrics)
    register_tiny_configs()
    clip = open_clip.create_model("harmo-micro", pretrained=result["checkpoint"])
    assert torch.isfinite(clip.logit_scale)


def test_killed_worker_resumes_from_last_checkpoint(prepared, tmp_path):
    out = tmp_path / "crashy"
    result = _train(prepared, out, inject_crash_at_step=6, inject_crash_rank=1, max_failures=1)
    assert result["step"] == 12 and (out / "checkpoint_000012").exists()
    client = MlflowClient(result["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("harmoclip").experiment_id])
    assert len(runs) == 1  # the restart logged into the same run
    logged = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))
    assert logged[-1] == 12 and logged.count(5) == 2  # steps 5-6 ran twice: before the crash and after resuming at 4

    again = _train(prepared, out)  # the same command again: nothing left to do, same final checkpoint
    assert again["step"] == 12


def test_nan_loss_fails_naming_the_step_and_keeps_the_checkpoint(prepared, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(TrainingFailedError, match="loss is nan at step 7"):
        _train(prepared, out, inject_nan_at_step=7, max_failures=0)
    assert (out / "checkpoint_000004" / "open_clip_weights.pt").exists()
    register_tiny_configs()
    open_clip.create_model("harmo-micro", pretrained=str(out / "checkpoint_000004" / "open_clip_weights.pt"))

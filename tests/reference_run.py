"""The reference training run the resume tests compare against: 2 gloo workers, 12 steps, a
checkpoint every 4, metrics every step (tests/conftest.py runs it once per session)."""

from __future__ import annotations

from harmoclip import MethodConfig, ModelConfig
from harmoclip.config import TrainConfig
from jobs import train as train_job

MODEL = ModelConfig(name="harmo-micro")
SETTINGS = dict(steps=12, batch_size=4, workers=2, lr=2e-3, warmup_steps=2, checkpoint_every=4, log_every=1)


def train(prepared: str, out, **overrides) -> dict:
    """The reference run's settings with `overrides`, into `out` (local path or s3:// URI); MLflow in
    a sqlite file beside a local `out` unless `mlflow_uri` is given."""
    settings = {**SETTINGS, **overrides}
    if "mlflow_uri" not in settings:
        settings["mlflow_uri"] = f"sqlite:///{out.parent}/mlflow.db"
    return train_job.run(prepared, str(out), MODEL, MethodConfig(), TrainConfig(**settings))

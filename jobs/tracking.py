"""MLflow tracking of one training run, resumable: a re-run or restarted worker finds its run again.

The run is keyed by the run's storage URI (tag `harmoclip.run`), so a restart after a failure
keeps logging into the same MLflow run instead of starting a duplicate.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from harmoclip.storage import is_remote

RUN_TAG = "harmoclip.run"
MAX_PARAM_LENGTH = 500


def default_tracking_uri(out: str) -> str:
    """sqlite beside a local run; for an s3:// run a local ./mlflow.db (use a server on clusters)."""
    base = os.path.abspath("." if is_remote(out) else os.path.dirname(os.path.abspath(out)))
    return f"sqlite:///{base}/mlflow.db"


def artifact_root(tracking_uri: str, storage: Optional[str] = None) -> Optional[str]:
    """Where a new experiment keeps its artifacts: under `storage` when that is an object store (a
    sweep on s3:// keeps its MLflow artifacts beside its results), else beside a sqlite store
    (MLflow's default is ./mlruns in the cwd), else wherever the tracking server says."""
    if storage and is_remote(storage):
        return storage.rstrip("/") + "/mlartifacts"
    if tracking_uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(tracking_uri[len("sqlite:///"):]), "mlartifacts")
    return None


class RunTracker:
    def __init__(self, tracking_uri: str, experiment: str, run_key: str, run_name: str,
                 params: dict[str, Any], parent_run_id: Optional[str] = None,
                 artifact_storage: Optional[str] = None) -> None:
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        experiment_obj = self.client.get_experiment_by_name(experiment)
        experiment_id = (experiment_obj.experiment_id if experiment_obj
                         else self.client.create_experiment(experiment,
                                                           artifact_location=artifact_root(tracking_uri, artifact_storage)))
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_key}'",
                                        max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {RUN_TAG: run_key, "mlflow.runName": run_name}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            self.run_id = self.client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id
            for key, value in params.items():
                self.client.log_param(self.run_id, key, str(value)[:MAX_PARAM_LENGTH])

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, path: str) -> None:
        self.client.log_artifact(self.run_id, path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

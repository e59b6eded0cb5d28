"""A real 2-node Ray cluster on this machine with token auth and an S3 server, driven through the
Jobs API as docs/cluster.md does: prepare -> train (one worker per node, storage on
s3://) -> evaluate; a sweep on s3:// that is stopped mid-way and resumed by submitting it again;
and what the jobs print (their own progress, Ray's internals only with --verbose)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import psutil
import pytest
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient

from jobs.common import free_port
from pipeline.synthetic import write_shapes_dataset

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def _kill_cluster(temp_dir: str) -> None:
    """Every process of this cluster (its temp dir is in their command lines), by PID."""
    victims = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp_dir in part for part in process.info["cmdline"] or []):
                victims.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for process in victims:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(victims, timeout=10)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Head + one worker node, 2 CPUs each, token authentication on; torn down by PID."""
    temp_dir = f"/tmp/rh-{uuid.uuid4().hex[:6]}"
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    common = ["--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        # Each node's job agent gets its own free port: the default (52365) may be held by another
        # Ray on this machine, and then the head accepts no jobs ("No available agent").
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--dashboard-port", str(dashboard),
                        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir,
                        "--dashboard-agent-listen-port", str(free_port()), *common],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", "--dashboard-agent-listen-port",
                        str(free_port()), *common], env=env, check=True, capture_output=True, timeout=120)
        yield {"address": f"http://127.0.0.1:{dashboard}", "token": token, "secret": os.environ["AWS_SECRET_ACCESS_KEY"]}
    finally:
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(client: JobSubmissionClient, entrypoint: str) -> str:
    """Submit, waiting (bounded) for the job agent, which comes up a few seconds after `ray start`
    (longer when the machine is loaded)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            # As `ray job submit --working-dir .`: .rayignore keeps .venv, outputs and .git home.
            return client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)})
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _wait(client: JobSubmissionClient, job: str, timeout: float = 400) -> JobStatus:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    client.stop_job(job)
    return _wait(client, job, 60)


def _run_job(client: JobSubmissionClient, entrypoint: str, expect: JobStatus = JobStatus.SUCCEEDED) -> str:
    job = _submit(client, entrypoint)
    status = _wait(client, job)
    logs = client.get_job_logs(job)
    assert status == expect, logs[-4000:]
    return logs


def _keys(bucket: str, prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


@pytest.fixture(scope="module")
def client(cluster) -> JobSubmissionClient:
    with pytest.raises(Exception, match="(?i)auth"):
        JobSubmissionClient(cluster["address"]).list_jobs()  # token authentication is on
    return JobSubmissionClient(cluster["address"], headers={"Authorization": f"Bearer {cluster['token']}"})


@pytest.fixture(scope="module")
def data(s3_server, client) -> dict:
    """Raw training and validation sets on s3://, and the training set prepared by a submitted job."""
    bucket = f"cluster-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    write_shapes_dataset(f"s3://{bucket}/raw/train", images=24, seed=0, size=48, captions_per_image=2)
    write_shapes_dataset(f"s3://{bucket}/raw/val", images=8, seed=1, size=48, captions_per_image=2)
    logs = _run_job(client, f"python -m jobs.prepare --input s3://{bucket}/raw/train "
                            f"--out s3://{bucket}/prepared --regions gt --tokenizer harmo-micro")
    return {"bucket": bucket, "prepare_logs": logs}


def test_two_node_cluster_prepares_trains_and_evaluates_on_s3(cluster, client, data, tmp_path):
    bucket, logs = data["bucket"], [data["prepare_logs"]]
    mlflow_db = tmp_path / "mlflow.db"
    assert [k for k in _keys(bucket, "prepared/") if k.endswith(".parquet") and "part-" in k]

    # From random weights: the literal reading, the method for training from scratch (no anchor).
    logs.append(_run_job(client, f"python -m jobs.train --method paper --data s3://{bucket}/prepared "
                                 f"--out s3://{bucket}/runs/r1 "
                                 f"--model harmo-micro --workers 2 --placement SPREAD --steps 4 --batch-size 4 "
                                 f"--checkpoint-every 2 --log-every 1 --mlflow-uri sqlite:///{mlflow_db}"))
    placement = dict(re.findall(r"worker rank (\d+)/2 on node ([0-9a-f]{16,})", logs[-1]))
    assert sorted(placement) == ["0", "1"], logs[-1][-3000:]
    assert len(set(placement.values())) == 2  # one worker per node
    run_keys = _keys(bucket, "runs/r1/")
    assert f"runs/r1/open_clip_weights.pt" in run_keys
    assert any(k.startswith("runs/r1/checkpoint_000004/") and k.endswith("open_clip_weights.pt") for k in run_keys)

    # The jobs print their own progress; Ray's INFO lines (per-step reports, Ray Data progress
    # blocks) only with --verbose.
    assert "step 4/4" in logs[-1] and "Reporting training result" not in logs[-1]
    assert "Starting execution of Dataset" not in logs[0] + logs[1]
    assert len(logs[-1].splitlines()) < 40, logs[-1]

    logs.append(_run_job(client, f"python -m jobs.evaluate --checkpoint s3://{bucket}/runs/r1 "
                                 f"--data s3://{bucket}/raw/val --out s3://{bucket}/results.json --verbose"))
    assert "Starting execution of Dataset" in logs[-1]
    body = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).get_object(
        Bucket=bucket, Key="results.json")["Body"].read()
    results = json.loads(body)
    assert 0 <= results["retrieval"]["i2t"]["r1"] <= 1 and results["protocol"]["images"] == 8

    # Credentials never leak into job logs, MLflow or dataset.json.
    dataset_json = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).get_object(
        Bucket=bucket, Key="prepared/dataset.json")["Body"].read().decode()
    for text in (*logs, dataset_json, mlflow_db.read_bytes().decode("latin-1")):
        assert cluster["secret"] not in text and os.environ["AWS_ACCESS_KEY_ID"] not in text
        assert cluster["token"] not in text


def _trial_progress(bucket: str, sweep: str) -> tuple[int, list[str]]:
    """(trials the sweep's saved state records as finished, trial folders holding a checkpoint but
    no final weights yet), as read back from the bucket."""
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = _keys(bucket, f"{sweep}/")
    states = sorted(k for k in keys if re.search(r"/experiment_state-[^/]+\.json$", k))
    finished = (s3.get_object(Bucket=bucket, Key=states[-1])["Body"].read().decode().count("TERMINATED")
                if states else 0)
    trials = {k[len(f"{sweep}/trials/"):].split("/")[0] for k in keys if k.startswith(f"{sweep}/trials/")}
    # Ray Train resumes from the checkpoints its snapshot lists (written once an upload is complete).
    snapshots = {t: f"{sweep}/trials/{t}/checkpoint_manager_snapshot.json" for t in trials}
    midway = [t for t in trials if f"{sweep}/trials/{t}/open_clip_weights.pt" not in keys and snapshots[t] in keys
              and "checkpoint_0" in s3.get_object(Bucket=bucket, Key=snapshots[t])["Body"].read().decode()]
    return finished, midway


def test_sweep_on_s3_is_stopped_midway_and_resumes_when_submitted_again(client, data, tmp_path):
    bucket = data["bucket"]
    sweep = f"python -m jobs.tune --data s3://{bucket}/prepared --val-data s3://{bucket}/raw/val --model harmo-micro " \
            f"--grid-lrc 0 1 --grid-gr 0 --scheduler none --steps 60 --batch-size 4 --checkpoint-every 10 " \
            f"--log-every 10 --mlflow-uri sqlite:///{tmp_path}/sweep.db"

    # A local --out on two nodes is refused before anything runs, saying what to pass instead.
    logs = _run_job(client, f"{sweep} --out {tmp_path}/local-sweep", expect=JobStatus.FAILED)
    assert "this Ray cluster has 2 nodes" in logs and "s3://" in logs and not (tmp_path / "local-sweep").exists()

    # One trial finished (and recorded so in the sweep's state on S3), the other part-way: stop.
    job = _submit(client, f"{sweep} --out s3://{bucket}/sweeps/s1")
    deadline = time.monotonic() + 300
    while (progress := _trial_progress(bucket, "sweeps/s1")) != (1, progress[1]) or not progress[1]:
        assert time.monotonic() < deadline and client.get_job_status(job) in (JobStatus.PENDING, JobStatus.RUNNING), \
            (progress, client.get_job_logs(job)[-3000:])
        time.sleep(0.5)
    client.stop_job(job)
    assert _wait(client, job, 60) == JobStatus.STOPPED
    stopped_trial = progress[1][0]

    logs = _run_job(client, f"{sweep} --out s3://{bucket}/sweeps/s1")
    assert "resuming the sweep" in logs
    keys = _keys(bucket, "sweeps/s1/")
    for name in ("summary.csv", "summary.md", "pareto.png"):
        assert f"sweeps/s1/{name}" in keys  # results beside the trials, on S3
        assert any(k.startswith("sweeps/s1/mlartifacts/") and k.endswith(name) for k in keys)  # MLflow's copy

    mlflow = MlflowClient(f"sqlite:///{tmp_path}/sweep.db")
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("harmoclip").experiment_id])
    child_runs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    children = {r.data.tags["harmoclip.run"].rsplit("/", 1)[-1]: r for r in child_runs}
    assert len(child_runs) == len(children) == 2 and stopped_trial in children  # the resumed trial kept its run
    for trial, run in children.items():
        evaluated = mlflow.get_metric_history(run.info.run_id, "val_harmony")
        steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "loss")]
        assert len(evaluated) == 1  # the finished trial was kept, not trained or evaluated again
        assert steps.count(10) == 1 and max(steps) == 60, (trial, steps)  # the stopped one went on from a checkpoint

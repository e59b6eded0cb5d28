"""A real 2-node Ray cluster on this machine with token auth and an S3 server: prepare -> train
(one worker per node, storage on s3://) -> evaluate, all submitted through the Jobs API."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import psutil
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline.synthetic import write_shapes_dataset

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


@pytest.fixture
def cluster(s3_server, tmp_path):
    """Head + one worker node, 2 CPUs each, token authentication on; torn down by PID."""
    temp_dir = f"/tmp/rh-{uuid.uuid4().hex[:6]}"
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = _free_port(), _free_port()
    common = ["--num-cpus", "2", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        # Each node's job agent gets its own free port: the default (52365) may be held by another
        # Ray on this machine, and then the head accepts no jobs ("No available agent").
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--dashboard-port", str(dashboard),
                        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir,
                        "--dashboard-agent-listen-port", str(_free_port()), *common],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", "--dashboard-agent-listen-port",
                        str(_free_port()), *common], env=env, check=True, capture_output=True, timeout=120)
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
            return client.submit_job(entrypoint=entrypoint, runtime_env={
                "working_dir": str(ROOT), "excludes": [".venv", ".git", "outputs", "**/__pycache__"]})
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _run_job(client: JobSubmissionClient, entrypoint: str, timeout: float = 400) -> str:
    job = _submit(client, entrypoint)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    else:
        client.stop_job(job)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-4000:]
    return logs


def _keys(bucket: str, prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def test_two_node_cluster_prepares_trains_and_evaluates_on_s3(cluster, bucket, tmp_path):
    write_shapes_dataset(f"s3://{bucket}/raw/train", images=24, seed=0, size=48, captions_per_image=2)
    write_shapes_dataset(f"s3://{bucket}/raw/val", images=8, seed=1, size=48, captions_per_image=2)
    with pytest.raises(Exception, match="(?i)auth"):
        JobSubmissionClient(cluster["address"]).list_jobs()  # token authentication is on
    client = JobSubmissionClient(cluster["address"], headers={"Authorization": f"Bearer {cluster['token']}"})
    mlflow_db = tmp_path / "mlflow.db"

    logs = [_run_job(client, f"python -m jobs.prepare --input s3://{bucket}/raw/train "
                             f"--out s3://{bucket}/prepared --regions gt --tokenizer harmo-micro")]
    assert [k for k in _keys(bucket, "prepared/") if k.endswith(".parquet") and "part-" in k]

    logs.append(_run_job(client, f"python -m jobs.train --data s3://{bucket}/prepared --out s3://{bucket}/runs/r1 "
                                 f"--model harmo-micro --workers 2 --placement SPREAD --steps 4 --batch-size 4 "
                                 f"--checkpoint-every 2 --log-every 1 --mlflow-uri sqlite:///{mlflow_db}"))
    placement = dict(re.findall(r"worker rank (\d+)/2 on node ([0-9a-f]{16,})", logs[-1]))
    assert sorted(placement) == ["0", "1"], logs[-1][-3000:]
    assert len(set(placement.values())) == 2  # one worker per node
    run_keys = _keys(bucket, "runs/r1/")
    assert f"runs/r1/open_clip_weights.pt" in run_keys
    assert any(k.startswith("runs/r1/checkpoint_000004/") and k.endswith("open_clip_weights.pt") for k in run_keys)

    logs.append(_run_job(client, f"python -m jobs.evaluate --checkpoint s3://{bucket}/runs/r1 "
                                 f"--data s3://{bucket}/raw/val --out s3://{bucket}/results.json"))
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

"""A real 2-node Ray cluster on this machine with token auth and an S3 server, driven through the
Jobs API as docs/cluster.md does: prepare -> train (one worker per node, storage on
s3://) -> evaluate; a sweep on s3:// that is stopped mid-way and resumed by submitting it again;
and what the jobs print (their own progress, Ray's internals only with --verbose)."""

from __future__ import annotations

import csv
import io
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
import torch
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient

from jobs.common import free_port
from pipeline.synthetic import write_shapes_dataset

ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def _processes_mentioning(text: str) -> list[psutil.Process]:
    """This machine's processes with `text` in their command line."""
    return [process for process in psutil.process_iter(["cmdline"])
            if any(text in part for part in process.info["cmdline"] or [])]


def _kill_cluster(temp_dir: str) -> None:
    """Every process of this cluster (its temp dir is in their command lines), by PID."""
    victims = _processes_mentioning(temp_dir)
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


class TwoNodeCluster:
    """Head + one worker node on this machine, 2 CPUs each, token authentication on. The worker
    node can be stopped as a lost machine would be (every process of it killed at once) and
    started again."""

    def __init__(self, temp_dir: str, token: str) -> None:
        self.temp_dir, self.token = temp_dir, token
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
                    # A stopped node is declared dead after 5 missed health checks 1 s apart (Ray's
                    # default: 3 s apart), so the node-loss tests wait less for it.
                    "RAY_health_check_period_ms": "1000"}
        self.env.pop("RAY_ADDRESS", None)
        self.port, dashboard = free_port(), free_port()
        self.address = f"http://127.0.0.1:{dashboard}"
        # Ray's State API clients (Ray Train's controller among them) ask this cluster's dashboard,
        # rather than looking for "the" Ray on a machine that runs the test session's own Ray too.
        self.env["RAY_API_SERVER_ADDRESS"] = self.address
        self.worker_port = 0
        # Each node's job agent gets its own free port: the default (52365) may be held by another
        # Ray on this machine, and then the head accepts no jobs ("No available agent").
        self._start(["--head", "--port", str(self.port), "--dashboard-port", str(dashboard), "--include-dashboard",
                     "true", "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir])
        self.start_worker_node()

    def _start(self, args: list[str]) -> None:
        subprocess.run([RAY, "start", *args, "--dashboard-agent-listen-port", str(free_port()), "--num-cpus", "2",
                        "--node-ip-address", "127.0.0.1", "--disable-usage-stats"],
                       env=self.env, check=True, capture_output=True, timeout=120)

    def start_worker_node(self) -> None:
        self.worker_port = free_port()  # names the node's raylet among this machine's processes
        # Its own temp dir, as another machine has its own disk: a node starting up clears the
        # runtime_resources of its temp dir, which would pull the job's working dir from under the
        # head's workers if the two nodes shared one.
        self._start(["--address", f"127.0.0.1:{self.port}", "--node-manager-port", str(self.worker_port),
                     "--temp-dir", f"{self.temp_dir}-worker"])

    def worker_node_processes(self) -> list[psutil.Process]:
        """The worker node's raylet and everything it started (workers, actors, agents)."""
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if cmdline and cmdline[0].endswith("/raylet") and f"--node_manager_port={self.worker_port}" in cmdline:
                return [process, *process.children(recursive=True)]
        raise AssertionError(f"no raylet with node manager port {self.worker_port}")

    def stop_worker_node(self) -> None:
        """Every process of the node at once: its raylet's tree and the rest `ray start` left
        (the log monitor, which would otherwise forward the restarted node's lines twice)."""
        victims = self.worker_node_processes() + _processes_mentioning(f"{self.temp_dir}-worker")
        for process in victims:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=10)


@pytest.fixture(scope="module")
def cluster(s3_server):
    temp_dir = f"/tmp/rh-{uuid.uuid4().hex[:6]}"
    try:
        yield TwoNodeCluster(temp_dir, secrets.token_hex(32))
    finally:
        _kill_cluster(temp_dir)  # the worker node's processes too: their temp dir starts with the head's
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(f"{temp_dir}-worker", ignore_errors=True)


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


PREPARE = "python -m jobs.prepare --input s3://{bucket}/raw/train --out s3://{bucket}/{out} --regions gt " \
          "--tokenizer harmo-micro"
# From random weights: the literal reading, the method for training from scratch (no anchor).
TRAIN = "python -m jobs.train --method paper --data s3://{bucket}/prepared --out s3://{bucket}/runs/{out} " \
        "--model harmo-micro --workers 2 --placement SPREAD --steps 12 --batch-size 4 --checkpoint-every 4 " \
        "--log-every 1 --mlflow-uri sqlite:///{mlflow_db}"


def _keys(bucket: str, prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


@pytest.fixture(scope="module")
def client(cluster) -> JobSubmissionClient:
    with pytest.raises(Exception, match="(?i)auth"):
        JobSubmissionClient(cluster.address).list_jobs()  # token authentication is on
    return JobSubmissionClient(cluster.address, headers={"Authorization": f"Bearer {cluster.token}"})


@pytest.fixture(scope="module")
def data(s3_server, client) -> dict:
    """Raw training and validation sets on s3://, and the training set prepared by a submitted job."""
    bucket = f"cluster-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    write_shapes_dataset(f"s3://{bucket}/raw/train", images=24, seed=0, size=48, captions_per_image=2)
    write_shapes_dataset(f"s3://{bucket}/raw/val", images=8, seed=1, size=48, captions_per_image=2)
    logs = _run_job(client, PREPARE.format(bucket=bucket, out="prepared"))
    return {"bucket": bucket, "prepare_logs": logs}


@pytest.fixture(scope="module")
def trained(client, data, tmp_path_factory) -> dict:
    """The training job on both nodes, uninterrupted: runs/r1 (the node-loss run must end there too)."""
    mlflow_db = tmp_path_factory.mktemp("r1") / "mlflow.db"
    return {"logs": _run_job(client, TRAIN.format(bucket=data["bucket"], out="r1", mlflow_db=mlflow_db)),
            "mlflow_db": mlflow_db}


def test_two_node_cluster_prepares_trains_and_evaluates_on_s3(cluster, client, data, trained):
    bucket, logs, mlflow_db = data["bucket"], [data["prepare_logs"], trained["logs"]], trained["mlflow_db"]
    assert [k for k in _keys(bucket, "prepared/") if k.endswith(".parquet") and "part-" in k]

    placement = dict(re.findall(r"worker rank (\d+)/2 on node ([0-9a-f]{16,})", logs[-1]))
    assert sorted(placement) == ["0", "1"], logs[-1][-3000:]
    assert len(set(placement.values())) == 2  # one worker per node
    run_keys = _keys(bucket, "runs/r1/")
    assert "runs/r1/open_clip_weights.pt" in run_keys
    assert any(k.startswith("runs/r1/checkpoint_000012/") and k.endswith("open_clip_weights.pt") for k in run_keys)

    # The jobs print their own progress; Ray's INFO lines (per-step reports, Ray Data progress
    # blocks) only with --verbose.
    assert "step 12/12" in logs[-1] and "Reporting training result" not in logs[-1]
    assert "Running Dataset" not in logs[0] + logs[1] and "Starting execution of Dataset" not in logs[0] + logs[1]
    assert len(logs[-1].splitlines()) < 40, logs[-1]

    logs.append(_run_job(client, f"python -m jobs.evaluate --checkpoint s3://{bucket}/runs/r1 "
                                 f"--data s3://{bucket}/raw/val --out s3://{bucket}/results.json --verbose"))
    assert "Running Dataset" in logs[-1]  # Ray Data's progress blocks: the images are read through it
    body = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).get_object(
        Bucket=bucket, Key="results.json")["Body"].read()
    results = json.loads(body)
    assert 0 <= results["retrieval"]["i2t"]["r1"] <= 1 and results["protocol"]["images"] == 8

    # Credentials never leak into job logs, MLflow or dataset.json.
    dataset_json = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).get_object(
        Bucket=bucket, Key="prepared/dataset.json")["Body"].read().decode()
    for text in (*logs, dataset_json, mlflow_db.read_bytes().decode("latin-1")):
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text and os.environ["AWS_ACCESS_KEY_ID"] not in text
        assert cluster.token not in text


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
            f"--grid-lrc 0 1 --grid-gr 0 --scheduler none --steps 20 --batch-size 4 --checkpoint-every 5 " \
            f"--log-every 5 --max-concurrent 1 --mlflow-uri sqlite:///{tmp_path}/sweep.db"

    # A local --out on two nodes is refused before anything runs, saying what to pass instead.
    logs = _run_job(client, f"{sweep} --out {tmp_path}/local-sweep", expect=JobStatus.FAILED)
    assert "this Ray cluster has 2 nodes" in logs and "s3://" in logs and not (tmp_path / "local-sweep").exists()

    # One trial finished (and recorded so in the sweep's state on S3), the other part-way: stop.
    # (One trial at a time: the second is part-way from its first checkpoint to its last.)
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
    assert sorted((r.data.params["method.lambda_lrc"], r.data.params["method.lambda_gr"]) for r in child_runs) == \
        [("0.0", "0.0"), ("1.0", "0.0")]
    summary = _objects(bucket, "sweeps/s1/", "summary.csv")["summary.csv"].decode()
    assert sorted(row["lambda_lrc"] for row in csv.DictReader(io.StringIO(summary))) == ["0.0", "1.0"]
    for trial, run in children.items():
        evaluated = mlflow.get_metric_history(run.info.run_id, "val_harmony")
        steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "loss")]
        assert len(evaluated) == 1  # the finished trial was kept, not trained or evaluated again
        assert steps.count(5) == 1 and max(steps) == 20, (trial, steps)  # the stopped one went on from a checkpoint


# -- a lost node -----------------------------------------------------------------------------------

def _objects(bucket: str, prefix: str, suffix: str) -> dict[str, bytes]:
    """Every object under `prefix` whose key ends with `suffix`: {key relative to prefix: bytes}."""
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    return {key[len(prefix):]: s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            for key in _keys(bucket, prefix) if key.endswith(suffix)}


def _stop_worker_node_once(cluster: TwoNodeCluster, client: JobSubmissionClient, job: str, ready) -> None:
    """Stop the worker node as soon as `ready()` holds, while `job` still runs; then start it again
    (the node returns, as a replacement from an autoscaler or a rebooted machine would)."""
    deadline = time.monotonic() + 300
    while not ready():
        assert client.get_job_status(job) in (JobStatus.PENDING, JobStatus.RUNNING) and time.monotonic() < deadline, \
            client.get_job_logs(job)[-3000:]
        time.sleep(0.2)
    cluster.stop_worker_node()
    assert client.get_job_status(job) == JobStatus.RUNNING  # stopped mid-way, not after the end
    cluster.start_worker_node()


def test_node_loss_during_prepare_gives_the_same_parquet_bytes(cluster, client, data):
    bucket = data["bucket"]
    # Two spaCy actors: Ray Data spreads an actor pool over the nodes, so one of them is on the
    # worker node (one actor lands on either node; the output is the same for any pool size).
    job = _submit(client, PREPARE.format(bucket=bucket, out="prepared-node-lost") + " --lexeme-actors 2")

    def map_work_on_worker_node() -> bool:  # a Ray Data map task or actor of the job, on the node
        return any(p.cmdline()[:1] and "Map" in p.cmdline()[0] for p in cluster.worker_node_processes()[1:]
                   if p.is_running())

    _stop_worker_node_once(cluster, client, job, map_work_on_worker_node)
    assert _wait(client, job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-4000:]
    uninterrupted = _objects(bucket, "prepared/", ".parquet")
    assert _objects(bucket, "prepared-node-lost/", ".parquet") == uninterrupted and uninterrupted


def test_node_loss_during_train_restores_the_last_checkpoint_and_ends_equal(cluster, client, data, trained,
                                                                            tmp_path):
    bucket = data["bucket"]
    job = _submit(client, TRAIN.format(bucket=bucket, out="r2", mlflow_db=tmp_path / "mlflow.db"))

    def first_checkpoint_complete() -> bool:  # Ray Train lists a checkpoint once its upload is complete
        snapshot = _objects(bucket, "runs/r2/", "checkpoint_manager_snapshot.json")
        return b"checkpoint_000004" in snapshot.get("checkpoint_manager_snapshot.json", b"")

    _stop_worker_node_once(cluster, client, job, first_checkpoint_complete)
    assert _wait(client, job) == JobStatus.SUCCEEDED, client.get_job_logs(job)[-4000:]
    logs = client.get_job_logs(job)
    restored_from = re.search(r"restored checkpoint_0000(04|08): going on from step (4|8)", logs)
    assert restored_from, logs[-4000:]

    # Every step logged, those up to the restored checkpoint once: the run went on from it, not from
    # the start. (Steps after it that had finished before the node was lost ran, and logged, twice.)
    mlflow = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = mlflow.search_runs([mlflow.get_experiment_by_name("harmoclip").experiment_id])
    steps = [m.step for m in mlflow.get_metric_history(run.info.run_id, "loss")]
    assert sorted(set(steps)) == list(range(1, 13)), steps
    assert all(steps.count(step) == 1 for step in range(1, int(restored_from.group(2)) + 1)), steps

    reference, restored = (torch.load(io.BytesIO(_objects(bucket, f"runs/{out}/", "open_clip_weights.pt")[
        "open_clip_weights.pt"]), weights_only=True)["state_dict"] for out in ("r1", "r2"))
    assert restored.keys() == reference.keys()
    for name, tensor in restored.items():
        assert torch.allclose(tensor, reference[name], rtol=1e-5, atol=1e-6), name

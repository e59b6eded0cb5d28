"""Shared fixtures: a tiny model, a synthetic batch, a real S3-speaking server on 127.0.0.1, a local
Ray, a tiny prepared dataset, and a CPU burner for runs that must not depend on timing."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator

import boto3
import pytest
import torch

from harmoclip import HarmoCLIP, ModelConfig, create_clip
from harmoclip.batch import synthetic_batch
from harmoclip.checkpoint import save_open_clip_weights
from harmoclip.config import PrepareConfig
from jobs.common import free_port
from pipeline.prepare import prepare
from pipeline.sources import find_source
from pipeline.synthetic import write_shapes_dataset
from tests import reference_run

TEST_MODEL = "harmo-micro"
# The suite runs on two workers (pytest-xdist; options in pyproject.toml: -n 2 --dist loadfile).
# Each worker takes a group of tests at a time: a file, or files sharing a costly session fixture
# (the reference run), so module and session fixtures are made once. The slowest groups go first
# (about 600 s down to 45 s on 2 cores), the short ones fill the gaps, and both workers end at
# about the same time.
SHARED_GROUPS = {"test_train.py": "reference_run", "test_s3_faults.py": "reference_run"}
SLOWEST_FIRST = ("test_cluster.py", "reference_run", "test_harmony.py", "test_bench_gpu.py", "test_tune.py",
                 "test_embed.py", "test_two_jobs.py", "test_real_photos.py", "test_prepare_webdataset_urls.py",
                 "test_prepare.py", "test_evaluate.py")


def scheduling_group(nodeid: str) -> str:
    """The group a test runs in: its file's name, or the name of the files' shared group."""
    filename = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    return SHARED_GROUPS.get(filename, filename)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest groups first, the rest in their usual order (a stable sort keeps each file's
    tests together and in order)."""
    rank = {group: position for position, group in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(scheduling_group(item.nodeid), len(rank)))


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's file-by-file scheduling, with a shared group sent to one worker as one unit (its
    `xdist_group` marks no longer reach the scheduler under pytest 9.2)."""
    from xdist.scheduler import LoadFileScheduling

    class GroupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_group(nodeid)

    return GroupScheduling(config, log)


@pytest.fixture
def model() -> HarmoCLIP:
    torch.manual_seed(0)
    return HarmoCLIP(create_clip(ModelConfig(name=TEST_MODEL)))


@pytest.fixture(scope="session")
def micro_weights(tmp_path_factory) -> str:
    """An open_clip weights file of a randomly initialised harmo-micro (seed 0): a model the
    inference jobs can load as `--checkpoint FILE --model harmo-micro`."""
    torch.manual_seed(0)
    return save_open_clip_weights(create_clip(ModelConfig(name=TEST_MODEL)),
                                  str(tmp_path_factory.mktemp("weights") / "weights.pt"))


@pytest.fixture
def batch(model: HarmoCLIP) -> dict[str, torch.Tensor]:
    return synthetic_batch(TEST_MODEL, model.image_size, batch_size=6, max_regions=5, max_lexemes=4, seed=1)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode on loopback: boto3 *and* pyarrow's own S3 client talk to it over HTTP.

    Session-wide and exported through os.environ before Ray starts, so Ray's worker processes
    (which inherit the environment at start) reach it too.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh, empty bucket on the test S3 server."""
    name = f"harmo-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One real local Ray per test worker: 2 cores plus 2 logical CPUs, as `jobs.common.init_ray` starts it.

    A new one (address "local") even while test_cluster.py's 2-node cluster runs beside it in the
    other worker, which `ray.init()` would otherwise join as the latest cluster `ray start` made."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def prepared(ray_local, tmp_path_factory) -> str:
    """A tiny prepared dataset (16 synthetic images, 5 captions each as in COCO, gt regions) for
    training runs; shared by the whole session (tests only read it)."""
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(str(root), images=16, seed=0, size=48, captions_per_image=5)
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(find_source(str(root)), str(out), PrepareConfig(regions="gt", tokenizer=TEST_MODEL, batch_size=8))
    return str(out)


@pytest.fixture(scope="session")
def clean_run(prepared, tmp_path_factory) -> dict:
    """The reference run (tests/reference_run.py), uninterrupted, checkpoints on local disk: what
    every resumed or restored run must end up equal to."""
    result = reference_run.train(prepared, tmp_path_factory.mktemp("clean") / "run")
    return {**result, "model": reference_run.MODEL, "settings": reference_run.SETTINGS}


@contextmanager
def burning_cpus() -> Iterator[None]:
    """One busy process per core while the block runs. Niced like Ray's own workers (15) or lower,
    or a run would take minutes; it still takes every cycle the run leaves and shifts the timing of
    everything. (Also used outside pytest, by bench.repeat_prepare.)"""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.nice(19))
               for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


@pytest.fixture
def cpu_burner() -> Callable[[], ContextManager[None]]:
    """`with cpu_burner(): ...` runs the block with every core kept busy (`burning_cpus`)."""
    return burning_cpus

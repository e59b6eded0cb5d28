"""Shared fixtures: a tiny model, a synthetic batch, and a real S3-speaking server on 127.0.0.1."""

from __future__ import annotations

import os
import socket

import boto3
import pytest
import torch

from harmoclip import HarmoCLIP, ModelConfig, create_clip
from harmoclip.batch import synthetic_batch

TEST_MODEL = "harmo-micro"


@pytest.fixture
def model() -> HarmoCLIP:
    torch.manual_seed(0)
    return HarmoCLIP(create_clip(ModelConfig(name=TEST_MODEL)))


@pytest.fixture
def batch(model: HarmoCLIP) -> dict[str, torch.Tensor]:
    return synthetic_batch(TEST_MODEL, model.image_size, batch_size=6, max_regions=5, max_lexemes=4, seed=1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch):
    """moto in server mode on loopback: boto3 *and* pyarrow's own S3 client talk to it over HTTP."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="harmo")
    try:
        yield endpoint
    finally:
        server.stop()

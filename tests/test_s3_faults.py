"""S3 failures while checkpoints are uploaded: transient ones are retried by the client; one that
outlasts the retries fails the worker, Ray Train restores the last complete checkpoint, and the run
ends exactly where an uninterrupted one does.

A small HTTP proxy on 127.0.0.1 sits between the S3 client and the moto server and answers chosen
checkpoint uploads with 503 SlowDown, as S3 does under load.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import boto3
import torch
from mlflow.tracking import MlflowClient

from harmoclip.storage import fetch_to_local
from tests import reference_run

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FlakyProxy:
    """Forwards every request to `upstream`; fails the first `failures[marker]` PUTs whose path
    holds `marker`, for each marker."""

    def __init__(self, upstream: str, failures: dict[str, int]) -> None:
        self.failed = dict.fromkeys(failures, 0)
        self.forwarded_puts = 0
        lock = threading.Lock()  # uploads can overlap: exactly `failures` of them must fail
        upstream_host = urlparse(upstream).netloc
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as the AWS SDK expects

            def _read_body(self) -> bytes:
                if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline().strip():  # trailers
                    pass
                return b"".join(chunks)

            def _relay(self) -> None:
                body = self._read_body()
                marker = next((m for m in failures if m in self.path), None) if self.command == "PUT" else None
                with lock:
                    fail = marker is not None and proxy.failed[marker] < failures[marker]
                    if fail:
                        proxy.failed[marker] += 1
                    proxy.forwarded_puts += marker is not None and not fail
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                connection = http.client.HTTPConnection(upstream_host, timeout=30)
                headers = {key: value for key, value in self.headers.items()
                           if key.lower() not in ("transfer-encoding", "expect", "content-length", "connection")}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # A HEAD answer has no body but states the object's size.
                self.send_header("Content-Length", response.getheader("Content-Length", "0")
                                 if self.command == "HEAD" else str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FlakyProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_checkpoint_uploads_retry_then_fail_the_worker_and_the_run_restores(prepared, clean_run, s3_server,
                                                                           bucket, tmp_path, monkeypatch):
    """The reference run's settings, with checkpoints on s3:// behind the proxy: two 503s on checkpoint 4
    (fewer than the client's 3 attempts), and checkpoint 8 refused more often than it retries."""
    failures = {"checkpoint_000004/": 2, "checkpoint_000008/open_clip_weights.pt": 9}
    with FlakyProxy(s3_server, failures) as proxy:
        # The driver's and the workers' S3 clients go through the proxy (workers inherit the env).
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        result = reference_run.train(prepared, f"s3://{bucket}/runs/flaky", max_failures=1,
                                     mlflow_uri=f"sqlite:///{tmp_path}/m.db")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert proxy.failed == failures and proxy.forwarded_puts > 0
    assert result["step"] == 12

    client = MlflowClient(result["tracking_uri"])
    run = client.search_runs([client.get_experiment_by_name("harmoclip").experiment_id])[0]
    logged = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert logged.count(4) == 1  # the transient errors were retried without a restart
    assert logged.count(5) == 2  # steps 5-8 again, from checkpoint 4: never the broken 8

    # The run ends with the weights of the uninterrupted local one: the restore was exact.
    weights = fetch_to_local(result["checkpoint"], tmp_path / "cache")
    reference = torch.load(clean_run["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    restored = torch.load(weights, map_location="cpu", weights_only=True)["state_dict"]
    assert restored.keys() == reference.keys()
    for name, tensor in restored.items():
        assert torch.allclose(tensor, reference[name], rtol=1e-5, atol=1e-6), name
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket=bucket, Prefix="runs/flaky/")["Contents"]]
    assert "runs/flaky/checkpoint_000012/open_clip_weights.pt" in keys and "runs/flaky/open_clip_weights.pt" in keys

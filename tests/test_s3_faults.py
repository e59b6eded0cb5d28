"""Transient S3 failures while checkpoints are uploaded are retried, and the run completes.

A small HTTP proxy on 127.0.0.1 sits between the S3 client and the moto server and answers the
first uploads of checkpoint files with 503 SlowDown, as S3 does under load.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import boto3

from harmoclip import MethodConfig, ModelConfig
from harmoclip.config import TrainConfig
from jobs import train as train_job

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FlakyProxy:
    """Forwards every request to `upstream`; fails the first `failures` PUTs whose path holds `marker`."""

    def __init__(self, upstream: str, marker: str, failures: int) -> None:
        self.failed, self.forwarded_puts = 0, 0
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
                is_checkpoint_put = self.command == "PUT" and marker in self.path
                with lock:
                    fail = is_checkpoint_put and proxy.failed < failures
                    proxy.failed += fail
                    proxy.forwarded_puts += is_checkpoint_put and not fail
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
                self.send_header("Content-Length", str(len(payload)))
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


def test_checkpoint_upload_survives_transient_s3_errors(prepared, s3_server, bucket, tmp_path, monkeypatch):
    with FlakyProxy(s3_server, marker="checkpoint_", failures=2) as proxy:
        # The driver's S3 client goes through the proxy; Ray Train uploads checkpoints with it.
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        result = train_job.run(prepared, f"s3://{bucket}/runs/flaky", ModelConfig(name="harmo-micro"),
                               MethodConfig(), TrainConfig(steps=4, batch_size=4, checkpoint_every=2, log_every=2,
                                                           max_failures=0, mlflow_uri=f"sqlite:///{tmp_path}/m.db"))
    assert proxy.failed == 2 and proxy.forwarded_puts > 0
    assert result["step"] == 4
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(
        Bucket=bucket, Prefix="runs/flaky/")["Contents"]]
    assert "runs/flaky/checkpoint_000004/open_clip_weights.pt" in keys
    assert "runs/flaky/open_clip_weights.pt" in keys

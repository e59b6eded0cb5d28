"""The download cache for s3:// weights, against the real S3 server of the test session."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from harmoclip.storage import fetch_to_local


def test_an_overwritten_object_is_fetched_again_never_served_stale(s3_server, bucket, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    key, uri = "run/open_clip_weights.pt", f"s3://{bucket}/run/open_clip_weights.pt"
    s3.put_object(Bucket=bucket, Key=key, Body=b"first weights")
    first = fetch_to_local(uri, tmp_path)
    assert Path(first).read_bytes() == b"first weights"
    assert fetch_to_local(uri, tmp_path) == first  # unchanged: the cached copy
    s3.put_object(Bucket=bucket, Key=key, Body=b"other weights")  # same size, same second: a continued run
    second = fetch_to_local(uri, tmp_path)
    assert Path(second).read_bytes() == b"other weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == [Path(second).name]  # old version gone, no partials


def test_a_missing_object_is_a_clear_error(bucket, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/nope.pt"):
        fetch_to_local(f"s3://{bucket}/nope.pt", tmp_path)

"""The one place where a path or URI becomes a pyarrow filesystem.

Everything that reads or writes data, weights or checkpoints goes through `resolve`, so local
paths and `s3://` URIs behave the same and an S3-compatible endpoint (`AWS_ENDPOINT_URL`, e.g. a
MinIO or a test server on 127.0.0.1) is honoured everywhere at once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import boto3
import botocore.exceptions
import pyarrow.fs as pafs

S3_SCHEME = "s3://"


def is_remote(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


class StorageError(OSError):
    """An object store that cannot be used at all (no credentials): named, never retried."""


_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
                   "AWS_EC2_METADATA_DISABLED")


def _s3_endpoint_and_region() -> tuple[str | None, str]:
    """The S3 endpoint (None: AWS itself) and region from the environment, as the AWS SDKs read them."""
    endpoint_url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return endpoint_url, os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_filesystem(endpoint_url: str | None = None) -> pafs.S3FileSystem:
    """An S3 client that fails in seconds rather than retrying for minutes on a bad endpoint.

    Cached per endpoint and credential environment: stages call this for every file they read.
    """
    default_endpoint, region = _s3_endpoint_and_region()
    return _s3_filesystem(endpoint_url or default_endpoint, region, tuple(os.environ.get(k) for k in _CREDENTIAL_ENV))


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint_url: str | None, region: str, credential_env: tuple) -> pafs.S3FileSystem:
    # boto3's credential chain (env, profiles, instance profile) answers in about a second; without
    # this, pyarrow would send unsigned requests and fail later with a less helpful error.
    if boto3.Session().get_credentials() is None:
        raise StorageError("no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                           "or run on a machine with an instance profile")
    kwargs: dict = {
        "region": region,
        "connect_timeout": 5,
        "request_timeout": 30,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """`(filesystem, path within it)` for a local path or an `s3://bucket/key` URI."""
    if is_remote(uri):
        try:
            return s3_filesystem(), uri[len(S3_SCHEME):].rstrip("/")
        except StorageError as err:
            raise StorageError(f"{uri}: {err}") from None
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', for both local paths and s3:// URIs."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def read_text(uri: str) -> str:
    """A small text file (a class list, templates) from a local path or an s3:// URI."""
    filesystem, path = resolve(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file") from None


def _output_stream(filesystem: pafs.FileSystem, path: str) -> pafs.NativeFile:
    """A stream writing `path`; on a local disk its folder is made first (S3 has no folders)."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return filesystem.open_output_stream(path)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a small file (a summary, a results table) to a local path or an s3:// URI."""
    filesystem, path = resolve(uri)
    with _output_stream(filesystem, path) as stream:
        stream.write(data)


def upload_directory(local_dir: str, filesystem: pafs.FileSystem, path: str) -> None:
    """Copy every file under `local_dir` to `path` in `filesystem`, raising if any write fails.

    Not pyarrow.fs.copy_files: when one part of a multipart S3 upload fails for good, it logs
    "Error ignored when destroying file" and returns normally, leaving the object out, so a
    checkpoint would be registered without its weights. Here each stream is closed explicitly
    (close raises the upload error) and each object's size is checked against the file's.
    """
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            source = os.path.join(root, name)
            target = f"{path}/{os.path.relpath(source, local_dir)}"
            with open(source, "rb") as reader, _output_stream(filesystem, target) as writer:
                shutil.copyfileobj(reader, writer, 8 * 2**20)
            written, expected = filesystem.get_file_info(target).size, os.path.getsize(source)
            if written != expected:
                raise OSError(f"{target}: {written} bytes stored, {expected} written")


def _object_identity(uri: str) -> str:
    """What changes when an object is overwritten: its ETag and size. (S3's modification time has
    one-second resolution: too coarse for weights rewritten by a continued run.)"""
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    endpoint, region = _s3_endpoint_and_region()
    try:
        head = boto3.client("s3", endpoint_url=endpoint, region_name=region).head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise FileNotFoundError(f"no such object: {uri}") from err
        raise OSError(f"cannot read {uri}: {err}") from err
    return f"{head['ETag'].strip(chr(34))}-{head['ContentLength']}"


def fetch_to_local(uri: str, cache_dir: str | os.PathLike | None = None) -> str:
    """A local file path for `uri`: itself if local, else a cached download.

    The cache is keyed by the URI *and* the object's identity, so an overwritten object is fetched
    again, never served stale; the download goes to a private temporary name and is renamed into
    place, so a reader never sees half a file. Older versions of the same URI are removed.
    """
    if not is_remote(uri):
        if not Path(uri).is_file():
            raise FileNotFoundError(f"no such file: {uri}")
        return uri
    cache = Path(cache_dir or Path.home() / ".cache" / "harmoclip")
    cache.mkdir(parents=True, exist_ok=True)
    uri_key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    version = hashlib.sha256(_object_identity(uri).encode()).hexdigest()[:12]
    local = cache / f"{uri_key}-{version}-{Path(uri).name}"
    if not local.exists():
        fs, path = resolve(uri)
        partial = cache / f".{local.name}.{os.getpid()}.partial"
        try:
            pafs.copy_files(path, str(partial), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise OSError(f"cannot download {uri}: {err}") from err
        os.replace(partial, local)
        for stale in cache.glob(f"{uri_key}-*"):
            if stale != local:
                stale.unlink(missing_ok=True)
    return str(local)

"""Reading a prepared dataset (jobs.prepare's output): its `dataset.json`, its shards, its schema
version. The one home for this, shared by training, evaluation and anything else that reads one.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow.fs as pafs

from harmoclip.storage import join, resolve

from .prepare import DATASET_FILE, SCHEMA_VERSION


class DatasetError(ValueError):
    """The prepared dataset is missing, unfinished, or was made for another model."""


def read_dataset_manifest(uri: str) -> dict[str, Any]:
    filesystem, path = resolve(join(uri, DATASET_FILE))
    try:
        with filesystem.open_input_stream(path) as stream:
            manifest = json.loads(stream.read())
    except FileNotFoundError as err:
        raise DatasetError(f"{uri} has no {DATASET_FILE}: not a prepared dataset, or its preparation did not "
                           "finish (run python -m jobs.prepare)") from err
    except OSError as err:
        raise DatasetError(f"cannot read {uri}/{DATASET_FILE}: {err}") from err
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(f"{uri}: schema version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}")
    return manifest


def shard_files(uri: str) -> tuple[pafs.FileSystem, list[str]]:
    filesystem, path = resolve(uri)
    files = sorted(info.path for info in filesystem.get_file_info(pafs.FileSelector(path))
                   if info.base_name.startswith("part-") and info.base_name.endswith(".parquet"))
    if not files:
        raise DatasetError(f"{uri} has no part-*.parquet shards (0 rows were written?)")
    return filesystem, files

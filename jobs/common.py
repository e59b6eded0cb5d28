"""What every job shares: connecting to Ray, how much of Ray's own logging a person sees, and
splitting a run URI for Ray Train's storage."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

from harmoclip.cli import add_bool_argument
from harmoclip.storage import is_remote, resolve

VERBOSE_ENV = "HARMOCLIP_VERBOSE"
# Libraries whose INFO lines describe Ray's machinery rather than the job's progress.
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow")
# Where Ray's State API clients (Ray Train's controller among them) find the dashboard.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
# torch deprecates the autograd all_gather that open_clip's ClipLoss (and our gather, which must
# match it bit for bit) call every step. Python shows a warning once per place, but Ray resets that
# record whenever it touches the warning filters, so a 12-step run printed it 21 times.
DEPRECATED_GATHER = r"torch\.distributed\.nn\.functional\.all_gather is deprecated"


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    add_bool_argument(parser, "--verbose",
                      help=f"Also print Ray's own INFO logs, not only its warnings and errors (or set {VERBOSE_ENV}=1)")


def set_verbose(enabled: bool) -> None:
    """`--verbose` sets the environment variable, so a local Ray's workers started later inherit it."""
    if enabled:
        os.environ[VERBOSE_ENV] = "1"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def log_level() -> int:
    """The level Ray's libraries log at on the console: INFO when verbose, else WARNING."""
    return logging.INFO if verbose() else logging.WARNING


def quiet_libraries(level: int | None = None) -> None:
    """Hold Ray's libraries (and, in a worker, open_clip's root-logger INFO lines) at `level`.

    Called in the driver and at the start of every worker loop we own. Warnings and errors pass,
    except torch's deprecation of the all_gather we share with open_clip (DEPRECATED_GATHER).
    """
    level = log_level() if level is None else level
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", message=DEPRECATED_GATHER, category=FutureWarning)


def init_ray() -> None:
    """Join the cluster when submitted as a Ray job (RAY_ADDRESS), else start a local Ray.

    A local Ray gets two more logical CPUs than cores: Ray Train workers each hold a CPU for the
    whole run, and the Ray Data tasks that feed them must still be schedulable on a small machine.
    It runs the dashboard: Ray Train watches its controller through the State API it serves. A
    local Ray's address goes into the environment its raylet and workers inherit: by default the
    State API looks for "the" Ray on the machine and fails when another job runs its own beside
    this one ("Found multiple active Ray instances"), so two jobs on one machine each keep to their
    own.
    """
    import ray  # here, not at the top: jobs.smoke shares this module and runs without Ray

    quiet_libraries()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=log_level())
    else:
        port = free_port()
        os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
        ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, logging_level=log_level())
    quiet_libraries()  # ray.init configures the "ray" logger again


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def autoscaler_maximum() -> dict[str, float] | None:
    """The most of each resource this cluster can grow to, as its autoscaler is configured, where
    Ray reports that (the GCS's cluster config, which Ray Train and Ray Data read for the same
    question); None where it does not: a local Ray, a fixed cluster, or an autoscaler that does
    not publish its configuration. Not a public Ray API, hence the guard: any failure reads as
    "not known". Call after init_ray."""
    try:
        from ray._private.state import state

        return state.get_max_resources_from_cluster_config() or None
    except Exception:  # a missing or changed private API: fall back as if nothing were reported
        return None


def add_shared_fs_argument(parser: argparse.ArgumentParser) -> None:
    add_bool_argument(parser, "--shared-fs",
                      help="--out is on a filesystem every node mounts (NFS, EFS, Lustre): allow a local path "
                           "on a cluster of more than one node (default: such a cluster needs s3://)")


def check_cluster_storage(out: str, shared_fs: bool) -> None:
    """Refuse a node-local --out on a multi-node cluster: checkpoints and trial results would land
    on whichever node wrote them, and a restore or a summary on another node would not find them.

    Call after init_ray. An autoscaling cluster may have one node now and more later: use s3://
    there whatever this check says.
    """
    import ray

    if is_remote(out) or shared_fs:
        return
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if nodes > 1:
        raise ValueError(f"--out {out} is a local path, but this Ray cluster has {nodes} nodes and each would "
                         f"write to its own disk; pass an object store URI (--out s3://BUCKET/PREFIX), or add "
                         f"--shared-fs if {out} is on a filesystem every node mounts")


def run_storage(out: str) -> tuple[str, str, object]:
    """`(storage_path, run name, filesystem)` for Ray Train's RunConfig from a run URI."""
    filesystem, path = resolve(out)
    parent, _, name = path.rstrip("/").rpartition("/")
    return parent or "/", name, filesystem


@contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Bad input a person can fix (a missing file, a malformed dataset, a flag value out of range)
    ends a job with `error: ...` on stderr and exit code 2 instead of a traceback; any other
    exception is a bug and keeps its traceback."""
    try:
        yield
    except kinds as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err

"""What every job shares: connecting to Ray, and splitting a run URI for Ray Train's storage."""

from __future__ import annotations

import os

import ray

from harmoclip.storage import resolve


def init_ray() -> None:
    """Join the cluster when submitted as a Ray job (RAY_ADDRESS), else start a local Ray.

    A local Ray gets two more logical CPUs than cores: Ray Train workers each hold a CPU for the
    whole run, and the Ray Data tasks that feed them must still be schedulable on a small machine.
    """
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, log_to_driver=True)


def run_storage(out: str) -> tuple[str, str, object]:
    """`(storage_path, run name, filesystem)` for Ray Train's RunConfig from a run URI."""
    filesystem, path = resolve(out)
    parent, _, name = path.rstrip("/").rpartition("/")
    return parent or "/", name, filesystem

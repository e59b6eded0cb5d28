"""The driver's peak memory while `jobs.prepare` runs, as the input grows: preparation must stream,
so the driver's peak should stay near its start-up footprint whether it prepares 1k or 10k images.

Each size runs `pipeline.prepare.prepare` in a fresh process (a fresh local Ray) on a synthetic
shapes COCO folder written beforehand (grid regions, 5 captions per image), and reports that
process's memory at start (imports and Ray started) and its peak while preparing: private
(anonymous pages, from /proc/self/smaps_rollup, sampled every 0.2 s), the driver's own memory,
which is what must stay flat as the input grows; and resident (`ru_maxrss`), which also counts
the pages of Ray's shared object store the driver has read through while writing the shards (they
belong to the object store, which spills to disk when full). `--code DIR` runs another checkout
of the project (say a `git worktree` of an earlier commit) in the same environment, for a
before/after table measured in one sitting.

    .venv/bin/python -m bench.prepare_memory --images 1000 10000
    git worktree add /tmp/before HEAD~1 && .venv/bin/python -m bench.prepare_memory --code /tmp/before
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_mib() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def private_mib() -> float:
    """This process's anonymous (private heap) memory now: what it holds itself, not the shared
    object-store pages it has mapped."""
    with open("/proc/self/smaps_rollup") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("Anonymous:")) / 1024


class PeakPrivate:
    """The largest `private_mib` seen by a sampling thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak = interval, private_mib()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, private_mib())
            self.stop.wait(self.interval)

    def close(self) -> float:
        self.stop.set()
        self.thread.join()
        return self.peak


def child(source: str, out: str, batch_size: int) -> None:
    """Runs in the measured process: start Ray, prepare, print one JSON line."""
    import ray

    from harmoclip.config import PrepareConfig
    from pipeline.prepare import prepare
    from pipeline.sources import find_source

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    at_start, private_at_start = peak_mib(), private_mib()
    private = PeakPrivate()
    started = time.perf_counter()
    manifest = prepare(find_source(source), out, PrepareConfig(regions="grid", batch_size=batch_size))
    seconds = time.perf_counter() - started
    print(json.dumps({"start_mib": at_start, "peak_mib": peak_mib(), "private_start_mib": private_at_start,
                      "private_peak_mib": private.close(), "seconds": seconds,
                      "rows": manifest["counts"]["rows_written"]}))


def measure(code: str, source: str, out: str, batch_size: int) -> dict:
    """One prepare in a fresh interpreter that imports the project from `code`."""
    # This file by path (so an older checkout needs no copy of it); the project from `code`.
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--rows-per-batch", str(batch_size),
                             "--child", source, out], cwd=code,
                            env={**os.environ, "PYTHONPATH": code}, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"error: prepare of {source} with the code in {code} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.prepare_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 10000], help="input sizes (images)")
    parser.add_argument("--code", default=None, metavar="DIR",
                        help="also measure the checkout in DIR (an earlier commit), reported as 'before'")
    parser.add_argument("--rows-per-batch", dest="batch_size", type=int, default=64,
                        help="jobs.prepare --rows-per-batch (rows per block), to tell per-block from per-row costs")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child, args.batch_size)
        return []
    from pipeline.synthetic import write_shapes_dataset

    checkouts = ([("before", os.path.abspath(args.code))] if args.code else []) + [("this checkout", ROOT)]
    rows = []
    print("| code | images | caption rows | driver private memory at start / peak / growth (MiB) "
          "| driver RSS at start / peak / growth (MiB) | images/s |\n|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for images in args.images:
            source = f"{tmp}/shapes-{images}"
            with contextlib.redirect_stderr(io.StringIO()):  # its progress bar: the table is the output
                write_shapes_dataset(source, images=images, seed=0, size=64)
            for label, code in checkouts:
                out = f"{tmp}/prepared-{images}-{len(rows)}"
                row = {"code": label, "images": images, **measure(code, source, out, args.batch_size)}
                rows.append(row)
                private = row["private_peak_mib"] - row["private_start_mib"]
                print(f"| {label} | {images} | {row['rows']} | {row['private_start_mib']:.0f} / "
                      f"{row['private_peak_mib']:.0f} / {private:.0f} | {row['start_mib']:.0f} / "
                      f"{row['peak_mib']:.0f} / {row['peak_mib'] - row['start_mib']:.0f} | "
                      f"{images / row['seconds']:.1f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()

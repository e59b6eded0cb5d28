"""Is byte-identical preparation a property? The prepare job, run N times on one small input with
every core kept busy, must write the same bytes every time.

The input is the synthetic shapes set (`pipeline.synthetic`) with a few bad rows added: corrupt,
truncated and missing images, blank captions and a caption for an unknown image. Small batches and
shards and two spaCy actors give the scheduler many blocks to reorder. Each run's shards and
rejects are compared by sha256 to the first run's; the script prints how many runs match.
Not part of CI (minutes).

    .venv/bin/python -m bench.repeat_prepare [--runs 20] [--images 40]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import ray

from harmoclip.config import PrepareConfig
from pipeline.prepare import prepare
from pipeline.sources import find_source
from pipeline.synthetic import write_shapes_dataset
from tests.conftest import burning_cpus


def write_input(root: Path, images: int) -> str:
    """The shapes set plus bad rows; returns a description of it."""
    write_shapes_dataset(str(root), images=images, seed=0, size=48, captions_per_image=3)
    files = sorted((root / "images").iterdir())
    files[1].write_bytes(b"this is not an image at all" * 10)  # corrupt
    files[2].write_bytes(files[2].read_bytes()[:200])  # truncated
    files[3].unlink()  # missing
    captions = json.loads((root / "captions.json").read_text())
    last_id = max(a["id"] for a in captions["annotations"])
    captions["annotations"] += [{"id": last_id + 1, "image_id": 5, "caption": ""},
                                {"id": last_id + 2, "image_id": 6, "caption": "  \t"},
                                {"id": last_id + 3, "image_id": 99999, "caption": "a caption for no image"}]
    (root / "captions.json").write_text(json.dumps(captions))
    return (f"{images} synthetic shapes images (48 px, 3 captions each) with 3 bad images (corrupt, truncated, "
            f"missing), 2 blank captions and 1 caption of an unknown image: {len(captions['annotations'])} rows")


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.parquet"))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.repeat_prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rows-per-shard", type=int, default=16)
    parser.add_argument("--lexeme-actors", type=int, default=2)
    args = parser.parse_args(argv)
    config = PrepareConfig(regions="gt", batch_size=args.batch_size, rows_per_shard=args.rows_per_shard,
                           lexeme_actors=args.lexeme_actors)
    # A local Ray as jobs.common.init_ray starts one (2 logical CPUs over the cores), without the
    # dashboard, which preparation does not use and which is slow to start on a loaded machine.
    ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="repeat-prepare-") as tmp:
        root = Path(tmp) / "input"
        described = write_input(root, args.images)
        print(described, flush=True)
        source = find_source(str(root))
        reference, identical, seconds = None, 0, []
        with burning_cpus():
            for run in range(args.runs):
                out = Path(tmp) / f"run{run:02d}"
                start = time.perf_counter()
                counts = prepare(source, str(out), config)["counts"]
                seconds.append(time.perf_counter() - start)
                found = digests(out)
                if reference is None:
                    reference = found
                    print(f"run 1: {len(found)} files ({sum(p.startswith('part-') for p in found)} shards, "
                          f"rejects), {counts['rows_written']} rows written, {counts['rows_rejected']} rejected, "
                          f"{seconds[-1]:.1f} s", flush=True)
                differing = sorted(p for p in reference.keys() | found.keys() if reference.get(p) != found.get(p))
                identical += not differing
                if run:
                    print(f"run {run + 1}: {'identical' if not differing else 'DIFFERS: ' + ', '.join(differing)}, "
                          f"{seconds[-1]:.1f} s", flush=True)
    result = {"runs": args.runs, "byte_identical": identical, "input": described,
              "config": {"batch_size": config.batch_size, "rows_per_shard": config.rows_per_shard,
                         "lexeme_actors": config.lexeme_actors, "regions": config.regions},
              "seconds_per_run": round(sum(seconds) / len(seconds), 1)}
    print(f"{identical} of {args.runs} runs byte-identical to the first (shards and rejects, sha256), "
          f"under a CPU burner; {result['seconds_per_run']} s per run")
    return result


if __name__ == "__main__":
    main()

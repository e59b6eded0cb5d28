"""bench/gpu.sh, the GPU check, in its CPU dry run: every step it would run on a GPU runs here, so
the script cannot rot between sessions that have a GPU."""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_prints_and_writes_one_table(tmp_path):
    result = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OUT": str(tmp_path)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = (tmp_path / "gpu.md").read_text()
    assert written.strip() in result.stdout
    rows = [line for line in written.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert [row.split(" | ")[0][2:].split(",")[0].split(" ")[0] for row in rows] == \
        ["jobs.smoke", "bench.step", "bench.train", "bench.evaluate"]
    for row in rows:
        numbers = [float(n) for n in re.findall(r"-?\d+\.\d+", row.split(" | ")[1])]
        assert numbers and all(math.isfinite(n) and n >= 0 for n in numbers), row
    assert "INFO" not in result.stdout

"""bench/gpu.sh, the GPU check, in its CPU dry run: every step it would run on a GPU runs here, so
the script cannot rot between sessions that have a GPU; and a figure that cannot be right fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench import gpu

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_prints_and_writes_one_table_of_possible_figures(tmp_path):
    # The interpreter running the tests, not the script's default .venv/bin/python.
    result = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}, timeout=480)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    written = (tmp_path / "gpu.md").read_text()
    assert written.strip() in result.stdout
    rows = [line for line in written.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert [row.split(" | ")[0][2:].split(",")[0].split(" ")[0] for row in rows] == \
        ["jobs.smoke", "bench.step", "bench.train", "bench.evaluate"]
    assert all(row.rstrip(" |").endswith("possible") for row in rows), rows
    assert "INFO" not in result.stdout


def test_impossible_figures_fail_their_row():
    assert gpu.impossible({"stage": ("rate", 120.0), "ratio": ("ratio", 0.9), "loss": ("loss", 2.3)}) == []
    assert gpu.impossible({"Ray Data stage": ("rate", -112.0), "ratio": ("ratio", -0.09)}) == \
        ["Ray Data stage = -112", "ratio = -0.09"]
    assert gpu.impossible({"rate": ("rate", 0.0), "loss": ("loss", float("nan")), "r": ("ratio", 570.0)}) == \
        ["rate = 0", "loss = nan", "r = 570"]
    assert gpu.impossible({"Ray Data vs forward": ("ratio", 0.046)}) == []  # measured on the dry run: slow, not broken

#!/usr/bin/env bash
# The project's GPU check (bench/gpu.py): jobs.smoke with bf16, bench.step on ViT-B-16 (samples/s,
# HarmoCLIP/GC-only ratio, MFU), bench.train with one GPU worker (Ray-fed vs in-memory) and
# bench.evaluate on the GPU, printed as one table and written to $OUT/gpu.md when OUT is set.
# At most 8 minutes. On a CPU machine: bash bench/gpu.sh --dry-run (tiny sizes, about two minutes).
# PYTHON picks the interpreter (default: the project's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec timeout 480 "${PYTHON:-.venv/bin/python}" -m bench.gpu "$@"

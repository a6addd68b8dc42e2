#!/usr/bin/env bash
# Create a virtualenv (Python 3.11) and install a requirements file into it; re-installs only when
# that file changed. Default: .venv from requirements.txt (used by run_sample.sh and test.sh).
# Usage: setup.sh [VENV_DIR REQUIREMENTS_FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
REQS="${2:-requirements.txt}"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
want="$(sha256sum "$REQS" | cut -d' ' -f1)"
if [ "$(cat "$VENV/.requirements.sha" 2>/dev/null || true)" != "$want" ]; then
    echo "Installing $REQS into $VENV (first time: several minutes)..."
    "$VENV/bin/pip" install --disable-pip-version-check -q -r "$REQS"
    echo "$want" > "$VENV/.requirements.sha"
fi

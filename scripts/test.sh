#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite (real MONAI Label servers on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"

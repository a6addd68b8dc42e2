#!/usr/bin/env bash
# Set up (if needed: .venv, the slicer-core .venv-slicer and nnU-Net's .venv-nnunet) and run the whole test suite
# (real MONAI Label servers on 127.0.0.1; Slicer's MRML classes from slicer-core).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_slicer.sh
.venv/bin/python benchmarks/peer_inference.py --setup   # nnU-Net v2 in .venv-nnunet (tests/test_nnunet_import.py)
# real components the tests start on 127.0.0.1: Orthanc (PACS) and headless Chromium (OHIF)
bash scripts/orthanc.sh install
bash scripts/browser.sh install
# lint: any finding or unformatted file fails the run (config: ruff.toml)
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"

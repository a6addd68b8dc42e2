#!/usr/bin/env bash
# Create .venv-slicer (slicer-core: Slicer's MRML scene and segmentations logic without the
# application) for the Slicer module's scene tests. Called by test.sh.
set -euo pipefail
exec bash "$(dirname "$0")/setup.sh" .venv-slicer requirements-slicer.txt

#!/usr/bin/env bash
# Set up (if needed) and start the MONAI Label server on the embedded sample:
# six hippocampus MRI studies (four labelled) and a UNet3D trained by this project.
# Environment: HOST (default 127.0.0.1), PORT (default 8000), WORK (default ./work).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORK="${WORK:-work}"
mkdir -p "$WORK"
if [ ! -d "$WORK/sample_studies" ]; then
    cp -r sample/studies "$WORK/sample_studies"   # the server writes into its studies folder
fi
echo "Serving $WORK/sample_studies on http://${HOST:-127.0.0.1}:${PORT:-8000} (Ctrl-C to stop)"
exec .venv/bin/python -m monailabel.main start_server \
    --app apps/unet_seg --studies "$WORK/sample_studies" \
    --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" \
    --conf models unet3d \
    --conf preset small --conf roi_size 40,56,40 \
    --conf unet3d.pretrained sample/models/unet3d_hippocampus_small.pt \
    --conf model_dir "$WORK/model" "$@"

#!/usr/bin/env bash
# The sample on a real PACS, in one command: set up (if needed), start Orthanc with DICOMweb on
# 127.0.0.1 (Debian packages, its own folder and pid), store the six sample volumes in it as MR
# series (once), and serve them with the sample UNet3D; OHIF at http://127.0.0.1:8000/ohif/.
# Ctrl-C stops the server and Orthanc.
# Environment: PORT (server, default 8000; OHIF's MONAI Label panel assumes 8000), PACS_PORT
# (default 8042), WORK (default ./work). Extra arguments go to start_server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORK="${WORK:-work}"
PACS_PORT="${PACS_PORT:-8042}"
PACS="http://127.0.0.1:$PACS_PORT/dicom-web"
mkdir -p "$WORK"
bash scripts/orthanc.sh start "$WORK/orthanc" "$PACS_PORT"
trap 'bash scripts/orthanc.sh stop "$WORK/orthanc"' EXIT
if [ ! -f "$WORK/orthanc/loaded.json" ]; then
    .venv/bin/python scripts/load_pacs.py --url "$PACS" --images sample/studies --modality MR \
        > "$WORK/orthanc/loaded.json.tmp"
    mv "$WORK/orthanc/loaded.json.tmp" "$WORK/orthanc/loaded.json"
fi
echo "Serving the PACS $PACS on http://127.0.0.1:${PORT:-8000} (OHIF: /ohif/; Ctrl-C to stop)"
MONAI_LABEL_DICOMWEB_CACHE_PATH="$WORK/pacs_cache" .venv/bin/python -m monailabel.main start_server \
    --app apps/unet_seg --studies "$PACS" \
    --host 127.0.0.1 --port "${PORT:-8000}" \
    --conf models unet3d \
    --conf preset small --conf roi_size 40,56,40 \
    --conf unet3d.pretrained sample/models/unet3d_hippocampus_small.pt \
    --conf model_dir "$WORK/pacs_model" "$@"

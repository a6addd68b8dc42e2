"""Store NIfTI volumes in a PACS as DICOM series (STOW-RS), with exact geometry; prints what it stored.

    .venv/bin/python scripts/load_pacs.py --url http://127.0.0.1:8042/dicom-web --images sample/studies \\
        --modality MR

Each ``*.nii.gz`` in ``--images`` becomes one study with one series (patient id = file name without
extension, series description ``unet_seg sample``). ``ORTHANC_USER`` / ``ORTHANC_PASSWORD`` are
sent as HTTP basic auth when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "unet_seg"))

from lib.dicomseries import store, volume_to_series  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    p.add_argument("--images", required=True, help="folder of .nii.gz volumes")
    p.add_argument("--modality", default="MR", choices=("MR", "CT"))
    args = p.parse_args()
    auth = (
        {"username": os.environ["ORTHANC_USER"], "password": os.environ.get("ORTHANC_PASSWORD", "")}
        if os.environ.get("ORTHANC_USER")
        else {}
    )
    stored = []
    for path in sorted(Path(args.images).glob("*.nii.gz")):
        img = nib.load(path)
        name = path.name[: -len(".nii.gz")]
        series = volume_to_series(
            np.asanyarray(img.dataobj),
            img.affine,
            modality=args.modality,
            patient_id=name,
            patient_name=f"{name}^",
            series_description="unet_seg sample",
        )
        store(args.url, series, **auth)
        stored.append(
            {
                "file": path.name,
                "study": series[0].StudyInstanceUID,
                "series": series[0].SeriesInstanceUID,
                "slices": len(series),
            }
        )
    print(json.dumps(stored, indent=2))


if __name__ == "__main__":
    main()

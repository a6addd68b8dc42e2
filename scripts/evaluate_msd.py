"""Per-class Dice of a published unet_seg model on MSD-style cases, through the app's own inferer.

Runs the same code path as ``POST /infer/<model>`` (pre-processing, sliding window, optional flip
TTA, inverse to the original geometry) on every case of ``--data`` that is NOT in ``--exclude``
(a studies folder, e.g. the one the model was trained from), so the figures are on held-out
cases. Example::

    .venv/bin/python scripts/evaluate_msd.py --data ../shared/data/hippocampus \\
        --model-file runs/hippo120/model/unet3d.pt --exclude runs/hippo120/studies --tta
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import nibabel as nib
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_DIR = os.path.join(ROOT, "apps", "unet_seg")
sys.path.insert(0, APP_DIR)

from lib.checkpoints import CheckpointMeta, read_checkpoint  # noqa: E402
from lib.configs import conf_from_meta  # noqa: E402
from lib.metrics import dice_per_class  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model-file", required=True)
    p.add_argument("--model", default="unet3d")
    p.add_argument("--exclude", default=None, help="folder whose *.nii.gz names are left out (training cases)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--tta", action="store_true")
    p.add_argument("--out", default=None, help="write the JSON summary here")
    args = p.parse_args()

    meta = CheckpointMeta.from_dict(read_checkpoint(args.model_file)[1])
    labels = meta.labels
    with open(os.path.join(args.data, "dataset.json"), encoding="utf-8") as f:
        items = json.load(f)["training"]
    excluded = set(os.listdir(args.exclude)) if args.exclude else set()
    items = [it for it in items if os.path.basename(it["image"]) not in excluded][: args.limit]

    os.environ.setdefault("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")
    from main import UNetSegApp

    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "studies"))
        conf = {
            "models": args.model,
            "model_dir": os.path.join(tmp, "model"),
            "pretrained": os.path.abspath(args.model_file),
            "tracking": "none",
            **conf_from_meta(args.model, meta),
        }
        app = UNetSegApp(APP_DIR, os.path.join(tmp, "studies"), conf)
        per_case, times = [], []
        for it in items:
            img = os.path.abspath(os.path.join(args.data, it["image"]))
            ref = np.rint(np.asanyarray(nib.load(os.path.join(args.data, it["label"])).dataobj)).astype(int)
            t = time.time()
            res = app.infer({"model": args.model, "image": img, "tta": args.tta})
            times.append(time.time() - t)
            pred = np.asanyarray(nib.load(res["file"]).dataobj)
            os.remove(res["file"])
            per_case.append(dice_per_class(pred, ref, labels))
    mean = {k: float(np.nanmean([c[k] for c in per_case])) for k in labels}
    summary = {
        "cases": len(per_case),
        "tta": args.tta,
        "model_version": meta.get("version"),
        "dice_per_class": mean,
        "mean_dice": float(np.mean(list(mean.values()))),
        "seconds_per_case_median": float(np.median(times)),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()

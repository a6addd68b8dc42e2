"""Train a unet_seg model on an MSD-style dataset (dataset.json + imagesTr/labelsTr) without a server.

It lays the dataset out as a MONAI Label studies folder (symlinks: images + labels/final) and
runs the app's own trainer exactly as ``POST /train/<model>`` does, then prints the per-class
validation Dice of the published model. Used to make the embedded sample model and to report
real training runs, e.g.::

    .venv/bin/python scripts/train_msd.py --data ../shared/data/hippocampus --out runs/hippo \\
        --preset small --roi 40,56,40 --epochs 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_DIR = os.path.join(ROOT, "apps", "unet_seg")


def build_studies(data: str, studies: str, limit: int | None, seed: int) -> int:
    """Symlink the MSD training cases (a seeded random ``limit`` of them) into a studies layout; returns the count."""
    sys.path.insert(0, APP_DIR)
    from lib.datasets import link_studies, load_cases  # noqa: E402

    cases = load_cases(data, "training")
    if limit:
        cases = random.Random(seed).sample(cases, min(limit, len(cases)))
    return link_studies(cases, studies)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="MSD-style folder with dataset.json")
    p.add_argument("--out", required=True, help="output folder (studies/ and model/ are created inside)")
    p.add_argument("--model", default="unet3d")
    p.add_argument("--labels", default=None, help="label names (default: dataset.json labels)")
    p.add_argument("--preset", default="small")
    p.add_argument("--roi", default="40,56,40")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=None, help="default: the model's (unet3d 2, nnU-Net from its plan)")
    p.add_argument("--lr", type=float, default=None, help="default: the model's (unet3d 2e-4, nnU-Net 0.01)")
    p.add_argument("--iterations", type=int, default=None, help="nnU-Net: iterations per epoch")
    p.add_argument("--val_split", type=float, default=0.2)
    p.add_argument(
        "--dropout", type=float, default=0.0, help="dropout rate (conf dropout; lets the epistemic strategy sample it)"
    )
    p.add_argument("--limit", type=int, default=None, help="use only this many cases (random, seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world_size", type=int, default=1)
    p.add_argument("--amp", default="true")
    p.add_argument("--tracking", default="none")
    args = p.parse_args()

    with open(os.path.join(args.data, "dataset.json"), encoding="utf-8") as f:
        ds_labels = json.load(f).get("labels", {})
    labels = args.labels or ",".join(
        v.lower() for k, v in sorted(ds_labels.items(), key=lambda kv: int(kv[0])) if int(k) != 0
    )
    studies = os.path.join(args.out, "studies")
    n = build_studies(args.data, studies, args.limit, args.seed)
    os.environ.setdefault("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")
    sys.path.insert(0, APP_DIR)
    from main import UNetSegApp  # noqa: E402  (the app's own module)

    conf = {
        "models": args.model,
        "model_dir": os.path.join(args.out, "model"),
        "labels": labels,
        "preset": args.preset,
        "roi_size": args.roi,
        "tracking": args.tracking,
        "dropout": str(args.dropout),
    }
    app = UNetSegApp(APP_DIR, studies, conf)
    start = time.time()
    request = {
        "model": args.model,
        "max_epochs": args.epochs,
        "val_split": args.val_split,
        "split_seed": args.seed,
        "world_size": args.world_size,
        "amp": args.amp,
    }
    for key, value in (
        ("train_batch_size", args.batch),
        ("learning_rate", args.lr),
        ("iterations_per_epoch", args.iterations),
    ):
        if value is not None:
            request[key] = value
    stats = app.train(request)
    wall = time.time() - start
    summary = {
        "cases": n,
        "train_cases": stats.get("train_cases"),
        "val_cases": stats.get("val_cases"),
        "model": args.model,
        "epochs": args.epochs,
        "iterations_per_epoch": args.iterations,
        "preset": args.preset if args.model == "unet3d" else None,
        "roi": args.roi if args.model == "unet3d" else None,
        "wall_time_s": round(wall, 1),
        "best_val_mean_dice": stats.get("published", {}).get("val_mean_dice"),
        "best_epoch": stats.get("published", {}).get("epoch"),
        "last_epoch_val_dice_per_class": stats.get("val_dice_per_class"),
        "gate": stats.get("gate"),
    }
    store = app.model_store(args.model)
    version = stats.get("version") or store.serving().id
    meta = store.meta(version)
    summary["published_model"] = store.path(version)  # the run's version file (copy it to ship the model)
    summary["best_val_dice_per_class"] = dict(meta.validation.per_class) if meta.validation else None
    if meta.plan:
        summary["plan"] = {
            k: meta.plan.get(k) for k in ("patch_size", "batch_size", "target_spacing", "filters", "strides")
        }
        summary["postprocessing"] = meta.postprocessing
    print(json.dumps(summary, indent=2))
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()

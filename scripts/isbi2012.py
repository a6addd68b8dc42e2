"""Train UNet2D on ISBI 2012 EM slices and evaluate on held-out slices with the reference's metrics.

Lays the chosen slices out as a MONAI Label studies folder (PNG symlinks, labels/final), runs
the app's own trainer exactly as ``POST /train/unet2d`` does, then evaluates the published
model on the evaluation slices through the inferer's own pre-processing and the shared engine
(sliding window, Gaussian blending, optional flip TTA): soft Dice over both classes (NVIDIA
UNet_Medical's figure), foreground (cell) Dice, and the ISBI challenge's foreground-restricted
V_rand and V_info after border thinning. Example::

    .venv/bin/python scripts/isbi2012.py --data ../shared/data/isbi2012 --out runs/isbi \\
        --train 0-15 --eval 16-21 --preset small --epochs 40 --tta
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_DIR = os.path.join(ROOT, "apps", "unet_seg")


def parse_range(text: str) -> list[int]:
    """'0-15' or '0,2,5-7' -> list of ints."""
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="isbi2012 folder with train/image and train/label PNGs")
    p.add_argument("--out", required=True)
    p.add_argument("--train", default="0-15", help="training slice numbers (default 0-15)")
    p.add_argument("--eval", default="16-21", help="evaluation slice numbers (default 16-21)")
    p.add_argument("--preset", default="small")
    p.add_argument("--padding", default="same")
    p.add_argument("--roi", default="256")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=4, help="random windows per slice per epoch")
    p.add_argument("--lr", type=float, default=0.0, help="0: the optimizer's default")
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--loss", default="ce_dice")
    p.add_argument("--val_split", type=float, default=0.2)
    p.add_argument("--tta", action="store_true")
    p.add_argument("--amp", default="true")
    p.add_argument("--skip_train", action="store_true", help="only evaluate the published model in --out")
    args = p.parse_args()

    studies = os.path.join(args.out, "studies")
    os.makedirs(os.path.join(studies, "labels", "final"), exist_ok=True)
    for i in parse_range(args.train):
        for sub, dst in (("image", studies), ("label", os.path.join(studies, "labels", "final"))):
            target = os.path.join(dst, f"isbi_{i:02d}.png")
            if not os.path.lexists(target):
                os.symlink(os.path.abspath(os.path.join(args.data, "train", sub, f"{i}.png")), target)

    sys.path.insert(0, APP_DIR)
    import numpy as np  # noqa: E402
    import torch  # noqa: E402
    from monai.transforms import LoadImage  # noqa: E402

    from lib.inference import predict_volume  # noqa: E402
    from lib.metrics import scores_2d  # noqa: E402
    from lib.runtime import resolve_amp  # noqa: E402
    from main import UNetSegApp  # noqa: E402

    conf = {
        "models": "unet2d",
        "model_dir": os.path.join(args.out, "model"),
        "preset": args.preset,
        "padding": args.padding,
        "roi_size": args.roi,
        "tracking": "none",
    }
    app = UNetSegApp(APP_DIR, studies, conf)
    summary: dict = {
        "train_slices": args.train,
        "eval_slices": args.eval,
        "preset": args.preset,
        "padding": args.padding,
        "roi": args.roi,
        "epochs": args.epochs,
        "optimizer": args.optimizer,
        "loss": args.loss,
    }
    if not args.skip_train:
        start = time.time()
        stats = app.train(
            {
                "model": "unet2d",
                "max_epochs": args.epochs,
                "train_batch_size": args.batch,
                "num_samples": args.samples,
                "learning_rate": args.lr,
                "optimizer": args.optimizer,
                "loss": args.loss,
                "val_split": args.val_split,
                "amp": args.amp,
            }
        )
        summary.update(
            {
                "train_wall_time_s": round(time.time() - start, 1),
                "train_cases": stats.get("train_cases"),
                "val_cases": stats.get("val_cases"),
                "best_val_dice": stats.get("published", {}).get("val_mean_dice"),
                "best_epoch": stats.get("published", {}).get("epoch"),
            }
        )

    task = app.infer_task("unet2d")
    device = torch.device("cpu")
    net, meta = task.load_network(device)
    amp = resolve_amp(args.amp, device)
    per_image = {}
    loader = LoadImage(image_only=True)
    for i in parse_range(args.eval):
        image = os.path.join(args.data, "train", "image", f"{i}.png")
        data = task.run_pre_transforms({"image": image}, task.pre_transforms())
        t0 = time.time()
        probs = predict_volume(
            net,
            torch.as_tensor(data["image"])[None],
            meta["roi_size"],
            slice_axis=meta.get("slice_axis"),
            tta=args.tta,
            amp=amp,
            device=device,
        )[0]
        seconds = time.time() - t0
        ref = (np.asarray(loader(os.path.join(args.data, "train", "label", f"{i}.png"))) > 127).astype(np.int64)
        scores = scores_2d(probs, ref)
        scores["seconds"] = round(seconds, 3)
        per_image[str(i)] = scores
        print(i, {k: round(v, 4) for k, v in scores.items()}, flush=True)
    keys = ["soft_dice", "dice", "v_rand", "v_info"]
    summary.update(
        {
            "tta": args.tta,
            "model_version": meta.get("version"),
            "per_image": per_image,
            "mean": {k: float(np.mean([s[k] for s in per_image.values()])) for k in keys},
        }
    )
    print(json.dumps(summary["mean"], indent=2))
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()

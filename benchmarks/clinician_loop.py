"""One full clinician loop against a real server, timed: next study -> segmentation -> submit -> retrained model served.

Builds a studies folder from MSD Task04 Hippocampus cases the sample model never saw (its
training cases are the seeded random 120 of ``scripts/train_msd.py --limit 120 --seed 0``):
``--labelled`` of them with their expert labels, ``--unlabelled`` without. Starts the real
MONAI Label server (unet3d, the embedded sample model, automatic retraining after ``--rounds``
new final labels, ``--epochs`` of fine-tuning), then plays the annotator ``--rounds`` times:

1. ``POST /activelearning/<strategy>`` (the study the model is least sure about),
2. ``POST /infer/unet3d`` with flip TTA (what the annotator waits for in Slicer),
3. ``PUT /datastore/label`` with the expert label standing in for the corrected segmentation.

The last submission triggers retraining; the script times submit -> a newer model version on
/info (the trainer publishes each better checkpoint as it goes) and submit -> training done,
and reports the Dice of the served segmentations before correction, and of the first and
retrained model on the studies still unlabelled (the first model's segmentations of every
unlabelled study are made once before the loop as the baseline, so the server is warm).
Writes ``<out>/clinician_loop.json``.

    .venv/bin/python benchmarks/clinician_loop.py --data ../shared/data/hippocampus --out runs/loop
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "unet_seg"
sys.path.insert(0, str(APP_DIR))

from lib.checkpoints import CheckpointMeta, read_checkpoint  # noqa: E402
from lib.datasets import load_cases  # noqa: E402
from lib.metrics import dice_per_class  # noqa: E402
from lib.serverproc import running_server  # noqa: E402


def unseen_cases(data: str, limit: int = 120, seed: int = 0) -> list:
    """Labelled training cases NOT among the sample model's seeded random ``limit`` (sorted by name)."""
    cases = load_cases(data, "training")
    used = {c.name for c in random.Random(seed).sample(cases, min(limit, len(cases)))}
    return sorted((c for c in cases if c.name not in used and c.label), key=lambda c: c.name)


def dice(pred_path: str, truth_path: str) -> float:
    """Mean Dice over the labels present in the truth (anterior, posterior)."""
    pred = np.asanyarray(nib.load(pred_path).dataobj).astype(np.int64)
    truth = np.asanyarray(nib.load(truth_path).dataobj).astype(np.int64)
    per = dice_per_class(pred, truth, {str(v): int(v) for v in np.unique(truth).tolist() if v})
    return float(np.mean(list(per.values())))


def infer(url: str, image_id: str, out: Path, tta: bool = True) -> tuple[Path, float]:
    t0 = time.time()
    r = requests.post(
        f"{url}/infer/unet3d",
        params={"image": image_id, "output": "image"},
        data={"params": json.dumps({"tta": tta})},
        timeout=600,
    )
    r.raise_for_status()
    out.write_bytes(r.content)
    return out, time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="MSD Task04 Hippocampus folder (dataset.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--labelled", type=int, default=30)
    p.add_argument("--unlabelled", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="submissions per retraining (auto_retrain_after)")
    p.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs of the automatic retraining")
    p.add_argument("--strategy", default="uncertainty")
    p.add_argument(
        "--model_file",
        default=str(ROOT / "sample" / "models" / "unet3d_hippocampus_small.pt"),
        help="unet3d checkpoint served first (preset small, roi 40x56x40; default the embedded sample model)",
    )
    p.add_argument("--strategy_params", default="{}", help="JSON body extras, e.g. '{\"dropout\": 0.2}' for epistemic")
    args = p.parse_args()

    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    studies, truth_dir, segs = out / "studies", out / "truth", out / "segs"
    for d in (studies / "labels" / "final", truth_dir, segs):
        d.mkdir(parents=True)
    cases = unseen_cases(args.data)
    if len(cases) < args.labelled + args.unlabelled:
        raise SystemExit(f"only {len(cases)} unseen labelled cases; ask for fewer")
    for i, case in enumerate(cases[: args.labelled + args.unlabelled]):
        shutil.copy(case.image, studies / f"{case.name}.nii.gz")
        shutil.copy(
            case.label, (studies / "labels" / "final" if i < args.labelled else truth_dir) / f"{case.name}.nii.gz"
        )
    unlabelled = sorted(p.name[:-7] for p in truth_dir.glob("*.nii.gz"))

    conf = {
        "models": "unet3d",
        "preset": "small",
        "roi_size": "40,56,40",
        "tracking": "none",
        "unet3d.pretrained": str(Path(args.model_file).resolve()),
        "model_dir": str(out / "model"),
        "auto_retrain_after": str(args.rounds),
        "max_epochs": str(args.epochs),
        # retraining keeps the model's rate
        "dropout": str(CheckpointMeta.from_dict(read_checkpoint(args.model_file)[1]).spec.get("dropout", 0.0)),
    }
    report: dict = {
        "labelled": args.labelled,
        "unlabelled": args.unlabelled,
        "rounds": args.rounds,
        "epochs": args.epochs,
        "strategy": args.strategy,
        "strategy_params": json.loads(args.strategy_params),
        "cpu_threads": os.cpu_count(),
    }
    t_start = time.time()
    with running_server(studies, conf, out / "server.log") as srv:
        report["server_start_s"] = round(time.time() - t_start, 1)
        v1 = requests.get(f"{srv.url}/info/", timeout=30).json()["models"]["unet3d"]["version"]
        # the served model before any submission (baseline)
        first_model = {
            i: dice(str(infer(srv.url, i, segs / f"{i}_v1.nii.gz")[0]), str(truth_dir / f"{i}.nii.gz"))
            for i in unlabelled
        }
        rounds = []
        for _ in range(args.rounds):
            t0 = time.time()
            nxt = requests.post(
                f"{srv.url}/activelearning/{args.strategy}",
                json={"client_id": "bench", **json.loads(args.strategy_params)},
                timeout=1800,
            )
            nxt.raise_for_status()
            image_id, t_next = nxt.json()["id"], time.time() - t0
            seg, t_infer = infer(srv.url, image_id, segs / f"{image_id}_v1.nii.gz")
            t0 = time.time()
            with open(truth_dir / f"{image_id}.nii.gz", "rb") as f:
                reply = requests.put(
                    f"{srv.url}/datastore/label",
                    params={"image": image_id, "tag": "final"},
                    files={"label": (f"{image_id}.nii.gz", f)},
                    timeout=120,
                )
            reply.raise_for_status()
            t_submit_call = time.time() - t0
            submitted_at = time.time()
            rounds.append(
                {
                    "id": image_id,
                    "score": nxt.json().get("score"),
                    "next_s": round(t_next, 2),
                    "infer_tta_s": round(t_infer, 2),
                    "request_to_segmentation_s": round(t_next + t_infer, 2),
                    "dice_before_correction": round(dice(str(seg), str(truth_dir / f"{image_id}.nii.gz")), 4),
                    "submit_s": round(t_submit_call, 2),
                    "reply": reply.json(),
                }
            )
            print(json.dumps(rounds[-1]), flush=True)
        retrain = rounds[-1]["reply"].get("retrain")
        if not retrain or not retrain.get("task"):
            raise SystemExit(f"the last submission did not start retraining: {rounds[-1]['reply']}")
        report["train_status"] = srv.wait_train_done(timeout=3600, poll_s=0.5).get("status")
        # the promotion gate decides at the end
        report["submit_to_training_done_s"] = round(time.time() - submitted_at, 1)
        models = requests.get(f"{srv.url}/info/", timeout=30).json()["models"]["unet3d"]
        v3 = models["version"]
        report["model_before"], report["model_after"] = v1, v3
        # gate figures
        report["retrained_version"] = next((r for r in models["versions"] if r["source"] == "trained"), None)
        remaining = [i for i in unlabelled if i not in {r["id"] for r in rounds}]
        after, t_after = [], []
        for i in remaining:
            path, t = infer(srv.url, i, segs / f"{i}_v2.nii.gz")
            after.append(dice(str(path), str(truth_dir / f"{i}.nii.gz")))
            t_after.append(t)
        report["rounds"] = rounds
        key = f"{args.strategy}_unet3d"
        scores = {
            i: requests.get(f"{srv.url}/datastore/image/info", params={"image": i}, timeout=30).json().get(key)
            for i in unlabelled
        }
        scored = [i for i in unlabelled if scores.get(i) is not None]
        report["first_model_dice"] = {i: round(first_model[i], 4) for i in unlabelled}
        report["scores"] = {i: round(scores[i], 4) for i in scored}
        if len(scored) > 2:  # does a higher score mean a worse segmentation? (Spearman rank correlation)
            from scipy.stats import spearmanr

            rho = spearmanr([scores[i] for i in scored], [first_model[i] for i in scored])
            report["spearman_score_vs_dice"] = round(float(rho.statistic), 3)
        report["remaining"] = remaining
        report["dice_first_model_remaining"] = (
            round(float(np.mean([first_model[i] for i in remaining])), 4) if remaining else None
        )
        report["dice_after_retrain_remaining"] = round(float(np.mean(after)), 4) if after else None
        report["infer_tta_s_median"] = round(statistics.median([r["infer_tta_s"] for r in rounds] + t_after), 2)
    report["total_s"] = round(time.time() - t_start, 1)
    (out / "clinician_loop.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()

"""Pre-annotation throughput and what it costs an annotator, against a real server.

Starts the real MONAI Label server (unet3d, the embedded sample model) on ``--studies`` copied
studies of MSD Task04 Hippocampus (``imagesTr``, no labels), then, ``--runs`` times for each
setting (no TTA, 8-flip TTA):

1. ``POST /batch/infer/unet3d?images=all`` and poll ``GET /batch/infer/`` until DONE: studies per
   minute (the job's own count and wall time);
2. while a job runs, one interactive ``POST /infer/unet3d`` (no TTA): its latency, beside the same
   request on an idle server: what an annotator waits while pre-annotation runs;
3. ``POST /activelearning/first`` on a pre-annotated study + ``GET /datastore/label?tag=prediction``:
   the stored prediction opened without inference.

A job skips studies whose stored prediction the serving version made, so each run says
``"force": true``. Prints a table and writes ``<out>/preannotation.json``.

    .venv/bin/python benchmarks/preannotation.py --data ../shared/data/hippocampus --out runs/preannotation
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "unet_seg"))

from lib.serverproc import running_server, sample_conf  # noqa: E402


def wait_job(url: str, timeout: float = 3600) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        status = requests.get(f"{url}/batch/infer/", timeout=30).json()
        if status["status"] != "RUNNING":
            return status
        time.sleep(0.2)
    raise TimeoutError(status)


def infer_s(url: str, image: str) -> float:
    t = time.perf_counter()
    r = requests.post(f"{url}/infer/unet3d", params={"image": image, "output": "image"}, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hippocampus"))
    ap.add_argument("--out", default="runs/preannotation")
    ap.add_argument("--studies", type=int, default=24)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    studies = out / "studies"
    studies.mkdir(parents=True)
    for path in sorted((Path(args.data) / "imagesTr").glob("*.nii.gz"))[: args.studies]:
        shutil.copy(path, studies / path.name)
    ids = sorted(p.name[: -len(".nii.gz")] for p in studies.glob("*.nii.gz"))
    conf = sample_conf(
        model_dir=str(out / "model"),
    )
    rows = []
    with running_server(studies, conf, out / "server.log") as srv:  # automatic re-scoring off (LabelServer)
        infer_s(srv.url, ids[0])  # warm
        idle = statistics.median(infer_s(srv.url, ids[0]) for _ in range(3))
        for tta in (False, True):
            per_minute, busy = [], []
            for _ in range(args.runs):
                r = requests.post(
                    f"{srv.url}/batch/infer/unet3d", params={"images": "all"}, json={"tta": tta, "force": True}
                )
                r.raise_for_status()
                time.sleep(0.5)
                busy.append(infer_s(srv.url, ids[-1]))
                status = wait_job(srv.url)
                assert status["status"] == "DONE" and status["failed"] == 0, status
                per_minute.append(60.0 * status["done"] / status["elapsed_s"])
            rows.append(
                {
                    "tta": tta,
                    "studies": len(ids),
                    "per_minute_median": round(statistics.median(per_minute), 1),
                    "per_minute_runs": [round(v, 1) for v in per_minute],
                    "interactive_infer_idle_s": round(idle, 3),
                    "interactive_infer_during_job_s": round(statistics.median(busy), 3),
                }
            )
        t = time.perf_counter()
        nxt = requests.post(f"{srv.url}/activelearning/first", json={}, timeout=60).json()
        label = requests.get(f"{srv.url}/datastore/label", params={"label": nxt["id"], "tag": "prediction"}, timeout=60)
        label.raise_for_status()
        opened = time.perf_counter() - t
    result = {"rows": rows, "next_study_with_stored_prediction_s": round(opened, 3), "prediction": nxt["prediction"]}
    (out / "preannotation.json").write_text(json.dumps(result, indent=2))
    print("| TTA | studies | studies/min (median) | runs | /infer idle s | /infer during job s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {'8 flips' if r['tta'] else 'off'} | {r['studies']} | {r['per_minute_median']} | "
            f"{r['per_minute_runs']} | {r['interactive_infer_idle_s']} | {r['interactive_infer_during_job_s']} |"
        )
    print(f"next study + stored prediction download: {opened:.3f} s ({nxt['prediction']})")


if __name__ == "__main__":
    main()

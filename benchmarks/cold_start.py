"""Cold start: one volume end to end through ``main.py predict`` against a bare ``import torch``, and server start-up.

Each figure is the median of ``--runs`` fresh processes, run in turn on the same machine:

* ``python -c "import torch"``: the floor every PyTorch tool pays;
* ``main.py predict --config unet3d --ckpt <sample model> --tta --amp true`` on one sample volume, with the
  fast path (``--engine auto``, the default) and with the app's inferer (``--engine app``);
* a real ``monailabel start_server`` on the sample studies, from launch until ``/info/`` answers.

    .venv/bin/python benchmarks/cold_start.py --runs 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "unet_seg"))

from lib.serverproc import SAMPLE_MODEL, LabelServer, sample_conf  # noqa: E402


def wall(cmd: list[str]) -> float:
    """Seconds a fresh process takes from launch to exit (it must succeed)."""
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=900)
    seconds = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed:\n{r.stderr[-3000:]}")
    return seconds


def server_start(work: Path, run: int) -> float:
    """Seconds from launching the sample server (a fresh copy of the studies and model dir) until /info/ answers."""
    studies = work / f"studies{run}"
    shutil.copytree(ROOT / "sample" / "studies", studies)
    t = time.perf_counter()
    srv = LabelServer(studies, sample_conf(model_dir=str(work / f"model{run}")), work / f"server{run}.log")
    try:
        srv.wait_ready()
        return time.perf_counter() - t
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--image", default=str(ROOT / "sample" / "studies" / "hippocampus_003.nii.gz"))
    ap.add_argument("--out", default="runs/cold_start.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cold_start_"))
    data = work / "data"
    (data / "images").mkdir(parents=True)
    shutil.copy(args.image, data / "images" / Path(args.image).name)
    (data / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "anterior", "2": "posterior"},
                "test": [f"images/{Path(args.image).name}"],
            }
        )
    )
    predict = [sys.executable, str(ROOT / "main.py"), "predict", "--config", "unet3d", "--data", str(data)]
    predict += ["--ckpt", str(SAMPLE_MODEL), "--tta", "--amp", "true"]
    times: dict[str, list[float]] = {"import torch": [], "predict (fast path)": [], "predict (app)": [], "server": []}
    try:
        for run in range(args.runs):
            times["import torch"].append(wall([sys.executable, "-c", "import torch"]))
            times["predict (fast path)"].append(wall([*predict, "--results", str(work / f"fast{run}")]))
            times["predict (app)"].append(wall([*predict, "--results", str(work / f"app{run}"), "--engine", "app"]))
            times["server"].append(server_start(work, run))
            print(f"run {run + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["import torch"])
    print(f"\n| step | median s of {args.runs} | x import torch |")
    print("|---|---|---|")
    report = {}
    for key, values in times.items():
        m = statistics.median(values)
        report[key] = {
            "median_s": round(m, 3),
            "x_import_torch": round(m / base, 2),
            "runs": [round(v, 3) for v in values],
        }
        print(f"| {key} | {m:.2f} | {m / base:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

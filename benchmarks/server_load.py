"""Does the server stay responsive while it computes? Bursts of concurrent /infer against a real server.

For each scenario and concurrency N the script fires N ``POST /infer/unet3d`` at once (one thread
and one ``requests.Session`` each) and, while they are in flight, polls ``GET /info/`` back to back
(~20 ms apart) from a second thread and ``GET /datastore/?output=stats``, ``GET /train/`` and
``POST /activelearning/first`` round-robin from a third, recording every status code and latency.
The same N inferences are also run once one after the other; ``ratio`` = burst wall / sequential
wall (above 1: the server loses throughput under a burst). A ``503`` with ``Retry-After`` (a full
inference queue) is retried after that many seconds and counted; every inference must end in 200.

Scenarios:

* ``sample``: the embedded sample (hippocampus MRI ~35x50x35, ``sample/models/unet3d_hippocampus_small.pt``),
  concurrency ``--concurrency`` (default 1,8,20).
* ``brats``: a BraTS-sized two-channel volume (240x240x155x2). There is no trained two-channel
  model in the repository, so a second server is given the two ``train/`` cases of
  ``--brats`` (Flair + T1c stacked as a 4-D NIfTI, labels in ``labels/final``), trained briefly
  through ``POST /train/unet3d`` (the figures are about serving, not accuracy), and then
  ``--brats_concurrency`` inferences of a ``validation/`` case uploaded to the datastore as a 4-D file
  are fired (params ``--brats_params`` on top of the others). On CPU one such inference takes minutes.
  ``--skip_brats`` leaves it out.

Every burst is repeated ``--repeats`` times; the table shows the median of the per-run figures and,
with more than one run, their spread (min..max). Writes ``--out`` (JSON, every request's code and
latency) and prints a Markdown table plus the machine, ready for the README. Exit status 1 when an
inference was not answered 200.

    .venv/bin/python benchmarks/server_load.py                       # 1,8,20 x 3 runs + BraTS x 4
    .venv/bin/python benchmarks/server_load.py --quick               # smoke test: 1,4 x 1 run;
                                                                     # tiny BraTS model, 2 at overlap 0
    .venv/bin/python benchmarks/server_load.py --skip_brats --tta    # sample only, flip TTA on every inference
    .venv/bin/python benchmarks/server_load.py --skip_brats --peer   # + the same bursts on MONAI Label's own /infer
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "unet_seg"
sys.path.insert(0, str(APP_DIR))

from lib.serverproc import LabelServer  # noqa: E402

SAMPLE_STUDIES = ROOT / "sample" / "studies"
SAMPLE_MODEL = ROOT / "sample" / "models" / "unet3d_hippocampus_small.pt"
BRATS_DEFAULT = ROOT.parent / "shared" / "data" / "brats" / "brats2015_2mod"
BRATS_MODALITIES = ("Flair_subtrMeanDivStd", "T1c_subtrMeanDivStd")
BRATS_LABEL = "OTMultiClass"
BRATS_LABELS = "necrosis,edema,nonenhancing,enhancing"

#: the per-run figures summarised over repeats (median and min..max)
#: answers of a status endpoint that are not a failure (``GET /train/`` is 404 until a training has run)
EXPECTED_STATUS = {"/train/": {"200", "404"}}
FIGURES = (
    "infer_p50_s",
    "infer_p99_s",
    "info_p50_ms",
    "info_p99_ms",
    "info_max_ms",
    "others_p99_ms",
    "others_max_ms",
    "wall_s",
    "ratio",
)


@dataclass
class Call:
    """One request: endpoint, final status (HTTP code, or the exception's name), latency, 503s retried."""

    endpoint: str
    status: int | str
    latency_s: float
    start_s: float  # relative to the burst's start
    retries_503: int = 0
    nbytes: int = 0


def new_session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # 127.0.0.1: never through a proxy from the environment
    return s


def retry_after_s(reply: requests.Response, default: float = 1.0) -> float:
    """Seconds of a ``Retry-After`` header (a number; ``default`` when missing or a date)."""
    try:
        return max(0.0, float(reply.headers.get("Retry-After", default)))
    except ValueError:
        return default


def infer_call(
    session: requests.Session, url: str, image_id: str, params: Mapping[str, Any], timeout: float, t0: float
) -> Call:
    """``POST /infer/unet3d`` on a datastore image; a 503 is retried after its Retry-After.

    Latency covers all tries.
    """
    start = time.perf_counter()
    retries = 0
    while True:
        left = timeout - (time.perf_counter() - start)
        try:
            r = session.post(
                f"{url}/infer/unet3d",
                params={"image": image_id, "output": "image"},
                files={"params": (None, json.dumps(dict(params)))},
                timeout=max(left, 1.0),
            )
        except requests.RequestException as e:
            return Call("infer", type(e).__name__, time.perf_counter() - start, start - t0, retries)
        if r.status_code == 503 and time.perf_counter() - start + retry_after_s(r) < timeout:
            retries += 1
            time.sleep(retry_after_s(r))
            continue
        return Call("infer", r.status_code, time.perf_counter() - start, start - t0, retries, len(r.content))


def status_call(session: requests.Session, url: str, endpoint: str, t0: float, timeout: float) -> Call:
    """One status request
    (``GET /info/``, ``GET /datastore/?output=stats``, ``GET /train/``, ``POST /activelearning/first``)."""
    start = time.perf_counter()
    try:
        if endpoint == "/activelearning/first":
            r = session.post(f"{url}{endpoint}", json={}, timeout=timeout)
        elif endpoint == "/datastore/":
            r = session.get(f"{url}{endpoint}", params={"output": "stats"}, timeout=timeout)
        else:
            r = session.get(f"{url}{endpoint}", timeout=timeout)
        status: int | str = r.status_code
    except requests.RequestException as e:
        status = type(e).__name__
    return Call(endpoint, status, time.perf_counter() - start, start - t0)


def burst(url: str, n: int, image_id: str, params: Mapping[str, Any], poll_s: float, timeout: float) -> dict[str, Any]:
    """N concurrent inferences while /info and the other status endpoints are polled; every call recorded."""
    go, done = threading.Event(), threading.Event()
    infers: list[Call | None] = [None] * n
    info: list[Call] = []
    others: list[Call] = []
    t0 = 0.0

    def infer_worker(i: int) -> None:
        with new_session() as s:
            go.wait()
            infers[i] = infer_call(s, url, image_id, params, timeout, t0)

    def info_poller() -> None:
        with new_session() as s:
            go.wait()
            while not done.is_set():
                info.append(status_call(s, url, "/info/", t0, timeout))
                time.sleep(poll_s)

    def others_poller() -> None:
        with new_session() as s:
            go.wait()
            for endpoint in itertools.cycle(("/datastore/", "/train/", "/activelearning/first")):
                if done.is_set():
                    break
                others.append(status_call(s, url, endpoint, t0, timeout))
                time.sleep(poll_s)

    workers = [threading.Thread(target=infer_worker, args=(i,), daemon=True) for i in range(n)]
    pollers = [threading.Thread(target=info_poller, daemon=True), threading.Thread(target=others_poller, daemon=True)]
    for t in workers + pollers:
        t.start()
    time.sleep(0.2)  # every thread is waiting on `go`
    t0 = time.perf_counter()
    go.set()
    for t in workers:
        t.join()
    wall = time.perf_counter() - t0
    done.set()  # a poll already sent finishes and counts: it was waiting during the burst
    for t in pollers:
        t.join()
    return {"wall_s": wall, "infers": [c for c in infers if c is not None], "info": info, "others": others}


def sequential(url: str, n: int, image_id: str, params: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """The same N inferences one after the other (one session)."""
    with new_session() as s:
        t0 = time.perf_counter()
        calls = [infer_call(s, url, image_id, params, timeout, t0) for _ in range(n)]
        return {"wall_s": time.perf_counter() - t0, "infers": calls}


def pct(values: list[float], q: float, scale: float = 1.0) -> float | None:
    return round(float(np.percentile(values, q)) * scale, 4 if scale == 1.0 else 1) if values else None


def codes(calls: list[Call]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(str(c.status) for c in calls).items())}


def summarize(run: dict[str, Any], sequential_wall: float) -> dict[str, Any]:
    """The per-run figures of one burst (latencies: infer in s, status endpoints in ms)."""
    lat = [c.latency_s for c in run["infers"]]
    info = [c.latency_s for c in run["info"]]
    others = [c.latency_s for c in run["others"]]
    return {
        "infer_p50_s": pct(lat, 50),
        "infer_p99_s": pct(lat, 99),
        "info_p50_ms": pct(info, 50, 1000),
        "info_p99_ms": pct(info, 99, 1000),
        "info_max_ms": pct(info, 100, 1000),
        "others_p99_ms": pct(others, 99, 1000),
        "others_max_ms": pct(others, 100, 1000),
        "others_by_endpoint_max_ms": {
            ep: pct([c.latency_s for c in run["others"] if c.endpoint == ep], 100, 1000)
            for ep in sorted({c.endpoint for c in run["others"]})
        },
        "wall_s": round(run["wall_s"], 3),
        "ratio": round(run["wall_s"] / sequential_wall, 3) if sequential_wall else None,
        "info_polls": len(info),
        "other_polls": len(others),
        "infer_codes": codes(run["infers"]),
        "infer_503_retries": sum(c.retries_503 for c in run["infers"]),
        "info_codes": codes(run["info"]),
        "other_codes": {
            ep: codes([c for c in run["others"] if c.endpoint == ep])
            for ep in sorted({c.endpoint for c in run["others"]})
        },
        "calls": {
            k: [{**asdict(c), "latency_s": round(c.latency_s, 4), "start_s": round(c.start_s, 4)} for c in run[k]]
            for k in ("infers", "info", "others")
        },
    }


def measure(
    url: str, scenario: str, n: int, image_id: str, params: Mapping[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Sequential once, then ``--repeats`` bursts of N; medians and spread of the per-run figures."""
    seq = sequential(url, n, image_id, params, args.timeout)
    seq_bad = [c for c in seq["infers"] if c.status != 200]
    runs = []
    for r in range(args.repeats):
        run = summarize(burst(url, n, image_id, params, args.poll_ms / 1000, args.timeout), seq["wall_s"])
        runs.append(run)
        print(
            f"  {scenario} N={n} run {r + 1}/{args.repeats}: wall {run['wall_s']:.2f} s "
            f"(sequential {seq['wall_s']:.2f} s), "
            f"infer p50 {run['infer_p50_s']} s, /info p99 {run['info_p99_ms']} ms max {run['info_max_ms']} ms "
            f"({run['info_polls']} polls), codes {run['infer_codes']}",
            flush=True,
        )
    median, spread = {}, {}
    for k in FIGURES:
        vals = [run[k] for run in runs if run[k] is not None]
        median[k] = round(statistics.median(vals), 4) if vals else None
        spread[k] = [min(vals), max(vals)] if vals else None
    non200 = sum(v for run in runs for code, v in run["infer_codes"].items() if code != "200")
    status_non200 = sum(
        v
        for run in runs
        for ep, cs in [("/info/", run["info_codes"]), *run["other_codes"].items()]
        for code, v in cs.items()
        if code not in EXPECTED_STATUS.get(ep, {"200"})
    )
    return {
        "scenario": scenario,
        "concurrent": n,
        "image": image_id,
        "params": dict(params),
        "repeats": args.repeats,
        "sequential_wall_s": round(seq["wall_s"], 3),
        "sequential_codes": codes(seq["infers"]),
        "sequential_non200": len(seq_bad),
        "median": median,
        "spread": spread,
        "non200": non200,
        "infer_503_retries": sum(run["infer_503_retries"] for run in runs),
        "status_non200": status_non200,
        "runs": runs,
    }


def fmt(row: dict[str, Any], key: str, digits: int) -> str:
    med, spread = row["median"][key], row["spread"][key]
    if med is None:
        return "–"
    text = f"{med:.{digits}f}"
    if row["repeats"] > 1 and spread:
        text += f" ({spread[0]:.{digits}f}..{spread[1]:.{digits}f})"
    return text


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | concurrent | infer p50 s | infer p99 s | /info p50 ms | /info p99 ms | /info max ms "
        "| others p99 ms | burst wall s | sequential wall s | ratio | non-200 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        bad = str(row["non200"] + row["sequential_non200"])
        if row["infer_503_retries"]:
            bad += f" ({row['infer_503_retries']}x 503 retried)"
        lines.append(
            f"| {row['scenario']} | {row['concurrent']} | {fmt(row, 'infer_p50_s', 2)} | {fmt(row, 'infer_p99_s', 2)} "
            f"| {fmt(row, 'info_p50_ms', 0)} | {fmt(row, 'info_p99_ms', 0)} | {fmt(row, 'info_max_ms', 0)} "
            f"| {fmt(row, 'others_p99_ms', 0)} | {fmt(row, 'wall_s', 2)} | {row['sequential_wall_s']:.2f} "
            f"| {fmt(row, 'ratio', 2)} | {bad} |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "torch": version("torch"),
        "monai": version("monai"),
        "monailabel": version("monailabel"),
        "python": platform.python_version(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


@contextlib.contextmanager
def server(studies: Path, conf: Mapping[str, str], log: Path, start_timeout: float) -> Iterator[LabelServer]:
    """A real server; stopped in ``finally`` whatever happens."""
    srv = LabelServer(studies, conf, log)
    try:
        srv.wait_ready(timeout=start_timeout)
        yield srv
    finally:
        srv.stop()


def warm_up(
    url: str, image_id: str, params: Mapping[str, Any], expect_shape: tuple[int, ...], tmp: Path, timeout: float
) -> float:
    """One inference before measuring (the model is loaded on the first request); checks the label's shape."""
    t = time.perf_counter()
    with new_session() as s:
        r = s.post(
            f"{url}/infer/unet3d",
            params={"image": image_id, "output": "image"},
            files={"params": (None, json.dumps(dict(params)))},
            timeout=timeout,
        )
    latency = time.perf_counter() - t
    if r.status_code != 200:
        raise RuntimeError(f"warm-up inference of {image_id} answered {r.status_code}: {r.text[:2000]}")
    out = tmp / f"warmup_{image_id}.nii.gz"
    out.write_bytes(r.content)
    shape = tuple(nib.load(out).shape)
    if shape[:3] != tuple(expect_shape[:3]):
        raise RuntimeError(f"served label of {image_id} has shape {shape}, the image {expect_shape}")
    return latency


def check_ready(url: str) -> dict[str, Any]:
    info = requests.get(f"{url}/info/", timeout=60).json()
    if "unet3d" not in info.get("models", {}) or "unet3d" in info.get("models_not_ready", {}):
        raise RuntimeError(
            f"unet3d is not ready on {url}: models {list(info.get('models', {}))}, "
            f"not ready {info.get('models_not_ready')}"
        )
    return info["models"]["unet3d"]


def run_sample(
    args: argparse.Namespace,
    params: Mapping[str, Any],
    tmp: Path,
    report: dict[str, Any],
    scenario: str = "sample",
    routes: str = "unet_seg",
) -> list[dict[str, Any]]:
    """The sample model; ``routes`` ``monailabel`` serves /infer by MONAI Label's own route (the peer)."""
    slug = "".join(c if c.isalnum() else "_" for c in scenario)
    studies = tmp / f"{slug}_studies"
    shutil.copytree(SAMPLE_STUDIES, studies)
    image_id = args.image or sorted(p.name[:-7] for p in SAMPLE_STUDIES.glob("*.nii.gz"))[0]
    shape = nib.load(SAMPLE_STUDIES / f"{image_id}.nii.gz").shape
    conf = {
        "models": "unet3d",
        "preset": "small",
        "roi_size": "40,56,40",
        "unet3d.pretrained": str(SAMPLE_MODEL),
        "model_dir": str(tmp / f"{slug}_model"),
        "tracking": "none",
        "request_routes": routes,
    }
    log = tmp / f"{slug}_server.log"
    report["logs"][scenario] = str(log)
    t = time.perf_counter()
    with server(studies, conf, log, args.start_timeout) as srv:
        info = {
            "server_start_s": round(time.perf_counter() - t, 1),
            "image": image_id,
            "shape": list(shape),
            "model_version": check_ready(srv.url).get("version"),
        }
        info["warmup_infer_s"] = round(warm_up(srv.url, image_id, params, shape, tmp, args.timeout), 3)
        report["scenarios"][scenario] = info
        print(
            f"{scenario}: server up in {info['server_start_s']} s, {image_id} {tuple(shape)}, "
            f"warm-up {info['warmup_infer_s']} s",
            flush=True,
        )
        return [measure(srv.url, scenario, n, image_id, params, args) for n in args.concurrency]


def brats_4d(case: Path, out: Path) -> tuple[int, ...]:
    """Flair and T1c of one case stacked on the last axis (float32, the Flair affine) -> ``out``."""
    imgs = [nib.load(case / f"{m}.nii.gz") for m in BRATS_MODALITIES]
    data = np.stack([np.asanyarray(i.dataobj).astype(np.float32) for i in imgs], axis=-1)
    nib.save(nib.Nifti1Image(data, imgs[0].affine), out)
    return data.shape


def brats_label(case: Path, out: Path) -> None:
    img = nib.load(case / f"{BRATS_LABEL}.nii.gz")
    nib.save(nib.Nifti1Image(np.rint(np.asanyarray(img.dataobj)).astype(np.uint8), img.affine), out)


def run_brats(
    args: argparse.Namespace, params: Mapping[str, Any], tmp: Path, report: dict[str, Any]
) -> list[dict[str, Any]]:
    data = Path(args.brats)
    train_cases = sorted(p for p in (data / "train").iterdir() if p.is_dir())[:2]
    val_case = sorted(p for p in (data / "validation").iterdir() if p.is_dir())[0]
    if len(train_cases) < 2:
        raise SystemExit(f"{data / 'train'}: need two cases, found {len(train_cases)}")
    studies = tmp / "brats_studies"
    (studies / "labels" / "final").mkdir(parents=True)
    t = time.perf_counter()
    for case in train_cases:
        brats_4d(case, studies / f"{case.name}.nii.gz")
        brats_label(case, studies / "labels" / "final" / f"{case.name}.nii.gz")
    upload = tmp / f"{val_case.name}.nii.gz"
    shape = brats_4d(val_case, upload)
    prep_s = round(time.perf_counter() - t, 1)
    preset = "tiny" if args.quick else "small"
    conf = {
        "models": "unet3d",
        "modalities": "flair,t1c",
        "labels": BRATS_LABELS,
        "preset": preset,
        "roi_size": str(args.brats_roi),
        "model_dir": str(tmp / "brats_model"),
        "tracking": "none",
        "auto_retrain_after": "0",
    }
    log = tmp / "brats_server.log"
    report["logs"]["brats"] = str(log)
    train_req = json.loads(args.brats_train)
    t = time.perf_counter()
    with server(studies, conf, log, args.start_timeout) as srv:
        info: dict[str, Any] = {
            "prepare_s": prep_s,
            "server_start_s": round(time.perf_counter() - t, 1),
            "preset": preset,
            "roi_size": args.brats_roi,
            "train_cases": [c.name for c in train_cases],
            "image": val_case.name,
            "shape": list(shape),
            "train_request": train_req,
        }
        print(f"brats: server up in {info['server_start_s']} s; training unet3d ({preset}) {train_req}", flush=True)
        t = time.perf_counter()
        r = requests.post(f"{srv.url}/train/unet3d", json=train_req, timeout=120)
        if r.status_code != 200:
            raise RuntimeError(f"POST /train/unet3d answered {r.status_code}: {r.text[:2000]}")
        status = srv.wait_train_done(timeout=args.train_timeout, poll_s=1.0)
        info["train_s"], info["train_status"] = round(time.perf_counter() - t, 1), status.get("status")
        if status.get("status") != "DONE":
            raise RuntimeError(f"BraTS training did not finish: {json.dumps(status)[:2000]}")
        info["model_version"] = check_ready(srv.url).get("version")
        with open(upload, "rb") as f:
            r = requests.put(
                f"{srv.url}/datastore/image",
                params={"image": val_case.name},
                files={"file": (upload.name, f)},
                timeout=300,
            )
        if r.status_code != 200:
            raise RuntimeError(f"PUT /datastore/image {val_case.name} answered {r.status_code}: {r.text[:2000]}")
        info["warmup_infer_s"] = round(warm_up(srv.url, val_case.name, params, shape, tmp, args.timeout), 3)
        report["scenarios"]["brats"] = info
        print(
            f"brats: trained in {info['train_s']} s ({info['train_status']}), {val_case.name} {shape}, "
            f"warm-up {info['warmup_infer_s']} s",
            flush=True,
        )
        brats_args = argparse.Namespace(**{**vars(args), "repeats": args.brats_repeats or args.repeats})
        return [measure(srv.url, "brats", args.brats_concurrency, val_case.name, params, brats_args)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/server_load.json", help="JSON report (every request's code and latency)")
    p.add_argument("--concurrency", default="1,8,20", help="comma list of burst sizes for the sample scenario")
    p.add_argument(
        "--repeats", type=int, default=3, help="bursts per concurrency; the table shows medians and min..max"
    )
    p.add_argument("--tta", action="store_true", help='infer with {"tta": true} (8 flips)')
    p.add_argument("--params", default="{}", help="extra inference params as JSON, e.g. '{\"overlap\": 0.25}'")
    p.add_argument("--image", default=None, help="sample study id to infer (default the first)")
    p.add_argument("--poll_ms", type=float, default=20, help="pause between two polls of the same thread")
    p.add_argument(
        "--peer",
        action="store_true",
        help="also run the sample bursts against MONAI Label's own /infer route (conf request_routes monailabel)",
    )
    p.add_argument("--skip_brats", action="store_true")
    p.add_argument("--brats", default=str(BRATS_DEFAULT), help="brats2015_2mod folder (train/, validation/)")
    p.add_argument(
        "--brats_concurrency",
        type=int,
        default=None,
        help="burst size of the BraTS scenario (default 4; 2 with --quick)",
    )
    p.add_argument(
        "--brats_params",
        default=None,
        help='extra inference params of the BraTS scenario as JSON (default {}; {"overlap": 0} with --quick)',
    )
    p.add_argument("--brats_repeats", type=int, default=0, help="bursts of the BraTS scenario (default --repeats)")
    p.add_argument("--brats_roi", type=int, default=64, help="roi_size of the BraTS model")
    p.add_argument(
        "--brats_train",
        default='{"max_epochs": 1, "max_steps": 2, "train_batch_size": 1, "num_samples": 1}',
        help="POST /train/unet3d body for the BraTS model",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: concurrency 1,4, one run, tiny BraTS model, 2 BraTS inferences at overlap 0",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds one request may take")
    p.add_argument("--start_timeout", type=float, default=600, help="seconds a server may take to answer /info")
    p.add_argument("--train_timeout", type=float, default=3600)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (studies, models, server logs)")
    args = p.parse_args()
    if args.quick:
        args.concurrency, args.repeats = "1,4", 1
    if args.brats_concurrency is None:
        args.brats_concurrency = 2 if args.quick else 4
    if args.brats_params is None:
        args.brats_params = '{"overlap": 0}' if args.quick else "{}"
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if args.repeats < 1 or not args.concurrency or min(args.concurrency) < 1:
        p.error("--repeats and --concurrency must be >= 1")
    params = {**json.loads(args.params), **({"tta": True} if args.tta else {})}
    brats_params = {**params, **json.loads(args.brats_params)}

    report: dict[str, Any] = {
        "machine": machine(),
        "args": dict(vars(args)),
        "params": params,
        "brats_params": brats_params,
        "scenarios": {},
        "logs": {},
        "rows": [],
    }
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark still stops its server (finally)
    tmp = Path(tempfile.mkdtemp(prefix="server_load_"))
    ok = False
    try:
        report["rows"] += run_sample(args, params, tmp, report)
        if args.peer:
            report["rows"] += run_sample(args, params, tmp, report, "stock MONAI Label /infer", "monailabel")
        if not args.skip_brats:
            report["rows"] += run_brats(args, brats_params, tmp, report)
        ok = True
    finally:
        report["finished"] = ok
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(
                f"\nkept {tmp}; server logs: " + ", ".join(f"{k} {v}" for k, v in report["logs"].items()),
                file=sys.stderr,
            )

    m = report["machine"]
    print(
        f"\nMachine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), torch {m['torch']}, "
        f"monailabel {m['monailabel']}, load average at start {m['load_avg_at_start'][0]}; "
        f"inference params {json.dumps(params)}"
        + ("" if args.skip_brats else f" (brats {json.dumps(brats_params)})")
        + f", {args.repeats} run(s) per row"
        + (" (median, min..max)" if args.repeats > 1 else "")
        + "\n"
    )
    print(table(report["rows"]))
    status_bad = {
        f"{r['scenario']} N={r['concurrent']}": r["status_non200"] for r in report["rows"] if r["status_non200"]
    }
    if status_bad:
        print(f"\nstatus endpoints that failed (not 200; 404 is fine for /train/), see {out}: {status_bad}")
    print(f"\nwrote {out}")
    if any(r["non200"] or r["sequential_non200"] for r in report["rows"]):
        print("FAILED: some inferences were not answered 200", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

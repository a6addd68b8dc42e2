"""unet_seg vs nnU-Net v2 inference, side by side in one run: the same 3d_fullres topology, the same volumes.

``--setup`` makes the peer's own virtualenv (``.venv-nnunet``; nnU-Net v2 from PyPI, sharing
``.venv``'s torch through a ``.pth`` line so no second torch is installed) and exits. A run then:

1. takes ``--cases`` labelled MSD Hippocampus cases (``--data``) and writes them as nnU-Net raw
   data (``imagesTr``/``labelsTr``, ``dataset.json``);
2. plans them with nnU-Net's own fingerprint + ExperimentPlanner (in the peer venv) and with
   unet_seg's planner (``main.py train --config nnunet``, one iteration: the plan plus a model
   file of that topology), and prints both topologies (patch, poolings, kernels, filters): the
   comparison is only meaningful when they agree, which the script checks;
3. gives nnU-Net a model folder of that plan (``plans.json``, ``dataset.json``,
   ``fold_0/checkpoint_final.pth`` with seeded freshly initialised weights: timing does not
   depend on the weights);
4. times, ``--runs`` times each in a fresh process, files in -> files out on the same volumes:
   ``nnUNetPredictor.predict_from_files`` (step 0.5, Gaussian, mirroring = 8 flips when
   ``--tta``, 1 preprocessing and 1 export worker) and ``main.py predict --config nnunet``
   (fp32 and bf16 autocast where the CPU has it). Reported: the wall time of the prediction call
   inside each process (median of the runs) and of the whole process, and the ratio to nnU-Net;
5. the arithmetic floor: the convolution FLOPs of one window (forward hooks on unet_seg's network of
   that plan) x the sliding windows of every volume (overlap 0.5) x 8 flips, divided by the best
   GFLOP/s plain 3D convolutions of the network's sizes reach on this CPU (fp32, bf16; batch 2 and 8,
   both memory layouts);
   each tool's time is reported as a multiple of that floor.

    .venv/bin/python benchmarks/peer_inference.py --setup
    .venv/bin/python benchmarks/peer_inference.py --data ../shared/data/hippocampus --cases 20 --tta --out runs/peer
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_VENV = ROOT / ".venv-nnunet"
NNUNET_VERSION = "2.8.1"
DATASET = "Dataset004_Hippocampus"

# run inside the peer venv: plan with nnU-Net's own code
PEER_PLAN = """
import sys
from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
extract_fingerprints([4], check_dataset_integrity=True, clean=True, verbose=False)
plan_experiments([4])
"""

# run inside the peer venv: a model folder of the plan with seeded fresh weights
PEER_MODEL = """
import json, os, shutil, sys, torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
pre, out = sys.argv[1], sys.argv[2]
plans = json.load(open(os.path.join(pre, "nnUNetPlans.json")))
dataset = json.load(open(os.path.join(pre, "dataset.json")))
arch = plans["configurations"]["3d_fullres"]["architecture"]
torch.manual_seed(0)
net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                             1, len(dataset["labels"]), allow_init=True, deep_supervision=False)
os.makedirs(os.path.join(out, "fold_0"), exist_ok=True)
shutil.copy(os.path.join(pre, "nnUNetPlans.json"), os.path.join(out, "plans.json"))
shutil.copy(os.path.join(pre, "dataset.json"), os.path.join(out, "dataset.json"))
shutil.copy(os.path.join(pre, "dataset_fingerprint.json"), os.path.join(out, "dataset_fingerprint.json"))
torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
            "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset}},
           os.path.join(out, "fold_0", "checkpoint_final.pth"))
c = plans["configurations"]["3d_fullres"]
kw = arch["arch_kwargs"]
print(json.dumps({"patch": c["patch_size"], "spacing": c["spacing"], "strides": kw["strides"],
                  "kernels": kw["kernel_sizes"], "features": kw["features_per_stage"]}))
"""

# run inside the peer venv: one timed prediction of a folder
PEER_PREDICT = """
import sys, time, torch
t0 = time.perf_counter()
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
model, images, out, tta = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta, perform_everything_on_device=False,
                    device=torch.device("cpu"), verbose=False, verbose_preprocessing=False, allow_tqdm=False)
p.initialize_from_trained_model_folder(model, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
t1 = time.perf_counter()
p.predict_from_files(images, out, save_probabilities=False, overwrite=True,
                     num_processes_preprocessing=1, num_processes_segmentation_export=1)
print("PREDICT_S", time.perf_counter() - t1, "SETUP_S", t1 - t0)
"""


def setup() -> None:
    """The peer venv: nnU-Net v2 from PyPI, torch shared with .venv (a .pth line; nothing else of .venv wins).

    Nothing to do when the venv already imports that nnU-Net version and torch.
    """
    probe = "import torch, nnunetv2, importlib.metadata as m; print(m.version('nnunetv2'))"  # torch: the .pth line
    check = [str(PEER_VENV / "bin" / "python"), "-c", probe]
    if (PEER_VENV / "bin" / "python").exists():
        have = subprocess.run(check, capture_output=True, text=True)
        if have.returncode == 0 and have.stdout.strip() == NNUNET_VERSION:
            print(f"nnU-Net v2 {NNUNET_VERSION} in {PEER_VENV} (already there)")
            return
    if not (PEER_VENV / "bin" / "python").exists():
        subprocess.run([shutil.which("python3.11") or "python3", "-m", "venv", str(PEER_VENV)], check=True)
    site = next((PEER_VENV / "lib").glob("python3*/site-packages"))
    ours = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"))
    (site / "zz_unet_seg_torch.pth").write_text(f"{ours}\n")
    subprocess.run(
        [str(PEER_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", f"nnunetv2=={NNUNET_VERSION}"],
        check=True,
    )
    print(f"nnU-Net v2 {NNUNET_VERSION} in {PEER_VENV}")


def peer(code: str, *args: str, env: dict[str, str]) -> str:
    r = subprocess.run(
        [str(PEER_VENV / "bin" / "python"), "-c", code, *args], env=env, capture_output=True, text=True, timeout=3600
    )
    if r.returncode != 0:
        raise SystemExit(f"nnU-Net step failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r.stdout


def write_raw(data: Path, cases: int, raw: Path, images: Path) -> list[str]:
    """nnU-Net raw data of the first ``cases`` labelled cases; the same images for both tools in ``images``."""
    meta = json.loads((data / "dataset.json").read_text())
    entries = meta["training"][:cases]
    base = raw / DATASET
    for sub in ("imagesTr", "labelsTr"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    names = []
    for e in entries:
        img, lab = data / e["image"], data / e["label"]
        name = img.name[: -len(".nii.gz")]
        shutil.copy(img, base / "imagesTr" / f"{name}_0000.nii.gz")
        shutil.copy(lab, base / "labelsTr" / f"{name}.nii.gz")
        shutil.copy(img, images / f"{name}_0000.nii.gz")
        names.append(name)
    labels = {v: int(k) for k, v in meta["labels"].items()}
    (base / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "MRI"},
                "labels": labels,
                "numTraining": len(entries),
                "file_ending": ".nii.gz",
            }
        )
    )
    return names


def ours_plan(data: Path, cases: int, results: Path, msd: Path) -> dict:
    """unet_seg's nnunet plan and a model of it: one training iteration on the same cases."""
    meta = json.loads((data / "dataset.json").read_text())
    for sub in ("imagesTr", "labelsTr"):
        (msd / sub).mkdir(parents=True, exist_ok=True)
    entries = meta["training"][:cases]
    for e in entries:
        shutil.copy(data / e["image"], msd / "imagesTr")
        shutil.copy(data / e["label"], msd / "labelsTr")
    (msd / "dataset.json").write_text(json.dumps({**meta, "training": entries, "numTraining": len(entries)}))
    cmd = [sys.executable, str(ROOT / "main.py"), "train", "--config", "nnunet", "--data", str(msd)]
    cmd += ["--results", str(results), "--epochs", "1", "--iterations_per_epoch", "1", "--val_split", "0.2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"unet_seg training failed:\n{r.stderr[-4000:]}")
    plan = json.loads((results / "model" / "nnunet_plan.json").read_text())
    return plan


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return wall, r.stdout + r.stderr


def conv_flops(net: object, patch: list[int]) -> float:
    """Multiply-add FLOPs (x2) of one forward of ``net`` on a 1-channel window, from its (transposed) convolutions."""
    import torch

    total = [0.0]

    def hook(mod: torch.nn.Module, inp: tuple, out: torch.Tensor) -> None:
        k = float(torch.tensor(mod.kernel_size).prod())
        if isinstance(mod, torch.nn.ConvTranspose3d):
            total[0] += 2.0 * mod.in_channels * mod.out_channels / mod.groups * k * inp[0][0, 0].numel()
        else:
            total[0] += 2.0 * mod.in_channels / mod.groups * mod.out_channels * k * out[0, 0].numel()

    handles = [
        m.register_forward_hook(hook)
        for m in net.modules()
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))
    ]
    with torch.no_grad():
        net(torch.zeros(1, 1, *patch))
    for h in handles:
        h.remove()
    return total[0]


def attained_peak(dtype: str, seconds: float = 1.0) -> float:
    """Best GFLOP/s of plain 3D convolutions of this network's sizes on this CPU (fp32, or bf16).

    The best over channel counts and sizes, batch 2 and 8, channels-first and channels-last layouts,
    the weights in the compute dtype (no per-call casting): the fastest any of oneDNN's kernels for
    these shapes goes here, so that no tool can reach "more than 100%" of it by choosing a layout.
    """
    import torch

    best = 0.0
    kind = torch.bfloat16 if dtype == "bf16" else torch.float32
    for c, size in ((32, (40, 56, 40)), (64, (20, 28, 20)), (128, (10, 14, 10)), (256, (5, 7, 5))):
        for batch in (2, 8):
            for layout in (torch.contiguous_format, torch.channels_last_3d):
                conv = torch.nn.Conv3d(c, c, 3, padding=1, bias=False).eval().to(kind, memory_format=layout)
                x = torch.randn(batch, c, *size).to(kind, memory_format=layout)
                flops = 2.0 * c * c * 27 * batch * x[0, 0].numel()
                with torch.no_grad():
                    conv(x)
                    n, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < seconds:
                        conv(x)
                        n += 1
                best = max(best, flops * n / (time.perf_counter() - t0) / 1e9)
    return best


def windows(shape: tuple[int, ...], patch: list[int], overlap: float = 0.5) -> int:
    """Sliding-window count MONAI uses for a volume (smaller axes are padded to the patch)."""
    n = 1
    for dim, roi in zip(shape, patch, strict=True):
        step = max(int(roi * (1 - overlap)), 1)
        n *= 1 if dim <= roi else -(-(dim - roi) // step) + 1
    return n


def floor_seconds(model_dir: Path, images: Path, patch: list[int], tta: bool) -> dict:
    """The arithmetic floor of the prediction: every window's convolutions at the attained peak."""
    import nibabel as nib

    sys.path.insert(0, str(ROOT / "apps" / "unet_seg"))
    from lib.modelstore import ModelStore
    from lib.networks import DynUNetSpec

    store = ModelStore(str(model_dir), "nnunet")
    serving = store.serving()
    assert serving is not None, "unet_seg's model was not published"
    net = DynUNetSpec.from_dict(dict(store.meta(serving.id).spec)).build().eval()
    per_window = conv_flops(net, patch)
    count = sum(windows(nib.load(p).shape[:3], patch) for p in sorted(images.glob("*.nii.gz")))
    total = per_window * count * (8 if tta else 1)
    out = {"gflop_per_window": round(per_window / 1e9, 3), "windows": count, "total_gflop": round(total / 1e9, 1)}
    for dtype in ("fp32", "bf16"):
        peak = attained_peak(dtype)
        out[f"peak_{dtype}_gflops"] = round(peak, 1)
        out[f"floor_{dtype}_s"] = round(total / 1e9 / peak, 2)
    return out


def prepare(data: Path, cases: int, out: Path) -> tuple[dict[str, str], Path, Path, dict, bool, list[str]]:
    """Both tools plan ``cases`` cases in a fresh ``out``; nnU-Net gets a model folder of its plan.

    Returns (nnU-Net env, its preprocessed dataset folder, its model folder, its topology, whether
    unet_seg's topology is the same, the case names); both topologies are printed.
    """
    if not (PEER_VENV / "bin" / "python").exists():
        raise SystemExit(f"{PEER_VENV} missing: run benchmarks/peer_inference.py --setup first")
    shutil.rmtree(out, ignore_errors=True)
    raw, pre, res = out / "nnUNet_raw", out / "nnUNet_preprocessed", out / "nnUNet_results"
    env = {
        **os.environ,
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(pre),
        "nnUNet_results": str(res),
        "nnUNet_def_n_proc": "1",
    }
    names = write_raw(data, cases, raw, out / "images")
    peer(PEER_PLAN, env=env)
    model = res / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    theirs = json.loads(peer(PEER_MODEL, str(pre / DATASET), str(model), env=env).strip().splitlines()[-1])
    ours = ours_plan(data, cases, out / "ours", out / "msd")
    print("nnU-Net plan :", json.dumps(theirs))
    mine = {
        "patch": ours.get("patch_size"),
        "spacing": ours.get("target_spacing"),
        "strides": ours.get("strides"),
        "kernels": ours.get("kernel_sizes"),
        "features": ours.get("filters"),
    }
    print("unet_seg plan:", json.dumps(mine))
    same = all(list(theirs[k]) == list(mine[k] or []) for k in ("patch", "strides", "kernels", "features"))
    return env, pre / DATASET, model, theirs, same, names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setup", action="store_true", help="make the peer venv (nnU-Net v2 from PyPI) and exit")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hippocampus"))
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tta", action="store_true", help="8-flip mirroring on both sides")
    ap.add_argument("--out", default="runs/peer")
    args = ap.parse_args()
    if args.setup:
        setup()
        return
    out = Path(args.out).resolve()
    env, _pre, model, theirs, same, names = prepare(Path(args.data).resolve(), args.cases, out)
    images = out / "images"
    # our predict reads an images/ folder (plain names)
    ours_images = out / "ours_data" / "images"
    ours_images.mkdir(parents=True)
    for n in names:
        shutil.copy(images / f"{n}_0000.nii.gz", ours_images / f"{n}.nii.gz")
    rows: dict[str, list[tuple[float, float]]] = {"nnU-Net v2": [], "unet_seg fp32": [], "unet_seg bf16": []}
    for run in range(args.runs):
        wall, text = timed(
            [
                str(PEER_VENV / "bin" / "python"),
                "-c",
                PEER_PREDICT,
                str(model),
                str(images),
                str(out / "pred_nnunet"),
                "1" if args.tta else "0",
            ],
            env,
        )
        predict_s = float(text.split("PREDICT_S", 1)[1].split()[0])
        rows["nnU-Net v2"].append((predict_s, wall))
        for amp, key in (("false", "unet_seg fp32"), ("true", "unet_seg bf16")):
            cmd = [
                sys.executable,
                str(ROOT / "main.py"),
                "predict",
                "--config",
                "nnunet",
                "--data",
                str(out / "ours_data"),
            ]
            cmd += ["--results", str(out / "ours"), "--amp", amp] + (["--tta"] if args.tta else [])
            wall, text = timed(cmd)
            predict_s = float(text.split("PREDICT_S", 1)[1].split()[0])
            rows[key].append((predict_s, wall))
        print(f"run {run + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1][0]:.1f} s" for k, v in rows.items()))
    floor = floor_seconds(out / "ours" / "model", ours_images, list(theirs["patch"]), args.tta)
    print("arithmetic floor:", json.dumps(floor))
    ref = statistics.median(p for p, _ in rows["nnU-Net v2"])
    table = []
    tta = "8 flips" if args.tta else "off"
    print(f"\n{len(names)} volumes, TTA {tta}, {args.runs} fresh processes each; same topology: {same}")
    print("| tool | predict s (median) | process s (median) | ratio to nnU-Net | x bf16 floor | x fp32 floor |")
    print("|---|---|---|---|---|---|")
    for key, vals in rows.items():
        p = statistics.median(v[0] for v in vals)
        w = statistics.median(v[1] for v in vals)
        fb, ff = p / floor["floor_bf16_s"], p / floor["floor_fp32_s"]
        table.append(
            {
                "tool": key,
                "predict_s": round(p, 2),
                "process_s": round(w, 2),
                "ratio": round(p / ref, 3),
                "x_floor_bf16": round(fb, 2),
                "x_floor_fp32": round(ff, 2),
                "runs": [round(v[0], 2) for v in vals],
            }
        )
        print(f"| {key} | {p:.1f} | {w:.1f} | {p / ref:.2f} | {fb:.2f} | {ff:.2f} |")
    (out / "peer_inference.json").write_text(
        json.dumps(
            {"volumes": len(names), "tta": args.tta, "same_patch": same, "nnunet_plan": theirs, "rows": table}, indent=2
        )
    )


if __name__ == "__main__":
    main()

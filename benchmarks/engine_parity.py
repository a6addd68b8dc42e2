"""The fast engine against the previous one, on held-out cases: Dice (must not move) and time, fp32 and bf16.

Previous engine: MONAI's DynUNet and ``sliding_window_inference`` under the AMP policy's autocast (what
``lib.inference`` ran before ``lib.leannet``). Fast engine: ``LeanDynUNet`` (bf16 weights cast once,
channels-last) and our own sliding window. Both run on the same pre-processed volumes
(``lib.fastpredict.prepare``), with the same flips, argmax, post-processing and inverse geometry; Dice is
against the expert labels, per class, in the file's voxel grid.

The sample model (``sample/models/unet3d_hippocampus_small.pt``) was trained on the first 120 cases of
the MSD Hippocampus list, so the default evaluates the 88 after them::

    .venv/bin/python benchmarks/engine_parity.py --tta              # all 88 held-out cases
    .venv/bin/python benchmarks/engine_parity.py --tta --limit 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "apps" / "unet_seg"))

from lib.checkpoints import read_checkpoint  # noqa: E402
from lib.fastpredict import load_fast_model, prepare, restore  # noqa: E402
from lib.inference import predict_probabilities  # noqa: E402
from lib.runtime import AmpPolicy, cpu_has_native_bf16  # noqa: E402
from lib.serverproc import SAMPLE_MODEL  # noqa: E402


def previous_engine(
    net: torch.nn.Module, image: torch.Tensor, roi: list[int], tta: bool, amp: AmpPolicy
) -> torch.Tensor:
    """The engine before the lean network: MONAI's sliding window over MONAI's network, under autocast."""
    from monai.inferers import sliding_window_inference

    axes = [2, 3, 4]
    flips = [c for r in range(4) for c in itertools.combinations(axes, r)] if tta else [()]
    total = None
    with torch.no_grad():
        for f in flips:
            x = torch.flip(image, f) if f else image
            with amp.autocast():
                logits = sliding_window_inference(x, roi, 1, net, overlap=0.5, mode="gaussian", sigma_scale=0.125)
            p = torch.softmax(torch.as_tensor(logits).float(), 1)
            p = torch.flip(p, f) if f else p
            total = p if total is None else total + p
    assert total is not None
    return total / len(flips)


def dice(pred: np.ndarray, truth: np.ndarray, value: int) -> float:
    a, b = pred == value, truth == value
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * (a & b).sum() / denom)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hippocampus"))
    ap.add_argument("--model", default=str(SAMPLE_MODEL))
    ap.add_argument("--config", default="unet3d")
    ap.add_argument("--skip", type=int, default=120, help="cases of the list the model was trained on")
    ap.add_argument("--limit", type=int, default=0, help="evaluate at most this many (0: all after --skip)")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--out", default="runs/engine_parity.json")
    args = ap.parse_args()
    data = Path(args.data)
    meta = json.loads((data / "dataset.json").read_text())
    cases = meta["training"][args.skip :]
    cases = cases[: args.limit] if args.limit else cases
    labels = {str(v).lower(): int(k) for k, v in meta["labels"].items() if int(k) != 0}
    model = load_fast_model(args.config, args.model, labels, torch.device("cpu"))
    from lib.networks import DynUNetSpec, UNet3DSpec

    spec = (DynUNetSpec if "kernels" in model.meta.spec else UNet3DSpec).from_dict(dict(model.meta.spec))
    monai_net = spec.build().eval()
    monai_net.load_state_dict(read_checkpoint(args.model)[0], strict=True)
    policies = {"fp32": AmpPolicy("cpu", None, False)}
    if cpu_has_native_bf16():
        policies["bf16"] = AmpPolicy("cpu", torch.bfloat16, False)
    rows: dict[str, dict[str, list]] = {}
    for name in policies:
        for engine in ("previous", "fast"):
            rows[f"{engine} {name}"] = {"dice": [], "seconds": []}
    for case in cases:
        prepared = prepare(model, str(data / case["image"]))
        truth = np.asanyarray(nib.load(data / case["label"]).dataobj)
        for name, policy in policies.items():
            for engine in ("previous", "fast"):
                t = time.perf_counter()
                if engine == "fast":
                    probs = predict_probabilities(
                        model.net, prepared.image[None], model.meta.roi_size, tta=args.tta, amp=policy
                    )
                else:
                    probs = previous_engine(monai_net, prepared.image[None], model.meta.roi_size, args.tta, policy)
                row = rows[f"{engine} {name}"]
                row["seconds"].append(time.perf_counter() - t)
                label = restore(model, prepared, probs[0])
                row["dice"].append([dice(label, truth, v) for v in sorted(labels.values())])
    print(f"{len(cases)} held-out cases, TTA {'8 flips' if args.tta else 'off'}, model {Path(args.model).name}")
    print("| engine | mean Dice per class | engine s (sum) | max abs Dice change per case vs previous |")
    print("|---|---|---|---|")
    report = {}
    for key, row in rows.items():
        d = np.asarray(row["dice"])
        ref = np.asarray(rows[key.replace("fast", "previous")]["dice"])
        change = float(np.abs(d - ref).max())
        mean = [round(float(m), 4) for m in d.mean(0)]
        report[key] = {"mean_dice": mean, "seconds": round(sum(row["seconds"]), 2), "max_change": change}
        report[key]["median_case_s"] = round(statistics.median(row["seconds"]), 4)
        print(f"| {key} | {mean} | {sum(row['seconds']):.1f} | {change:.4f} |")
    for name in policies:
        a = np.asarray(rows[f"fast {name}"]["dice"]).mean(0)
        b = np.asarray(rows[f"previous {name}"]["dice"]).mean(0)
        print(f"{name}: mean Dice change fast - previous: {[round(float(x), 4) for x in a - b]}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cases": len(cases), "tta": args.tta, "rows": report}, indent=2))


if __name__ == "__main__":
    main()

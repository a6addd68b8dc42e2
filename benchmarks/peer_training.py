"""Training step of unet_seg vs nnU-Net v2 on the same 3d_fullres network, patch and batch, in one run.

The twin of ``benchmarks/peer_inference.py`` (same peer venv, ``--setup`` there): both tools plan
``--cases`` MSD Hippocampus cases and the topologies are checked equal. Then one optimisation
step is timed on random data of the plan's patch and nnU-Net's planned batch (``--batch``
overrides):

* nnU-Net (peer venv): its network from the plans with deep supervision, its loss
  (``DeepSupervisionWrapper`` over ``DC_and_CE_loss`` with ``MemoryEfficientSoftDiceLoss``, the
  targets at every head's scale), SGD Nesterov 0.99, gradient clipping 12: what ``nnUNetTrainer``
  runs per iteration on this CPU (it uses no autocast off CUDA);
* unet_seg (.venv): the published model's network in training mode, the trainer's
  ``DeepSupervisionLoss(DiceCELoss)``, the same optimiser and clipping, in fp32 and with bf16
  autocast where the CPU has it.

``--warmup`` steps, then the median of ``--steps`` timed steps; each side in its own fresh process.

    .venv/bin/python benchmarks/peer_training.py --data ../shared/data/hippocampus --out runs/peer_train
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_inference import ROOT, peer, prepare, timed  # noqa: E402

PEER_STEP = """
import json, sys, time, statistics, torch, numpy as np
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
pre, batch, warmup, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
plans = json.load(open(pre + "/nnUNetPlans.json")); dataset = json.load(open(pre + "/dataset.json"))
c = plans["configurations"]["3d_fullres"]; arch = c["architecture"]
batch = batch or c["batch_size"]
torch.manual_seed(0)
net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                             1, len(dataset["labels"]), allow_init=True, deep_supervision=True).train()
scales = list(list(i) for i in 1 / np.cumprod(np.vstack(arch["arch_kwargs"]["strides"]), axis=0))[:-1]
weights = np.array([1 / (2**i) for i in range(len(scales))]); weights[-1] = 0; weights = weights / weights.sum()
loss = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": c["batch_dice"], "smooth": 1e-5, "do_bg": False,
                              "ddp": False}, {}, weight_ce=1, weight_dice=1, ignore_label=None,
                              dice_class=MemoryEfficientSoftDiceLoss), weights)
opt = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
patch = c["patch_size"]
x = torch.randn(batch, 1, *patch)
full = torch.randint(0, len(dataset["labels"]), (batch, 1, *patch)).float()
down = torch.nn.functional.interpolate
targets = [down(full, scale_factor=[float(f) for f in s], mode="nearest") if any(f != 1 for f in s) else full
           for s in scales]
times = []
for i in range(warmup + steps):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    out = net(x)
    l = loss(out, targets)
    l.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
    opt.step()
    if i >= warmup:
        times.append(time.perf_counter() - t)
print(json.dumps({"batch": batch, "patch": patch, "step_s": statistics.median(times), "steps": times}))
"""

OURS_STEP = """
import json, statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
from monai.losses import DiceCELoss
from lib.modelstore import ModelStore
from lib.networks import DynUNetSpec
from lib.trainers.nnunet import DeepSupervisionLoss
model_dir, batch, warmup, steps, amp, patch = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), \\
    sys.argv[6] == "bf16", json.loads(sys.argv[7])
store = ModelStore(model_dir, "nnunet")
spec = DynUNetSpec.from_dict(dict(store.meta(store.serving().id).spec))
heads = max(1, len(spec.strides) - 2)
spec = DynUNetSpec.from_dict({**spec.to_dict(), "deep_supervision": True, "deep_supr_num": heads})
torch.manual_seed(0)
net = spec.build().train()
dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, smooth_nr=1e-5, smooth_dr=1e-5,
                     batch=True)
loss = DeepSupervisionLoss(dice_ce, heads=1 + spec.deep_supr_num)
opt = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
x = torch.randn(batch, 1, *patch)
y = torch.randint(0, spec.out_channels, (batch, 1, *patch))
ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp else (lambda: torch.autocast("cpu", enabled=False))
times = []
for i in range(warmup + steps):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with ctx():
        out = net(x)
        l = loss(out.float(), y)
    l.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
    opt.step()
    if i >= warmup:
        times.append(time.perf_counter() - t)
print(json.dumps({"batch": batch, "step_s": statistics.median(times), "steps": times}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "hippocampus"))
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--batch", type=int, default=0, help="0: nnU-Net's planned batch size")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="runs/peer_train")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    env, pre, _model, _plan, same, _names = prepare(Path(args.data).resolve(), args.cases, out)
    theirs = json.loads(
        peer(PEER_STEP, str(pre), str(args.batch), str(args.warmup), str(args.steps), env=env).strip().splitlines()[-1]
    )
    rows = {"nnU-Net v2 (fp32)": theirs}
    for amp in ("fp32", "bf16"):
        cmd = [sys.executable, "-c", OURS_STEP, str(ROOT / "apps" / "unet_seg"), str(out / "ours" / "model")]
        cmd += [str(theirs["batch"]), str(args.warmup), str(args.steps), amp, json.dumps(theirs["patch"])]
        _, text = timed(cmd)
        rows[f"unet_seg {amp}"] = json.loads(next(line for line in reversed(text.splitlines()) if line.startswith("{")))
    ref = theirs["step_s"]
    print(f"\npatch {theirs['patch']}, batch {theirs['batch']}, same topology: {same}; median of {args.steps} steps")
    print("| tool | step s | ratio to nnU-Net |")
    print("|---|---|---|")
    for key, row in rows.items():
        print(f"| {key} | {row['step_s']:.2f} | {row['step_s'] / ref:.2f} |")
    (out / "peer_training.json").write_text(json.dumps({"same_topology": same, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

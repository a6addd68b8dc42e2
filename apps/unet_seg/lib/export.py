"""Export a served network to TorchScript and ONNX, checking each against PyTorch on the same input.

The exported graph takes ``(B, C, *window)`` and returns logits ``(B, K, *window)`` (the first,
full-resolution head for deep-supervision networks: they are exported in eval mode). Sliding
window, TTA and the inverse geometry stay outside the graph (they are the engine's job).

``bundle`` writes a MONAI bundle instead (network, pre/post-processing, sliding window, inverse
geometry; see ``lib.bundle``) into ``<out_dir>/<model>_bundle`` or ``bundle_dir``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

FORMATS = ("torchscript", "onnx", "bundle")


def parse_formats(text: str) -> list[str]:
    """The comma list of ``--formats`` (``--format``); ValueError naming the unknown ones."""
    formats = [f.strip().lower() for f in str(text).split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ValueError(f"--formats: unknown {unknown or [text]}; use {', '.join(FORMATS)} (comma list)")
    return formats


def export_model(
    task: Any,
    out_dir: str,
    formats: list[str],
    tolerance: float,
    overwrite: bool = False,
    bundle_dir: str | None = None,
) -> dict[str, Any]:
    """Write ``<model>.ts`` / ``<model>.onnx`` / a MONAI bundle into ``out_dir``; returns paths and max abs
    differences. An existing bundle folder is replaced only with ``overwrite``."""
    formats = parse_formats(",".join(formats))
    bundle: dict[str, Any] | None = None
    if "bundle" in formats:  # first: it refuses an existing folder before anything is written
        from .bundle import export_bundle

        target = bundle_dir or os.path.join(out_dir, f"{task.model_name}_bundle")
        bundle = export_bundle(task, target, tolerance, overwrite=overwrite)
    device = torch.device("cpu")
    net, meta = task.load_network(device)
    net = net.eval()
    x = torch.randn(1, meta.in_channels, *meta.roi_size)
    with torch.no_grad():
        ref = net(x).float().numpy()
    os.makedirs(out_dir, exist_ok=True)
    result: dict[str, Any] = {
        "model": task.model_name,
        "version": meta.version,
        "input_shape": list(x.shape),
        "tolerance": tolerance,
        "exports": {"bundle": bundle} if bundle else {},
    }
    if "torchscript" in formats:
        path = os.path.join(out_dir, f"{task.model_name}.ts")
        with torch.no_grad():
            scripted = torch.jit.trace(net, x, check_trace=False)
        scripted.save(path)
        with torch.no_grad():
            got = torch.jit.load(path)(x).float().numpy()
        result["exports"]["torchscript"] = {"path": path, "max_abs_diff": float(np.abs(got - ref).max())}
    if "onnx" in formats:
        import onnxruntime

        path = os.path.join(out_dir, f"{task.model_name}.onnx")
        spatial = {i + 2: f"d{i}" for i in range(x.ndim - 2)}
        torch.onnx.export(
            net,
            (x,),
            path,
            input_names=["image"],
            output_names=["logits"],
            dynamo=False,
            opset_version=17,
            dynamic_axes={"image": {0: "batch", **spatial}, "logits": {0: "batch", **spatial}},
        )
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = session.run(None, {"image": x.numpy()})[0]
        result["exports"]["onnx"] = {
            "path": path,
            "max_abs_diff": float(np.abs(got - ref).max()),
            "onnxruntime": onnxruntime.__version__,
        }
    bad = {k: v["max_abs_diff"] for k, v in result["exports"].items() if v["max_abs_diff"] > tolerance}
    result["ok"] = not bad
    with open(os.path.join(out_dir, "export.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    if bad:
        for v in result["exports"].values():
            if v["max_abs_diff"] > tolerance and os.path.exists(v["path"]):
                os.replace(v["path"], v["path"] + ".mismatch")
        raise ValueError(f"exported outputs differ from PyTorch beyond {tolerance}: {bad} (files renamed *.mismatch)")
    return result

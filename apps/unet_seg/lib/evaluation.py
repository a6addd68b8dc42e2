"""Evaluation of label maps against references: per-class Dice and HD95, BraTS regions, ISBI scores.

Used by the CLI (``main.py evaluate``) and the scripts. Conventions, stated once:

* a class absent from both prediction and reference has Dice and HD95 undefined (NaN, written
  as empty in CSV and ``null`` in JSON) and is left out of means;
* a class present in only one of them has Dice 0 and HD95 undefined (no surface to measure),
  counted in ``hd95_one_sided`` so it is not silently dropped;
* HD95 is in physical units (mm) from the image spacing;
* BraTS regions (WT = every tumour label, TC = WT without edema, ET = enhancing) are reported
  when the label names say edema and enhancing tumour;
* 2D single-label models also get soft-free ISBI scores (V_rand, V_info after thinning).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from .metrics import dice_per_class, isbi_scores


def brats_regions(labels: Mapping[str, int]) -> dict[str, list[int]] | None:
    """WT/TC/ET label-value sets when the label names are BraTS-coded (edema + enhancing tumour), else None."""
    low = {n.lower(): v for n, v in labels.items()}
    edema = [v for n, v in low.items() if "edema" in n or n in ("ed",)]
    enhancing = [v for n, v in low.items() if ("enhanc" in n and not n.startswith("non")) or n in ("et",)]
    if not edema or not enhancing:
        return None
    tumour = sorted(low.values())
    return {"WT": tumour, "TC": [v for v in tumour if v not in edema], "ET": enhancing}


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None) -> float:
    """95th-percentile Hausdorff distance between two binary masks (NaN when either is empty)."""
    if not pred.any() or not ref.any():
        return float("nan")
    p = torch.as_tensor(pred[None, None].astype(np.float32))
    r = torch.as_tensor(ref[None, None].astype(np.float32))
    value = compute_hausdorff_distance(p, r, percentile=95, spacing=list(spacing) if spacing is not None else None)
    return float(value.item())


def evaluate_case(
    pred: np.ndarray, ref: np.ndarray, labels: Mapping[str, int], spacing: Sequence[float] | None = None
) -> dict[str, Any]:
    """All metrics of one case (integer label maps of equal shape)."""
    pred = np.asarray(pred).astype(np.int64)
    ref = np.rint(np.asarray(ref)).astype(np.int64)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    row: dict[str, Any] = {}
    one_sided = 0
    for name, value in labels.items():
        row[f"dice_{name}"] = dice_per_class(pred, ref, {name: value})[name]
        pm, rm = pred == value, ref == value
        row[f"hd95_{name}"] = hd95(pm, rm, spacing)
        one_sided += int(pm.any() != rm.any())
    row["hd95_one_sided"] = one_sided
    regions = brats_regions(labels)
    if regions:
        for region, values in regions.items():
            pm, rm = np.isin(pred, values), np.isin(ref, values)
            denom = int(pm.sum()) + int(rm.sum())
            row[f"dice_{region}"] = float("nan") if denom == 0 else 2.0 * float((pm & rm).sum()) / denom
            row[f"hd95_{region}"] = hd95(pm, rm, spacing)
    if pred.ndim == 2 and len(labels) == 1:
        value = next(iter(labels.values()))
        if (ref == value).any():
            scores = isbi_scores(pred == value, ref == value)
            row.update({"v_rand": scores["v_rand"], "v_info": scores["v_info"]})
    dice_vals = [row[f"dice_{n}"] for n in labels if not math.isnan(row[f"dice_{n}"])]
    row["mean_dice"] = float(np.mean(dice_vals)) if dice_vals else float("nan")
    return row


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean of every numeric metric over cases, NaN cases left out, with the number of cases that counted."""
    keys = [k for k in rows[0] if k not in ("case",)] if rows else []
    out: dict[str, Any] = {"cases": len(rows)}
    for key in keys:
        vals = np.array([r[key] for r in rows if isinstance(r.get(key), (int, float))], dtype=float)
        vals = vals[~np.isnan(vals)]
        out[key] = {"mean": float(vals.mean()) if vals.size else None, "n": int(vals.size)}
    return out


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def write_results(rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], json_path: str, csv_path: str) -> None:
    """Per-case rows + summary as JSON (NaN -> null) and the per-case rows as CSV (NaN -> empty)."""
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"summary": summary, "cases": [{k: _clean(v) for k, v in r.items()} for r in rows]}, f, indent=2)
    fields = list(rows[0]) if rows else ["case"]
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if _clean(v) is None else v) for k, v in r.items()})

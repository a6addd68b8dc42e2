"""Segmentation metrics shared by training validation, the CLI and the tests.

Convention for empty structures: when a class is absent from both prediction and reference
its Dice is NaN ("not defined") and it is left out of means (``nanmean``); a class present
in only one of them scores 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


def dice_per_class(pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, label_values: Mapping[str, int]) -> dict[str, float]:
    """Dice of each named label value between two integer label maps of the same shape."""
    p = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    r = ref.detach().cpu().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} differs from reference shape {r.shape}")
    out: dict[str, float] = {}
    for name, value in label_values.items():
        pm, rm = p == value, r == value
        denom = int(pm.sum()) + int(rm.sum())
        out[name] = float("nan") if denom == 0 else 2.0 * float(np.logical_and(pm, rm).sum()) / denom
    return out


def mean_ignoring_nan(values: Mapping[str, float]) -> float:
    """Mean of the defined (non-NaN) values; NaN when none is defined."""
    arr = np.array([v for v in values.values()], dtype=float)
    return float(np.nanmean(arr)) if arr.size and not np.all(np.isnan(arr)) else float("nan")


class DiceAccumulator:
    """Accumulates per-class intersections and sizes over a validation pass (one Dice per class over all cases)."""

    def __init__(self, label_values: Mapping[str, int]) -> None:
        self.label_values = dict(label_values)
        self.inter = {k: 0.0 for k in self.label_values}
        self.total = {k: 0.0 for k in self.label_values}
        self.case_dice: list[dict[str, float]] = []

    def update(self, pred: torch.Tensor, ref: torch.Tensor) -> None:
        """Add one case (integer label maps of equal shape)."""
        for name, value in self.label_values.items():
            pm, rm = pred == value, ref == value
            self.inter[name] += float((pm & rm).sum())
            self.total[name] += float(pm.sum() + rm.sum())
        self.case_dice.append(dice_per_class(pred, ref, self.label_values))

    def per_class_mean_of_cases(self) -> dict[str, float]:
        """Per-class Dice averaged over cases (NaN cases skipped): the usual reported figure."""
        out = {}
        for name in self.label_values:
            vals = np.array([c[name] for c in self.case_dice], dtype=float)
            out[name] = float(np.nanmean(vals)) if vals.size and not np.all(np.isnan(vals)) else float("nan")
        return out

    def per_class_global(self) -> dict[str, float]:
        """Per-class Dice over all voxels of all cases pooled."""
        return {k: (2 * self.inter[k] / self.total[k] if self.total[k] else float("nan")) for k in self.label_values}

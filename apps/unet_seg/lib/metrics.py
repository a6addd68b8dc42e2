"""Segmentation metrics shared by training validation, the CLI and the tests.

Convention for empty structures: when a class is absent from both prediction and reference
its Dice is NaN ("not defined") and it is left out of means (``nanmean``); a class present
in only one of them scores 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch


def dice_per_class(
    pred: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, label_values: Mapping[str, int]
) -> dict[str, float]:
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
    """Accumulates the per-class Dice of each case over a validation pass."""

    def __init__(self, label_values: Mapping[str, int]) -> None:
        self.label_values = dict(label_values)
        self.case_dice: list[dict[str, float]] = []

    def update(self, pred: torch.Tensor, ref: torch.Tensor) -> None:
        """Add one case (integer label maps of equal shape)."""
        self.case_dice.append(dice_per_class(pred, ref, self.label_values))

    def per_class_mean_of_cases(self) -> dict[str, float]:
        """Per-class Dice averaged over cases (NaN cases skipped): the usual reported figure."""
        out = {}
        for name in self.label_values:
            vals = np.array([c[name] for c in self.case_dice], dtype=float)
            out[name] = float(np.nanmean(vals)) if vals.size and not np.all(np.isnan(vals)) else float("nan")
        return out


# ---- 2D conventions of the UNet2D reference and the ISBI 2012 challenge -----------------------


def soft_dice(probs: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, eps: float = 1e-6) -> float:
    """Soft Dice averaged over ALL classes, background included (NVIDIA UNet_Medical's reported figure).

    ``probs``: class probabilities ``(K, *spatial)`` (softmax output); ``ref``: integer labels
    ``(*spatial)`` with values 0..K-1. Per class ``(2*sum(p*g) + eps) / (sum(p) + sum(g) + eps)``.
    """
    p = torch.as_tensor(probs, dtype=torch.float64)
    r = torch.as_tensor(np.asarray(ref) if not isinstance(ref, torch.Tensor) else ref).long()
    if tuple(p.shape[1:]) != tuple(r.shape):
        raise ValueError(f"probabilities {tuple(p.shape)} and reference {tuple(r.shape)} disagree")
    onehot = torch.nn.functional.one_hot(r, p.shape[0]).movedim(-1, 0).to(p.dtype)
    dims = tuple(range(1, p.ndim))
    inter = (p * onehot).sum(dims)
    total = p.sum(dims) + onehot.sum(dims)
    return float(((2 * inter + eps) / (total + eps)).mean())


def _segments(binary: np.ndarray) -> np.ndarray:
    """Connected components (4-connectivity in 2D, 6 in 3D) of a binary map; 0 stays 0 (boundary)."""
    from scipy import ndimage

    labelled, _ = ndimage.label(np.asarray(binary, dtype=bool))
    return labelled


def _thin_boundaries(segments: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Grow segments into boundary pixels (label 0) inside ``mask`` until none is left (ISBI 'thinning')."""
    from scipy import ndimage

    seg = segments.copy()
    if not seg.any():  # nothing to grow from: the whole mask is one segment
        seg[mask] = 1
        return seg
    while np.any(seg[mask] == 0):
        zeros = seg == 0
        grown = ndimage.maximum_filter(seg, size=3)
        seg[zeros] = grown[zeros]
    return seg


def _contingency(
    pred_seg: np.ndarray, ref_seg: np.ndarray, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint and marginal probabilities of (pred segment, reference segment) over the masked pixels."""
    p = pred_seg[mask].astype(np.int64)
    r = ref_seg[mask].astype(np.int64)
    if p.size == 0:
        raise ValueError("the reference has no foreground pixels: Rand/Info scores are undefined")
    _, p_idx = np.unique(p, return_inverse=True)
    _, r_idx = np.unique(r, return_inverse=True)
    pair = p_idx.astype(np.int64) * (int(r_idx.max()) + 1) + r_idx
    _, counts = np.unique(pair, return_counts=True)
    pij = counts / p.size
    s = np.bincount(p_idx) / p.size
    t = np.bincount(r_idx) / p.size
    return pij, s, t


def isbi_scores(pred_foreground: np.ndarray, ref_foreground: np.ndarray, thin: bool = True) -> dict[str, float]:
    """Foreground-restricted Rand and information-theoretic F-scores of the ISBI 2012 challenge.

    Inputs are binary maps of the object class (ISBI: cell interior = 1, membrane = 0). Each map
    is split into connected components (the segments). Only pixels inside reference segments are
    scored; with ``thin`` (the challenge's final metric) predicted boundary pixels are first
    absorbed into neighbouring predicted segments. With joint probabilities p_ij and marginals
    s_i (prediction), t_j (reference):

    * ``v_rand`` = sum p_ij^2 / (0.5 sum s_i^2 + 0.5 sum t_j^2)
    * ``v_info`` = I(S;T) / (0.5 H(S) + 0.5 H(T))  (1 when both entropies are 0)

    Also returned: the split and merge parts (Rand: sum p^2 / sum t^2 and / sum s^2; Info: I/H(S) and
    I/H(T)); a split score below 1 means the prediction cut reference segments apart, a merge score
    below 1 means it joined them.
    """
    pred_fg = np.asarray(pred_foreground).astype(bool)
    ref_fg = np.asarray(ref_foreground).astype(bool)
    if pred_fg.shape != ref_fg.shape:
        raise ValueError(f"prediction shape {pred_fg.shape} differs from reference shape {ref_fg.shape}")
    ref_seg = _segments(ref_fg)
    mask = ref_seg > 0
    pred_seg = _segments(pred_fg)
    if thin:
        pred_seg = _thin_boundaries(pred_seg, mask)
    pij, s, t = _contingency(pred_seg, ref_seg, mask)
    sum_p2, sum_s2, sum_t2 = float((pij**2).sum()), float((s**2).sum()), float((t**2).sum())
    h_s = float(-(s * np.log(s)).sum())
    h_t = float(-(t * np.log(t)).sum())
    # I(S;T) = H(S) + H(T) - H(S,T)
    h_st = float(-(pij * np.log(pij)).sum())
    info = h_s + h_t - h_st
    denom_info = 0.5 * h_s + 0.5 * h_t
    return {
        "v_rand": sum_p2 / (0.5 * sum_s2 + 0.5 * sum_t2),
        "v_rand_split": sum_p2 / sum_t2,
        "v_rand_merge": sum_p2 / sum_s2,
        "v_info": 1.0 if denom_info <= 1e-12 else max(0.0, info) / denom_info,
        "v_info_split": 1.0 if h_s <= 1e-12 else max(0.0, info) / h_s,
        "v_info_merge": 1.0 if h_t <= 1e-12 else max(0.0, info) / h_t,
    }


def scores_2d(
    probs: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor, foreground: int = 1
) -> dict[str, float]:
    """All UNet2D figures for one image: soft Dice (all classes), foreground Dice, ISBI V_rand / V_info.

    ``probs``: ``(K, *spatial)`` softmax output; ``ref``: integer labels ``(*spatial)``.
    The hard prediction is the argmax; the ISBI scores treat ``foreground`` as the object class.
    """
    p = torch.as_tensor(probs)
    r = np.asarray(ref.detach().cpu() if isinstance(ref, torch.Tensor) else ref).astype(np.int64)
    hard = torch.argmax(p, dim=0).cpu().numpy()
    out = {"soft_dice": soft_dice(p, r), "dice": dice_per_class(hard, r, {"fg": foreground})["fg"]}
    out.update(isbi_scores(hard == foreground, r == foreground))
    return out

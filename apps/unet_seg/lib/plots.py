"""Figures written next to results: training curves and prediction overlays (matplotlib, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# label colours (RGBA): distinct, readable on grey images
COLOURS = [(0.9, 0.1, 0.1), (0.1, 0.6, 0.95), (0.1, 0.8, 0.2), (0.95, 0.8, 0.1), (0.7, 0.2, 0.9), (1.0, 0.5, 0.0)]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: Sequence[Mapping[str, Any]], out_dir: str, name: str) -> list[str]:
    """Loss and per-class validation Dice per epoch; returns the written PNG paths (none without history)."""
    if not history:
        return []
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h.get("train_loss") if h.get("train_loss") is not None else np.nan for h in history], marker="o")
    ax1.set(title=f"{name}: training loss", xlabel="epoch", ylabel="loss")
    classes = sorted({k for h in history for k in (h.get("val_dice_per_class") or {})})
    for i, cls in enumerate(classes):
        values = [(h.get("val_dice_per_class") or {}).get(cls) for h in history]
        ax2.plot(
            epochs, [np.nan if v is None else v for v in values], marker="o", label=cls, color=COLOURS[i % len(COLOURS)]
        )
    ax2.set(title=f"{name}: validation Dice", xlabel="epoch", ylabel="Dice", ylim=(0, 1))
    if classes:
        ax2.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}_curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def plot_overlay(
    image: np.ndarray,
    label: np.ndarray,
    path: str,
    label_names: Mapping[str, int] | None = None,
    slices: int = 3,
    axis: int = -1,
) -> str:
    """A few slices (the ones with most foreground) of ``image`` with ``label`` coloured on top.

    2D images give one panel.
    """
    plt = _pyplot()
    img, lab = np.asarray(image, dtype=np.float32), np.asarray(label)
    if img.ndim == 2:
        img, lab, axis = img[..., None], lab[..., None], -1
    img, lab = np.moveaxis(img, axis, 0), np.moveaxis(lab, axis, 0)
    area = (lab > 0).reshape(lab.shape[0], -1).sum(1)
    order = np.argsort(-area)[: max(1, min(slices, lab.shape[0]))]
    fig, axes = plt.subplots(1, len(order), figsize=(4 * len(order), 4), squeeze=False)
    values = sorted(set(np.unique(lab).tolist()) - {0})
    names = {v: n for n, v in (label_names or {}).items()}
    for ax, idx in zip(axes[0], sorted(order), strict=True):
        sl = img[idx]
        lo, hi = np.percentile(sl, [1, 99]) if sl.size else (0, 1)
        ax.imshow(np.clip((sl - lo) / max(hi - lo, 1e-6), 0, 1).T, cmap="gray", origin="lower")
        rgba = np.zeros((*lab[idx].shape, 4))
        for i, v in enumerate(values):
            rgba[lab[idx] == v] = (*COLOURS[i % len(COLOURS)], 0.45)
        ax.imshow(np.transpose(rgba, (1, 0, 2)), origin="lower")
        ax.set_title(f"slice {idx}")
        ax.axis("off")
    if values:
        handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[i % len(COLOURS)]) for i in range(len(values))]
        fig.legend(handles, [names.get(v, str(v)) for v in values], loc="lower center", ncol=len(values))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

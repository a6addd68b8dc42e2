"""Published model files: ``{"model": state_dict, "meta": {...}}`` written atomically.

The meta block says how to rebuild the network (spec), which labels it predicts, its ROI and
channels, and where it came from (run, epoch, validation Dice, time). Inferers build the
network from it, so a served model never depends on today's conf matching yesterday's.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Meta keys that must agree between a checkpoint and the model config for it to be served.
COMPATIBILITY_KEYS = ("labels", "in_channels", "spatial_dims")


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (state_dict, meta) of a checkpoint; meta is {} for plain state dicts."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path}: not a checkpoint dictionary")
    state = ckpt.get("model", ckpt)
    meta = dict(ckpt.get("meta", {}))
    return dict(state), meta


_meta_cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}


def read_meta(path: str) -> dict[str, Any]:
    """Meta block of a checkpoint, cached by file modification time and size (cheap for /info)."""
    st = os.stat(path)
    key = (st.st_mtime_ns, st.st_size)
    cached = _meta_cache.get(path)
    if cached and cached[0] == key:
        return dict(cached[1])
    _, meta = read_checkpoint(path)
    _meta_cache[path] = (key, meta)
    return dict(meta)


def write_checkpoint_atomic(path: str, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write {"model", "meta"} to a temp file in the same folder, then rename over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".publish_", suffix=".pt", dir=folder)
    os.close(fd)
    try:
        torch.save({"model": dict(state), "meta": dict(meta)}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_publish_leftovers(model_dir: str) -> list[str]:
    """Remove temp files of publishes interrupted by a crash or kill -9 (``.publish_*``); returns their names.

    Call only where no publish can be running: server start-up and the start of a training (one at a time).
    """
    removed = []
    for path in glob.glob(os.path.join(model_dir, "**", ".publish_*"), recursive=True):
        try:
            os.remove(path)
            removed.append(os.path.basename(path))
            logger.warning(f"removed the leftover of an interrupted publish: {os.path.basename(path)}")
        except OSError as e:
            logger.warning(f"cannot remove leftover {os.path.basename(path)}: {e}")
    return removed


def incompatibility(meta: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """Why a checkpoint's meta cannot serve the expected config, or None when it can."""
    if not meta:
        return "checkpoint has no meta block (not written by unet_seg)"
    for key in COMPATIBILITY_KEYS:
        if key in expected and meta.get(key) != expected[key]:
            return f"checkpoint {key}={meta.get(key)!r} but the model is configured with {key}={expected[key]!r}"
    return None


def now_iso() -> str:
    """Local time stamp used in published meta."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")

"""Label values <-> names, kept exact across import and export (no Slicer needed).

Slicer's positional import (value k -> k-th name) loses non-contiguous values; instead the module
builds a colour table from the server's ``label_names`` (``{name: value}``) and maps by NAME.
These helpers do the array side: a colour table with stable colours, remapping a label map
between two name->value maps, and the ``label_info`` sent with a submitted label.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping

import numpy as np


def colour_table(label_names: Mapping[str, int]) -> list[dict]:
    """One entry per label: value, name and an RGB colour (stable: derived from the value)."""
    out = []
    for name, value in sorted(label_names.items(), key=lambda kv: kv[1]):
        hue = (int(value) * 0.61803398875) % 1.0
        rgb = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
        out.append({"value": int(value), "name": name, "rgb": [round(c, 4) for c in rgb]})
    return out


def remap(labelmap: np.ndarray, source: Mapping[str, int], target: Mapping[str, int]) -> np.ndarray:
    """Rewrite values from the ``source`` name->value map to the ``target`` one (by name; 0 stays 0).

    Values in the array that ``source`` does not name, and names ``target`` lacks, raise
    ``ValueError`` naming them rather than being dropped silently.
    """
    arr = np.asarray(labelmap)
    present = set(np.unique(arr).tolist()) - {0}
    unnamed = sorted(present - set(int(v) for v in source.values()))
    if unnamed:
        raise ValueError(f"label values {unnamed} have no name in {dict(source)}")
    missing = sorted(n for n, v in source.items() if v in present and n not in target)
    if missing:
        raise ValueError(f"labels {missing} are not known to the target {sorted(target)}")
    out = np.zeros(arr.shape, dtype=np.int32)
    for name, value in source.items():
        if name in target:
            out[arr == value] = int(target[name])
    return out


def label_info(label_names: Mapping[str, int]) -> list[dict]:
    """The ``label_info`` list sent with a submitted label: name, value and colour per label."""
    return [{"name": e["name"], "idx": e["value"], "color": e["rgb"]} for e in colour_table(label_names)]

"""Train/validation splits persisted beside the model, kept across retrains, and the data fingerprint.

* ``stable_split``: one split in ``<model>_split.json``; recorded validation cases stay in
  validation while they have labels, new labels go to training.
* ``fold_split``: k folds in ``<model>_folds.json``; a case never changes fold.
* ``data_fingerprint``: digest of the labelled cases a run saw (ids, image sizes, label bytes),
  stored in each version's meta.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np

from ..checkpoints import now_iso
from ..conf import ConfError


def case_id(item: Mapping[str, Any]) -> str:
    """Stable identifier of a datalist item: the image file name (first file for multi-file images)."""
    image = item["image"]
    first = image[0] if isinstance(image, (list, tuple)) else image
    return os.path.basename(str(first))


def stable_split(
    datalist: Sequence[dict], path: str, val_split: float, seed: int = 0, resplit: bool = False
) -> tuple[list[dict], list[dict]]:
    """Train/validation split persisted in ``path`` and kept across retrains.

    Validation cases recorded earlier stay in validation while they still have labels; every
    other labelled case goes to training. A new split (seeded) is drawn only on the first
    run, when ``resplit`` is asked, or when no recorded validation case is left.
    """
    by_id = {case_id(d): d for d in datalist}
    stored: dict[str, Any] = {}
    if os.path.exists(path) and not resplit:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    val_ids = [i for i in stored.get("validation", []) if i in by_id]
    if not val_ids:
        n = len(by_id)
        n_val = 0
        if val_split > 0 and n >= 2:
            n_val = min(max(1, int(round(n * val_split))), n - 1)
        val_ids = sorted(random.Random(seed).sample(sorted(by_id), n_val))
    train_ids = sorted(i for i in by_id if i not in set(val_ids))
    record = {"validation": val_ids, "training": train_ids, "val_split": val_split, "seed": seed, "updated": now_iso()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]


def fold_split(
    datalist: Sequence[dict], path: str, nfolds: int, fold: int, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """K-fold cross-validation split persisted in ``path`` (case -> fold), stable across retrains.

    Cases recorded earlier keep their fold; new cases are dealt to the currently smallest folds
    (seeded order), so adding labels never moves a case between training and validation of a fold.
    """
    if nfolds < 2 or not 0 <= fold < nfolds:
        raise ConfError(f"fold must be in [0, nfolds) with nfolds >= 2, got fold={fold}, nfolds={nfolds}")
    by_id = {case_id(d): d for d in datalist}
    stored: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    if stored.get("nfolds", nfolds) != nfolds:
        raise ConfError(f"{path} was made with nfolds={stored['nfolds']}; use it or delete the file to re-fold")
    assignment = {k: int(v) for k, v in stored.get("assignment", {}).items() if k in by_id}
    new = sorted(i for i in by_id if i not in assignment)
    random.Random(seed).shuffle(new)
    for case in new:
        sizes = [sum(1 for v in assignment.values() if v == k) for k in range(nfolds)]
        assignment[case] = sizes.index(min(sizes))
    record = {"nfolds": nfolds, "seed": seed, "assignment": dict(sorted(assignment.items())), "updated": now_iso()}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)
    val = [by_id[i] for i in sorted(by_id) if assignment[i] == fold]
    train = [by_id[i] for i in sorted(by_id) if assignment[i] != fold]
    return train, val


def estimated_bytes(datalist: Sequence[dict]) -> int:
    """Decoded float32 size of the images and labels in a datalist, from file headers only."""
    total = 0
    for item in datalist:
        for key in ("image", "label"):
            paths = item.get(key)
            for p in paths if isinstance(paths, (list, tuple)) else [paths]:
                if not p:
                    continue
                try:
                    total += int(np.prod(nib.load(str(p)).shape)) * 4
                except Exception:
                    total += os.path.getsize(p) * 8  # unknown format: assume ~8x compression
    return total


def data_fingerprint(datalist: Sequence[dict]) -> str:
    """sha256 (first 16 hex digits) of the cases: id, image file sizes and the label files' bytes."""
    digest = hashlib.sha256()
    for item in sorted(datalist, key=case_id):
        digest.update(case_id(item).encode())
        images = item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]]
        for path in images:
            digest.update(str(os.path.getsize(path)).encode())
        label = item.get("label")
        if label:
            with open(label, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]

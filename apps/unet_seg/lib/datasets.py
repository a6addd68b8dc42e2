"""Datasets outside a server: MSD-style folders (dataset.json) or images/ + labels/ folders.

The CLI and the scripts read cases through here and lay them out as a MONAI Label studies folder
(symlinks; labels in ``labels/final``) so training runs the server's own trainer unchanged.
Problems (missing dataset.json fields, missing files, a label without its image) raise
``DatasetError`` naming the file and field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".tif", ".tiff", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """The dataset folder is not usable; the message says which file or field is wrong."""


@dataclass
class Case:
    """One image (a path, or a list of per-modality paths) with its label path, if any."""

    name: str
    image: str | list[str]
    label: str | None = None


def _stem(path: str) -> str:
    base = os.path.basename(path)
    for suffix in IMAGE_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _require(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise DatasetError(f"{what} {path} does not exist")
    return path


def load_cases(data: str, split: str = "training") -> list[Case]:
    """Cases of ``data``: an MSD folder (``dataset.json``; ``split`` = training or test) or images/ + labels/
    folders."""
    if not os.path.isdir(data):
        raise DatasetError(f"--data {data} is not a folder")
    manifest = os.path.join(data, "dataset.json")
    if os.path.exists(manifest):
        try:
            with open(manifest, encoding="utf-8") as f:
                ds = json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{manifest} is not valid JSON: {e}") from e
        if split not in ds:
            raise DatasetError(f"{manifest} has no '{split}' list (fields: {', '.join(sorted(ds))})")
        cases = []
        for i, item in enumerate(ds[split]):
            if isinstance(item, str):
                item = {"image": item}
            if "image" not in item:
                raise DatasetError(f"{manifest} {split}[{i}] has no 'image' field")
            image = item["image"]
            paths = [os.path.normpath(os.path.join(data, p)) for p in (image if isinstance(image, list) else [image])]
            for p in paths:
                _require(p, f"{split}[{i}] image")
            label = item.get("label")
            if split == "training" and not label:
                raise DatasetError(f"{manifest} training[{i}] has no 'label' field")
            label_path = _require(os.path.normpath(os.path.join(data, label)), f"{split}[{i}] label") if label else None
            cases.append(Case(_stem(paths[0]), paths if len(paths) > 1 else paths[0], label_path))
        return cases
    images_dir, labels_dir = os.path.join(data, "images"), os.path.join(data, "labels")
    if not os.path.isdir(images_dir):
        raise DatasetError(f"{data} has neither dataset.json nor an images/ folder")
    labels = {}
    if os.path.isdir(labels_dir):
        labels = {
            _stem(f): os.path.join(labels_dir, f)
            for f in sorted(os.listdir(labels_dir))
            if f.lower().endswith(IMAGE_SUFFIXES)
        }
    images = {
        _stem(f): os.path.join(images_dir, f)
        for f in sorted(os.listdir(images_dir))
        if f.lower().endswith(IMAGE_SUFFIXES)
    }
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise DatasetError(f"labels without an image in {images_dir}: {', '.join(orphans[:5])}")
    if not images:
        raise DatasetError(f"{images_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [Case(name, path, labels.get(name)) for name, path in images.items()]


def label_names(data: str) -> list[str] | None:
    """Label names (background excluded, in value order) from an MSD dataset.json, if present."""
    manifest = os.path.join(data, "dataset.json")
    if not os.path.exists(manifest):
        return None
    with open(manifest, encoding="utf-8") as f:
        labels = json.load(f).get("labels")
    if not labels:
        return None
    return [str(v).lower() for k, v in sorted(labels.items(), key=lambda kv: int(kv[0])) if int(k) != 0]


def link_studies(cases: list[Case], studies: str) -> int:
    """Symlink labelled cases into a MONAI Label studies layout (images + labels/final); returns the count.

    Cases whose modalities are separate files are skipped (a studies folder holds one file per
    image: use one 4D file per case).
    """
    os.makedirs(os.path.join(studies, "labels", "final"), exist_ok=True)
    n = 0
    for case in cases:
        if case.label is None or isinstance(case.image, list):
            continue
        name = os.path.basename(case.image)
        # the image's id, the label's suffix
        label_name = _stem(name) + os.path.basename(case.label)[len(_stem(case.label)) :]
        for src, dst in (
            (case.image, os.path.join(studies, name)),
            (case.label, os.path.join(studies, "labels", "final", label_name)),
        ):
            if not os.path.lexists(dst):
                try:
                    os.symlink(os.path.abspath(src), dst)
                except FileExistsError:  # another process (torchrun rank) linked it first
                    if os.path.realpath(dst) != os.path.realpath(src):
                        raise DatasetError(f"{dst} exists and is not {src}") from None
        n += 1
    return n

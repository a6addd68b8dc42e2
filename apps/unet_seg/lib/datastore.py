"""A LocalDatastore that checks uploads before storing them and stays consistent under concurrency.

MONAI Label's LocalDatastore copies whatever arrives over ``PUT /datastore/label`` into
``labels/final`` (overwriting a good label with a corrupt one), joins image ids into paths
unchecked, and its file-watcher thread iterates the datastore while request threads change it
(the watcher dies with "dictionary changed size during iteration" and stays dead). Here:

* ids are restricted to safe names;
* images: header probed first (voxel limit, before decoding), then every voxel read and checked
  (``lib.validation.check_image``), and the channel count / dimensions must suit a served model;
* labels: ``lib.validation.check_label`` (integer, finite, values the models know, the image's
  shape, an affine within ``label_tolerance_mm`` of the image's, not constant, not empty unless
  ``allow_empty``);
* an existing image id is 409 unless ``overwrite``; then the image is replaced and each of its
  labels is kept only if it still fits the new image's grid (shape and affine), else removed
  (the reply lists what was kept and removed);
* one re-entrant lock guards every read and write of the in-memory datastore, the watcher
  included, and a watcher event that fails is logged instead of killing the thread.
Failures raise ``InputError``/``TooLarge`` (the routes answer 422/413) or an HTTP 404/409 whose
message names the id; nothing stored is touched.

A NIfTI label that covers the image's grid with its axes flipped or permuted (same voxels in
world space, other index order: ITK/Slicer writers do this for left-handed affines) is
re-oriented onto the image's index order before it is stored, so every consumer, slice-wise 2D
ones included, sees label and image voxel for voxel.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from .conf import parse_bool
from .validation import (
    FileHeader,
    InputError,
    check_affine,
    check_image,
    check_label,
    file_suffix,
    probe_file,
    read_voxels,
)

logger = logging.getLogger(__name__)

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_id(value: str, what: str = "image id") -> str:
    """Reject ids that could escape the datastore folder or are not plain names."""
    if not value or not SAFE_ID.match(value) or ".." in value:
        raise HTTPException(
            status_code=422, detail=f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' only (no paths)"
        )
    return value


def align_to_image(
    label: np.ndarray, label_affine: np.ndarray, image_affine: np.ndarray, atol: float = 1e-3
) -> np.ndarray | None:
    """``label`` in the image's index order when the two grids differ only by axis flips/permutations, else None.

    Returns the label unchanged when the affines already agree.
    """
    if label.ndim != 3 or np.allclose(label_affine, image_affine, atol=atol):
        return label
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(label_affine), io_orientation(image_affine))
    moved = apply_orientation(label, transform)
    moved_affine = label_affine @ inv_ornt_aff(transform, label.shape)
    return moved if np.allclose(moved_affine, image_affine, atol=atol) else None


@dataclass
class UploadRules:
    """What the served models accept: (channels, spatial dims) pairs and label values; limits."""

    inputs: set[tuple[int, int]] = field(default_factory=lambda: {(1, 3)})
    label_values: set[int] = field(default_factory=lambda: {1})
    max_voxels: int = 400_000_000
    label_tolerance_mm: float = 0.5


def image_layout(header: FileHeader | None, shape: tuple[int, ...]) -> tuple[int, int]:
    """(channels, spatial dims) of an image as the loaders will see it (channels last in files)."""
    colour = header is not None and header.format in ("png", "jpeg")
    if len(shape) == 2:
        return 1, 2
    if len(shape) == 3:
        return (shape[2], 2) if colour and shape[2] in (3, 4) else (1, 3)
    if len(shape) == 4:
        return shape[3], 3
    raise InputError(
        f"image has {len(shape)} dimensions (shape {shape}); expected 2D or 3D, optionally with a channel axis"
    )


def check_image_upload(
    rules: UploadRules, path: str, name: str
) -> tuple[FileHeader, tuple[int, ...], np.ndarray | None]:
    """Probe, decode and check an image file for any datastore: (header, array shape, affine) or InputError/TooLarge."""
    header = probe_file(path, name, rules.max_voxels)
    arr, affine = read_voxels(path, header)
    check_image(arr, affine, "image")
    channels, dims = image_layout(header, tuple(arr.shape))
    if (channels, dims) not in rules.inputs:
        served = ", ".join(f"{c} channel(s) {d}D" for c, d in sorted(rules.inputs))
        raise InputError(
            f"image has {channels} channel(s) and {dims} spatial dimensions (shape {tuple(arr.shape)}); "
            f"the served models take: {served}"
        )
    return header, tuple(arr.shape), affine


def check_label_upload(rules: UploadRules, path: str, name: str, allow_empty: bool) -> None:
    """The label checks that need no image file (datastores whose images are not local files, e.g. DICOMweb)."""
    header = probe_file(path, name, rules.max_voxels)
    label, _ = read_voxels(path, header)
    check_label(label, rules.label_values, "label", allow_empty=allow_empty)


F = TypeVar("F", bound=Callable[..., Any])


def locked(method: F) -> F:
    """Run a datastore method under the datastore's re-entrant lock."""

    @functools.wraps(method)
    def wrapper(self: ValidatingDatastore, *args: Any, **kwargs: Any) -> Any:
        with self._mutex:
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class WatcherLock:
    """Mixin for LocalDatastore subclasses: one re-entrant lock (``_mutex``) shared with the file watcher.

    Without it the watcher reloads the datastore file while a request thread changes the datastore
    (that thread then writes the reloaded copy back without its change), and a failing event kills
    the watcher thread for good.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._mutex = threading.RLock()  # before the datastore's __init__: the watcher may fire at once
        super().__init__(*args, **kwargs)

    def _on_any_event(self, event: Any) -> None:
        try:
            with self._mutex:
                super()._on_any_event(event)  # type: ignore[misc]
        except Exception:  # a dead watcher never recovers: log and keep watching
            logger.exception(f"datastore watcher: event {getattr(event, 'src_path', event)!r} failed; still watching")

    def _on_modify_event(self, event: Any) -> None:
        try:
            with self._mutex:
                super()._on_modify_event(event)  # type: ignore[misc]
        except Exception:
            logger.exception(f"datastore watcher: event {getattr(event, 'src_path', event)!r} failed; still watching")


class NoServerPaths:
    """Mixin for LocalDatastore subclasses: image info (``/datastore/image/info``, next sample) without the file's
    path on the server; clients download images by id (``GET /datastore/image``)."""

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        with self._mutex:  # type: ignore[attr-defined]
            info = super().get_image_info(image_id)  # type: ignore[misc]
        info.pop("path", None)
        return info


class ValidatingDatastore(NoServerPaths, WatcherLock, LocalDatastore):
    """LocalDatastore with upload validation and a lock around its state (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.rules = UploadRules()
        super().__init__(*args, **kwargs)

    def configure(self, rules: UploadRules) -> None:
        self.rules = rules

    # ---- every method that touches the in-memory model, under the watcher's lock ----------------
    refresh = locked(LocalDatastore.refresh)
    datalist = locked(LocalDatastore.datalist)
    get_image_uri = locked(LocalDatastore.get_image_uri)
    get_label_uri = locked(LocalDatastore.get_label_uri)
    get_labels_by_image_id = locked(LocalDatastore.get_labels_by_image_id)
    get_label_by_image_id = locked(LocalDatastore.get_label_by_image_id)
    get_label_info = locked(LocalDatastore.get_label_info)
    get_labeled_images = locked(LocalDatastore.get_labeled_images)
    get_unlabeled_images = locked(LocalDatastore.get_unlabeled_images)
    list_images = locked(LocalDatastore.list_images)
    remove_image = locked(LocalDatastore.remove_image)
    remove_label = locked(LocalDatastore.remove_label)
    update_image_info = locked(LocalDatastore.update_image_info)
    update_label_info = locked(LocalDatastore.update_label_info)
    status = locked(LocalDatastore.status)
    json = locked(LocalDatastore.json)

    @locked
    def __str__(self) -> str:
        return super().__str__()

    # ---- images -----------------------------------------------------------------------------
    def add_checked_image(
        self, image_id: str, path: str, name: str, info: dict[str, Any], overwrite: bool
    ) -> dict[str, Any]:
        """Store an uploaded image after checking it; 409 for an existing id unless ``overwrite``."""
        check_id(image_id)
        header, shape, affine = check_image_upload(self.rules, path, name)
        with self._mutex:
            exists = image_id in self._datastore.objects
            if exists and not overwrite:
                raise HTTPException(
                    status_code=409,
                    detail=f"image {image_id!r} already exists; send params "
                    f'{{"overwrite": true}} to replace it (its labels are kept '
                    f"only if they fit the new image's grid)",
                )
            kept, removed = [], []
            if exists:
                old_uri = self.get_image_uri(image_id)
                for tag in list(self._datastore.objects[image_id].labels):
                    if self._label_fits(self.get_label_uri(image_id, tag), shape, affine, header):
                        kept.append(tag)
                    else:
                        super().remove_label(image_id, tag)
                        removed.append(tag)
                suffix = file_suffix(name)
                if not old_uri.endswith(suffix) and os.path.exists(old_uri):
                    os.remove(old_uri)  # stored under another extension: the new file replaces it
            super().add_image(image_id, path, dict(info))
            out: dict[str, Any] = {"image": image_id}
            if exists:
                out.update({"replaced": True, "labels_kept": kept, "labels_removed": removed})
                logger.info(f"image {image_id!r} replaced; labels kept {kept}, removed {removed} (grid changed)")
            return out

    def _label_fits(
        self, label_path: str, shape: tuple[int, ...], affine: np.ndarray | None, header: FileHeader
    ) -> bool:
        try:
            lab = probe_file(label_path, label_path)
        except InputError:
            return False
        spatial = shape[:3] if len(shape) == 4 else shape
        if tuple(lab.shape[: len(spatial)]) != tuple(spatial):
            return False
        if lab.affine is not None and affine is not None:
            return bool(np.allclose(lab.affine, affine, atol=1e-3))
        return True

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """MONAI Label's entry (training subprocesses, scripts): the same checks, no overwrite."""
        name = os.path.basename(image_filename)
        image_id = image_id or name[: -len(file_suffix(name))]
        return self.add_checked_image(image_id, image_filename, name, image_info or {}, overwrite=False)["image"]

    # ---- labels -----------------------------------------------------------------------------
    def save_checked_label(
        self, image_id: str, label_path: str, name: str, label_tag: str, label_info: dict[str, Any]
    ) -> str:
        """Check an uploaded label against its image and the served models, then store it."""
        check_id(image_id)
        check_id(label_tag, "label tag")
        with self._mutex:
            if image_id not in self._datastore.objects:
                raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore")
            image_path = self.get_image_uri(image_id)
        header = probe_file(label_path, name, self.rules.max_voxels)
        label, label_affine = read_voxels(label_path, header)
        image_header = probe_file(image_path, image_path)
        image_shape = tuple(image_header.shape)
        if image_header.format in ("png", "jpeg") and len(image_shape) == 3 and image_shape[2] in (3, 4):
            image_shape = image_shape[:2]  # colour photo: the label covers the pixels
        elif len(image_shape) == 4:
            image_shape = image_shape[:3]
        image_affine = image_header.affine
        check_affine(label_affine, "label")
        aligned_file = None
        if label_affine is not None and image_affine is not None and label.dtype.names is None:
            aligned = align_to_image(label, label_affine, image_affine)
            if aligned is not None and aligned is not label:
                label, label_affine = np.ascontiguousarray(aligned), image_affine
                aligned_file = f"{label_path}.aligned.nii.gz"
                nib.save(nib.Nifti1Image(label, image_affine), aligned_file)
                logger.info(f"label for {image_id!r}: axes re-oriented onto the image's index order")
        info = dict(label_info or {})
        allow_empty = parse_bool(info.pop("allow_empty", False), "allow_empty") or label_tag != "final"
        try:
            check_label(
                label,
                self.rules.label_values,
                "label",
                image_shape=image_shape,
                label_affine=label_affine if image_affine is not None else None,
                image_affine=image_affine,
                tolerance_mm=self.rules.label_tolerance_mm,
                allow_empty=allow_empty,
            )
            with self._mutex:
                return super().save_label(image_id, aligned_file or label_path, label_tag, info)
        finally:
            if aligned_file and os.path.exists(aligned_file):
                os.remove(aligned_file)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """MONAI Label's entry (e.g. inference with save_label): the same checks."""
        return self.save_checked_label(
            image_id, label_filename, os.path.basename(label_filename), label_tag, label_info
        )

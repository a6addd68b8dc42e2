"""A LocalDatastore that checks uploads before storing them.

MONAI Label's LocalDatastore copies whatever arrives over ``PUT /datastore/label`` into
``labels/final`` (overwriting a good label with a corrupt one) and joins image ids into paths
unchecked. Here ids are restricted to safe names, images and labels must be readable, labels
must match the image's spatial shape and hold non-negative integer values, and an all-background
final label is refused unless the request says ``allow_empty``. Failures raise an HTTP 4xx whose
message names the problem; nothing stored is touched.

A NIfTI label that covers the image's grid with its axes flipped or permuted (same voxels in
world space, other index order: ITK/Slicer writers do this for left-handed affines) is
re-oriented onto the image's index order before it is stored, so every consumer, slice-wise 2D
ones included, sees label and image voxel for voxel.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import nibabel as nib
import numpy as np
from fastapi import HTTPException
from monai.transforms import LoadImage
from monailabel.datastore.local import LocalDatastore

from .conf import parse_bool

logger = logging.getLogger(__name__)

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_id(value: str, what: str = "image id") -> str:
    """Reject ids that could escape the datastore folder or are not plain names."""
    if not value or not SAFE_ID.match(value) or ".." in value:
        raise HTTPException(status_code=422, detail=f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' only (no paths)")
    return value


def align_to_image(label: np.ndarray, label_affine: np.ndarray, image_affine: np.ndarray,
                   atol: float = 1e-3) -> np.ndarray | None:
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


def read_array(path: str, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Fully read an image file (catches truncated/corrupt data); returns (array, affine or None)."""
    try:
        if path.endswith((".nii", ".nii.gz")):
            img = nib.load(path)
            return np.asanyarray(img.dataobj), img.affine
        arr = LoadImage(image_only=True)(path)
        return np.asarray(arr), None
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"{what} {path.rsplit('/', 1)[-1]} cannot be read: {type(e).__name__}: {e}") from e


class ValidatingDatastore(LocalDatastore):
    """LocalDatastore with upload validation (see module docstring)."""

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        if image_id:
            check_id(image_id)
        arr, _ = read_array(image_filename, "image")
        if arr.ndim < 2 or arr.ndim > 4 or min(arr.shape) < 1:
            raise HTTPException(status_code=422, detail=f"image has unsupported shape {arr.shape}: expected 2D, 3D or 4D (3D + channels)")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        check_id(image_id)
        check_id(label_tag, "label tag")
        if image_id not in self._datastore.objects:
            raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore")
        label, label_affine = read_array(label_filename, "label")
        aligned_file = None
        image_path = self.get_image_uri(image_id)
        image_shape = self._image_spatial_shape(image_path)
        if label_affine is not None and image_path.endswith((".nii", ".nii.gz")):
            image_affine = nib.load(image_path).affine
            aligned = align_to_image(label, label_affine, image_affine)
            if aligned is None:
                logger.warning(f"label for {image_id!r}: affine differs from the image's beyond axis flips; stored in its own index order")
            elif aligned is not label:
                label = np.ascontiguousarray(aligned)
                aligned_file = label_filename = f"{label_filename}.aligned.nii.gz"
                nib.save(nib.Nifti1Image(label, image_affine), label_filename)
                logger.info(f"label for {image_id!r}: axes re-oriented onto the image's index order")
        lab = np.squeeze(label) if label.ndim > len(image_shape) else label
        if tuple(lab.shape) != tuple(image_shape):
            raise HTTPException(status_code=422, detail=f"label shape {tuple(label.shape)} does not match image {image_id!r} shape {tuple(image_shape)}")
        if np.issubdtype(lab.dtype, np.floating) and not np.allclose(lab, np.rint(lab)):
            raise HTTPException(status_code=422, detail="label values must be integers (got fractional values)")
        if lab.min() < 0:
            raise HTTPException(status_code=422, detail=f"label values must be >= 0 (got {lab.min()})")
        info = dict(label_info or {})
        allow_empty = parse_bool(info.pop("allow_empty", False), "allow_empty")
        if label_tag == "final" and not allow_empty and not np.any(lab):
            raise HTTPException(status_code=422, detail="label is empty (all background); send params {\"allow_empty\": true} to store it anyway")
        try:
            return super().save_label(image_id, label_filename, label_tag, info)
        finally:
            if aligned_file and os.path.exists(aligned_file):
                os.remove(aligned_file)

    @staticmethod
    def _image_spatial_shape(path: str) -> tuple[int, ...]:
        if path.endswith((".nii", ".nii.gz")):
            shape = nib.load(path).shape
            return tuple(shape[:3]) if len(shape) == 4 else tuple(shape)
        arr = LoadImage(image_only=True)(path)
        if path.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")) and arr.ndim == 3:
            return tuple(arr.shape[:2])  # colour photo: drop the RGB(A) axis
        return tuple(arr.shape)

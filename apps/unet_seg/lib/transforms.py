"""Shared transform chains: loading with checks, normalisation and augmentation presets.

Every model composes its pre-processing from these pieces so that training, validation, the
server inferers and the CLI see identical inputs. Checks raise ``InputError`` naming the file
and what was expected (channel count, dimensions, label values).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapLabelValued,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandRotate90d,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    RandZoomd,
    Spacingd,
    SpatialPadd,
)

from .planning import normalize_by_plan  # noqa: E402
from .validation import InputError, check_dtype, check_finite, check_image  # noqa: E402  (InputError re-exported)


def _source(data: Mapping[Hashable, Any], key: Hashable) -> str:
    """Best description of where ``data[key]`` came from, for error messages."""
    value = data.get(f"{key}_path") or data.get(key)
    if isinstance(value, MetaTensor):
        value = value.meta.get("filename_or_obj", "<in-memory>")
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


class SafeLoadImaged(MapTransform):
    """LoadImaged that turns unreadable/corrupt/truncated files into an ``InputError`` naming the file."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        kwargs.setdefault("dtype", None)  # keep the file's data type so CheckImaged/CheckLabeld can judge it
        self.loader = LoadImaged(keys, allow_missing_keys=allow_missing_keys, image_only=True, **kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        try:
            return self.loader(data)
        except Exception as e:  # monai wraps reader errors in RuntimeError with a long trace
            keys = [k for k in self.keys if k in data]
            names = "; ".join(f"{k}={_source(data, k)}" for k in keys)
            root = e
            while root.__cause__ is not None:
                root = root.__cause__
            raise InputError(f"{names} cannot be read: {type(root).__name__}: {root}") from e


class CheckImaged(MapTransform):
    """Refuse images with a non-real data type, NaN/Inf voxels, empty axes or a degenerate affine; cast to float32."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            arr = img.array if isinstance(img, MetaTensor) else np.asarray(img)
            affine = np.asarray(img.affine) if isinstance(img, MetaTensor) and img.affine.shape == (4, 4) else None
            check_image(arr, affine, f"{key} {_source(data, key)}")
            out = torch.as_tensor(np.asarray(arr, dtype=np.float32))
            d[key] = MetaTensor(out, meta=img.meta) if isinstance(img, MetaTensor) else out
        return d


class CheckChannelsd(MapTransform):
    """Require ``channels`` channels and ``spatial_dims`` spatial dims (one value or the allowed ones).

    Checked after EnsureChannelFirst.
    """

    def __init__(
        self,
        keys: KeysCollection,
        channels: int,
        spatial_dims: int | Sequence[int],
        modality_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(keys)
        self.channels = channels
        self.allowed_dims = (spatial_dims,) if isinstance(spatial_dims, int) else tuple(spatial_dims)
        self.modality_names = list(modality_names or [])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            shape = tuple(d[key].shape)
            if len(shape) - 1 not in self.allowed_dims:
                dims = " or ".join(f"{n}D" for n in self.allowed_dims)
                raise InputError(
                    f"{key} {_source(data, key)}: expected a {dims} image "
                    f"(optionally with a channel axis), got array of shape {shape[1:] if shape[0] == 1 else shape}"
                )
            if shape[0] != self.channels:
                names = f" ({', '.join(self.modality_names)})" if self.modality_names else ""
                raise InputError(
                    f"{key} {_source(data, key)}: the model expects {self.channels} channel(s){names}, "
                    f"got {shape[0]} (shape {shape})"
                )
        return d


class CheckLabeld(MapTransform):
    """Require a label of the image's spatial shape whose values are background or known label values.

    Float labels with integer values are cast to integers (some MSD files are stored as float32).
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_values: Sequence[int],
        image_key: str = "image",
        require_foreground: bool = False,
    ) -> None:
        super().__init__(keys)
        self.allowed = {0, *[int(v) for v in label_values]}
        self.image_key = image_key
        self.require_foreground = require_foreground

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            arr = lab.array if isinstance(lab, MetaTensor) else np.asarray(lab)
            check_dtype(arr, f"label {_source(data, key)}")
            check_finite(arr, f"label {_source(data, key)}")
            if self.image_key in d and tuple(d[self.image_key].shape[1:]) != tuple(arr.shape[1:]):
                raise InputError(
                    f"label {_source(data, key)}: spatial shape {tuple(arr.shape[1:])} differs from "
                    f"image shape {tuple(d[self.image_key].shape[1:])}"
                )
            if arr.shape[0] != 1:
                raise InputError(
                    f"label {_source(data, key)}: expected a single-channel label map, got shape {arr.shape}"
                )
            rounded = np.rint(arr)
            if np.issubdtype(arr.dtype, np.floating) and not np.allclose(rounded, arr):
                raise InputError(f"label {_source(data, key)}: label values must be integers")
            values = set(np.unique(rounded).astype(int).tolist())
            unknown = sorted(values - self.allowed)
            if unknown:
                raise InputError(
                    f"label {_source(data, key)}: values {unknown} are not among the model's label values "
                    f"{sorted(self.allowed)}"
                )
            if self.require_foreground and values <= {0}:
                raise InputError(
                    f"label {_source(data, key)}: the label is empty (background only); training needs foreground"
                )
            out = torch.as_tensor(rounded.astype(np.int16))
            d[key] = MetaTensor(out, meta=lab.meta) if isinstance(lab, MetaTensor) else out
        return d


def load_chain(
    keys: Sequence[str],
    channels: int,
    spatial_dims: int | Sequence[int],
    label_values: Sequence[int] | None,
    orientation: str | None = "RAS",
    modality_names: Sequence[str] | None = None,
    require_foreground: bool = True,
    label_map: Mapping[int, int] | None = None,
) -> list:
    """Load image (+label), channel-first, check channels/labels, optional reorientation.

    ``label_map`` renames stored label values before the check (e.g. ``{255: 1}`` for PNG masks
    that store the object as white).
    """
    chain: list = [
        SafeLoadImaged(keys=list(keys)),
        CheckImaged(keys="image"),
        EnsureChannelFirstd(keys=list(keys)),
        CheckChannelsd(keys="image", channels=channels, spatial_dims=spatial_dims, modality_names=modality_names),
    ]
    if "label" in keys and label_values is not None:
        if label_map:
            chain.append(
                MapLabelValued(keys="label", orig_labels=list(label_map), target_labels=list(label_map.values()))
            )
        chain.append(CheckLabeld(keys="label", label_values=label_values, require_foreground=require_foreground))
    if orientation:
        chain.append(Orientationd(keys=list(keys), axcodes=orientation, labels=None))
    return chain


def zscore_nonzero(keys: str = "image") -> list:
    """Per-channel z-score over non-zero voxels (BraTS / No New-Net convention), float32."""
    return [
        NormalizeIntensityd(keys=keys, nonzero=True, channel_wise=True),
        EnsureTyped(keys=keys, dtype=torch.float32),
    ]


def random_crop_foreground(roi_size: Sequence[int], num_samples: int, pos_fraction: float) -> list:
    """Pad to the ROI, then random ROI crops centred on foreground with probability ``pos_fraction``."""
    pos = max(pos_fraction, 0.0)
    neg = max(1.0 - pos_fraction, 0.0)
    return [
        SpatialPadd(keys=["image", "label"], spatial_size=list(roi_size)),
        RandCropByPosNegLabeld(
            keys=["image", "label"],
            label_key="label",
            spatial_size=list(roi_size),
            pos=pos,
            neg=neg,
            num_samples=num_samples,
            image_key="image",
            image_threshold=-1e9,
            allow_smaller=True,
        ),
    ]


def flips_and_brightness(spatial_dims: int, flip_prob: float = 0.5, intensity_prob: float = 0.15) -> list:
    """Mirror flips on every axis plus brightness (scale) and shift augmentation."""
    return [
        *[RandFlipd(keys=["image", "label"], prob=flip_prob, spatial_axis=a) for a in range(spatial_dims)],
        RandScaleIntensityd(keys="image", factors=0.3, prob=intensity_prob),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=intensity_prob),
    ]


def nnunet_augmentation(spatial_dims: int, anisotropic: bool = False) -> list:
    """nnU-Net's default training augmentation with its probabilities.

    Rotation (+-30 deg; only in-plane when anisotropic) and scaling (0.7-1.4) each p=0.2,
    Gaussian noise (variance up to 0.1) p=0.1, Gaussian blur (sigma 0.5-1) p=0.2, brightness
    (x0.75-1.25) p=0.15, contrast (x0.75-1.25 around the mean) p=0.15, low-resolution simulation
    (zoom 0.5-1) p=0.25, gamma (0.7-1.5) p=0.3, mirroring on every axis p=0.5.
    """
    angle = 30 * 3.141592653589793 / 180
    if spatial_dims == 3:
        rotate = (angle, 0.0, 0.0) if anisotropic else (angle, angle, angle)
    else:
        rotate = (angle,)
    sigma = (0.5, 1.0)
    return [
        RandAffined(
            keys=["image", "label"], prob=0.2, rotate_range=rotate, mode=("bilinear", "nearest"), padding_mode="zeros"
        ),
        RandAffined(
            keys=["image", "label"],
            prob=0.2,
            scale_range=[(-0.3, 0.4)] * spatial_dims,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        ),
        RandGaussianNoised(keys="image", prob=0.1, mean=0.0, std=0.1**0.5),
        RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma),
        RandScaleIntensityd(keys="image", prob=0.15, factors=0.25),
        RandScaleIntensityFixedMeand(keys="image", prob=0.15, factors=0.25, preserve_range=True),
        RandSimulateLowResolutiond(
            keys="image",
            prob=0.25,
            zoom_range=(0.5, 1.0),
            upsample_mode="trilinear" if spatial_dims == 3 else "bilinear",
        ),
        RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5), retain_stats=True),
        *[RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=a) for a in range(spatial_dims)],
    ]


def nonzero(x: Any) -> Any:
    """Foreground selector for crop-to-non-zero (module level so it pickles for spawned workers)."""
    return x != 0


class NormalizeFromPland(MapTransform):
    """Per-channel normalisation as the nnU-Net plan says.

    ``{"scheme": "ct", "clip_min": lo, "clip_max": hi, "mean": m, "std": s}``: clip to the dataset's foreground
    0.5/99.5 percentiles, then z-score with the dataset's foreground statistics.
    ``{"scheme": "zscore", "use_nonzero_mask": bool}``: per-image z-score (over non-zero voxels
    when the plan says so; voxels outside stay 0).
    """

    def __init__(self, keys: KeysCollection, schemes: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(keys)
        self.schemes = [dict(s) for s in schemes]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != len(self.schemes):
                raise InputError(
                    f"{key} {_source(data, key)}: the plan normalises {len(self.schemes)} channel(s), "
                    f"got {img.shape[0]}"
                )
            out = normalize_by_plan(torch.as_tensor(img, dtype=torch.float32), self.schemes)
            d[key] = (
                MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
                if isinstance(img, MetaTensor)
                else out
            )
        return d


def nnunet_preprocess(
    keys: Sequence[str], target_spacing: Sequence[float], schemes: Sequence[Mapping[str, Any]]
) -> list:
    """Crop to non-zero, resample to the plan's spacing (3rd order image, nearest label), normalise.

    All steps but the normalisation are invertible, so the inferer can return labels in the
    request image's original geometry.
    """
    keys = list(keys)
    modes: Any = (3, "nearest") if len(keys) == 2 else 3
    return [
        CropForegroundd(keys=keys, source_key="image", select_fn=nonzero, allow_smaller=True),
        Spacingd(
            keys=keys,
            pixdim=list(target_spacing),
            mode=modes,
            padding_mode="border" if len(keys) == 1 else ("border", "border"),
        ),
        NormalizeFromPland(keys="image", schemes=schemes),
    ]


# ---- 2D: slices of volumes, the U-Net paper's border weights, UNet_Medical augmentation ---------


class RandSliced(Randomizable, MapTransform):
    """Turn a 3D (C, X, Y, Z) sample into one 2D slice along ``axis``; 2D samples pass unchanged.

    With probability ``pos_fraction`` the slice is drawn among those whose label has foreground
    (foreground oversampling), otherwise uniformly. All ``keys`` get the same slice.
    """

    def __init__(
        self, keys: KeysCollection, axis: int = 2, pos_fraction: float = 0.5, label_key: str = "label"
    ) -> None:
        super().__init__(keys)
        self.axis = axis
        self.pos_fraction = pos_fraction
        self.label_key = label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = d[self.first_key(d)]
        if first.ndim != 4:
            return d
        n = first.shape[1 + self.axis]
        index = int(self.R.randint(n))
        if self.label_key in d and self.R.rand() < self.pos_fraction:
            lab = torch.as_tensor(d[self.label_key])
            other = tuple(i for i in range(lab.ndim) if i != 1 + self.axis)
            fg = torch.nonzero(lab.amax(dim=other) > 0).flatten().tolist()
            if fg:
                index = int(fg[int(self.R.randint(len(fg)))])
        for key in self.key_iterator(d):
            x = d[key]
            sl = x.select(1 + self.axis, index)
            d[key] = (
                MetaTensor(sl.as_tensor() if isinstance(sl, MetaTensor) else sl) if isinstance(x, MetaTensor) else sl
            )
        return d


def border_weight_map(label: np.ndarray, w0: float = 10.0, sigma: float = 5.0) -> np.ndarray:
    """The U-Net paper's pixel weights: class balance + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)).

    ``label`` is a 2D integer map whose non-zero pixels are objects (cells); objects are its
    connected components. d1 and d2 are, for each background pixel, the distances to the
    nearest and second-nearest object; the border term makes thin separations between touching
    objects count. Class-balance weights are n / (K * n_k) over the K classes present. Distances
    are computed within 4 sigma of each object (beyond that the term is below e^-8).
    """
    from scipy import ndimage

    lab = np.asarray(label)
    if lab.ndim != 2:
        raise ValueError(f"border_weight_map takes a 2D label, got shape {lab.shape}")
    values, counts = np.unique(lab, return_counts=True)
    weights = np.zeros(lab.shape, dtype=np.float32)
    for v, c in zip(values, counts, strict=True):
        weights[lab == v] = lab.size / (len(values) * c)
    objects, n = ndimage.label(lab > 0)
    if n < 2:
        return weights
    reach = int(np.ceil(4 * sigma))
    d1 = np.full(lab.shape, np.inf, dtype=np.float32)
    d2 = np.full(lab.shape, np.inf, dtype=np.float32)
    for i, sl in enumerate(ndimage.find_objects(objects), start=1):
        if sl is None:
            continue
        box = tuple(
            slice(max(s.start - reach, 0), min(s.stop + reach, size)) for s, size in zip(sl, lab.shape, strict=True)
        )
        dist = ndimage.distance_transform_edt(objects[box] != i).astype(np.float32)
        a, b = d1[box], d2[box]
        closer = dist < a
        b[:] = np.where(closer, a, np.minimum(b, dist))
        a[:] = np.where(closer, dist, a)
    border = np.where(np.isfinite(d2), w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2)), 0.0).astype(np.float32)
    weights += np.where(lab == 0, border, 0.0).astype(np.float32)
    return weights


class BorderWeightd(MapTransform):
    """Adds ``weight_key``: :func:`border_weight_map` of a channel-first label, 2D or per slice of 3D along ``axis``.

    Deterministic, so a CacheDataset computes it once per case.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        weight_key: str = "weight",
        w0: float = 10.0,
        sigma: float = 5.0,
        axis: int = 2,
    ) -> None:
        super().__init__(keys)
        self.weight_key, self.w0, self.sigma, self.axis = weight_key, w0, sigma, axis

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = np.asarray(d[key])
            if lab.ndim not in (3, 4) or lab.shape[0] != 1:
                raise InputError(f"border weights need a single-channel 2D or 3D label, got shape {lab.shape}")
            if lab.ndim == 3:
                w = border_weight_map(lab[0], self.w0, self.sigma)[None]
            else:
                vol = np.moveaxis(lab[0], self.axis, 0)
                w = np.moveaxis(np.stack([border_weight_map(s, self.w0, self.sigma) for s in vol]), 0, self.axis)[None]
            d[self.weight_key] = MetaTensor(torch.as_tensor(w), meta=dict(getattr(d[key], "meta", {})))
        return d


def zscore_image(keys: str = "image") -> list:
    """Per-image, per-channel z-score over all pixels (EM / photographs: zero is a real intensity), float32."""
    return [
        NormalizeIntensityd(keys=keys, nonzero=False, channel_wise=True),
        EnsureTyped(keys=keys, dtype=torch.float32),
    ]


def unet2d_augmentation(roi_size: Sequence[int], keys: Sequence[str] = ("image", "label")) -> list:
    """UNet_Medical / U-Net paper augmentation for 2D: flips, rotation, elastic deformation, crop-and-resize,
    brightness.

    Spatial steps apply to every key in ``keys`` (labels and weights with nearest interpolation).
    Elastic deformation follows the paper: random displacements on a coarse grid (control
    points half a window apart, ~10 px), smoothly interpolated.
    """
    keys = list(keys)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    spacing = tuple(max(int(s) // 2, 8) for s in roi_size)
    return [
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        RandRotate90d(keys=keys, prob=0.5, max_k=3),
        Rand2DElasticd(
            keys=keys, prob=0.5, spacing=spacing, magnitude_range=(5.0, 10.0), mode=modes, padding_mode="reflection"
        ),
        RandZoomd(
            keys=keys,
            prob=0.5,
            min_zoom=1.0,
            max_zoom=1.25,
            keep_size=True,
            mode=["bilinear" if k == "image" else "nearest" for k in keys],
        ),
        RandShiftIntensityd(keys="image", offsets=0.2, prob=0.5),
        RandScaleIntensityd(keys="image", factors=0.2, prob=0.5),
    ]

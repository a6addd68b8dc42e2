"""nnU-Net-style self-configuration: dataset fingerprint -> training plan (numpy only; JSON in, JSON out).

This module is what makes the ``nnunet`` model family "self-configuring". It has two halves:

1. :func:`fingerprint_from_cases` reads the labelled cases once (NIfTI via nibabel) and condenses
   them into a *fingerprint*: per-case voxel spacing, shape before/after cropping to the non-zero
   region, the label values seen and foreground (label > 0) intensity statistics per channel.
2. :func:`plan_from_fingerprint` turns a fingerprint into a *plan* for a 2D or 3D U-Net: target
   spacing, median shape, patch size, batch size, per-stage strides / conv kernels / filters and the
   per-channel intensity normalisation. The rules follow nnU-Net v2's ``ExperimentPlanner`` (default
   planner, ``PlainConvUNet``, 8 GB reference budget) so that the same dataset gives the same
   configuration; they are re-implemented here in plain numpy (no torch, no nnU-Net install).

The fingerprint is a plain JSON-serialisable dict; the plan is a typed :class:`Plan` whose JSON form
(:meth:`Plan.to_dict`) carries a schema ``version`` (:data:`PLAN_VERSION`). :func:`save_plan` /
:func:`load_plan` (and :func:`save_json` (atomic) / :func:`load_json` for any JSON) store them beside
the model. The fields ``strides``, ``kernel_sizes`` and ``filters`` of a plan are named after the
arguments of MONAI's ``DynUNet`` so that ``networks.py`` can pass them straight on.

Axis order: everything is in the order of the array axes as nibabel returns them (``x, y, z`` for
a canonical NIfTI), which is the order MONAI transforms use. nnU-Net reads through SimpleITK and
works in the reversed order (``z, y, x``); the 3D rules are symmetric in the axes, so only the
choice of the 2D slicing axis is affected (see :func:`slice_axis_for`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

PathLike = str | os.PathLike


class PlanningError(ValueError):
    """Bad input to fingerprinting or planning; the message names the file/field and what was expected."""


# --------------------------------------------------------------------------------------------------
# constants of the planner (nnU-Net v2 defaults)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannerSettings:
    """Numbers the planner uses; the defaults are nnU-Net v2's ``ExperimentPlanner`` values.

    ``reference_voxels_*`` is the feature-map size (summed conv outputs of one sample, see
    :func:`estimate_feature_map_voxels`) that fits ``reference_batch_*`` samples into
    ``reference_gpu_memory_gb`` of GPU memory; nnU-Net calibrated them to reproduce its v1 plans.
    """

    base_filters: int = 32
    max_filters_3d: int = 320
    max_filters_2d: int = 512
    convs_per_stage: int = 2
    featuremap_min_edge_length: int = 4
    reference_voxels_3d: float = 560_000_000
    reference_voxels_2d: float = 85_000_000
    reference_batch_3d: int = 2
    reference_batch_2d: int = 12
    reference_gpu_memory_gb: float = 8.0
    initial_patch_voxels_3d: int = 256**3
    initial_patch_voxels_2d: int = 2048**2
    min_batch_size: int = 2
    max_dataset_fraction: float = 0.05
    anisotropy_threshold: float = 3.0
    nonzero_mask_threshold: float = 0.75


DEFAULT_SETTINGS = PlannerSettings()
PERCENTILES = (0.5, 50.0, 99.5)


# --------------------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------------------


def to_builtin(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays, tuples, paths and plans into plain JSON types."""
    if isinstance(obj, Plan):
        return obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_builtin(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_builtin(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def save_json(obj: Any, path: PathLike) -> Path:
    """Write ``obj`` as JSON atomically (temp file in the same folder, then ``os.replace``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_builtin(obj), indent=2, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def load_json(path: PathLike) -> Any:
    """Read a JSON file; invalid JSON raises :class:`PlanningError` naming the file."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PlanningError(f"{p}: not valid JSON ({e})") from e


# --------------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------------


def cases_from_dataset_json(dataset_dir: PathLike) -> tuple[list[dict], list[str]]:
    """Training cases and channel modalities of an MSD-style folder (``dataset.json`` + imagesTr/labelsTr)."""
    root = Path(dataset_dir)
    meta = load_json(root / "dataset.json")
    entries = meta.get("training")
    if not entries:
        raise PlanningError(f"{root / 'dataset.json'}: no 'training' entries")
    channels = meta.get("channel_names") or meta.get("modality") or {"0": "MRI"}
    modalities = [str(channels[k]) for k in sorted(channels, key=lambda k: int(k))]
    cases = [
        {"image": str((root / e["image"]).resolve()), "label": str((root / e["label"]).resolve())} for e in entries
    ]
    return cases, modalities


def _load_array(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) of a NIfTI file; unreadable files raise :class:`PlanningError`."""
    import nibabel as nib

    if not path.is_file():
        raise PlanningError(f"file not found: {path}")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for broken files
        raise PlanningError(f"{path}: cannot read as NIfTI ({e})") from e
    return data, np.asarray(img.affine, dtype=np.float64)


def spacing_from_affine(affine: np.ndarray) -> list[float]:
    """Voxel size per array axis: the length of each of the first three affine columns (mm)."""
    return [float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))]


def _as_path_list(value: Any, what: str) -> list[Path]:
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    if isinstance(value, Sequence) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
        return [Path(v) for v in value]
    raise PlanningError(f"{what}: expected a file path or a non-empty list of file paths, got {value!r}")


def read_case_channels(image: Any, what: str = "image") -> tuple[np.ndarray, list[float]]:
    """Channels-first float32 array ``(C, x, y, z)`` and spacing of one case's image(s).

    ``image`` is one path (3D, or 4D with channels last ``(x, y, z, c)``) or a list of 3D paths
    (one per channel). The spacing comes from the first file's affine.
    """
    channels: list[np.ndarray] = []
    spacing: list[float] | None = None
    spatial: tuple[int, ...] | None = None
    for path in _as_path_list(image, what):
        data, affine = _load_array(path)
        if data.ndim == 5 and data.shape[3] == 1:  # NIfTI vector layout (x, y, z, 1, c)
            data = data[:, :, :, 0, :]
        if data.ndim == 3:
            parts = [data]
        elif data.ndim == 4:
            parts = [data[..., c] for c in range(data.shape[3])]
        else:
            raise PlanningError(f"{path}: expected a 3D image or a 4D image with channels last, got shape {data.shape}")
        if spatial is None:
            spatial, spacing = tuple(data.shape[:3]), spacing_from_affine(affine)[:3]
        elif tuple(data.shape[:3]) != spatial:
            raise PlanningError(
                f"{path}: channel shape {tuple(data.shape[:3])} differs from the case's first channel {spatial}"
            )
        for part in parts:
            arr = np.asarray(part, dtype=np.float32)
            if not np.all(np.isfinite(arr)):
                raise PlanningError(f"{path}: image contains NaN or infinite values")
            channels.append(arr)
    assert spacing is not None
    if min(spacing) <= 0:
        raise PlanningError(f"{what}: degenerate affine, voxel spacing {spacing} (must be > 0)")
    return np.stack(channels), spacing


def read_label(path: PathLike, spatial_shape: Sequence[int]) -> np.ndarray:
    """Integer label array of one case, checked against the image's spatial shape."""
    p = Path(path)
    data, _ = _load_array(p)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if tuple(data.shape) != tuple(spatial_shape):
        raise PlanningError(f"{p}: label shape {tuple(data.shape)} does not match image shape {tuple(spatial_shape)}")
    if not np.issubdtype(data.dtype, np.integer) and (not np.all(np.isfinite(data)) or np.any(np.mod(data, 1) != 0)):
        raise PlanningError(f"{p}: label values must be integers (got non-integer values)")
    return np.asarray(data).astype(np.int64)


def nonzero_bbox(data: np.ndarray) -> list[list[int]]:
    """``[[start, stop], ...]`` per spatial axis of the voxels where any channel is non-zero.

    ``data`` is channels-first. An all-zero image keeps its full extent.
    """
    mask = np.any(data != 0, axis=0)
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=other))
        bbox.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, int(mask.shape[axis])])
    return bbox


def intensity_statistics(values: np.ndarray) -> dict[str, float]:
    """mean, std, median, min, max, percentile_00_5, percentile_99_5 of a 1D sample."""
    v = np.asarray(values, dtype=np.float64)
    p005, median, p995 = np.percentile(v, PERCENTILES)
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "median": float(median),
        "min": float(v.min()),
        "max": float(v.max()),
        "percentile_00_5": float(p005),
        "percentile_99_5": float(p995),
    }


def _modality_list(modality: str | Sequence[str], num_channels: int) -> list[str]:
    if isinstance(modality, str):
        return [modality] * num_channels
    mods = [str(m) for m in modality]
    if len(mods) != num_channels:
        raise PlanningError(f"modality: {len(mods)} names given ({mods}) but the images have {num_channels} channel(s)")
    return mods


def fingerprint_from_cases(
    cases: list[dict],
    modality: str | list[str] = "MRI",
    foreground_samples_per_case: int = 10000,
    seed: int = 0,
) -> dict:
    """Dataset fingerprint of labelled cases ``[{"image": path | [paths], "label": path}, ...]``.

    Per case: spacing (affine column lengths, array axis order), shape before and after cropping to
    the bounding box of voxels where any channel is non-zero, and ``foreground_samples_per_case``
    intensities per channel drawn with replacement from the foreground (label > 0) inside that box
    (nnU-Net's sampling). Dataset level: per-channel foreground statistics of all samples, label
    values seen, channel count and ``median_relative_size_after_cropping``.
    """
    if not cases:
        raise PlanningError("cases: no cases given (need at least one labelled case)")
    if foreground_samples_per_case < 1:
        raise PlanningError(f"foreground_samples_per_case: must be >= 1, got {foreground_samples_per_case}")
    rng = np.random.default_rng(seed)
    spacings, before, after, records = [], [], [], []
    samples: list[list[np.ndarray]] = []
    labels_seen: set[int] = set()
    num_channels: int | None = None
    for i, case in enumerate(cases):
        if not isinstance(case, Mapping) or "image" not in case or "label" not in case:
            raise PlanningError(f"cases[{i}]: expected a dict with 'image' and 'label', got {case!r}")
        data, spacing = read_case_channels(case["image"], f"cases[{i}].image")
        if num_channels is None:
            num_channels = data.shape[0]
            samples = [[] for _ in range(num_channels)]
        elif data.shape[0] != num_channels:
            raise PlanningError(
                f"cases[{i}] ({case['image']}): {data.shape[0]} channel(s), but cases[0] has {num_channels}; "
                "all cases must have the same channels"
            )
        label = read_label(case["label"], data.shape[1:])
        bbox = nonzero_bbox(data)
        box = tuple(slice(lo, hi) for lo, hi in bbox)
        foreground = label[box] > 0
        n_fg = int(foreground.sum())
        if n_fg:
            for c in range(num_channels):
                samples[c].append(rng.choice(data[c][box][foreground], foreground_samples_per_case, replace=True))
        labels_seen.update(int(v) for v in np.unique(label))
        spacings.append(spacing)
        before.append([int(s) for s in data.shape[1:]])
        after.append([hi - lo for lo, hi in bbox])
        records.append(
            {
                "image": [os.fspath(p) for p in _as_path_list(case["image"], "image")],
                "label": os.fspath(case["label"]),
                "bbox": bbox,
                "foreground_voxels": n_fg,
            }
        )
    assert num_channels is not None
    if not samples[0]:
        raise PlanningError("labels: no foreground voxels (label > 0) inside the non-zero image region of any case")
    relative = [float(np.prod(a) / np.prod(b)) for a, b in zip(after, before, strict=True)]
    fp = {
        "num_cases": len(cases),
        "num_channels": num_channels,
        "modality": _modality_list(modality, num_channels),
        "labels": sorted(labels_seen),
        "spacings": spacings,
        "shapes_before_crop": before,
        "shapes_after_crop": after,
        "median_relative_size_after_cropping": float(np.median(relative)),
        "foreground_samples_per_case": foreground_samples_per_case,
        "foreground_intensity_properties_per_channel": [intensity_statistics(np.concatenate(s)) for s in samples],
        "cases": records,
    }
    return to_builtin(fp)


# --------------------------------------------------------------------------------------------------
# target spacing
# --------------------------------------------------------------------------------------------------


def target_spacing(
    spacings: Sequence[Sequence[float]],
    shapes: Sequence[Sequence[int]],
    anisotropy_threshold: float = 3.0,
) -> list[float]:
    """Full-resolution target spacing, nnU-Net v2's ``determine_fullres_target_spacing`` rule.

    * Start from the median spacing per axis (``shapes`` are the shapes after cropping).
    * Let ``w`` be the axis with the largest median spacing (first one on ties). The dataset is
      treated as anisotropic when BOTH
      - ``median_spacing[w] > anisotropy_threshold * max(median spacing of the other axes)`` and
      - ``median_shape[w] * anisotropy_threshold < min(median shape of the other axes)``
        (the coarse axis also has far fewer voxels).
    * Then axis ``w`` takes the 10th percentile of its spacings instead of the median (finer, to
      avoid interpolation artefacts for the many cases that are coarser than that), but never finer
      than the other axes: if the 10th percentile is below ``max(other median spacings)`` it becomes
      ``max(other median spacings) + 1e-5``. (The floor is the coarsest *other* axis, not
      "3 x finest".) All other axes keep their medians.
    """
    sp = np.asarray(spacings, dtype=np.float64)
    sz = np.asarray(shapes, dtype=np.float64)
    if sp.ndim != 2 or sp.shape[0] == 0 or sz.shape != sp.shape:
        raise PlanningError(
            "spacings/shapes: expected two equally long non-empty lists of per-case vectors, "
            f"got shapes {sp.shape} and {sz.shape}"
        )
    if np.any(sp <= 0):
        raise PlanningError("spacings: all spacings must be > 0")
    target = np.percentile(sp, 50, axis=0)
    median_size = np.percentile(sz, 50, axis=0)
    if target.size < 2:
        return [float(v) for v in target]
    worst = int(np.argmax(target))
    others = [a for a in range(target.size) if a != worst]
    coarsest_other = float(max(target[a] for a in others))
    aniso_spacing = target[worst] > anisotropy_threshold * coarsest_other
    aniso_voxels = median_size[worst] * anisotropy_threshold < min(median_size[a] for a in others)
    if aniso_spacing and aniso_voxels:
        coarse = float(np.percentile(sp[:, worst], 10))
        if coarse < coarsest_other:
            coarse = coarsest_other + 1e-5
        target[worst] = coarse
    return [float(v) for v in target]


def slice_axis_for(spacing: Sequence[float]) -> int:
    """The axis a 2D model slices through: the one with the largest target spacing (first on ties).

    This is nnU-Net's ``transpose_forward[0]``. For an isotropic dataset it is axis 0. nnU-Net's
    array order is SimpleITK's (z, y, x), so there it is z; in our nibabel order it is x. For MSD
    hippocampus (1 mm isotropic) both leave in-plane median sizes ~(50, 35/36) and the same
    published 2D patch 56 x 40; pass ``slice_axis`` to :func:`plan_from_fingerprint` to choose.
    """
    return int(np.argmax(np.asarray(spacing, dtype=np.float64)))


def resampled_shape(shape: Sequence[float], spacing: Sequence[float], new_spacing: Sequence[float]) -> list[int]:
    """Shape after resampling from ``spacing`` to ``new_spacing`` (rounded per axis)."""
    return [int(round(float(s) * float(a) / float(b))) for s, a, b in zip(shape, spacing, new_spacing, strict=True)]


# --------------------------------------------------------------------------------------------------
# network topology and memory estimate
# --------------------------------------------------------------------------------------------------


def pad_to_multiple(shape: Sequence[float], divisors: Sequence[int]) -> list[int]:
    """Round each axis up to a multiple of its divisor."""
    return [int(math.ceil(float(s) / d - 1e-9) * d) for s, d in zip(shape, divisors, strict=True)]


def pooling_topology(
    spacing: Sequence[float],
    patch_size: Sequence[float],
    featuremap_min_edge_length: int = 4,
) -> dict:
    """Strides and conv kernels per stage for a patch, nnU-Net v2's ``get_pool_and_conv_props``.

    Stage by stage (the patch is halved on the pooled axes each time):

    * an axis may pool while its feature-map edge is >= 2 * ``featuremap_min_edge_length``, and
      only if its current spacing is < 2x the finest current spacing among those axes (so a coarse
      axis waits until the others have been pooled down to its resolution);
    * if only one axis may pool, it must be >= 3 * ``featuremap_min_edge_length``; with none, stop;
    * the conv kernel of an axis is 1 while its current spacing is >= 2x the finest current spacing
      of all axes, and 3 from then on (it never goes back to 1);
    * the last (bottleneck) stage always uses kernel 3.

    Returns ``strides`` (first entry all 1), ``kernel_sizes`` (one per stage), ``num_pool_per_axis``,
    ``divisible_by`` (2 ** pools) and ``patch_size`` rounded up to be divisible by it.
    """
    dims = len(spacing)
    cur_spacing = [float(s) for s in spacing]
    cur_size = [float(s) for s in patch_size]
    pools = [0] * dims
    kernel = [1] * dims
    strides: list[list[int]] = [[1] * dims]
    kernels: list[list[int]] = []
    min_edge = featuremap_min_edge_length
    while True:
        axes = [a for a in range(dims) if cur_size[a] >= 2 * min_edge]
        if not axes:
            break
        finest_poolable = min(cur_spacing[a] for a in axes)
        axes = [a for a in axes if cur_spacing[a] / finest_poolable < 2]
        if not axes or (len(axes) == 1 and cur_size[axes[0]] < 3 * min_edge):
            break
        finest = min(cur_spacing)
        kernel = [3 if kernel[a] == 3 or cur_spacing[a] / finest < 2 else 1 for a in range(dims)]
        kernels.append(list(kernel))
        strides.append([2 if a in axes else 1 for a in range(dims)])
        for a in axes:
            pools[a] += 1
            cur_spacing[a] *= 2
            cur_size[a] = math.ceil(cur_size[a] / 2)
    kernels.append([3] * dims)
    divisible_by = [2**p for p in pools]
    return {
        "strides": strides,
        "kernel_sizes": kernels,
        "num_pool_per_axis": pools,
        "divisible_by": divisible_by,
        "patch_size": pad_to_multiple(patch_size, divisible_by),
    }


def filters_per_stage(num_stages: int, dims: int, settings: PlannerSettings = DEFAULT_SETTINGS) -> list[int]:
    """``base * 2**i`` per stage, capped at 320 (3D) / 512 (2D)."""
    cap = settings.max_filters_3d if dims == 3 else settings.max_filters_2d
    return [min(cap, settings.base_filters * 2**i) for i in range(num_stages)]


def estimate_feature_map_voxels(
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    filters: Sequence[int],
    num_classes: int,
    convs_per_stage: int = 2,
) -> int:
    """Summed conv output sizes (elements) of one sample through a plain U-Net: nnU-Net's VRAM proxy.

    Encoder: ``convs_per_stage`` convs per stage at that stage's resolution (the first one strided).
    Decoder (every stage but the bottleneck): a transposed conv plus ``convs_per_stage`` convs at
    the skip resolution, and one segmentation output (``num_classes``) at full resolution (no deep
    supervision outputs, as in nnU-Net's estimate). Input channels are not counted.
    """
    size = [int(s) for s in patch_size]
    sizes = []
    for stride in strides:
        size = [s // k for s, k in zip(size, stride, strict=True)]
        sizes.append(int(np.prod(size, dtype=np.int64)))
    total = sum(convs_per_stage * f * n for f, n in zip(filters, sizes, strict=True))
    total += sum((convs_per_stage + 1) * f * n for f, n in zip(filters[:-1], sizes[:-1], strict=True))
    if len(sizes) > 1:
        total += num_classes * sizes[0]
    return int(total)


# --------------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------------


PLAN_VERSION = 1
"""Schema version of :class:`Plan`'s JSON form. Plans saved before the field existed have version 1's layout."""


def normalize_by_plan(image: torch.Tensor, schemes: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """A float32 copy of a channel-first image normalised per channel as a plan says (see ``Plan.normalization``).

    ``{"scheme": "ct", "clip_min": lo, "clip_max": hi, "mean": m, "std": s}``: clip to the dataset's foreground
    0.5/99.5 percentiles, then z-score with the dataset's foreground statistics.
    ``{"scheme": "zscore", "use_nonzero_mask": bool}``: per-image z-score (over non-zero voxels
    when the plan says so; voxels outside stay 0).
    """
    out = image.to(torch.float32).clone()
    for c, scheme in enumerate(schemes):
        x = out[c]
        if scheme.get("scheme") == "ct":
            lo, hi = scheme["clip_min"], scheme["clip_max"]
            x = x.clamp(float(lo), float(hi))
            out[c] = (x - float(scheme["mean"])) / max(float(scheme["std"]), 1e-8)
        elif scheme.get("use_nonzero_mask"):
            mask = x != 0
            if mask.any():
                vals = x[mask]
                out[c] = torch.where(mask, (x - vals.mean()) / vals.std().clamp_min(1e-8), torch.zeros_like(x))
        else:
            out[c] = (x - x.mean()) / x.std().clamp_min(1e-8)
    return out


@dataclass(kw_only=True)
class Plan:
    """An nnU-Net training plan (what :func:`plan_from_fingerprint` decides), in the array axis order.

    The fields without a default are required in :meth:`from_dict`; the others describe how the plan
    was reached (shown in ``/info`` and the plan file) and may be absent from older or trimmed copies
    (checkpoint metas drop ``fingerprint_summary``).
    """

    dims: int
    """2 or 3: the network's spatial dimensions."""
    axes: list[int] = field(default_factory=list)
    """Array axes the network sees (all three in 3D; the in-plane pair in 2D)."""
    slice_axis: int | None = None
    """2D: the array axis volumes are cut along; ``None`` in 3D."""
    target_spacing: list[float]
    """Voxel size (mm) per array axis that studies are resampled to."""
    spacing: list[float] = field(default_factory=list)
    """``target_spacing`` on ``axes``."""
    median_shape: list[float] = field(default_factory=list)
    """Median shape after cropping and resampling, on ``axes``."""
    median_shape_3d: list[float] = field(default_factory=list)
    """Median shape after cropping and resampling, all three axes."""
    patch_size: list[int]
    """Training patch and inference window (on ``axes``)."""
    batch_size: int
    """Patches per batch (all processes together)."""
    strides: list[list[int]]
    """Per stage, per axis down-sampling factor (first stage all 1); DynUNet's ``strides``."""
    kernel_sizes: list[list[int]]
    """Per stage, per axis conv kernel; DynUNet's ``kernel_size``."""
    filters: list[int]
    """Per stage feature channels; DynUNet's ``filters``."""
    num_stages: int = 0
    """Number of resolution stages (``len(filters)``)."""
    num_pool_per_axis: list[int] = field(default_factory=list)
    """Poolings per axis."""
    divisible_by: list[int] = field(default_factory=list)
    """``2 ** num_pool_per_axis``: window sizes must be multiples of it."""
    convs_per_stage: int = 2
    """Convolutions per stage."""
    in_channels: int
    """Input channels the plan was made for."""
    labels: list[int] = field(default_factory=list)
    """Label values seen in the fingerprint (background 0 included)."""
    num_classes: int = 0
    """``len(labels)``."""
    normalization: list[dict[str, Any]]
    """Per-channel intensity normalisation (see :func:`normalisation_for`)."""
    memory: dict[str, Any] = field(default_factory=dict)
    """How patch and batch were sized: budget, feature-map estimate, batch before/after the 5 % cap."""
    fingerprint_summary: dict[str, Any] | None = None
    """Dataset summary the plan was made from (not stored in checkpoints)."""
    version: int = PLAN_VERSION
    """Schema version (:data:`PLAN_VERSION`)."""

    def to_dict(self, fingerprint_summary: bool = True) -> dict[str, Any]:
        """Plain JSON form, ``version`` first; ``fingerprint_summary=False`` (or none held) leaves the summary out."""
        out: dict[str, Any] = {"version": self.version}
        for f in fields(self):
            if f.name == "version" or (
                f.name == "fingerprint_summary" and (not fingerprint_summary or self.fingerprint_summary is None)
            ):
                continue
            out[f.name] = getattr(self, f.name)
        return to_builtin(out)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """A plan from its JSON form (also one saved before ``version`` existed); unknown keys are ignored.

        Raises :class:`PlanningError` (a ``ValueError``) for a newer schema version, missing required
        keys or an inconsistent topology.
        """
        if not isinstance(data, Mapping):
            raise PlanningError(f"plan: expected a JSON object, got {type(data).__name__}")
        version = data.get("version", PLAN_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise PlanningError(f"plan: 'version' must be a positive integer, got {version!r}")
        if version > PLAN_VERSION:
            raise PlanningError(
                f"plan: version {version} is newer than this code understands ({PLAN_VERSION}); "
                "update unet_seg or plan again (replan: true)"
            )
        known = {f.name: f for f in fields(cls)}
        required = [name for name, f in known.items() if f.default is MISSING and f.default_factory is MISSING]
        missing = [k for k in required if k not in data]
        if missing:
            raise PlanningError(f"plan: missing required key(s) {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in known and k != "version"}
        plan = cls(**to_builtin(values))
        plan.validate()
        return plan

    def validate(self) -> None:
        """Check the fields agree with each other (dims, per-stage lists, slice axis)."""
        if self.dims not in (2, 3):
            raise PlanningError(f"plan: dims must be 2 or 3, got {self.dims!r}")
        if len(self.patch_size) != self.dims or len(self.target_spacing) != 3:
            raise PlanningError(
                f"plan: patch_size {self.patch_size} must have {self.dims} sizes and target_spacing "
                f"{self.target_spacing} three"
            )
        if not (len(self.strides) == len(self.kernel_sizes) == len(self.filters)) or not self.filters:
            raise PlanningError(
                f"plan: {len(self.strides)} strides, {len(self.kernel_sizes)} kernel sizes and "
                f"{len(self.filters)} filters; one of each per stage is needed"
            )
        if self.dims == 2 and self.slice_axis not in (0, 1, 2):
            raise PlanningError(f"plan: a 2D plan needs slice_axis 0, 1 or 2, got {self.slice_axis!r}")
        if int(self.in_channels) < 1 or len(self.normalization) != int(self.in_channels):
            raise PlanningError(
                f"plan: {len(self.normalization)} normalisation scheme(s) for in_channels {self.in_channels}"
            )


def save_plan(plan: Plan, path: PathLike) -> Path:
    """Write a plan's JSON form atomically."""
    return save_json(plan.to_dict(), path)


def load_plan(path: PathLike) -> Plan:
    """Read a plan file (any version up to :data:`PLAN_VERSION`); errors name the file."""
    try:
        return Plan.from_dict(load_json(path))
    except PlanningError as e:
        if str(e).startswith(str(path)):
            raise
        raise PlanningError(f"{path}: {e}") from e


def _require(fp: Mapping[str, Any], key: str) -> Any:
    if key not in fp:
        raise PlanningError(f"fingerprint: missing field '{key}'")
    return fp[key]


def initial_patch_size(
    spacing: Sequence[float], median_shape: Sequence[float], settings: PlannerSettings = DEFAULT_SETTINGS
) -> list[float]:
    """Patch shaped like an isotropic-in-mm box of 256^3 (3D) / 2048^2 (2D) voxels, clipped to the median shape."""
    inv = 1.0 / np.asarray(spacing, dtype=np.float64)
    budget = settings.initial_patch_voxels_3d if len(spacing) == 3 else settings.initial_patch_voxels_2d
    scale = (budget / float(np.prod(inv))) ** (1.0 / len(spacing))
    return [min(float(round(float(v * scale))), float(m)) for v, m in zip(inv, median_shape, strict=True)]


def normalisation_for(
    fp: Mapping[str, Any], modalities: Sequence[str], settings: PlannerSettings = DEFAULT_SETTINGS
) -> list[dict]:
    """Per-channel intensity normalisation (nnU-Net's schemes for CT and everything else).

    * CT: clip to the dataset's foreground ``percentile_00_5`` / ``percentile_99_5``, then z-score
      with the dataset's foreground ``mean`` / ``std`` (same numbers for every image).
    * anything else: per-image z-score; ``use_nonzero_mask`` (statistics and output restricted to
      the non-zero region) is on when cropping to non-zero removed > 25 % of the median image.
    """
    relative = float(fp.get("median_relative_size_after_cropping", 1.0))
    use_mask = relative < settings.nonzero_mask_threshold
    props = fp.get("foreground_intensity_properties_per_channel")
    out = []
    for c, mod in enumerate(modalities):
        if mod.strip().lower() == "ct":
            if not props or len(props) <= c:
                raise PlanningError(
                    f"fingerprint: CT channel {c} needs 'foreground_intensity_properties_per_channel'[{c}]"
                )
            p = props[c]
            missing = [k for k in ("percentile_00_5", "percentile_99_5", "mean", "std") if k not in p]
            if missing:
                raise PlanningError(f"fingerprint: foreground_intensity_properties_per_channel[{c}] lacks {missing}")
            out.append(
                {
                    "channel": c,
                    "modality": mod,
                    "scheme": "ct",
                    "clip_min": float(p["percentile_00_5"]),
                    "clip_max": float(p["percentile_99_5"]),
                    "mean": float(p["mean"]),
                    "std": float(max(p["std"], 1e-8)),
                    "use_nonzero_mask": False,
                }
            )
        else:
            out.append({"channel": c, "modality": mod, "scheme": "zscore", "use_nonzero_mask": bool(use_mask)})
    return out


def _fit_to_memory(
    spacing: Sequence[float],
    median_shape: Sequence[float],
    topo: dict,
    num_classes: int,
    reference: float,
    reference_batch: int,
    settings: PlannerSettings,
) -> tuple[dict, int]:
    """Shrink the patch (axis largest relative to the median shape first) until the estimate fits."""
    dims = len(spacing)

    def estimate(t: dict) -> int:
        f = filters_per_stage(len(t["strides"]), dims, settings)
        return estimate_feature_map_voxels(t["patch_size"], t["strides"], f, num_classes, settings.convs_per_stage)

    est = estimate(topo)
    while est / reference_batch * settings.min_batch_size > reference:
        patch = list(topo["patch_size"])
        ratios = [p / m for p, m in zip(patch, median_shape, strict=True)]
        axis = max(range(dims), key=lambda a: (ratios[a], a))  # largest ratio; ties -> last axis (nnU-Net argsort)
        # step by the divisor of the already-reduced shape so that no valid size is skipped
        probe = list(patch)
        probe[axis] -= topo["divisible_by"][axis]
        step = pooling_topology(spacing, probe, settings.featuremap_min_edge_length)["divisible_by"][axis]
        patch[axis] -= step
        if patch[axis] < 1:
            raise PlanningError(
                f"gpu_memory_gb: budget too small, no patch fits (reference {reference:.3g} feature-map voxels)"
            )
        topo = pooling_topology(spacing, patch, settings.featuremap_min_edge_length)
        est = estimate(topo)
    return topo, est


def _validated_geometry(fp: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    spacings = np.asarray(_require(fp, "spacings"), dtype=np.float64)
    shapes = np.asarray(_require(fp, "shapes_after_crop"), dtype=np.float64)
    if spacings.ndim != 2 or spacings.shape[0] == 0 or spacings.shape[1] != 3:
        raise PlanningError(
            f"fingerprint: 'spacings' must be a non-empty list of 3-vectors, got array shape {spacings.shape}"
        )
    if shapes.shape != spacings.shape:
        raise PlanningError(f"fingerprint: 'shapes_after_crop' {shapes.shape} must match 'spacings' {spacings.shape}")
    if np.any(spacings <= 0) or np.any(shapes < 1):
        raise PlanningError("fingerprint: spacings must be > 0 and shapes_after_crop >= 1")
    return spacings, shapes


def plan_from_fingerprint(
    fp: dict,
    dims: int = 3,
    gpu_memory_gb: float = 8.0,
    *,
    modality: str | list[str] | None = None,
    slice_axis: int | None = None,
    target_spacing_override: Sequence[float] | None = None,
    settings: PlannerSettings = DEFAULT_SETTINGS,
) -> Plan:
    """A 2D or 3D U-Net :class:`Plan` from a fingerprint, following nnU-Net v2's ``ExperimentPlanner``.

    ``gpu_memory_gb`` is the memory budget (the nnunet config's ``memory budget`` conf value);
    the reference (8 GB) numbers scale linearly with it. Steps:

    1. target spacing (:func:`target_spacing`) and the median of the per-case shapes after
       cropping, resampled to it. 2D plans use the two axes other than ``slice_axis``
       (default :func:`slice_axis_for`) and are per slice.
    2. initial patch (:func:`initial_patch_size`) -> :func:`pooling_topology` (pools, kernels,
       patch padded to 2**pools) -> filters ``32 * 2**i`` capped at 320 (3D) / 512 (2D).
    3. while the feature-map estimate for a batch of 2 exceeds the budget, shrink the axis that is
       largest relative to the median shape and recompute the topology.
    4. batch = round(budget / estimate * reference batch), capped so that one batch holds at most
       5 % of the dataset's voxels (median shape x cases), and at least 2.
    """
    if dims not in (2, 3):
        raise PlanningError(f"dims: must be 2 or 3, got {dims!r}")
    if not gpu_memory_gb or gpu_memory_gb <= 0:
        raise PlanningError(f"gpu_memory_gb: must be > 0, got {gpu_memory_gb!r}")
    spacings, shapes = _validated_geometry(fp)
    num_cases = int(fp.get("num_cases", len(spacings)))
    num_channels = int(fp.get("num_channels", len(fp.get("foreground_intensity_properties_per_channel") or [0])))
    labels = sorted({0, *(int(v) for v in fp.get("labels", [0, 1]))})
    num_classes = len(labels)
    modalities = _modality_list(modality if modality is not None else fp.get("modality", "MRI"), num_channels)

    if target_spacing_override is not None:
        if len(target_spacing_override) != 3 or min(target_spacing_override) <= 0:
            raise PlanningError(
                f"target_spacing_override: expected three positive numbers, got {target_spacing_override!r}"
            )
        full_spacing = [float(v) for v in target_spacing_override]
    else:
        full_spacing = target_spacing(spacings, shapes, settings.anisotropy_threshold)
    new_shapes = [resampled_shape(s, sp, full_spacing) for s, sp in zip(shapes, spacings, strict=True)]
    median_3d = [float(v) for v in np.median(np.asarray(new_shapes, dtype=np.float64), axis=0)]
    dataset_voxels = float(np.prod(median_3d, dtype=np.float64)) * num_cases

    if dims == 3:
        axes, cut = [0, 1, 2], None
    else:
        cut = slice_axis_for(full_spacing) if slice_axis is None else int(slice_axis)
        if cut not in (0, 1, 2):
            raise PlanningError(f"slice_axis: must be 0, 1 or 2, got {slice_axis!r}")
        axes = [a for a in range(3) if a != cut]
    spacing = [full_spacing[a] for a in axes]
    median_shape = [median_3d[a] for a in axes]

    initial = initial_patch_size(spacing, median_shape, settings)
    topo = pooling_topology(spacing, initial, settings.featuremap_min_edge_length)
    scale = gpu_memory_gb / settings.reference_gpu_memory_gb
    reference = (settings.reference_voxels_3d if dims == 3 else settings.reference_voxels_2d) * scale
    reference_batch = settings.reference_batch_3d if dims == 3 else settings.reference_batch_2d
    topo, est = _fit_to_memory(spacing, median_shape, topo, num_classes, reference, reference_batch, settings)

    patch = topo["patch_size"]
    batch_from_memory = round(reference / est * reference_batch)
    batch_cap = round(dataset_voxels * settings.max_dataset_fraction / float(np.prod(patch, dtype=np.float64)))
    batch_size = max(min(batch_from_memory, batch_cap), settings.min_batch_size)
    filters = filters_per_stage(len(topo["strides"]), dims, settings)

    props = fp.get("foreground_intensity_properties_per_channel")
    plan = {
        "version": PLAN_VERSION,
        "dims": dims,
        "axes": axes,
        "slice_axis": cut,
        "target_spacing": full_spacing,
        "spacing": spacing,
        "median_shape": median_shape,
        "median_shape_3d": median_3d,
        "patch_size": patch,
        "batch_size": int(batch_size),
        "strides": topo["strides"],
        "kernel_sizes": topo["kernel_sizes"],
        "filters": filters,
        "num_stages": len(filters),
        "num_pool_per_axis": topo["num_pool_per_axis"],
        "divisible_by": topo["divisible_by"],
        "convs_per_stage": settings.convs_per_stage,
        "in_channels": num_channels,
        "labels": labels,
        "num_classes": num_classes,
        "normalization": normalisation_for(fp, modalities, settings),
        "memory": {
            "gpu_memory_gb": float(gpu_memory_gb),
            "estimated_feature_map_voxels": est,
            "reference_feature_map_voxels": float(reference),
            "batch_size_from_memory": int(batch_from_memory),
            "batch_size_cap_5_percent": int(batch_cap),
        },
        "fingerprint_summary": {
            "num_cases": num_cases,
            "num_channels": num_channels,
            "modality": modalities,
            "labels": labels,
            "median_spacing": [float(v) for v in np.median(spacings, axis=0)],
            "median_shape_after_crop": [float(v) for v in np.median(shapes, axis=0)],
            "median_relative_size_after_cropping": float(fp.get("median_relative_size_after_cropping", 1.0)),
            "foreground_intensity_properties_per_channel": props,
        },
    }
    return Plan.from_dict(to_builtin(plan))

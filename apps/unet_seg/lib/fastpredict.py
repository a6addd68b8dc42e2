"""The command line's fast predict path: NIfTI in, label out, without MONAI or the MONAI Label app.

``main.py predict`` spends most of a one-volume run importing MONAI and building the app. For the
common case this module does the same work with nibabel, torch and our own engine:

* the model is the store's serving version (or ``--ckpt``) of ``unet3d`` or the 3-D ``nnunet``, a
  plain DynUNet served by :class:`~lib.leannet.LeanDynUNet`, with one input channel and the labels
  the app would be configured with (the data's ``dataset.json``, ``--ckpt``'s, or the recipe's default);
* the image is one 3-D NIfTI file that passes the app's image checks;
* pre-processing needs no resampling: unet3d reorients to RAS (nibabel's orientation
  transform, as MONAI's ``Orientationd``) and z-scores non-zero voxels per channel (MONAI's
  ``NormalizeIntensityd(nonzero=True)``); nnunet crops to the non-zero box and normalises as its
  plan says, when the voxel spacing already is the plan's (MONAI's ``Spacingd`` then returns the
  image unchanged);
* the engine is ``lib.inference.predict_volume`` (windows, Gaussian blending, flip TTA, AMP), then
  argmax, the plan's largest-component post-processing, and the inverse crop and orientation.

Anything else raises :class:`Unsupported` and the caller runs the app's inferer instead, which
also gives the canonical error for bad input. ``tests/test_fast_inference.py`` holds both paths
equal voxel for voxel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .checkpoints import CheckpointMeta, read_checkpoint
from .inference import largest_component, predict_volume
from .leannet import LeanDynUNet
from .planning import Plan, normalize_by_plan
from .runtime import resolve_amp, resolve_device
from .validation import InputError, check_image

logger = logging.getLogger(__name__)

FAST_CONFIGS = ("unet3d", "nnunet")


class Unsupported(Exception):
    """This model or image needs the app's inferer; the message says why."""


@dataclass
class FastModel:
    """A served model ready for the fast path."""

    config: str
    path: str
    meta: CheckpointMeta
    net: LeanDynUNet
    plan: Plan | None


def load_fast_model(config: str, path: str, labels: Mapping[str, int], device: torch.device) -> FastModel:
    """The model file ``path`` of ``config`` for the fast path, or :class:`Unsupported`.

    ``labels`` are the labels (name -> value) the app would be configured with: the model must have them.
    """
    if config not in FAST_CONFIGS:
        raise Unsupported(f"config {config} has no fast path")
    state, raw = read_checkpoint(path)
    meta = CheckpointMeta.from_dict(raw)
    if meta.model != config:
        raise Unsupported(f"{os.path.basename(path)} is a {meta.model} model")
    if meta.spatial_dims != 3 or meta.slice_axis is not None or meta.in_channels != 1:
        raise Unsupported("only one-channel 3-D networks have a fast path")
    if dict(meta.labels) != dict(labels) or sorted(labels.values()) != list(range(1, len(labels) + 1)):
        raise Unsupported("the configured labels are not the model's")
    if not LeanDynUNet.supports(meta.spec):
        raise Unsupported("not a plain DynUNet")
    plan = None
    if config == "nnunet":
        if not meta.plan:
            raise Unsupported("nnunet checkpoint without a plan")
        plan = Plan.from_dict(meta.plan)
        if set(meta.plan) - {f for f in Plan.__dataclass_fields__}:
            raise Unsupported("plan has fields this path does not know")
    net = LeanDynUNet.from_spec(meta.spec, state).to(device)
    return FastModel(config, path, meta, net, plan)


def _zscore_nonzero(x: torch.Tensor) -> torch.Tensor:
    """Per channel, non-zero voxels to zero mean and unit (population) std; zeros stay (MONAI's convention)."""
    out = x.clone()
    for c in range(out.shape[0]):
        mask = out[c] != 0
        if mask.any():
            vals = out[c][mask]
            std = float(torch.std(vals, unbiased=False))
            out[c][mask] = (vals - float(torch.mean(vals))) / (std if std != 0.0 else 1.0)
    return out


def _foreground_box(x: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of voxels non-zero in any channel (``(C, *spatial)``)."""
    mask = np.any(x != 0, axis=0)
    if not mask.any():
        raise Unsupported("image has no non-zero voxel")
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


@dataclass
class Prepared:
    """A pre-processed volume ``(C, *spatial)`` and what maps a label back to the file's voxel grid."""

    image: torch.Tensor
    affine: np.ndarray  # the file's
    shape: tuple[int, ...]  # after reorientation, before cropping
    box: tuple[slice, ...]  # the crop inside ``shape``
    back: np.ndarray | None  # nibabel orientation transform back to the file's axes


def prepare(model: FastModel, image_path: str) -> Prepared:
    """Load, check and pre-process one NIfTI file as the app's pre-transforms would, or :class:`Unsupported`."""
    import nibabel as nib

    if not isinstance(image_path, str) or not image_path.lower().endswith((".nii", ".nii.gz")):
        raise Unsupported("not a NIfTI file")
    try:
        img = nib.load(image_path)
        arr = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
        check_image(arr, affine, "image")
    except (InputError, OSError, ValueError, EOFError) as e:
        raise Unsupported(f"image needs the app's checks: {e}") from e
    if arr.ndim != 3:
        raise Unsupported("not a 3-D single-channel volume")
    original = affine
    data = np.asarray(arr, dtype=np.float32)
    back = None
    if model.config == "unet3d":  # the app reorients to RAS (unet3d.orientation's default)
        source, ras = nib.io_orientation(affine), nib.orientations.axcodes2ornt(("R", "A", "S"))
        ornt = nib.orientations.ornt_transform(source, ras)
        data = nib.orientations.apply_orientation(data, ornt)
        affine = affine @ nib.orientations.inv_ornt_aff(ornt, arr.shape)
        back = nib.orientations.ornt_transform(ras, source)
    x = data[None]
    box: tuple[slice, ...] = tuple(slice(0, n) for n in data.shape)
    if model.plan is not None:
        box = _foreground_box(x)
        x = x[(slice(None), *box)]
        spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        if not np.allclose(spacing, model.plan.target_spacing, rtol=0, atol=1e-5):
            raise Unsupported(f"spacing {spacing.round(4).tolist()} needs resampling")
    image = torch.from_numpy(np.ascontiguousarray(x))
    image = normalize_by_plan(image, model.plan.normalization) if model.plan is not None else _zscore_nonzero(image)
    return Prepared(image, original, tuple(data.shape), box, back)


def _restore_label(model: FastModel, prepared: Prepared, label: torch.Tensor) -> np.ndarray:
    """The label in the file's voxel grid (uint8): the plan's largest components, the inverse crop and orientation."""
    import nibabel as nib

    keep = list((model.meta.postprocessing or {}).get("largest_component", []))
    label = largest_component(label, [model.meta.labels[n] for n in keep if n in model.meta.labels])
    full = np.zeros(prepared.shape, dtype=np.uint8)
    full[prepared.box] = label.cpu().numpy()
    if prepared.back is not None:
        full = nib.orientations.apply_orientation(full, prepared.back)
    return full


def _label(model: FastModel, prepared: Prepared, request: Mapping[str, Any]) -> torch.Tensor:
    """The network's argmax label ``(*spatial)`` (uint8) on a prepared volume, with the request's options."""
    device = resolve_device(request.get("device"))
    probs = predict_volume(
        model.net,
        prepared.image[None],
        model.meta.roi_size,
        tta=bool(request.get("tta", False)),
        overlap=float(request.get("overlap", 0.5)),
        blend=str(request.get("blend", "gaussian")),
        amp=resolve_amp(request.get("amp", True), device),
        device=device,
    )
    return torch.argmax(probs[0], dim=0).to(torch.uint8)


def _write(model: FastModel, prepared: Prepared, label: torch.Tensor, image_path: str, out_path: str) -> str:
    """Post-process ``label`` and write it to ``out_path`` (under a temporary name, then renamed)."""
    import nibabel as nib

    full = _restore_label(model, prepared, label)
    ext = ".nii.gz" if image_path.lower().endswith(".nii.gz") else ".nii"
    tmp = out_path + ".part" + ext
    try:
        nib.save(nib.Nifti1Image(full, prepared.affine), tmp)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out_path


def predict_file(model: FastModel, image_path: str, out_path: str, request: Mapping[str, Any]) -> str:
    """Segment one NIfTI file into ``out_path`` (written under a temporary name, then renamed); returns it.

    ``request`` holds the inference options of an /infer request: tta, overlap, blend, amp, device.
    """
    prepared = prepare(model, image_path)
    return _write(model, prepared, _label(model, prepared, request), image_path, out_path)


def predict_files(
    model: FastModel, jobs: Sequence[tuple[str, str]], request: Mapping[str, Any]
) -> Iterator[tuple[int, str | Unsupported]]:
    """:func:`predict_file` over ``(image_path, out_path)`` jobs, reading the next file and writing the last label
    on a second thread while the network runs (file I/O, gzip and post-processing overlap the compute).

    Yields ``(job index, written path)`` in job order, or ``(index, Unsupported)`` for a file the app must segment.
    Any other error stops the run, as :func:`predict_file` would.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    def load(i: int) -> Prepared | Unsupported:
        try:
            return prepare(model, jobs[i][0])
        except Unsupported as e:
            return e

    with ThreadPoolExecutor(1, thread_name_prefix="predict-io") as io:
        nxt: Future | None = io.submit(load, 0) if jobs else None
        writing: tuple[int, Future] | None = None
        for i, (image_path, out_path) in enumerate(jobs):
            assert nxt is not None
            prepared = nxt.result()
            nxt = io.submit(load, i + 1) if i + 1 < len(jobs) else None
            if isinstance(prepared, Unsupported):
                if writing is not None:  # keep the order of the yields
                    yield writing[0], writing[1].result()
                    writing = None
                yield i, prepared
                continue
            label = _label(model, prepared, request)
            if writing is not None:
                yield writing[0], writing[1].result()
            writing = (i, io.submit(_write, model, prepared, label, image_path, out_path))
        if writing is not None:
            yield writing[0], writing[1].result()


class FileSegmenter:
    """``case -> written label path`` on the fast path, built where it runs (a Ray worker) from what pickles:
    the model file, its config and labels, the /infer options and the output folder."""

    def __init__(self, config: str, path: str, labels: Mapping[str, int], request: Mapping[str, Any], out_dir: str):
        self.model = load_fast_model(config, path, labels, resolve_device(request.get("device")))
        self.request = dict(request)
        self.out_dir = out_dir

    def __call__(self, case: Any) -> str:
        ext = ".nii.gz" if str(case.image).lower().endswith(".nii.gz") else ".nii"
        return predict_file(self.model, case.image, os.path.join(self.out_dir, f"{case.name}{ext}"), self.request)

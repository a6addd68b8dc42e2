"""The one inference engine: sliding window with Gaussian blending plus flip test-time augmentation.

Used by the server inferers, validation during training, the CLI and benchmarks. Input is a
batch ``(B, C, *spatial)``; output is softmax probabilities ``(B, K, *spatial)`` in float32 on
the input's device. TTA averages the probabilities over every combination of flipped spatial
axes (2^d passes: 8 in 3D, 4 in 2D). The flipped copies of the input are stacked into one batch
and each window is predicted for all of them in one forward (:func:`flip_groups`): the windows
and weights are those of flipping the whole volume, so the result is the same as looping over the
flips, but the network runs at batch 8, where oneDNN's convolutions reach their peak rate (batch 1
leaves the small deep levels at 25-60% of it). Large windows or volumes run the flips in smaller
groups, down to one at a time.

The sliding window is our own (``sliding_window``), window for window and weight for weight
MONAI's ``sliding_window_inference`` with constant padding (``tests/test_fast_inference.py`` holds
them equal), so that this module, and the command line's predict path, import nothing from MONAI.
A :class:`~lib.leannet.LeanDynUNet` under a bf16 policy on a CPU runs as a bf16 copy without
autocast (see that module); any other network runs under the policy's autocast.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch

from .leannet import LeanDynUNet
from .runtime import AmpPolicy


def flip_combinations(spatial_dims: int) -> list[tuple[int, ...]]:
    """All subsets of spatial axes (as tensor dims of a (B, C, ...) batch), identity first."""
    axes = [2 + i for i in range(spatial_dims)]
    return [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)]


#: windows of at most this many voxels (all batched windows together) per forward when flips are batched: a
#: hippocampus window (40x56x40) x 8 flips is 0.72 M; a 128^3 BraTS window runs its flips one at a time
FLIP_BATCH_VOXELS = 1_000_000
#: stacked flipped copies of a volume (input channels + output logits, float32) may use at most this many bytes
FLIP_BATCH_BYTES = 1 << 30


def flip_groups(count: int, window_voxels: int, volume_values: int, sw_batch_size: int = 1) -> int:
    """How many of ``count`` flips to predict together: the largest power of two dividing ``count`` whose windows
    (``sw_batch_size`` each) fit :data:`FLIP_BATCH_VOXELS` and whose stacked volumes (``volume_values`` floats per
    copy: input channels + classes) fit :data:`FLIP_BATCH_BYTES`."""
    group = count
    while group > 1 and (
        count % group
        or group * sw_batch_size * window_voxels > FLIP_BATCH_VOXELS
        or group * volume_values * 4 > FLIP_BATCH_BYTES
    ):
        group //= 2
    return max(group, 1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-voxel entropy (nats) of probabilities ``(K, ...)`` over their first axis."""
    p = probs.float().clamp_min(1e-8)
    return -(p * p.log()).sum(0)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start of every window along one axis of ``size`` (already padded to at least ``roi``), as MONAI places them."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    count = next((d + 1 for d in range(math.ceil(size / interval)) if d * interval + roi >= size), 1)
    return [min(i * interval, size - roi) for i in range(count)]


@lru_cache(maxsize=8)
def importance_map(roi: tuple[int, ...], blend: str, sigma_scale: float) -> torch.Tensor:
    """Per-voxel weight of a window: a Gaussian of sigma ``sigma_scale * roi`` per axis (floored at 1e-3) or ones."""
    if blend == "constant":
        return torch.ones(roi)
    out: torch.Tensor | None = None
    for i, n in enumerate(roi):
        x = torch.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=torch.float)
        g = torch.exp(x**2 / (-2 * (n * sigma_scale) ** 2))
        out = g if out is None else out.unsqueeze(-1) * g[(None,) * i]
    assert out is not None
    return out.clamp_(min=max(float(out.min()), 1e-3))


def sliding_window(
    predictor: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float,
    blend: str,
    sigma_scale: float,
    sw_batch_size: int = 1,
    starts: Callable[[int, int, float], list[int]] | None = None,
    weights: Callable[[tuple[int, ...], str, float], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Blended logits ``(B, K, *spatial)`` in float32 of ``predictor`` over windows of ``image`` ``(B, C, *spatial)``.

    Axes shorter than the window are zero-padded (half before, the rest after) and cropped back.
    ``starts`` and ``weights`` replace :func:`window_starts` and :func:`importance_map` (another
    tool's window layout, e.g. nnU-Net's for models imported from it).
    """
    starts_of, weight_of = starts or window_starts, weights or importance_map
    roi = tuple(int(r) for r in roi_size)
    shape = image.shape[2:]
    pads = [max(r - s, 0) for r, s in zip(roi, shape, strict=True)]
    if any(pads):
        flat = [p for d in reversed(range(len(roi))) for p in (pads[d] // 2, pads[d] - pads[d] // 2)]
        image = torch.nn.functional.pad(image, flat)
    size = image.shape[2:]
    starts = list(itertools.product(*(starts_of(n, r, overlap) for n, r in zip(size, roi, strict=True))))
    windows = [  # every batch item's window at one position together, so a batch of flips shares a forward
        (b, tuple(slice(s, s + r) for s, r in zip(st, roi, strict=True)))
        for st in starts
        for b in range(image.shape[0])
    ]
    if len(starts) == 1 and not any(s.start for s in windows[0][1]):  # one window covers the volume
        out = torch.cat(
            [_logits(predictor(image[i : i + sw_batch_size])) for i in range(0, image.shape[0], sw_batch_size)]
        )
    else:
        weight = weight_of(roi, blend, float(sigma_scale)).to(image.device)
        out = None
        count = torch.zeros((1, 1, *size), device=image.device)
        for st in starts:
            count[(..., *(slice(s, s + r) for s, r in zip(st, roi, strict=True)))] += weight
        for i in range(0, len(windows), sw_batch_size):
            group = windows[i : i + sw_batch_size]
            logits = _logits(predictor(torch.cat([image[(slice(b, b + 1), slice(None), *sl)] for b, sl in group])))
            if out is None:
                out = torch.zeros((image.shape[0], logits.shape[1], *size), device=image.device)
            for (b, sl), part in zip(group, logits, strict=True):
                out[(b, slice(None), *sl)] += part * weight
        assert out is not None
        out /= count
    if any(pads):
        out = out[(..., *(slice(p // 2, p // 2 + s) for p, s in zip(pads, shape, strict=True)))]
    return out


def _logits(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Float32 logits of the full-resolution head (deep-supervision nets return a list in training mode)."""
    if isinstance(output, (list, tuple)):
        output = output[0]
    return torch.as_tensor(output).float()


@torch.no_grad()
def predict_probabilities(
    net: torch.nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    *,
    overlap: float = 0.5,
    blend: str = "gaussian",
    sigma_scale: float = 0.125,
    sw_batch_size: int = 1,
    tta: bool = False,
    amp: AmpPolicy | None = None,
    device: torch.device | None = None,
    mc_dropout: bool = False,
    starts: Callable[[int, int, float], list[int]] | None = None,
    weights: Callable[[tuple[int, ...], str, float], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Softmax probabilities of ``net`` over ``image`` by Gaussian-blended sliding windows (+ flip TTA).

    ``mc_dropout`` keeps the dropout layers sampling (everything else, normalisation included, in
    eval mode): one call is then one Monte-Carlo dropout sample. ``starts`` / ``weights``: see
    :func:`sliding_window`.
    """
    if image.ndim != len(roi_size) + 2:
        raise ValueError(
            f"image must be (B, C, *spatial) with {len(roi_size)} spatial dims, got shape {tuple(image.shape)}"
        )
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    device = device or next(net.parameters()).device
    image = image.to(device)
    was_training = net.training
    net.eval()
    if mc_dropout:
        for module in net.modules():
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                module.train()
    flips = flip_combinations(len(roi_size)) if tta else [()]
    total: torch.Tensor | None = None
    ctx: Callable[[], object] = amp.autocast if amp is not None else lambda: torch.autocast(device.type, enabled=False)
    if isinstance(net, LeanDynUNet) and amp is not None and amp.dtype is not None and device.type == "cpu":
        net, ctx = net.in_dtype(amp.dtype), lambda: torch.autocast(device.type, enabled=False)
    batch = image.shape[0]
    group = 1
    if batch == 1:  # a batch of volumes (2D slices) is already batched
        classes = int(getattr(net, "out_channels", 0) or 8)  # only sizes the groups: a generous guess when unknown
        per_copy = image[0].numel() + classes * image[0, 0].numel()
        group = flip_groups(len(flips), math.prod(roi_size), per_copy, sw_batch_size)
    try:
        for i in range(0, len(flips), group):
            chunk = flips[i : i + group]
            x = torch.cat([torch.flip(image, axes) if axes else image for axes in chunk])
            with ctx():  # type: ignore[attr-defined]
                logits = sliding_window(
                    net, x, roi_size, overlap, blend, sigma_scale, sw_batch_size * len(chunk), starts, weights
                )
            for j, axes in enumerate(chunk):
                probs = torch.softmax(logits[j * batch : (j + 1) * batch], dim=1)
                if axes:
                    probs = torch.flip(probs, axes)
                total = probs if total is None else total + probs
    finally:
        net.train(was_training)  # resets the dropout layers too
    assert total is not None
    return total / len(flips)


@torch.no_grad()
def predict_volume(
    net: torch.nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    *,
    slice_axis: int | None = None,
    slice_batch: int = 32,
    **kwargs: object,
) -> torch.Tensor:
    """Probabilities for a batch ``(1, C, *spatial)``; a 2D net on a 3D image runs slice by slice.

    With ``slice_axis`` set (0, 1 or 2 of the spatial axes) and a 2D ``roi_size``, the volume's
    slices along that axis are segmented in batches of ``slice_batch`` through
    :func:`predict_probabilities` (same blending, TTA over the 2D axes, AMP) and stacked back.
    """
    spatial = image.ndim - 2
    if slice_axis is None or spatial == len(roi_size):
        return predict_probabilities(net, image, roi_size, **kwargs)  # type: ignore[arg-type]
    if spatial != 3 or len(roi_size) != 2:
        raise ValueError(
            f"slice-wise inference needs a 3D image and a 2D roi, got {tuple(image.shape)} / {tuple(roi_size)}"
        )
    if image.shape[0] != 1:
        raise ValueError("slice-wise inference takes one volume at a time")
    slices = image[0].movedim(1 + slice_axis, 0)  # (S, C, a, b)
    parts = [
        predict_probabilities(net, slices[i : i + slice_batch], roi_size, **kwargs)  # type: ignore[arg-type]
        for i in range(0, slices.shape[0], slice_batch)
    ]
    probs = torch.cat(parts, dim=0)  # (S, K, a, b)
    return probs.movedim(0, 1 + slice_axis)[None]


def largest_component(label: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    """Keep only the largest connected component of each of ``values`` in an integer label map (no channel axis).

    Components connect through faces, edges and corners (MONAI's KeepLargestConnectedComponent with
    full connectivity, ``independent=True``); the voxels of smaller components become background.
    """
    if not values:
        return label
    from scipy import ndimage

    arr = label.cpu().numpy()
    out = arr.copy()
    structure = ndimage.generate_binary_structure(arr.ndim, arr.ndim)
    for value in values:
        components, count = ndimage.label(arr == value, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            out[(components != 0) & (components != int(sizes.argmax()))] = 0
    return torch.from_numpy(out).to(label.device)

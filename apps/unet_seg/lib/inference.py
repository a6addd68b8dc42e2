"""The one inference engine: sliding window with Gaussian blending plus flip test-time augmentation.

Used by the server inferers, validation during training, the CLI and benchmarks. Input is a
batch ``(B, C, *spatial)``; output is softmax probabilities ``(B, K, *spatial)`` in float32 on
the input's device. TTA averages the probabilities over every combination of flipped spatial
axes (2^d passes: 8 in 3D, 4 in 2D). The flips run as a loop: on CPU stacking them into one
batch measured slower.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.transforms import KeepLargestConnectedComponent

from .runtime import AmpPolicy


def flip_combinations(spatial_dims: int) -> list[tuple[int, ...]]:
    """All subsets of spatial axes (as tensor dims of a (B, C, ...) batch), identity first."""
    axes = [2 + i for i in range(spatial_dims)]
    return [c for r in range(spatial_dims + 1) for c in itertools.combinations(axes, r)]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-voxel entropy (nats) of probabilities ``(K, ...)`` over their first axis."""
    p = probs.float().clamp_min(1e-8)
    return -(p * p.log()).sum(0)


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
) -> torch.Tensor:
    """Softmax probabilities of ``net`` over ``image`` by Gaussian-blended sliding windows (+ flip TTA).

    ``mc_dropout`` keeps the dropout layers sampling (everything else, normalisation included, in
    eval mode): one call is then one Monte-Carlo dropout sample.
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
    try:
        for axes in flips:
            x = torch.flip(image, axes) if axes else image
            ctx = amp.autocast() if amp is not None else torch.autocast(device.type, enabled=False)
            with ctx:
                logits = sliding_window_inference(
                    x,
                    roi_size=tuple(roi_size),
                    sw_batch_size=sw_batch_size,
                    predictor=net,
                    overlap=overlap,
                    mode=blend,
                    sigma_scale=sigma_scale,
                )
            if isinstance(logits, (list, tuple)):  # deep-supervision nets: first head is full resolution
                logits = logits[0]
            probs = torch.softmax(torch.as_tensor(logits).float(), dim=1)
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
    """Keep only the largest connected component of each of ``values`` in an integer label map (no channel axis)."""
    if not values:
        return label
    keep = KeepLargestConnectedComponent(applied_labels=list(values), is_onehot=False, independent=True)
    return torch.as_tensor(keep(label[None]))[0].to(label.dtype)

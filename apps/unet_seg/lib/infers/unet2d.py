"""UNet2D inferer: 2D images directly, volumes and multi-page TIFF stacks slice by slice."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..networks import UNet2DSpec, build_unet2d
from ..transforms import load_chain, zscore_image
from .base import SegInferTask


class UNet2DInfer(SegInferTask):
    """Original U-Net: 2D sliding window (Gaussian blending, flip TTA) per image or per slice."""

    def __init__(self, *, modality_names: Sequence[str], **kwargs: Any) -> None:
        self.modality_names = list(modality_names)
        super().__init__(spatial_dims=2, network_dims=2, **kwargs)

    def build_network(self, meta: Mapping[str, Any]) -> torch.nn.Module:
        return build_unet2d(UNet2DSpec.from_dict(meta["spec"]))

    def window_divisor(self, meta: Mapping[str, Any]) -> int | Sequence[int]:
        return UNet2DSpec.from_dict(meta["spec"]).divisor

    def pre_transforms(self, data: Any = None) -> list:
        return [*load_chain(["image"], self.in_channels, (2, 3), None, None, self.modality_names), *zscore_image("image")]

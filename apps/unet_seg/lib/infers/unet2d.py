"""UNet2D inferer: 2D images directly, volumes and multi-page TIFF stacks slice by slice."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..networks import UNet2DSpec
from ..transforms import load_chain, zscore_image
from .base import SegInferTask


class UNet2DInfer(SegInferTask):
    """Original U-Net: 2D sliding window (Gaussian blending, flip TTA) per image or per slice."""

    spec_class = UNet2DSpec

    def __init__(self, *, modality_names: Sequence[str], **kwargs: Any) -> None:
        self.modality_names = list(modality_names)
        super().__init__(spatial_dims=2, network_dims=2, **kwargs)

    def pre_transforms(self, data: Any = None) -> list:
        return [
            *load_chain(["image"], self.in_channels, (2, 3), None, None, self.modality_names),
            *zscore_image("image"),
        ]

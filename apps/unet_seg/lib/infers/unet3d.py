"""UNet3D inferer: the training pre-processing without augmentation, served through the shared base."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..networks import UNet3DSpec
from ..transforms import load_chain, zscore_nonzero
from .base import SegInferTask


class UNet3DInfer(SegInferTask):
    """3D U-Net (No New-Net) segmentation of N-modality volumes."""

    spec_class = UNet3DSpec

    def __init__(self, *, modality_names: Sequence[str], orientation: str | None, **kwargs: Any) -> None:
        self.modality_names = list(modality_names)
        self.orientation = orientation
        super().__init__(spatial_dims=3, **kwargs)

    def pre_transforms(self, data: Any = None) -> list:
        return [
            *load_chain(["image"], self.in_channels, 3, None, self.orientation, self.modality_names),
            *zscore_nonzero("image"),
        ]

"""UNet3D trainer: No New-Net 3D U-Net, Dice+CE without background, Adam, foreground-biased crops."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.losses import DiceCELoss
from monailabel.tasks.train.basic_train import Context

from ..conf import parse_float, parse_int, parse_size
from ..networks import UNet3DSpec, build_unet3d
from ..recipes import UNET3D as RECIPE
from ..transforms import flips_and_brightness, load_chain, random_crop_foreground, zscore_nonzero
from .base import SegTrainTask


class UNet3DTrain(SegTrainTask):
    """Training recipe of NVIDIA's UNet_3D_Medical (defaults: ``lib.recipes.UNet3DRecipe``)."""

    spec_class = UNet3DSpec

    def __init__(
        self,
        *,
        spec: UNet3DSpec,
        roi_size: Sequence[int],
        modality_names: Sequence[str],
        orientation: str | None,
        **kwargs: Any,
    ) -> None:
        self.spec = spec
        self._roi = tuple(roi_size)
        self.modality_names = list(modality_names)
        self.orientation = orientation
        config = {
            "roi_size": list(roi_size),
            "num_samples": RECIPE.num_samples,
            "pos_fraction": RECIPE.pos_fraction,
            "learning_rate": RECIPE.learning_rate,
        }
        config.update(kwargs.pop("config", {}) or {})
        super().__init__(spatial_dims=3, in_channels=spec.in_channels, config=config, **kwargs)

    def roi_size(self, context: Context) -> tuple[int, ...]:
        roi = parse_size(context.request.get("roi_size", self._roi), 3, "roi_size")
        bad = [s for s in roi if s % self.spec.divisor]
        if bad:
            raise ValueError(
                f"roi_size {roi}: every size must be a multiple of {self.spec.divisor} "
                f"for a {self.spec.levels}-level UNet3D"
            )
        return roi

    def network_spec(self, context: Context) -> dict[str, Any]:
        return self.spec.to_dict()

    def extra_meta(self, context: Context) -> dict[str, Any]:
        return {
            "modalities": self.modality_names,
            "orientation": self.orientation,
            "normalisation": "zscore_nonzero_per_channel",
        }

    def network(self, context: Context) -> torch.nn.Module:
        return build_unet3d(self.spec)

    def optimizer(self, context: Context) -> torch.optim.Optimizer:
        lr = parse_float(context.request.get("learning_rate", RECIPE.learning_rate), "learning_rate")
        return torch.optim.Adam(context.network.parameters(), lr=lr)

    def loss_function(self, context: Context) -> torch.nn.Module:
        return DiceCELoss(
            to_onehot_y=True, softmax=True, include_background=False, squared_pred=False, smooth_nr=1e-5, smooth_dr=1e-5
        )

    def _load_chain(self, keys: list[str]) -> list:
        return load_chain(
            keys, self.spec.in_channels, 3, list(self.labels.values()), self.orientation, self.modality_names
        )

    def train_pre_transforms(self, context: Context) -> list:
        roi = self.roi_size(context)
        return [
            *self._load_chain(["image", "label"]),
            *zscore_nonzero("image"),
            *random_crop_foreground(
                roi,
                parse_int(context.request.get("num_samples", RECIPE.num_samples), "num_samples", 1),
                parse_float(context.request.get("pos_fraction", RECIPE.pos_fraction), "pos_fraction"),
            ),
            *flips_and_brightness(3),
        ]

    def val_pre_transforms(self, context: Context) -> list:
        return [*self._load_chain(["image", "label"]), *zscore_nonzero("image")]

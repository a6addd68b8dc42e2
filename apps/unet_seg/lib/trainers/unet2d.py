"""UNet2D trainer: the original U-Net on 2D images and on slices of volumes (ISBI 2012 EM recipe).

* Samples: a 2D image is used as is; a volume gives one slice along ``slice_axis`` per sample
  (slices with foreground preferred with probability ``pos_fraction``); then random windows of
  ``roi_size`` with the same foreground bias.
* Loss ``ce_dice`` (default): cross-entropy + soft Dice over both classes (NVIDIA UNet_Medical);
  ``weighted_ce_dice``: the paper's border-weighted cross-entropy (``w0``, ``sigma`` in pixels)
  + Dice.
* Optimizer ``adam`` (default, lr 1e-4) or ``sgd`` (the paper: momentum 0.99, lr 0.01);
  ``learning_rate`` 0 means the optimizer's default.
* Augmentation: flips, rotation, elastic deformation, crop-and-resize, brightness.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from monai.losses import DiceLoss
from monai.transforms import EnsureTyped, RandCropByPosNegLabeld, SpatialPadd
from monailabel.tasks.train.basic_train import Context

from ..conf import ConfError, parse_float, parse_int, parse_size
from ..networks import UNet2DSpec, build_unet2d
from ..recipes import UNET2D as RECIPE
from ..transforms import BorderWeightd, RandSliced, load_chain, unet2d_augmentation, zscore_image
from .base import SegTrainTask

LOSSES = ("ce_dice", "weighted_ce_dice")
OPTIMIZERS = RECIPE.optimizer_learning_rates()  # name -> its own learning rate


class CeDiceLoss(torch.nn.Module):
    """Cross-entropy (optionally pixel-weighted) + soft Dice over all classes, background included."""

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=True, smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        labels = target[:, 0].long()
        ce = torch.nn.functional.cross_entropy(pred.float(), labels, reduction="none")
        if weight is not None:
            w = weight[:, 0].to(ce.dtype)
            ce = (ce * w).sum() / w.sum().clamp_min(1e-8)
        else:
            ce = ce.mean()
        return ce + self.dice(pred.float(), target)


class UNet2DTrain(SegTrainTask):
    """Training recipe of the original U-Net / NVIDIA UNet_Medical (see module docstring)."""

    spec_class = UNet2DSpec

    def __init__(
        self,
        *,
        spec: UNet2DSpec,
        roi_size: Sequence[int],
        slice_axis: int,
        modality_names: Sequence[str],
        label_map: Mapping[int, int] | None,
        **kwargs: Any,
    ) -> None:
        self.spec = spec
        self._roi = tuple(roi_size)
        self._slice_axis = slice_axis
        self.modality_names = list(modality_names)
        self.label_map = dict(label_map or {})
        r = RECIPE
        config = {
            "roi_size": list(roi_size),
            "num_samples": r.num_samples,
            "pos_fraction": r.pos_fraction,
            "optimizer": r.optimizer,
            "learning_rate": r.learning_rate,
            "loss": r.loss,
            "w0": r.w0,
            "sigma": r.sigma,
            "train_batch_size": r.train_batch_size,
        }
        config.update(kwargs.pop("config", {}) or {})
        super().__init__(spatial_dims=2, in_channels=spec.in_channels, config=config, **kwargs)

    # ---- request ----------------------------------------------------------------------------
    def roi_size(self, context: Context) -> tuple[int, ...]:
        roi = parse_size(context.request.get("roi_size", self._roi), 2, "roi_size")
        bad = [s for s in roi if s % self.spec.divisor]
        if bad:
            raise ConfError(
                f"roi_size {roi}: every size must be a multiple of {self.spec.divisor} "
                f"for a {self.spec.depth}-pooling UNet2D"
            )
        return roi

    def slice_axis(self, context: Context) -> int | None:
        return self._slice_axis

    def _loss_name(self, context: Context) -> str:
        name = str(context.request.get("loss", RECIPE.loss)).lower()
        if name not in LOSSES:
            raise ConfError(f"loss: expected one of {', '.join(LOSSES)}, got {name!r}")
        return name

    # ---- recipe -----------------------------------------------------------------------------
    def network_spec(self, context: Context) -> dict[str, Any]:
        return self.spec.to_dict()

    def extra_meta(self, context: Context) -> dict[str, Any]:
        return {
            "modalities": self.modality_names,
            "normalisation": "zscore_per_image",
            "label_map": {str(k): v for k, v in self.label_map.items()},
            "loss": self._loss_name(context),
        }

    def network(self, context: Context) -> torch.nn.Module:
        return build_unet2d(self.spec)

    def optimizer(self, context: Context) -> torch.optim.Optimizer:
        name = str(context.request.get("optimizer", RECIPE.optimizer)).lower()
        if name not in OPTIMIZERS:
            raise ConfError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
        lr = parse_float(context.request.get("learning_rate") or 0, "learning_rate") or OPTIMIZERS[name]
        if name == "sgd":
            return torch.optim.SGD(context.network.parameters(), lr=lr, momentum=0.99)
        return torch.optim.Adam(context.network.parameters(), lr=lr)

    def loss_function(self, context: Context) -> torch.nn.Module:
        self._loss_name(context)  # validate early
        return CeDiceLoss()

    def compute_loss(self, engine: Engine, pred: torch.Tensor, targets: torch.Tensor, batchdata: dict) -> torch.Tensor:
        weight = batchdata.get("weight") if isinstance(batchdata, dict) else None
        if weight is not None:
            weight = torch.as_tensor(weight).to(pred.device)
        return engine.loss_function(pred, targets, weight)

    def _load_chain(self, keys: list[str]) -> list:
        return load_chain(
            keys,
            self.spec.in_channels,
            (2, 3),
            list(self.labels.values()),
            None,
            self.modality_names,
            label_map=self.label_map,
        )

    def train_pre_transforms(self, context: Context) -> list:
        roi = list(self.roi_size(context))
        pos = parse_float(context.request.get("pos_fraction", RECIPE.pos_fraction), "pos_fraction")
        weighted = self._loss_name(context) == "weighted_ce_dice"
        keys = ["image", "label", "weight"] if weighted else ["image", "label"]
        chain = [*self._load_chain(["image", "label"]), *zscore_image("image")]
        if weighted:  # before the first random step, so a CacheDataset keeps the weights
            chain.append(
                BorderWeightd(
                    "label",
                    w0=parse_float(context.request.get("w0", RECIPE.w0), "w0"),
                    sigma=parse_float(context.request.get("sigma", RECIPE.sigma), "sigma"),
                    axis=self._slice_axis,
                )
            )
        chain += [
            RandSliced(keys=keys, axis=self._slice_axis, pos_fraction=pos),
            SpatialPadd(keys=keys, spatial_size=roi, mode="reflect"),
            RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=roi,
                pos=pos,
                neg=1 - pos,
                num_samples=parse_int(context.request.get("num_samples", RECIPE.num_samples), "num_samples", 1),
                image_key="image",
                image_threshold=-1e9,
                allow_smaller=True,
            ),
            *unet2d_augmentation(roi, keys),
            EnsureTyped(keys="image", dtype=torch.float32),
        ]
        return chain

    def val_pre_transforms(self, context: Context) -> list:
        return [*self._load_chain(["image", "label"]), *zscore_image("image")]

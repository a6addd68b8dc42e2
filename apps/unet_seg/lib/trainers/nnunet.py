"""nnU-Net trainer (3D and 2D): plan from the data, DynUNet with deep supervision, nnU-Net's recipe.

* The plan (``lib.planning``) is made once from the labelled studies and saved as
  ``<model_dir>/<model>_plan.json``; later trainings reuse it unless the request says
  ``replan: true``.
* Loss: Dice (without background) + CE on every deep-supervision head, weights 1/2^i with the
  lowest-resolution head dropped, normalised to sum 1.
* SGD (Nesterov, momentum 0.99, weight decay 3e-5), lr 0.01 with poly(0.9) decay per epoch,
  gradient-norm clipping at 12; ``iterations_per_epoch`` batches per epoch (nnU-Net: 250).
* Patches: 1/3 centred on foreground (nnU-Net's 33 % oversampling), the rest elsewhere;
  nnU-Net's augmentations (``lib.transforms.nnunet_augmentation``).
* 2D: the plan's in-plane patch, trained on slices along the plan's ``slice_axis``.
* A serving version imported from nnU-Net v2 (``lib/nnunetv2.py``) is fine-tuned with its own
  plan, network and nnU-Net pre-processing (request ``pretrained: false`` plans afresh instead).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from monai.handlers import LrScheduleHandler
from monai.losses import DiceCELoss
from monai.transforms import EnsureTyped, RandCropByPosNegLabeld, SpatialPadd, SqueezeDimd
from monailabel.tasks.train.basic_train import Context

from ..conf import parse_bool, parse_float, parse_int
from ..networks import DynUNetSpec
from ..nnunetv2 import AnyDynUNetSpec, NnUNetV2Spec, fine_tune_start, preprocess_chain
from ..planning import (
    DEFAULT_SETTINGS,
    Plan,
    PlannerSettings,
    PlanningError,
    fingerprint_from_cases,
    load_plan,
    plan_from_fingerprint,
    save_plan,
)
from ..recipes import NNUNET as RECIPE
from ..transforms import load_chain, nnunet_augmentation, nnunet_preprocess
from .base import SegTrainTask

logger = logging.getLogger(__name__)


class DeepSupervisionLoss(torch.nn.Module):
    """Weighted sum of a loss over stacked deep-supervision heads ``(B, heads, C, ...)``."""

    def __init__(self, loss: torch.nn.Module, heads: int) -> None:
        super().__init__()
        self.loss = loss
        weights = [1 / 2**i for i in range(heads)]
        if heads > 1:
            weights[-1] = 0.0  # the lowest-resolution head is dropped, as in nnU-Net
        total = sum(weights)
        self.weights = [w / total for w in weights]

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.ndim == target.ndim:  # eval mode: one head
            return self.loss(pred, target)
        return sum(w * self.loss(pred[:, i], target) for i, w in enumerate(self.weights) if w > 0)


def planner_settings(
    base_filters: int | None = None, max_filters: int | None = None, max_patch_voxels: int | None = None, dims: int = 3
) -> PlannerSettings:
    """nnU-Net's planner constants, optionally shrunk (tests, CPU previews)."""
    changes: dict[str, Any] = {}
    if base_filters:
        changes["base_filters"] = base_filters
    if max_filters:
        changes["max_filters_3d" if dims == 3 else "max_filters_2d"] = max_filters
    if max_patch_voxels:
        changes["initial_patch_voxels_3d" if dims == 3 else "initial_patch_voxels_2d"] = max_patch_voxels
    return dataclasses.replace(DEFAULT_SETTINGS, **changes)


class NnUNetTrain(SegTrainTask):
    """Self-configuring nnU-Net training (see module docstring)."""

    spec_class = AnyDynUNetSpec

    search_postprocessing = True

    def __init__(
        self,
        *,
        dims: int,
        modality_names: Sequence[str],
        modality_kinds: Sequence[str],
        gpu_memory_gb: float,
        settings: PlannerSettings,
        iterations_per_epoch: int,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.dims = dims
        self.dropout = dropout
        self.modality_names = list(modality_names)
        self.modality_kinds = list(modality_kinds)
        self.gpu_memory_gb = gpu_memory_gb
        self.settings = settings
        config = {
            "learning_rate": RECIPE.learning_rate,
            "grad_clip": RECIPE.grad_clip,
            "iterations_per_epoch": iterations_per_epoch,
            "replan": RECIPE.replan,
            "train_batch_size": RECIPE.train_batch_size,
            "pos_fraction": RECIPE.pos_fraction,
        }
        config.update(kwargs.pop("config", {}) or {})
        super().__init__(spatial_dims=dims, in_channels=len(self.modality_names), config=config, **kwargs)
        self.plan_path = self.paths.plan

    # ---- the plan -------------------------------------------------------------------------
    def make_plan(self, datalist: list[dict], replan: bool = False) -> Plan:
        """Load the saved plan, or fingerprint the labelled studies and plan (then save)."""
        if os.path.exists(self.plan_path) and not replan:
            plan = load_plan(self.plan_path)
            if plan.in_channels == self.in_channels and plan.dims == self.dims:
                return plan
            logger.info(f"{self.plan_path} does not fit this config (channels/dims); planning again")
        fp = fingerprint_from_cases(datalist, self.modality_kinds)
        plan = plan_from_fingerprint(
            fp, self.dims, self.gpu_memory_gb, modality=self.modality_kinds, settings=self.settings
        )
        save_plan(plan, self.plan_path)
        logger.info(f"nnU-Net plan saved to {self.plan_path}: patch {plan.patch_size}, batch {plan.batch_size}")
        return plan

    def plan(self) -> Plan | None:
        """The saved plan, if any (shown in /info)."""
        return load_plan(self.plan_path) if os.path.exists(self.plan_path) else None

    def info(self) -> dict:
        out = super().info()
        try:
            plan = self.plan()
        except PlanningError as e:  # a broken or newer plan file must not break /info
            logger.warning(f"/info: {e}")
            plan = None
        if plan:
            out["plan"] = {
                k: getattr(plan, k)
                for k in (
                    "dims",
                    "target_spacing",
                    "patch_size",
                    "batch_size",
                    "strides",
                    "kernel_sizes",
                    "filters",
                    "normalization",
                    "slice_axis",
                )
            }
        return out

    def pre_process(self, request: dict, datastore: Any) -> list[dict]:
        datalist = super().pre_process(request, datastore)
        start = fine_tune_start(self.store, parse_bool(request.get("pretrained", True), "pretrained"))
        if start is not None:  # an imported nnU-Net model: its plan, network and pre-processing
            request["_imported"] = {"plan": start.plan, "spec": start.spec}
            request["_plan"] = Plan.from_dict(start.plan or {})
            logger.info(f"fine-tuning the nnU-Net model imported as {start.version} with its own plan")
        else:
            request["_plan"] = self.make_plan(datalist, parse_bool(request.get("replan", RECIPE.replan), "replan"))
        return datalist

    @staticmethod
    def _plan(context: Context) -> Plan:
        return context.request["_plan"]

    # ---- recipe ---------------------------------------------------------------------------
    def roi_size(self, context: Context) -> tuple[int, ...]:
        return tuple(int(s) for s in self._plan(context).patch_size)

    def slice_axis(self, context: Context) -> int | None:
        return self._plan(context).slice_axis if self.dims == 2 else None

    def spec(self, context: Context) -> DynUNetSpec:
        """DynUNet spec from the plan (deep supervision on every stage but the two lowest), or the imported model's."""
        imported = context.request.get("_imported")
        if imported:
            return NnUNetV2Spec.from_dict({**imported["spec"], "dropout": self.dropout})
        plan = self._plan(context)
        strides = [list(s) for s in plan.strides]
        return DynUNetSpec(
            spatial_dims=self.dims,
            in_channels=self.in_channels,
            out_channels=self.num_classes,
            kernels=[list(k) for k in plan.kernel_sizes],
            strides=strides,
            filters=list(plan.filters),
            deep_supervision=True,
            deep_supr_num=max(1, len(strides) - 2),
            dropout=self.dropout,
        )

    def network_spec(self, context: Context) -> dict[str, Any]:
        return self.spec(context).to_dict()

    def extra_meta(self, context: Context) -> dict[str, Any]:
        imported = context.request.get("_imported")
        plan = dict(imported["plan"]) if imported else self._plan(context).to_dict(fingerprint_summary=False)
        return {"plan": plan, "modalities": self.modality_names}

    def network(self, context: Context) -> torch.nn.Module:
        return self.spec(context).build()

    def optimizer(self, context: Context) -> torch.optim.Optimizer:
        lr = parse_float(context.request.get("learning_rate", RECIPE.learning_rate), "learning_rate")
        return torch.optim.SGD(context.network.parameters(), lr=lr, momentum=0.99, nesterov=True, weight_decay=3e-5)

    def lr_scheduler_handler(self, context: Context) -> LrScheduleHandler:
        sched = torch.optim.lr_scheduler.PolynomialLR(
            context.optimizer, total_iters=max(context.max_epochs, 1), power=0.9
        )
        context.lr_scheduler = sched  # a resumed run moves it to the saved epoch
        return LrScheduleHandler(sched, print_lr=False, epoch_level=True)

    def loss_function(self, context: Context) -> torch.nn.Module:
        dice_ce = DiceCELoss(
            to_onehot_y=True, softmax=True, include_background=False, smooth_nr=1e-5, smooth_dr=1e-5, batch=True
        )
        return DeepSupervisionLoss(dice_ce, heads=1 + self.spec(context).deep_supr_num)

    def _preprocess(self, context: Context, keys: list[str]) -> list:
        imported = context.request.get("_imported")
        if imported:
            return preprocess_chain(
                keys, imported["plan"], self.in_channels, self.modality_names, list(self.labels.values())
            )
        plan = self._plan(context)
        return [
            *load_chain(keys, self.in_channels, 3, list(self.labels.values()), None, self.modality_names),
            *nnunet_preprocess(keys, plan.target_spacing, plan.normalization),
        ]

    def train_pre_transforms(self, context: Context) -> list:
        patch = list(self.roi_size(context))
        crop = patch
        axis = self.slice_axis(context)
        if axis is not None:  # 2D on volumes: crop a one-slice slab, then drop that axis
            crop = patch[:axis] + [1] + patch[axis:]
        pos = parse_float(context.request.get("pos_fraction", RECIPE.pos_fraction), "pos_fraction")
        chain = [
            *self._preprocess(context, ["image", "label"]),
            SpatialPadd(keys=["image", "label"], spatial_size=crop),
            RandCropByPosNegLabeld(
                keys=["image", "label"],
                label_key="label",
                spatial_size=crop,
                pos=pos,
                neg=1 - pos,
                num_samples=1,
                image_key="image",
                image_threshold=-1e9,
                allow_smaller=True,
            ),
        ]
        if axis is not None:
            chain.append(SqueezeDimd(keys=["image", "label"], dim=1 + axis))
        spacing = self._plan(context).target_spacing
        anisotropic = self.dims == 3 and max(spacing) > 3 * min(spacing)
        return [*chain, *nnunet_augmentation(self.dims, anisotropic), EnsureTyped(keys="image", dtype=torch.float32)]

    def val_pre_transforms(self, context: Context) -> list:
        return self._preprocess(context, ["image", "label"])

    # ---- epochs of a fixed number of iterations --------------------------------------------
    def __call__(self, request: dict, datastore: Any) -> dict:
        request = dict(request)
        if not parse_int(
            request.get("train_batch_size", self._config.get("train_batch_size", RECIPE.train_batch_size)) or 0,
            "train_batch_size",
        ):
            request["train_batch_size"] = 1  # placeholder; replaced by the plan's batch size in train()
            request["_batch_from_plan"] = True
        return super().__call__(request, datastore)

    def train(self, rank: int, world_size: int, request: dict, datalist: list) -> Any:
        if request.get("_batch_from_plan"):
            request["train_batch_size"] = max(1, int(request["_plan"].batch_size) // max(world_size, 1))
        return super().train(rank, world_size, request, datalist)

    def _create_trainer(self, context: Context) -> Any:
        trainer = super()._create_trainer(context)
        iters = parse_int(context.request.get("iterations_per_epoch", 0) or 0, "iterations_per_epoch")
        if iters > 0:
            trainer.state.epoch_length = iters
        return trainer

"""nnU-Net 3D recipe card: a self-configuring U-Net planned from the labelled studies.

Conf keys (plain or prefixed ``nnunet.``):

* ``labels``, ``modalities``   as for unet3d (default ``anterior,posterior`` and ``1``)
* ``modality``                 ``MRI`` (per-image z-score) or ``CT`` (clip + dataset z-score);
                               one value or one per channel
* ``gpu_memory_gb``            memory budget the plan's patch and batch are sized for (default 8, nnU-Net's reference)
* ``schedule``                 ``fast`` (default, interactive: 50 epochs x 50 iterations) or
                               ``nnunet`` (nnU-Net's 1000 epochs x 250 iterations)
* ``max_epochs``, ``iterations_per_epoch``   override the schedule
* ``base_filters``, ``max_filters``, ``max_patch_voxels``   shrink the planned network (tests, CPU previews)
* ``dropout``                  dropout rate in every conv block (default ``0``, as nnU-Net; MC dropout uses it)
* ``pretrained``               a local checkpoint served until the model is trained here, or an nnU-Net v2
                               results folder / export zip (``lib/nnunetv2.py``): imported as a version that
                               serves; its labels and channels become this model's defaults
* ``configuration``, ``folds``, ``checkpoint``   which nnU-Net model of that folder: configuration (when it
                               holds several), folds (default: all trained), ``final`` (default) or ``best``
"""

from __future__ import annotations

from typing import Any

from ..conf import AppConf, ConfError, parse_modalities
from ..infers.nnunet import NnUNetInfer
from ..nnunetv2 import open_pretrained, serve_pretrained
from ..recipes import NNUNET, NnUNetRecipe
from ..trainers.nnunet import NnUNetTrain, planner_settings
from . import SegConfig


class NnUNet(SegConfig):
    """TaskConfig registering the nnU-Net inferer and trainer (3D; the 2D config subclasses it)."""

    recipe: NnUNetRecipe = NNUNET
    dims = NNUNET.dims
    nnunet_sources = True

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        c, r = AppConf(conf), self.recipe
        imported, self.import_error = open_pretrained(conf, name, self.dims)
        self.labels = c.labels(imported.labels if imported else r.labels, model=name)
        self.modalities = parse_modalities(
            c.get("modalities", ",".join(imported.channel_names) if imported else r.modalities, model=name)
        )
        default_kinds = ",".join(imported.modality_kinds) if imported else r.modality
        kinds = [k.strip().upper() for k in c.str("modality", default_kinds, model=name).split(",") if k.strip()]
        if len(kinds) == 1:
            kinds = kinds * len(self.modalities)
        if len(kinds) != len(self.modalities) or any(k not in ("CT", "MRI", "MR", "OTHER") for k in kinds):
            raise ConfError(
                f"{name}.modality: give CT or MRI, once or per channel ({len(self.modalities)}), got {kinds}"
            )
        self.kinds = ["MRI" if k == "MR" else k for k in kinds]
        schedule = c.str("schedule", r.schedule, model=name)
        schedules = r.schedules()
        if schedule not in schedules:
            raise ConfError(f"{name}.schedule: expected one of {sorted(schedules)}, got {schedule!r}")
        epochs, iters = schedules[schedule]
        self.max_epochs = c.int("max_epochs", epochs, model=name, minimum=1)
        self.iterations = c.int("iterations_per_epoch", iters, model=name, minimum=1)
        self.dropout = c.dropout(model=name)
        self.gpu_memory_gb = c.float("gpu_memory_gb", r.gpu_memory_gb, model=name)
        self.settings = planner_settings(
            base_filters=c.int("base_filters", r.base_filters, model=name) or None,
            max_filters=c.int("max_filters", r.max_filters, model=name) or None,
            max_patch_voxels=c.int("max_patch_voxels", r.max_patch_voxels, model=name) or None,
            dims=self.dims,
        )
        self.init_shared(conf, name, model_dir, r)
        if imported is not None:
            self.import_error = serve_pretrained(self.store, imported, name)

    def _common(self) -> dict[str, Any]:
        return {**super()._common(), "dims": self.dims}

    def infer(self) -> NnUNetInfer:
        return NnUNetInfer(
            in_channels=len(self.modalities),
            roi_size=[0] * self.dims,
            description=f"nnU-Net {self.dims}D (self-configuring) for {', '.join(self.labels)}",
            import_error=self.import_error,
            **self._common(),
        )

    def trainer(self) -> NnUNetTrain:
        return NnUNetTrain(
            modality_kinds=self.kinds,
            gpu_memory_gb=self.gpu_memory_gb,
            settings=self.settings,
            iterations_per_epoch=self.iterations,
            dropout=self.dropout,
            **self._train_common(),
            description=f"Train nnU-Net {self.dims}D from a plan of the labelled studies",
            config={"max_epochs": self.max_epochs},
            **self._common(),
        )

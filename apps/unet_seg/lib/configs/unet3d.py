"""UNet3D recipe card (NVIDIA UNet_3D_Medical: 3D U-Net with the No New-Net changes).

Defaults fit the embedded sample (MSD hippocampus: one T1 channel, labels anterior/posterior).
Conf keys (plain or prefixed ``unet3d.``):

* ``labels``        label names, values 1..N in order (default ``anterior,posterior``)
* ``modalities``    channel count or names, e.g. ``4`` or ``flair,t1,t1c,t2`` (default ``1``)
* ``roi_size``      training crop and inference window (default ``128``; multiples of 2^(levels-1))
* ``preset``        network size: ``full`` (32->320 filters, 5 levels), ``small``, ``tiny``
* ``dropout``       dropout rate in every conv block (default ``0``); MC dropout (``epistemic``) uses it
* ``orientation``   axcodes images are reoriented to (default ``RAS``; ``none`` keeps the file's)
* ``pretrained``    a local checkpoint served until the model is trained here
* ``max_epochs``, ``learning_rate``, ``train_batch_size``  training defaults
"""

from __future__ import annotations

import logging
from typing import Any

from ..checkpoints import CheckpointMeta
from ..conf import AppConf, parse_modalities
from ..infers.unet3d import UNet3DInfer
from ..networks import UNET3D_PRESETS, UNet3DSpec, preset_name
from ..recipes import UNET3D
from ..trainers.unet3d import UNet3DTrain
from . import SegConfig

logger = logging.getLogger(__name__)


class UNet3D(SegConfig):
    """TaskConfig registering the UNet3D inferer and trainer (defaults: ``lib.recipes.UNet3DRecipe``)."""

    recipe = UNET3D

    dims = 3

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        c, r = AppConf(conf), self.recipe
        self.labels = c.labels(r.labels, model=name)
        self.modalities = parse_modalities(c.get("modalities", r.modalities, model=name))
        self.preset = c.str("preset", r.preset, model=name)
        self.spec = UNet3DSpec.from_preset(
            self.preset, in_channels=len(self.modalities), out_channels=len(self.labels) + 1
        )
        self.spec.dropout = c.dropout(model=name)
        self.roi_size = c.size("roi_size", r.roi_size, 3, model=name)
        bad = [s for s in self.roi_size if s % self.spec.divisor]
        if bad:
            raise ValueError(
                f"{name}.roi_size {self.roi_size}: sizes must be multiples of {self.spec.divisor} "
                f"for preset {self.preset!r}"
            )
        orientation = c.str("orientation", r.orientation, model=name)
        self.orientation = None if orientation.lower() in ("none", "") else orientation
        self.init_shared(conf, name, model_dir, r)
        self.train_defaults = {
            "max_epochs": c.int("max_epochs", r.max_epochs, model=name, minimum=1),
            "learning_rate": c.float("learning_rate", r.learning_rate, model=name),
            "train_batch_size": c.int("train_batch_size", r.train_batch_size, model=name, minimum=1),
        }

    def _common(self) -> dict[str, Any]:
        return {**super()._common(), "orientation": self.orientation}

    def infer(self) -> UNet3DInfer:
        return UNet3DInfer(
            in_channels=len(self.modalities),
            roi_size=self.roi_size,
            description=f"3D U-Net (No New-Net, preset {self.preset}) for {', '.join(self.labels)}",
            **self._common(),
        )

    def trainer(self) -> UNet3DTrain:
        return UNet3DTrain(
            spec=self.spec,
            roi_size=self.roi_size,
            **self._train_common(),
            description=f"Train 3D U-Net (preset {self.preset})",
            config=self.train_defaults,
            **self._common(),
        )

    @staticmethod
    def conf_from_meta(meta: CheckpointMeta) -> dict[str, str]:
        """Conf that makes this config match a model file (the command line's ``--ckpt``): preset and window."""
        conf = {"roi_size": ",".join(str(s) for s in meta.roi_size)}
        preset = preset_name(meta.spec, UNET3D_PRESETS)
        if preset:
            conf["preset"] = preset
        return conf

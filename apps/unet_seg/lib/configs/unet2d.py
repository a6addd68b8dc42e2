"""UNet2D recipe card: the original U-Net (Ronneberger 2015; NVIDIA UNet_Medical on ISBI 2012 EM).

Serves 2D images (PNG, TIFF) directly and volumes (NIfTI, multi-page TIFF stacks) slice by
slice. Defaults fit ISBI 2012: one grey channel, one label ``cell`` stored as 255 in the PNG
masks (membrane = 0). Conf keys (plain or prefixed ``unet2d.``):

* ``labels``        label names, values 1..N in order (default ``cell``)
* ``label_map``     stored value -> label value for training labels (default ``255:1``; ``none`` to disable)
* ``modalities``    channel count or names (default ``1``; ``3`` for RGB)
* ``roi_size``      training crop and inference window (default ``256``; multiples of 2^depth)
* ``preset``        ``full`` (the paper: 64 -> 1024 filters, 4 poolings, 31M parameters), ``small``, ``tiny``
* ``padding``       ``same`` (default) or ``valid`` (the paper's unpadded convolutions with overlap-tile mirroring)
* ``dropout``       dropout rate at the end of the contracting path, as in the paper (default ``0``;
                    MC dropout (``epistemic``) uses it)
* ``batch_norm``    add batch normalisation after each convolution (default false, as in the paper)
* ``slice_axis``    array axis volumes are cut along (default ``2``: NIfTI axial, TIFF pages)
* ``pretrained``    a local checkpoint served until the model is trained here
* ``max_epochs``, ``learning_rate``, ``train_batch_size``, ``optimizer`` (adam|sgd), ``loss`` (ce_dice|weighted_ce_dice)
"""

from __future__ import annotations

from typing import Any

from ..checkpoints import CheckpointMeta
from ..conf import AppConf, ConfError, parse_label_map, parse_modalities
from ..infers.unet2d import UNet2DInfer
from ..networks import UNET2D_PRESETS, UNet2DSpec, preset_name
from ..recipes import UNET2D
from ..trainers.unet2d import UNet2DTrain
from . import SegConfig


class UNet2D(SegConfig):
    """TaskConfig registering the UNet2D inferer and trainer (defaults: ``lib.recipes.UNet2DRecipe``)."""

    recipe = UNET2D

    dims = 2

    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs: Any) -> None:
        super().init(name, model_dir, conf, planner, **kwargs)
        c, r = AppConf(conf), self.recipe
        self.labels = c.labels(r.labels, model=name)
        self.label_map = parse_label_map(c.get("label_map", r.label_map, model=name), f"{name}.label_map")
        unknown = sorted(set(self.label_map.values()) - {0, *self.labels.values()})
        if unknown:
            raise ConfError(
                f"{name}.label_map maps to {unknown}, which are not label values {sorted(self.labels.values())}"
            )
        self.modalities = parse_modalities(c.get("modalities", r.modalities, model=name))
        self.preset = c.str("preset", r.preset, model=name)
        try:
            self.spec = UNet2DSpec.from_preset(
                self.preset,
                in_channels=len(self.modalities),
                out_channels=len(self.labels) + 1,
                padding=c.str("padding", r.padding, model=name),
                batch_norm=c.bool("batch_norm", r.batch_norm, model=name),
                dropout=c.dropout(model=name),
            )
        except ValueError as e:
            raise ConfError(f"{name}: {e}") from e
        self.roi_size = c.size("roi_size", r.roi_size, 2, model=name)
        if any(s % self.spec.divisor for s in self.roi_size):
            raise ConfError(
                f"{name}.roi_size {self.roi_size}: sizes must be multiples of {self.spec.divisor} "
                f"for preset {self.preset!r}"
            )
        self.slice_axis = c.int("slice_axis", r.slice_axis, model=name, minimum=0)
        if self.slice_axis > 2:
            raise ConfError(f"{name}.slice_axis must be 0, 1 or 2, got {self.slice_axis}")
        self.init_shared(conf, name, model_dir, r)
        self.train_defaults = {
            "max_epochs": c.int("max_epochs", r.max_epochs, model=name, minimum=1),
            "learning_rate": c.float("learning_rate", r.learning_rate, model=name),  # 0: the optimizer's own
            "train_batch_size": c.int("train_batch_size", r.train_batch_size, model=name, minimum=1),
            "optimizer": c.str("optimizer", r.optimizer, model=name),
            "loss": c.str("loss", r.loss, model=name),
        }

    def infer(self) -> UNet2DInfer:
        return UNet2DInfer(
            in_channels=len(self.modalities),
            roi_size=self.roi_size,
            description=f"2D U-Net (Ronneberger, preset {self.preset}, {self.spec.padding} padding) for "
            f"{', '.join(self.labels)}; volumes slice by slice",
            **self._common(),
        )

    def trainer(self) -> UNet2DTrain:
        return UNet2DTrain(
            spec=self.spec,
            roi_size=self.roi_size,
            slice_axis=self.slice_axis,
            label_map=self.label_map,
            **self._train_common(),
            description=f"Train 2D U-Net (preset {self.preset})",
            config=self.train_defaults,
            **self._common(),
        )

    @staticmethod
    def conf_from_meta(meta: CheckpointMeta) -> dict[str, str]:
        """Conf that makes this config match a model file (the command line's ``--ckpt``): preset, window, padding."""
        conf = {
            "roi_size": ",".join(str(s) for s in meta.roi_size),
            "padding": str(meta.spec.get("padding", "same")),
            "batch_norm": str(meta.spec.get("batch_norm", False)).lower(),
        }
        preset = preset_name(meta.spec, UNET2D_PRESETS)
        if preset:
            conf["preset"] = preset
        return conf

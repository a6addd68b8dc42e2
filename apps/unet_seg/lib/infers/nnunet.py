"""nnU-Net inferer (3D and 2D): pre-processing from the served model's own plan, mirror TTA, original geometry out.

A version imported from nnU-Net v2 (``lib/nnunetv2.py``) is pre-processed in nnU-Net's axis order
and way (its plan's ``nnunet_v2`` block) and run with nnU-Net's window layout; ``tta`` mirrors it as
nnU-Net does (logits averaged per window over the axes its checkpoint allows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..checkpoints import CheckpointMeta
from ..conf import parse_bool
from ..inference import predict_volume
from ..nnunetv2 import (
    AnyDynUNetSpec,
    MirroredLogits,
    imported_info,
    nnunet_importance_map,
    nnunet_window_starts,
    preprocess_chain,
    probabilities_before_resampling,
)
from ..planning import Plan
from ..transforms import load_chain, nnunet_preprocess
from .base import ModelNotReady, SegInferTask


class NnUNetInfer(SegInferTask):
    """Serves an nnU-Net checkpoint; the plan inside its meta decides spacing and normalisation."""

    spec_class = AnyDynUNetSpec

    def __init__(
        self, *, modality_names: Sequence[str], dims: int, import_error: str | None = None, **kwargs: Any
    ) -> None:
        self.modality_names = list(modality_names)
        self.import_error = import_error  # why the nnU-Net model named by ``pretrained`` could not be imported
        super().__init__(spatial_dims=3, network_dims=dims, config={"tta": True}, **kwargs)

    def served_meta(self) -> CheckpointMeta:
        """The meta of the checkpoint that will serve the next request."""
        path, meta, _ = self._candidate()
        if not path or meta is None:
            raise ModelNotReady(self.not_ready_reason())
        return meta

    def served_plan(self) -> Plan:
        """The plan of the checkpoint that will serve the next request."""
        return Plan.from_dict(self.served_meta().plan)

    def not_ready_reason(self) -> str | None:
        reason = super().not_ready_reason()
        if reason and self.import_error:
            return f"model '{self.model_name}' cannot serve: {self.import_error}"
        return reason

    def pre_transforms(self, data: Any = None) -> list:
        meta = self.served_meta()
        if imported_info(meta) is not None:
            return preprocess_chain(["image"], meta.plan or {}, self.in_channels, self.modality_names)
        plan = Plan.from_dict(meta.plan)
        return [
            *load_chain(["image"], self.in_channels, 3, None, None, self.modality_names),
            *nnunet_preprocess(["image"], plan.target_spacing, plan.normalization),
        ]

    def compute_probabilities(
        self, data: dict[str, Any], dev: torch.device
    ) -> tuple[torch.Tensor, dict, dict[str, Any]]:
        info = imported_info(self.served_meta())
        if info is None:
            return super().compute_probabilities(data, dev)
        # an imported model: nnU-Net's TTA (mirrored logits averaged per window, over its allowed axes); its folds
        # are averaged inside the network
        mirror = list(info.get("mirror_axes") or []) if parse_bool(data.get("tta", False), "tta") else []
        net, meta = self.load_network(dev)
        image, engine = self._engine_inputs(data, meta, dev, default_overlap=0.5)
        blend = str(data.get("blend", "gaussian"))
        layout = {"starts": nnunet_window_starts, "weights": nnunet_importance_map}  # nnUNetPredictor's windows
        probs = predict_volume(MirroredLogits(net, mirror), image, blend=blend, tta=False, **layout, **engine)
        back = info.get("probability_resampling") or {}  # nnU-Net resamples before the argmax
        probs = probabilities_before_resampling(probs, data[self.input_key], **back)
        run = {
            "tta": bool(mirror),
            "mirror_axes": mirror,
            "amp": engine["amp"].describe(),
            "roi_size": list(engine["roi_size"]),
            "model_version": meta.version,
            "ensemble": int(meta.spec.get("folds", 1) or 1),
        }
        return probs, meta, run

"""nnU-Net inferer (3D and 2D): pre-processing from the served model's own plan, mirror TTA, original geometry out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..networks import DynUNetSpec
from ..planning import Plan
from ..transforms import load_chain, nnunet_preprocess
from .base import ModelNotReady, SegInferTask


class NnUNetInfer(SegInferTask):
    """Serves an nnU-Net checkpoint; the plan inside its meta decides spacing and normalisation."""

    spec_class = DynUNetSpec

    def __init__(self, *, modality_names: Sequence[str], dims: int, **kwargs: Any) -> None:
        self.modality_names = list(modality_names)
        super().__init__(spatial_dims=3, network_dims=dims, config={"tta": True}, **kwargs)

    def served_plan(self) -> Plan:
        """The plan of the checkpoint that will serve the next request."""
        path, meta, _ = self._candidate()
        if not path:
            raise ModelNotReady(self.not_ready_reason())
        return Plan.from_dict(meta.plan)

    def pre_transforms(self, data: Any = None) -> list:
        plan = self.served_plan()
        return [
            *load_chain(["image"], self.in_channels, 3, None, None, self.modality_names),
            *nnunet_preprocess(["image"], plan.target_spacing, plan.normalization),
        ]

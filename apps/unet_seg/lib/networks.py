"""Network factories shared by the server tasks, the CLI and the tests.

UNet3D follows NVIDIA's UNet_3D_Medical (3D U-Net with the "No New-Net" changes): instance
normalisation, LeakyReLU, strided-convolution down-sampling, transposed-convolution
up-sampling and filters that start at 32 and double per level up to a cap of 320. It is built
on MONAI's DynUNet, whose residual-free "UnetBasicBlock" is exactly conv-norm-LeakyReLU x2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from monai.networks.nets import DynUNet

# Network size presets: "full" is the reference recipe, the smaller ones exist for CPU
# machines, embedded samples and tests (tiny trains in seconds).
UNET3D_PRESETS: dict[str, dict[str, int]] = {
    "full": {"base_filters": 32, "max_filters": 320, "levels": 5},
    "small": {"base_filters": 16, "max_filters": 128, "levels": 4},
    "tiny": {"base_filters": 4, "max_filters": 16, "levels": 3},
}


@dataclass
class UNet3DSpec:
    """Everything needed to rebuild a UNet3D; stored inside every checkpoint."""

    in_channels: int = 1
    out_channels: int = 3
    base_filters: int = 32
    max_filters: int = 320
    levels: int = 5
    dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_preset(cls, preset: str, in_channels: int, out_channels: int) -> "UNet3DSpec":
        """Spec for a named size preset (see UNET3D_PRESETS)."""
        if preset not in UNET3D_PRESETS:
            raise ValueError(f"unknown network preset {preset!r}; valid: {sorted(UNET3D_PRESETS)}")
        return cls(in_channels=in_channels, out_channels=out_channels, **UNET3D_PRESETS[preset])

    @property
    def filters(self) -> list[int]:
        """Filters per level: base * 2^i capped at max_filters."""
        return [min(self.base_filters * 2**i, self.max_filters) for i in range(self.levels)]

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this (one factor 2 per down-sampling)."""
        return 2 ** (self.levels - 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UNet3DSpec":
        """Inverse of to_dict (unknown keys are rejected by the dataclass)."""
        return cls(**data)


def build_unet3d(spec: UNet3DSpec) -> torch.nn.Module:
    """3D U-Net (No New-Net style) as a DynUNet without deep supervision."""
    n = spec.levels
    return DynUNet(
        spatial_dims=3,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        kernel_size=[3] * n,
        strides=[1] + [2] * (n - 1),
        upsample_kernel_size=[2] * (n - 1),
        filters=spec.filters,
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        dropout=spec.dropout or None,
        deep_supervision=False,
        res_block=False,
        trans_bias=True,
    )


def count_parameters(net: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


@dataclass
class DynUNetSpec:
    """A plan-shaped DynUNet (nnU-Net): per-stage kernels, strides and filters; stored in checkpoints."""

    spatial_dims: int
    in_channels: int
    out_channels: int
    kernels: list[list[int]]
    strides: list[list[int]]
    filters: list[int]
    deep_supervision: bool = True
    deep_supr_num: int = 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DynUNetSpec":
        """Inverse of to_dict."""
        return cls(**data)

    @property
    def divisor(self) -> list[int]:
        """Per-axis factor every input size must be a multiple of (product of the strides)."""
        out = [1] * self.spatial_dims
        for stride in self.strides:
            out = [o * s for o, s in zip(out, stride)]
        return out


def build_dynunet(spec: DynUNetSpec) -> torch.nn.Module:
    """nnU-Net's plain U-Net: conv-IN-LeakyReLU x2 per stage, strided conv down, transposed conv up.

    In training mode with deep supervision the output is stacked as (B, 1 + deep_supr_num, C, ...)
    (all heads upsampled to full resolution); in eval mode only the full-resolution head.
    """
    if len(spec.kernels) != len(spec.strides) or len(spec.filters) != len(spec.strides):
        raise ValueError(f"plan stages disagree: {len(spec.kernels)} kernels, {len(spec.strides)} strides, {len(spec.filters)} filters")
    return DynUNet(
        spatial_dims=spec.spatial_dims,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        kernel_size=spec.kernels,
        strides=spec.strides,
        upsample_kernel_size=spec.strides[1:],
        filters=spec.filters,
        norm_name=("INSTANCE", {"affine": True}),
        act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        deep_supervision=spec.deep_supervision,
        deep_supr_num=max(1, spec.deep_supr_num),
        res_block=False,
        trans_bias=False,
    )

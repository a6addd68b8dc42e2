"""Network factories shared by the server tasks, the CLI and the tests.

UNet2D is Ronneberger et al.'s original U-Net (2015): per level two 3x3 convolutions + ReLU,
2x2 max-pooling down, 2x2 up-convolution up, skip connections by concatenation, 64 filters
doubling to 1024 at the fourth pooling. ``padding="same"`` keeps sizes (the default, as in
NVIDIA's UNet_Medical); ``padding="valid"`` is the paper's unpadded network run with the
overlap-tile strategy: the input is mirror-padded so the valid output covers exactly the input.

UNet3D follows NVIDIA's UNet_3D_Medical (3D U-Net with the "No New-Net" changes): instance
normalisation, LeakyReLU, strided-convolution down-sampling, transposed-convolution
up-sampling and filters that start at 32 and double per level up to a cap of 320. It is built
on MONAI's DynUNet, whose residual-free "UnetBasicBlock" is exactly conv-norm-LeakyReLU x2.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    def from_preset(cls, preset: str, in_channels: int, out_channels: int) -> UNet3DSpec:
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

    def build(self) -> torch.nn.Module:
        """The network this spec describes."""
        return build_unet3d(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNet3DSpec:
        """Inverse of to_dict (unknown keys are rejected by the dataclass)."""
        return cls(**data)


def same_weights_layout(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """True when two stored specs build networks with the same weights (they may differ in dropout rate only)."""
    strip = lambda spec: {k: v for k, v in (spec or {}).items() if k != "dropout"}  # noqa: E731
    return a is not None and b is not None and strip(a) == strip(b)


def preset_name(spec: dict[str, Any], presets: dict[str, dict[str, int]]) -> str | None:
    """Name of the size preset a stored network spec was built from (None when it matches none)."""
    for name, values in presets.items():
        if all(spec.get(k) == v for k, v in values.items()):
            return name
    return None


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
    dropout: float = 0.0

    def build(self) -> torch.nn.Module:
        """The network this spec describes."""
        return build_dynunet(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DynUNetSpec:
        """Inverse of to_dict."""
        return cls(**data)

    @property
    def divisor(self) -> list[int]:
        """Per-axis factor every input size must be a multiple of (product of the strides)."""
        out = [1] * self.spatial_dims
        for stride in self.strides:
            out = [o * s for o, s in zip(out, stride, strict=True)]
        return out


def build_dynunet(spec: DynUNetSpec) -> torch.nn.Module:
    """nnU-Net's plain U-Net: conv-IN-LeakyReLU x2 per stage, strided conv down, transposed conv up.

    In training mode with deep supervision the output is stacked as (B, 1 + deep_supr_num, C, ...)
    (all heads upsampled to full resolution); in eval mode only the full-resolution head.
    """
    if len(spec.kernels) != len(spec.strides) or len(spec.filters) != len(spec.strides):
        raise ValueError(
            f"plan stages disagree: {len(spec.kernels)} kernels, {len(spec.strides)} strides, "
            f"{len(spec.filters)} filters"
        )
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
        dropout=spec.dropout or None,
    )


# ---- UNet2D (Ronneberger 2015) ---------------------------------------------------------------

UNET2D_PRESETS: dict[str, dict[str, int]] = {
    "full": {"base_filters": 64, "depth": 4},  # the paper: 64 -> 1024, 4 poolings
    "small": {"base_filters": 16, "depth": 4},
    "tiny": {"base_filters": 4, "depth": 2},
}


@dataclass
class UNet2DSpec:
    """Everything needed to rebuild a UNet2D; stored inside every checkpoint."""

    in_channels: int = 1
    out_channels: int = 2
    base_filters: int = 64
    depth: int = 4
    padding: str = "same"
    batch_norm: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.padding not in ("same", "valid"):
            raise ValueError(f"UNet2D padding must be 'same' or 'valid', got {self.padding!r}")
        if self.depth < 1:
            raise ValueError(f"UNet2D depth (number of poolings) must be >= 1, got {self.depth}")

    @classmethod
    def from_preset(cls, preset: str, in_channels: int, out_channels: int, **kwargs: Any) -> UNet2DSpec:
        """Spec for a named size preset (see UNET2D_PRESETS)."""
        if preset not in UNET2D_PRESETS:
            raise ValueError(f"unknown network preset {preset!r}; valid: {sorted(UNET2D_PRESETS)}")
        return cls(in_channels=in_channels, out_channels=out_channels, **UNET2D_PRESETS[preset], **kwargs)

    @property
    def filters(self) -> list[int]:
        """Filters per level, encoder top to bottleneck: base * 2^i."""
        return [self.base_filters * 2**i for i in range(self.depth + 1)]

    @property
    def divisor(self) -> int:
        """Window sizes must be multiples of this (one factor 2 per pooling)."""
        return 2**self.depth

    def build(self) -> torch.nn.Module:
        """The network this spec describes."""
        return build_unet2d(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNet2DSpec:
        """Inverse of to_dict."""
        return cls(**data)


class _DoubleConv(torch.nn.Sequential):
    """Two 3x3 convolutions, each followed by (optional batch norm and) ReLU."""

    def __init__(self, cin: int, cout: int, pad: int, batch_norm: bool, dropout: float = 0.0) -> None:
        layers: list[torch.nn.Module] = []
        for i, c in enumerate((cin, cout)):
            layers.append(torch.nn.Conv2d(c, cout, 3, padding=pad, bias=not batch_norm))
            if batch_norm:
                layers.append(torch.nn.BatchNorm2d(cout))
            layers.append(torch.nn.ReLU(inplace=True))
            if dropout and i == 1:
                layers.append(torch.nn.Dropout2d(dropout))
        super().__init__(*layers)


def _center_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    dy, dx = (x.shape[-2] - size[0]) // 2, (x.shape[-1] - size[1]) // 2
    return x[..., dy : dy + size[0], dx : dx + size[1]]


def _mirror_pad(x: torch.Tensor, pads: Sequence[int]) -> torch.Tensor:
    """Reflect-pad (left, right, top, bottom) even beyond the image size, by repeated reflection."""
    left, right, top, bottom = (int(p) for p in pads)
    while left or right or top or bottom:
        h, w = x.shape[-2:]
        step = [min(left, w - 1), min(right, w - 1), min(top, h - 1), min(bottom, h - 1)]
        if not any(step):  # 1-pixel image: reflection is undefined, replicate instead
            return torch.nn.functional.pad(x, (left, right, top, bottom), mode="replicate")
        x = torch.nn.functional.pad(x, step, mode="reflect")
        left, right, top, bottom = left - step[0], right - step[1], top - step[2], bottom - step[3]
    return x


class UNet2D(torch.nn.Module):
    """The original U-Net (see module docstring); output has the input's spatial size in both padding modes."""

    def __init__(self, spec: UNet2DSpec) -> None:
        super().__init__()
        self.spec = spec
        pad = 1 if spec.padding == "same" else 0
        f = spec.filters
        self.down = torch.nn.ModuleList(
            [
                _DoubleConv(spec.in_channels if i == 0 else f[i - 1], f[i], pad, spec.batch_norm)
                for i in range(spec.depth)
            ]
        )
        self.pool = torch.nn.MaxPool2d(2)
        self.bottleneck = _DoubleConv(f[-2], f[-1], pad, spec.batch_norm, spec.dropout)
        self.up = torch.nn.ModuleList(
            [torch.nn.ConvTranspose2d(f[i + 1], f[i], 2, stride=2) for i in reversed(range(spec.depth))]
        )
        self.decode = torch.nn.ModuleList(
            [_DoubleConv(2 * f[i], f[i], pad, spec.batch_norm) for i in reversed(range(spec.depth))]
        )
        self.head = torch.nn.Conv2d(f[0], spec.out_channels, 1)
        for m in self.modules():  # the paper: Gaussian weights with std sqrt(2 / fan-in) (He)
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)

    def valid_output_size(self, size: int) -> int | None:
        """Output size of the unpadded network for an input size (None if a pooling would see an odd size)."""
        for _ in range(self.spec.depth):
            size -= 4
            if size <= 0 or size % 2:
                return None
            size //= 2
        size -= 4
        for _ in range(self.spec.depth):
            size = size * 2 - 4
        return size if size > 0 else None

    def tile_input_size(self, size: int) -> int:
        """Smallest valid input size whose unpadded output covers ``size`` pixels."""
        n = size
        while True:
            out = self.valid_output_size(n)
            if out is not None and out >= size:
                return n
            n += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        valid = self.spec.padding == "valid"
        if valid:  # overlap-tile: mirror the borders so the valid output covers the whole input
            pads = []
            for s in (w, h):
                n = self.tile_input_size(s)
                before = (n - self.valid_output_size(n)) // 2  # type: ignore[operator]
                pads += [before, n - s - before]
            x = _mirror_pad(x, pads)
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.up, self.decode, reversed(skips), strict=True):
            x = up(x)
            if x.shape[-2:] != skip.shape[-2:]:
                skip = _center_crop(skip, x.shape[-2:])
            x = block(torch.cat([skip, x], dim=1))
        out = self.head(x)
        if valid:
            out = out[..., :h, :w]
        return out


def build_unet2d(spec: UNet2DSpec) -> torch.nn.Module:
    """The Ronneberger U-Net for a spec."""
    return UNet2D(spec)

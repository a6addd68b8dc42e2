"""An inference-only twin of the plain DynUNet our 3D U-Net and nnU-Net are built on, for speed and a light import.

MONAI's ``DynUNet`` (residual-free blocks: conv -> instance norm -> LeakyReLU, twice per stage;
strided convolutions down, transposed convolutions up, skips concatenated after the
up-sampled features) is what the models train as. Serving it as is costs, on a CPU, about a
quarter more than its convolutions do (measured in ``benchmarks/peer_inference.py``):

* autocast re-casts every weight to bf16 on every call and runs instance norm in fp32, so every
  feature map is converted twice per block; here the weights are cast once (``to(dtype)``) and
  the whole forward stays in one dtype (norm statistics are still accumulated in fp32 by the
  kernel);
* oneDNN's 3-D convolutions run 10-40% faster on channels-last (NDHWC) tensors, but instance
  norm in MONAI's form (a reshape to one "batch" of B*C channels) copies them back to
  channels-first; here it is a group norm with one channel per group, the same arithmetic,
  whose CPU kernel works on channels-last tensors in place;
* the deep-supervision heads are computed in eval mode too and thrown away; here they are not.

The module loads a DynUNet state dict (the checkpoint's own keys) and reproduces its eval-mode
output (the full-resolution head) to float rounding: ``tests/test_fast_inference.py`` checks it
against MONAI's network. It imports nothing from MONAI, so the command line's predict path starts
without MONAI. Dropout layers are absent: Monte-Carlo dropout keeps MONAI's network.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

#: feature maps of at most this many voxels per channel are instance-normalised channels-first (see ``_norm_act``)
CHANNELS_FIRST_NORM_VOXELS = 1024


def _padding(kernel: Sequence[int], stride: Sequence[int]) -> tuple[int, ...]:
    """DynUNet's convolution padding: (k - s + 1) // 2 per axis."""
    return tuple((k - s + 1) // 2 for k, s in zip(kernel, stride, strict=True))


class LeanDynUNet(torch.nn.Module):
    """Eval-mode forward of a plain DynUNet from its layout and state dict (see module docstring)."""

    def __init__(
        self,
        spatial_dims: int,
        kernels: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        state: Mapping[str, torch.Tensor],
        eps: float = 1e-5,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.eps = eps
        self.slope = negative_slope
        self.kernels = [tuple(int(v) for v in k) for k in kernels]
        self.strides = [tuple(int(v) for v in s) for s in strides]
        stages = len(self.kernels)
        names = ["input_block"] + [f"downsamples.{i}" for i in range(stages - 2)] + ["bottleneck"]
        self.encoder = torch.nn.ModuleList(self._block(state, name) for name in names)
        self.decoder = torch.nn.ModuleList(self._block(state, f"upsamples.{i}.conv_block") for i in range(stages - 1))
        self.up = torch.nn.ParameterList(
            self._param(state, f"upsamples.{i}.transp_conv.conv.weight") for i in range(stages - 1)
        )
        self.up_bias = torch.nn.ParameterList(
            self._param(state, f"upsamples.{i}.transp_conv.conv.bias", optional=True) for i in range(stages - 1)
        )
        self.head = self._param(state, "output_block.conv.conv.weight")
        self.head_bias = self._param(state, "output_block.conv.conv.bias")
        self.conv = F.conv3d if spatial_dims == 3 else F.conv2d
        self.conv_t = F.conv_transpose3d if spatial_dims == 3 else F.conv_transpose2d
        self.memory_format = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
        self.cast(self.head.dtype, self.head.device)
        self.eval()

    @staticmethod
    def _param(state: Mapping[str, torch.Tensor], key: str, optional: bool = False) -> torch.nn.Parameter | None:
        if key not in state:
            if optional:
                return None
            raise KeyError(f"state dict has no {key!r}: not a plain DynUNet of this layout")
        return torch.nn.Parameter(state[key].detach().clone(), requires_grad=False)

    def _block(self, state: Mapping[str, torch.Tensor], name: str) -> torch.nn.ParameterList:
        """conv1, norm1 weight/bias, conv2, norm2 weight/bias of one UnetBasicBlock."""
        keys = ["conv1.conv.weight", "norm1.weight", "norm1.bias", "conv2.conv.weight", "norm2.weight", "norm2.bias"]
        return torch.nn.ParameterList(self._param(state, f"{name}.{k}") for k in keys)

    @property
    def out_channels(self) -> int:
        """Number of output classes (the head's channels)."""
        return int(self.head.shape[0])

    @staticmethod
    def supports(spec: Mapping[str, Any]) -> bool:
        """Whether a stored spec describes a plain DynUNet (an nnU-Net plan's or a UNet3D preset's).

        Specs with a ``kind`` (models imported from nnU-Net v2: fold ensembles, nnU-Net's decoder kernels) are not.
        """
        if "kind" in spec:
            return False
        return "kernels" in spec or {"levels", "base_filters", "max_filters"} <= set(spec)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> LeanDynUNet:
        """From a stored network spec: a DynUNetSpec (nnU-Net plan) or a UNet3DSpec (levels + filters)."""
        if "kernels" in spec:
            return cls(int(spec["spatial_dims"]), spec["kernels"], spec["strides"], state)
        levels = int(spec["levels"])
        return cls(3, [[3, 3, 3]] * levels, [[1, 1, 1]] + [[2, 2, 2]] * (levels - 1), state)

    def cast(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> LeanDynUNet:
        """This network in ``dtype`` on ``device``, weights laid out channels-last as the activations are."""
        return self.to(device=device, dtype=dtype, memory_format=self.memory_format)

    def in_dtype(self, dtype: torch.dtype) -> LeanDynUNet:
        """A copy in ``dtype`` on this network's device, made once and kept (weights never change after loading)."""
        copies = self.__dict__.setdefault("_copies", {})  # a plain dict: not registered as submodules
        if dtype == self.head.dtype:
            return self
        if dtype not in copies:
            copies[dtype] = copy.deepcopy(self, {id(copies): {}}).cast(dtype, self.head.device)
        return copies[dtype]

    def _norm_act(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Instance norm (affine) + LeakyReLU in place: a group norm with one channel per group (statistics
        accumulated in fp32 for bf16 input).

        PyTorch's channels-last group-norm kernel is the faster one on wide feature maps (32 channels at
        40x56x40: 4x faster than a channels-first copy) and 3-15x slower on small ones (256 channels at
        5x7x5 or 10x10x10, 32 at 5x7x5), in bf16 and fp32, batch 1 and 8, measured on this project's
        CPUs; so maps of at most :data:`CHANNELS_FIRST_NORM_VOXELS` voxels are normalised as a
        channels-first copy (a few hundred kilobytes).
        """
        if x.device.type == "cpu" and x[0, 0].numel() <= CHANNELS_FIRST_NORM_VOXELS:
            y = F.group_norm(x.contiguous(), x.shape[1], weight, bias, self.eps)
            y = y.contiguous(memory_format=self.memory_format)
        else:
            y = F.group_norm(x, x.shape[1], weight, bias, self.eps)
        return F.leaky_relu_(y, self.slope)

    def _run_block(self, x: torch.Tensor, params: torch.nn.ParameterList, stride: Sequence[int], kernel: Sequence[int]):
        w1, g1, b1, w2, g2, b2 = params
        x = self._norm_act(self.conv(x, w1, None, stride, _padding(kernel, stride)), g1, b1)
        ones = (1,) * self.spatial_dims
        return self._norm_act(self.conv(x, w2, None, ones, _padding(kernel, ones)), g2, b2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the full-resolution head, ``(B, K, *spatial)``, channels-last, in the module's dtype."""
        x = x.to(dtype=self.head.dtype, memory_format=self.memory_format)
        skips = []
        for i, params in enumerate(self.encoder):
            x = self._run_block(x, params, self.strides[i], self.kernels[i])
            skips.append(x)
        skips.pop()  # the bottleneck's output is x itself
        for j, params in enumerate(self.decoder):
            level = len(self.kernels) - 2 - j  # the encoder stage this up-sampling returns to
            stride = self.strides[level + 1]
            x = self.conv_t(x, self.up[j], self.up_bias[j], stride)
            x = torch.cat((x, skips[level]), dim=1)
            # DynUNet's up block convolves with the deeper stage's kernel
            x = self._run_block(x, params, (1,) * self.spatial_dims, self.kernels[level + 1])
        return self.conv(x, self.head, self.head_bias)

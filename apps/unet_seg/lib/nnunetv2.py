"""Bring your own nnU-Net: models trained with nnU-Net v2, served (and fine-tuned) as unet_seg model versions.

``--conf nnunet.pretrained <folder or zip>`` (or ``nnunet2d.pretrained`` for a ``2d`` model, or
``main.py predict --config nnunet --ckpt <folder or zip>``) names an nnU-Net results folder
(``nnUNet_results``, a dataset folder in it, or one ``<trainer>__<plans>__<configuration>``
folder) or a zip from ``nnUNetv2_export_model_to_zip`` (the same tree). Nothing of nnU-Net
needs to be installed: this module reads its files the way nnU-Net's ``nnUNetPredictor``
does and checks them.

* **What is read.** ``plans.json`` (configuration, with ``inherits_from`` resolved and the
  pre-2.4 plans layout converted), ``dataset.json`` (labels, channel names) and
  ``fold_<k>/checkpoint_<final|best>.pth`` of the chosen folds (default: every fold that has
  the checkpoint, as nnU-Net). Conf keys (model-prefixed): ``configuration`` (when the folder
  holds several), ``folds`` (``0,1,2`` or ``all``), ``checkpoint`` (``final``, ``best`` or a file
  name). Checkpoints are loaded with ``weights_only`` (numpy scalars allowed), never as
  arbitrary pickles.
* **What is supported.** ``nnUNetTrainer`` and its variants shipped with nnU-Net that change only
  the schedule, augmentation, sampling, optimizer, loss or mirroring (``SUPPORTED_TRAINERS``),
  with nnU-Net's ``PlainConvUNet`` (two conv-InstanceNorm-LeakyReLU per stage, strided conv
  down, transposed conv up), label maps (no region training), ZScore and CT normalisation,
  readers SimpleITKIO / NibabelIO / NibabelIOWithReorient. Anything else is refused with an
  error naming the field.
* **The network.** PlainConvUNet's weights are mapped key by key onto MONAI's DynUNet
  (``NnUNetV2Spec``: transposed-conv bias on, the decoder kernels of nnU-Net's decoder). The
  conv biases before instance norm are dropped: the norm subtracts them exactly. Every
  segmentation head is kept, the lower ones as DynUNet's deep-supervision heads, so one fold
  can be fine-tuned by ``trainers/nnunet.py``. Several folds become one ``NnUNetFoldEnsemble``
  whose output is the mean of the folds' logits (what ``nnUNetPredictor`` averages).
* **The axes.** nnU-Net reads images with SimpleITK, so its network sees (z, y, x): the file's
  voxel axes reversed (then ``transpose_forward``); plans' spacings and patch sizes are in that
  order, and nnU-Net never reorients to RAS. ``preprocess_chain`` loads the image without
  reorientation, reverses the axes, crops to the non-zero box (``NnUNetCropd``), normalises as
  the plans say and resamples only when the spacing differs (``NnUNetResampled``; nnU-Net's
  third-order, separate-z rule). Both steps are invertible, so the served label comes back in
  the request image's exact geometry.
* **Inference.** The shared engine with nnU-Net's window layout (tile step 0.5 with windows
  spread evenly, ``nnunet_window_starts``; its Gaussian, ``nnunet_importance_map``) around
  ``MirroredLogits``: TTA as ``nnUNetPredictor`` does it, the mean of the logits over the flips
  of the checkpoint's ``inference_allowed_mirroring_axes`` in each window. Where the study was
  resampled, the log-probabilities are resampled back linearly before the argmax
  (``probabilities_before_resampling``), as nnU-Net resamples its logits. Measured on a
  hippocampus case relabelled to 0.7 x 1.0 x 1.6 mm (resampled, three windows): 0 voxels differ
  from ``nnUNetPredictor``; with the engine's own window layout 38, with its softmax-averaging
  TTA and nearest-neighbour label resampling as well 327.

The imported model is stored as one version (``source: imported``, its meta's plan holds an
``nnunet_v2`` block saying where it came from); ``import_into_store`` adds it and serves it.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import re
import zipfile
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.networks.blocks.dynunet_block import UnetBasicBlock
from monai.transforms import InvertibleTransform, MapTransform
from monai.utils import TraceKeys

from .checkpoints import CheckpointMeta, is_nnunet_source, now_iso, save_checkpoint
from .conf import AppConf
from .inference import flip_combinations, flip_groups
from .modelstore import ModelStore, VersionRecord
from .networks import DynUNetSpec, build_dynunet
from .planning import PLAN_VERSION, PlanningError, normalisation_for, spacing_from_affine
from .transforms import NormalizeFromPland, load_chain

logger = logging.getLogger(__name__)

#: the ``kind`` of an imported network's spec and the key of the plan block that marks an imported model
KIND = "nnunet_v2"
PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
#: trainers whose checkpoints are nnUNetTrainer's network with another schedule, augmentation or loss
SUPPORTED_TRAINERS = re.compile(
    r"^nnUNetTrainer("
    r"|_\d+epochs?(_NoMirroring)?|NoMirroring|NoDA|NoDeepSupervision|_noDummy2DDA|_warmup"
    r"|_onlyMirror01(_1500ep|_DA5|_DASegOrd0)?|_probabilisticOversampling(_\d+)?"
    r"|(Vanilla)?Adam(1en3|3en4)?|Adan(1en1|1en3|3en4|CosAnneal)?|CosAnneal"
    r"|DA5(ord0|Segord0|_10epochs)?|_DASegOrd0(_NoMirroring)?"
    r"|CELoss(_5epochs)?|DiceLoss|DiceCELoss_noSmooth|DiceTopK10Loss|Topk10Loss(LS01)?"
    r")$"
)
READERS = ("SimpleITKIO", "NibabelIO", "NibabelIOWithReorient")
CHECKPOINT_NAMES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth", "latest": "checkpoint_latest.pth"}
ANISO_THRESHOLD = 3.0  # nnU-Net's: resample the low-resolution axis separately beyond this spacing ratio


class NnUNetImportError(ValueError):
    """An nnU-Net model that cannot be served; the message names the file or field and what was expected."""


# ---- reading a results folder or an export zip ---------------------------------------------------


class _Tree:
    """Read-only view of a folder or a zip archive by relative POSIX paths."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.zip = None if os.path.isdir(path) else zipfile.ZipFile(path)

    def files(self) -> list[str]:
        """Every file, relative (a results folder is walked at most 6 levels deep)."""
        if self.zip is not None:
            return [n.rstrip("/") for n in self.zip.namelist() if not n.endswith("/")]
        out = []
        root = os.path.abspath(self.path)
        for folder, dirs, names in os.walk(root):
            rel = os.path.relpath(folder, root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if depth >= 6:
                dirs[:] = []
            out += [os.path.join(rel, n).replace(os.sep, "/").removeprefix("./") for n in names]
        return out

    def read(self, rel: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(rel)
        with open(os.path.join(self.path, rel), "rb") as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        if self.zip is not None:
            try:
                self.zip.getinfo(rel)
                return True
            except KeyError:
                return False
        return os.path.isfile(os.path.join(self.path, rel))

    def json(self, rel: str) -> dict[str, Any]:
        try:
            data = json.loads(self.read(rel))
        except (OSError, KeyError) as e:
            raise NnUNetImportError(f"{rel} cannot be read ({e})") from e
        except json.JSONDecodeError as e:
            raise NnUNetImportError(f"{rel} is not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise NnUNetImportError(f"{rel}: expected a JSON object")
        return data


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _safe_globals() -> list[Any]:
    """What an nnU-Net checkpoint pickles besides tensors: numpy scalars and dtypes (its training log)."""
    try:
        from numpy.core.multiarray import scalar
    except ImportError:  # numpy 2
        from numpy._core.multiarray import scalar  # type: ignore[no-redef]
    allowed: list[Any] = [np.dtype, scalar]
    allowed += [(scalar, f"numpy.{m}.multiarray.scalar") for m in ("core", "_core")]
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            t = getattr(np.dtypes, name)
            allowed += [t, (t, f"numpy.dtypes.{name}")]
    return allowed


def _resolve_configuration(plans: Mapping[str, Any], name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A plans configuration with ``inherits_from`` resolved (as nnU-Net's PlansManager does)."""
    configs = plans.get("configurations") or {}
    if name not in configs:
        raise NnUNetImportError(f"plans.json has no configuration '{name}' (it has: {', '.join(configs) or 'none'})")
    config = copy.deepcopy(configs[name])
    parent = config.get("inherits_from")
    if parent:
        if parent in seen:
            raise NnUNetImportError(f"plans.json: configurations inherit from each other in a circle ({name})")
        base = _resolve_configuration(plans, parent, (*seen, name))
        base.update(config)
        config = base
    if "architecture" not in config:  # plans written before nnU-Net 2.4
        config["architecture"] = _old_architecture(config)
    return config


def _old_architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``architecture`` block nnU-Net reconstructs from the pre-2.4 plans layout."""
    try:
        n = len(config["n_conv_per_stage_encoder"])
        cls = config["UNet_class_name"]
        return {
            "network_class_name": PLAIN_CONV_UNET if cls == "PlainConvUNet" else cls,
            "arch_kwargs": {
                "n_stages": n,
                "features_per_stage": [
                    min(config["UNet_base_num_features"] * 2**i, config["unet_max_num_features"]) for i in range(n)
                ],
                "conv_op": f"torch.nn.modules.conv.Conv{len(config['patch_size'])}d",
                "kernel_sizes": config["conv_kernel_sizes"],
                "strides": config["pool_op_kernel_sizes"],
                "n_conv_per_stage": config["n_conv_per_stage_encoder"],
                "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
                "conv_bias": True,
                "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{len(config['patch_size'])}d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
        }
    except (KeyError, TypeError) as e:
        raise NnUNetImportError(f"plans.json: configuration has neither 'architecture' nor the old layout ({e})") from e


@dataclass
class NnUNetModel:
    """One configuration of one trainer of an nnU-Net results folder, checked: what ``open_model`` found."""

    source: str  # the file or folder name the user gave (never a server path in messages)
    folder: str  # the model folder inside it ('' = the source itself)
    name: str  # "<dataset>/<trainer>__<plans>__<configuration>" (messages, meta)
    plans: dict[str, Any]
    dataset: dict[str, Any]
    configuration: str
    config: dict[str, Any]
    folds: list[str]
    checkpoint: str
    labels: dict[str, int]
    channel_names: list[str]
    tree: _Tree = field(repr=False)

    @property
    def dims(self) -> int:
        """2 or 3: the network's spatial dimensions."""
        return len(self.config["patch_size"])

    @property
    def modality_kinds(self) -> list[str]:
        """CT or MRI per channel (what unet_seg's planner would call them; from the normalisation schemes)."""
        return ["CT" if s == "CTNormalization" else "MRI" for s in self.config.get("normalization_schemes", [])]

    def fold_file(self, fold: str) -> str:
        """The checkpoint of a fold, relative to the source."""
        return _join(self.folder, f"fold_{fold}/{self.checkpoint}")

    def load_fold(self, fold: str) -> dict[str, Any]:
        """A fold's checkpoint dictionary (``weights_only``: tensors, numbers, strings, numpy scalars)."""
        rel = self.fold_file(fold)
        try:
            data = self.tree.read(rel)
        except (OSError, KeyError) as e:
            raise NnUNetImportError(f"fold {fold}: {self.name}/fold_{fold}/{self.checkpoint} cannot be read") from e
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
            raise NnUNetImportError(
                f"fold {fold}: {self.checkpoint} is not a loadable nnU-Net checkpoint ({first})"
            ) from e
        if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("network_weights"), Mapping):
            raise NnUNetImportError(
                f"fold {fold}: {self.checkpoint} holds no 'network_weights' (not an nnU-Net v2 checkpoint)"
            )
        return dict(ckpt)


def _model_folders(tree: _Tree) -> list[str]:
    """Folders (relative; '' = the root) that hold a plans.json: nnU-Net model folders."""
    return sorted(
        {
            f.rsplit("/", 1)[0] if "/" in f else ""
            for f in tree.files()
            if f == "plans.json" or f.endswith("/plans.json")
        }
    )


def _config_of(folder: str) -> str | None:
    base = folder.rsplit("/", 1)[-1]
    parts = base.split("__")
    return parts[2] if len(parts) == 3 else None


def _parse_folds(value: Any) -> list[str] | None:
    if value is None or str(value).strip().lower() in ("", "auto"):
        return None
    out = []
    for part in re.split(r"[,\s]+", str(value).strip()):
        if part == "all":
            out.append("all")
        elif part.isdigit():
            out.append(str(int(part)))
        elif part:
            raise NnUNetImportError(f"folds: expected fold numbers or 'all' (e.g. 0,1,2), got {value!r}")
    if not out or len(set(out)) != len(out):
        raise NnUNetImportError(f"folds: expected distinct fold numbers or 'all', got {value!r}")
    return out


def open_model(
    path: str,
    dims: int,
    configuration: str | None = None,
    folds: Any = None,
    checkpoint: str | None = None,
    model_name: str = "nnunet",
) -> NnUNetModel:
    """Find and check the nnU-Net model in a results folder or export zip (json files and fold folders only).

    ``dims`` is what the serving config runs (3: nnunet, 2: nnunet2d): a model of the other kind is
    an error that says which config serves it.
    """
    source = os.path.basename(os.path.normpath(path)) or path
    if not os.path.exists(path):
        raise NnUNetImportError(f"{source} does not exist")
    try:
        tree = _Tree(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise NnUNetImportError(f"{source} cannot be opened as a folder or zip archive ({e})") from e
    folders = _model_folders(tree)
    if not folders:
        raise NnUNetImportError(
            f"{source} is not an nnU-Net results folder or export zip: no plans.json in it (expected "
            "<Dataset>/<trainer>__<plans>__<configuration>/ with plans.json, dataset.json and "
            "fold_<k>/checkpoint_final.pth)"
        )
    wanted = configuration or None
    if wanted:
        chosen = [f for f in folders if _config_of(f) == wanted or (f == "" and len(folders) == 1)]
        if not chosen:
            found = ", ".join(f or source for f in folders)
            raise NnUNetImportError(f"{source} holds no model of configuration '{wanted}' (it holds: {found})")
    else:
        preferred = ("3d_fullres", "3d_lowres") if dims == 3 else ("2d",)
        chosen = folders
        if len(folders) > 1:
            for name in preferred:
                hits = [f for f in folders if _config_of(f) == name]
                if hits:
                    chosen = hits
                    break
    if len(chosen) > 1:
        raise NnUNetImportError(
            f"{source} holds {len(chosen)} nnU-Net models ({', '.join(chosen)}); point {model_name}.pretrained at one "
            f"of them (or set {model_name}.configuration)"
        )
    folder = chosen[0]
    name = folder or source
    for required in ("plans.json", "dataset.json"):
        if not tree.exists(_join(folder, required)):
            raise NnUNetImportError(f"{name}: {required} is missing")
    plans = tree.json(_join(folder, "plans.json"))
    dataset = tree.json(_join(folder, "dataset.json"))
    config_name = wanted or _config_of(name)
    if config_name is None:
        names = list(plans.get("configurations") or {})
        matching = [n for n in names if len(_resolve_configuration(plans, n).get("patch_size", [])) == dims]
        if len(matching) != 1:
            raise NnUNetImportError(
                f"{name}: the folder name does not say its configuration (expected "
                "<trainer>__<plans>__<configuration>); "
                f"set {model_name}.configuration to one of {', '.join(names)}"
            )
        config_name = matching[0]
    config = _resolve_configuration(plans, config_name)
    if config.get("previous_stage") or "cascade" in config_name:
        raise NnUNetImportError(
            f"{name}: configuration '{config_name}' is a cascade stage (it needs the low-resolution stage's "
            "segmentation as input); serve 3d_fullres, 3d_lowres or 2d"
        )
    model_dims = len(config.get("patch_size") or [])
    if model_dims != dims:
        other = "nnunet2d" if model_dims == 2 else "nnunet"
        raise NnUNetImportError(
            f"{name} is a {model_dims}D nnU-Net model (configuration '{config_name}'); serve it with the {other} "
            f"config (--conf {other}.pretrained ...), not {model_name}"
        )
    checkpoint_file = CHECKPOINT_NAMES.get(str(checkpoint or "final").lower(), str(checkpoint))
    available = sorted(
        {
            m.group(1)
            for f in tree.files()
            if (m := re.fullmatch(re.escape(_join(folder, "fold_")) + r"(\d+|all)/" + re.escape(checkpoint_file), f))
        },
        key=lambda x: (x == "all", int(x) if x.isdigit() else 0),
    )
    requested = _parse_folds(folds)
    if requested is None:
        if not available:
            raise NnUNetImportError(f"{name}: no fold_<k>/{checkpoint_file} in it (no trained fold to serve)")
        requested = available
    missing = [f for f in requested if f not in available]
    if missing:
        raise NnUNetImportError(
            f"{name}: fold {', '.join(missing)} missing (no fold_{missing[0]}/{checkpoint_file}); available folds with "
            f"{checkpoint_file}: {', '.join(available) or 'none'}"
        )
    labels, channels = _labels_and_channels(dataset, name)
    return NnUNetModel(
        source=source,
        folder=folder,
        name=name,
        plans=plans,
        dataset=dataset,
        configuration=config_name,
        config=config,
        folds=requested,
        checkpoint=checkpoint_file,
        labels=labels,
        channel_names=channels,
        tree=tree,
    )


def _labels_and_channels(dataset: Mapping[str, Any], name: str) -> tuple[dict[str, int], list[str]]:
    """Served labels (name -> value, background and ignore left out) and channel names of a dataset.json."""
    raw = dataset.get("labels")
    if not isinstance(raw, Mapping) or not raw:
        raise NnUNetImportError(f"{name}/dataset.json: 'labels' must map label names to values")
    if any(isinstance(v, (list, tuple)) for v in raw.values()) or dataset.get("regions_class_order"):
        raise NnUNetImportError(
            f"{name}/dataset.json: region-based labels (overlapping regions, sigmoid outputs) are not supported"
        )
    try:
        values = {str(k): int(v) for k, v in raw.items() if str(k) != "ignore"}
    except (TypeError, ValueError) as e:
        raise NnUNetImportError(f"{name}/dataset.json: label values must be integers ({e})") from e
    if sorted(values.values()) != list(range(len(values))):
        raise NnUNetImportError(
            f"{name}/dataset.json: label values must be 0 (background) .. N without gaps, got {sorted(values.values())}"
        )
    labels = {k: v for k, v in sorted(values.items(), key=lambda kv: kv[1]) if v != 0}
    if not labels:
        raise NnUNetImportError(f"{name}/dataset.json: no foreground label")
    channels = dataset.get("channel_names") or dataset.get("modality")
    if not isinstance(channels, Mapping) or not channels:
        raise NnUNetImportError(f"{name}/dataset.json: 'channel_names' must map channel numbers to names")
    try:
        ordered = [str(channels[k]) for k in sorted(channels, key=int)]
    except ValueError as e:
        raise NnUNetImportError(f"{name}/dataset.json: channel_names keys must be 0..C-1") from e
    return labels, ordered


# ---- the network ------------------------------------------------------------------------------


@dataclass
class NnUNetV2Spec(DynUNetSpec):
    """DynUNet laid out as nnU-Net's PlainConvUNet (stored in the meta of imported models and their fine-tunes)."""

    kind: str = KIND
    decoder_kernels: list[list[int]] = field(default_factory=list)
    negative_slope: float = 0.01
    folds: int = 1

    def build(self) -> torch.nn.Module:
        """One DynUNet, or the mean of ``folds`` of them (nnU-Net's fold ensemble)."""
        if self.folds > 1:
            single = NnUNetV2Spec.from_dict({**self.to_dict(), "folds": 1})
            return NnUNetFoldEnsemble([single.build() for _ in range(self.folds)])
        net = build_dynunet(self)
        for up in net.upsamples:  # nnU-Net's transposed convolutions have a bias (build_dynunet's do not)
            old = up.transp_conv.conv
            up.transp_conv.conv = type(old)(
                old.in_channels,
                old.out_channels,
                old.kernel_size,
                stride=old.stride,
                padding=old.padding,
                output_padding=old.output_padding,
                bias=True,
            )
        stages = len(self.filters)
        for i, up in enumerate(net.upsamples):  # DynUNet takes the kernel of the stage below; nnU-Net its own
            kernel = list(self.decoder_kernels[i]) if self.decoder_kernels else list(self.kernels[stages - 2 - i])
            if list(up.conv_block.conv1.conv.kernel_size) != kernel:
                out_ch = up.conv_block.conv2.conv.out_channels
                up.conv_block = UnetBasicBlock(
                    self.spatial_dims,
                    2 * out_ch,
                    out_ch,
                    kernel_size=kernel,
                    stride=1,
                    norm_name=("INSTANCE", {"affine": True}),
                    act_name=("leakyrelu", {"negative_slope": self.negative_slope, "inplace": True}),
                    dropout=self.dropout or None,
                )
        if self.negative_slope != 0.01:
            for m in net.modules():
                if isinstance(m, torch.nn.LeakyReLU):
                    m.negative_slope = self.negative_slope
        return net


class NnUNetFoldEnsemble(torch.nn.Module):
    """Several folds of one nnU-Net model; the output is the mean of their logits (as nnUNetPredictor averages)."""

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for m in self.members:
            y = m(x)
            out = y if out is None else out + y
        assert out is not None
        return out / len(self.members)


class MirroredLogits(torch.nn.Module):
    """nnU-Net's test-time mirroring around a network: the mean of its logits over every flip combination of the
    allowed spatial axes (``inference_allowed_mirroring_axes``; none: the network alone), window by window, as
    ``nnUNetPredictor`` averages them before the Gaussian blend and the softmax."""

    def __init__(self, net: torch.nn.Module, axes: Sequence[int]) -> None:
        super().__init__()
        self.net = net
        self.axes = {int(a) for a in axes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flips = [c for c in flip_combinations(x.ndim - 2) if all(a - 2 in self.axes for a in c)]
        group = flip_groups(len(flips), x[0, 0].numel() * x.shape[0], 0)  # mirrors in one batch where they fit
        out = None
        for i in range(0, len(flips), group):
            chunk = flips[i : i + group]
            ys = self.net(torch.cat([torch.flip(x, axes) if axes else x for axes in chunk]))
            for j, axes in enumerate(chunk):
                y = ys[j * x.shape[0] : (j + 1) * x.shape[0]]
                y = torch.flip(y, axes) if axes else y
                out = y if out is None else out + y
        assert out is not None
        return out / len(flips)


def nnunet_window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis as ``nnUNetPredictor`` places them (``compute_steps_for_sliding_window``):
    the fewest windows with steps of at most ``roi * (1 - overlap)``, spread evenly from 0 to ``size - roi``."""
    count = math.ceil((size - roi) / (roi * (1 - overlap))) + 1
    step = (size - roi) / (count - 1) if count > 1 else 0.0
    return [int(round(step * i)) for i in range(count)]


@lru_cache(maxsize=8)
def nnunet_importance_map(roi: tuple[int, ...], blend: str, sigma_scale: float) -> torch.Tensor:
    """nnU-Net's window weights (``compute_gaussian``): a delta at the centre voxel blurred by a Gaussian of sigma
    ``sigma_scale * roi`` (scipy, truncated at 4 sigma), its zeros raised to the smallest non-zero weight."""
    if blend == "constant":
        return torch.ones(roi)
    from scipy.ndimage import gaussian_filter

    delta = np.zeros(roi)
    delta[tuple(n // 2 for n in roi)] = 1
    g = torch.as_tensor(gaussian_filter(delta, [n * sigma_scale for n in roi], 0, mode="constant", cval=0))
    g = (g / g.max()).float()
    g[g == 0] = g[g != 0].min()
    return g


class AnyDynUNetSpec:
    """``from_dict`` for the nnunet configs: unet_seg's own DynUNet spec, or an imported model's (``kind``)."""

    @staticmethod
    def from_dict(data: dict[str, Any]) -> DynUNetSpec:
        return NnUNetV2Spec.from_dict(data) if data.get("kind") == KIND else DynUNetSpec.from_dict(data)


def _check_architecture(model: NnUNetModel) -> dict[str, Any]:
    """The PlainConvUNet arch kwargs of the model, or an error naming what unet_seg cannot rebuild."""
    arch = model.config.get("architecture") or {}
    cls = arch.get("network_class_name", "")
    kw = arch.get("arch_kwargs") or {}
    where = f"{model.name}/plans.json configuration '{model.configuration}'"
    if cls.rsplit(".", 1)[-1] != "PlainConvUNet":
        raise NnUNetImportError(
            f"{where}: network {cls or '?'} is not supported (only nnU-Net's default PlainConvUNet; residual encoder "
            "and other architectures cannot be rebuilt here)"
        )
    n = int(kw.get("n_stages", 0))
    checks = {
        "n_stages >= 3": n >= 3,
        "one kernel size, stride and feature count per stage": len(kw.get("kernel_sizes", [])) == n
        and len(kw.get("strides", [])) == n
        and len(kw.get("features_per_stage", [])) == n,
        "n_conv_per_stage all 2": list(np.atleast_1d(kw.get("n_conv_per_stage", 2))) in ([2] * n, [2]),
        "n_conv_per_stage_decoder all 2": list(np.atleast_1d(kw.get("n_conv_per_stage_decoder", 2)))
        in ([2] * (n - 1), [2]),
        "norm_op InstanceNorm": "InstanceNorm" in str(kw.get("norm_op", "")),
        "norm_op_kwargs affine with eps 1e-5": bool((kw.get("norm_op_kwargs") or {}).get("affine", False))
        and abs(float((kw.get("norm_op_kwargs") or {}).get("eps", 1e-5)) - 1e-5) < 1e-12,
        "nonlin LeakyReLU": str(kw.get("nonlin", "")).endswith("LeakyReLU"),
        "no dropout_op": not kw.get("dropout_op"),
        "conv_op Conv2d/Conv3d": str(kw.get("conv_op", "")).endswith(f"Conv{model.dims}d"),
    }
    failed = [k for k, ok in checks.items() if not ok]
    if failed:
        raise NnUNetImportError(
            f"{where}: PlainConvUNet settings unet_seg cannot rebuild: expected {'; '.join(failed)}"
        )
    return kw


def _state_map(stages: int, heads: int) -> list[tuple[str, str]]:
    """(PlainConvUNet key prefix, DynUNet key prefix) of every layer with weights."""
    pairs: list[tuple[str, str]] = []
    for s in range(stages):
        dyn = "input_block" if s == 0 else ("bottleneck" if s == stages - 1 else f"downsamples.{s - 1}")
        for j in (0, 1):
            pairs += [
                (f"encoder.stages.{s}.0.convs.{j}.conv", f"{dyn}.conv{j + 1}.conv"),
                (f"encoder.stages.{s}.0.convs.{j}.norm", f"{dyn}.norm{j + 1}"),
            ]
    for i in range(stages - 1):  # decoder stage i: from the bottom up, as DynUNet's upsamples
        pairs.append((f"decoder.transpconvs.{i}", f"upsamples.{i}.transp_conv.conv"))
        for j in (0, 1):
            pairs += [
                (f"decoder.stages.{i}.convs.{j}.conv", f"upsamples.{i}.conv_block.conv{j + 1}.conv"),
                (f"decoder.stages.{i}.convs.{j}.norm", f"upsamples.{i}.conv_block.norm{j + 1}"),
            ]
    pairs.append((f"decoder.seg_layers.{stages - 2}", "output_block.conv.conv"))
    for h in range(heads):  # DynUNet's head h sits h + 1 stages above the top: nnU-Net's seg layer stages - 3 - h
        pairs.append((f"decoder.seg_layers.{stages - 3 - h}", f"deep_supervision_heads.{h}.conv.conv"))
    return pairs


def spec_for(model: NnUNetModel) -> NnUNetV2Spec:
    """The DynUNet spec of a model (checked architecture)."""
    kw = _check_architecture(model)
    n = int(kw["n_stages"])
    kernels = [
        [int(k) for k in np.atleast_1d(ks)] * (model.dims if np.size(ks) == 1 else 1) for ks in kw["kernel_sizes"]
    ]
    strides = [[int(k) for k in np.atleast_1d(st)] * (model.dims if np.size(st) == 1 else 1) for st in kw["strides"]]
    slope = float((kw.get("nonlin_kwargs") or {}).get("negative_slope", 0.01))
    return NnUNetV2Spec(
        spatial_dims=model.dims,
        in_channels=len(model.channel_names),
        out_channels=len(model.labels) + 1,
        kernels=kernels,
        strides=strides,
        filters=[int(f) for f in kw["features_per_stage"]],
        deep_supervision=True,
        deep_supr_num=n - 2,
        decoder_kernels=[kernels[n - 2 - i] for i in range(n - 1)],
        negative_slope=slope,
    )


def nnunet_to_dynunet(weights: Mapping[str, torch.Tensor], spec: NnUNetV2Spec, what: str) -> dict[str, torch.Tensor]:
    """A PlainConvUNet state dict as the state dict of ``spec``'s (single) DynUNet; every key accounted for."""
    net = NnUNetV2Spec.from_dict({**spec.to_dict(), "folds": 1}).build()
    target = net.state_dict()
    src = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in weights.items()}
    used: set[str] = set()
    for theirs, ours in _state_map(len(spec.filters), spec.deep_supr_num):
        for suffix in ("weight", "bias"):
            tk, ok = f"{theirs}.{suffix}", f"{ours}.{suffix}"
            if ok not in target:  # conv biases before instance norm: the norm removes them exactly
                used.add(tk)
                continue
            if tk not in src:
                raise NnUNetImportError(f"{what}: network_weights lack {tk} (not a PlainConvUNet of these plans)")
            if tuple(src[tk].shape) != tuple(target[ok].shape):
                raise NnUNetImportError(
                    f"{what}: {tk} has shape {tuple(src[tk].shape)}, the plans and dataset.json give "
                    f"{tuple(target[ok].shape)} (plans/labels mismatch: the network does not fit plans.json and "
                    "dataset.json)"
                )
            target[ok].copy_(src[tk].to(target[ok].dtype))
            used.add(tk)
    # PlainConvUNet registers some modules twice (all_modules, decoder.encoder): those keys are aliases
    left = [k for k in src if k not in used and ".all_modules." not in k and not k.startswith("decoder.encoder.")]
    if left:
        raise NnUNetImportError(
            f"{what}: network_weights have layers a PlainConvUNet of these plans does not ({', '.join(left[:4])}...)"
        )
    return {k: v.clone() for k, v in net.state_dict().items()}


def dynunet_to_nnunet(state: Mapping[str, torch.Tensor], spec: NnUNetV2Spec) -> dict[str, torch.Tensor]:
    """Inverse of :func:`nnunet_to_dynunet` for the layers DynUNet holds (PlainConvUNet key names; conv biases zero)."""
    out: dict[str, torch.Tensor] = {}
    for theirs, ours in _state_map(len(spec.filters), spec.deep_supr_num):
        for suffix in ("weight", "bias"):
            if f"{ours}.{suffix}" in state:
                out[f"{theirs}.{suffix}"] = state[f"{ours}.{suffix}"].clone()
            elif theirs.endswith(".conv") and suffix == "bias":
                out[f"{theirs}.bias"] = torch.zeros(state[f"{ours}.weight"].shape[0])
    return out


# ---- meta and plan ----------------------------------------------------------------------------


def _normalization(model: NnUNetModel) -> list[dict[str, Any]]:
    """unet_seg's per-channel schemes (``NormalizeFromPland``) of the plans' ZScore / CT normalisation."""
    schemes = list(model.config.get("normalization_schemes") or [])
    masks = list(model.config.get("use_mask_for_norm") or [False] * len(schemes))
    if len(schemes) != len(model.channel_names):
        raise NnUNetImportError(
            f"{model.name}: plans.json normalises {len(schemes)} channel(s) but dataset.json names "
            f"{len(model.channel_names)} (plans/labels mismatch)"
        )
    for c, scheme in enumerate(schemes):
        if scheme not in ("ZScoreNormalization", "CTNormalization"):
            raise NnUNetImportError(
                f"{model.name}/plans.json: normalisation {scheme} of channel {c} is not supported "
                "(ZScoreNormalization, CTNormalization)"
            )
    props = model.plans.get("foreground_intensity_properties_per_channel") or {}
    fingerprint = {
        "foreground_intensity_properties_per_channel": [props.get(str(c)) or {} for c in range(len(schemes))]
    }
    try:  # the planner's own CT / z-score schemes, from nnU-Net's dataset statistics
        out = normalisation_for(fingerprint, ["CT" if s == "CTNormalization" else "MRI" for s in schemes])
    except PlanningError as e:
        raise NnUNetImportError(f"{model.name}/plans.json: {e}") from e
    for entry, name, mask in zip(out, model.channel_names, masks, strict=False):
        entry["modality"] = name
        if entry["scheme"] == "zscore":
            entry["use_nonzero_mask"] = bool(mask)
    return out


def _geometry(model: NnUNetModel) -> dict[str, Any]:
    reader = str(model.plans.get("image_reader_writer", "SimpleITKIO"))
    if reader not in READERS:
        raise NnUNetImportError(
            f"{model.name}/plans.json: image_reader_writer {reader} is not supported ({', '.join(READERS)})"
        )
    forward = [int(i) for i in model.plans.get("transpose_forward", [0, 1, 2])]
    if sorted(forward) != [0, 1, 2]:
        raise NnUNetImportError(f"{model.name}/plans.json: transpose_forward {forward} is not a permutation of 0, 1, 2")
    kwargs = model.config.get("resampling_fn_data_kwargs") or {}
    back = model.config.get("resampling_fn_probabilities_kwargs") or {}
    return {
        "reader": reader,
        "transpose_forward": forward,
        "spacing": [float(s) for s in model.config["spacing"]],
        "order": int(kwargs.get("order", 3)),
        "order_z": int(kwargs.get("order_z", 0)),
        "force_separate_z": kwargs.get("force_separate_z"),
        "probability_resampling": {
            "order": int(back.get("order", 1)),
            "order_z": int(back.get("order_z", 0)),
            "force_separate_z": back.get("force_separate_z"),
        },
    }


def plan_for(model: NnUNetModel, spec: NnUNetV2Spec, info: Mapping[str, Any]) -> dict[str, Any]:
    """The meta's plan: unet_seg's Plan fields (nnU-Net's axis order) plus the ``nnunet_v2`` block."""
    dims = model.dims
    spacing = [float(s) for s in model.config["spacing"]]
    strides = spec.strides
    return {
        "version": PLAN_VERSION,
        "dims": dims,
        "axes": [0, 1, 2] if dims == 3 else [1, 2],
        "slice_axis": None if dims == 3 else 0,
        "target_spacing": spacing if dims == 3 else [0.0, *spacing],  # 2D: 0 = the image's own slice spacing
        "spacing": spacing,
        "median_shape": [float(s) for s in model.config.get("median_image_size_in_voxels", [])],
        "patch_size": [int(p) for p in model.config["patch_size"]],
        "batch_size": int(model.config.get("batch_size", 2)),
        "strides": strides,
        "kernel_sizes": spec.kernels,
        "filters": spec.filters,
        "num_stages": len(spec.filters),
        "num_pool_per_axis": [sum(1 for s in strides if s[a] > 1) for a in range(dims)],
        "divisible_by": [int(np.prod([s[a] for s in strides])) for a in range(dims)],
        "convs_per_stage": 2,
        "in_channels": len(model.channel_names),
        "labels": list(range(len(model.labels) + 1)),
        "num_classes": len(model.labels) + 1,
        "normalization": _normalization(model),
        KIND: dict(info),
    }


def convert(model: NnUNetModel, model_name: str) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """Weights and meta of the model's chosen folds: one DynUNet, or a fold ensemble of them."""
    try:
        return _convert(model, model_name)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        if isinstance(e, NnUNetImportError):
            raise
        raise NnUNetImportError(f"{model.name}: plans.json or a checkpoint lacks what nnU-Net writes ({e!r})") from e


def _convert(model: NnUNetModel, model_name: str) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    spec = spec_for(model)
    states = []
    trainer = mirror = None
    for i, fold in enumerate(model.folds):
        ckpt = model.load_fold(fold)
        what = f"{model.name}/fold_{fold}/{model.checkpoint}"
        name = str(ckpt.get("trainer_name", ""))
        if not SUPPORTED_TRAINERS.match(name):
            raise NnUNetImportError(
                f"{what}: trainer class {name or '?'} is not supported (nnUNetTrainer and its schedule, augmentation "
                "and loss variants are; a trainer that changes the network or the inference cannot be rebuilt here)"
            )
        init = ckpt.get("init_args") or {}
        if init.get("configuration") not in (None, model.configuration):
            raise NnUNetImportError(
                f"{what}: trained as configuration '{init.get('configuration')}', the folder is '{model.configuration}'"
            )
        trained_labels = (init.get("dataset_json") or {}).get("labels")
        if trained_labels is not None and {str(k): v for k, v in trained_labels.items()} != {
            str(k): v for k, v in model.dataset["labels"].items()
        }:
            raise NnUNetImportError(
                f"{what}: trained with labels {trained_labels} but dataset.json says {model.dataset['labels']} "
                "(plans/labels mismatch)"
            )
        trained_plans = init.get("plans")
        if isinstance(trained_plans, Mapping):
            theirs = _resolve_configuration(trained_plans, model.configuration)
            for key in ("patch_size", "spacing", "normalization_schemes"):
                if list(theirs.get(key) or []) != list(model.config.get(key) or []):
                    raise NnUNetImportError(
                        f"{what}: trained with {key} {theirs.get(key)} but plans.json says {model.config.get(key)} "
                        "(plans mismatch)"
                    )
        axes = ckpt.get("inference_allowed_mirroring_axes")
        axes = None if axes is None else sorted(int(a) for a in axes)
        if i == 0:
            trainer, mirror = name, axes
        elif axes != mirror:
            raise NnUNetImportError(f"{what}: mirroring axes {axes} differ from fold {model.folds[0]}'s {mirror}")
        states.append(nnunet_to_dynunet(ckpt["network_weights"], spec, what))
    info = {
        "source": model.source,
        "model": model.name,
        "trainer": trainer,
        "plans_name": model.plans.get("plans_name"),
        "dataset_name": model.plans.get("dataset_name"),
        "configuration": model.configuration,
        "folds": list(model.folds),
        "checkpoint": model.checkpoint,
        "mirror_axes": mirror or [],
        **_geometry(model),
    }
    if len(states) == 1:
        state = states[0]
        spec_out = spec
    else:
        state = {f"members.{i}.{k}": v for i, s in enumerate(states) for k, v in s.items()}
        spec_out = NnUNetV2Spec.from_dict({**spec.to_dict(), "folds": len(states)})
    meta = CheckpointMeta(
        model=model_name,
        labels=dict(model.labels),
        in_channels=len(model.channel_names),
        spatial_dims=model.dims,
        spec=spec_out.to_dict(),
        roi_size=[int(p) for p in model.config["patch_size"]],
        slice_axis=None if model.dims == 3 else 0,
        plan=plan_for(model, spec, info),
        modalities=list(model.channel_names),
        normalisation=KIND,
        created=now_iso(),
        source="imported",
    )
    return state, meta


def open_pretrained(conf: Mapping[str, str], name: str, dims: int) -> tuple[NnUNetModel | None, str | None]:
    """The nnU-Net model ``<name>.pretrained`` names and None, or (None, the error that keeps the model from serving).

    (None, None) when ``pretrained`` names no folder or zip. Conf keys (plain or ``<name>.``-prefixed):
    ``configuration``, ``folds``, ``checkpoint``.
    """
    c = AppConf(conf)
    given = c.get("pretrained", None, model=name)
    if not given or not is_nnunet_source(os.path.abspath(given)):
        return None, None
    try:
        model = open_model(
            os.path.abspath(given),
            dims,
            configuration=c.get("configuration", None, model=name),
            folds=c.get("folds", None, model=name),
            checkpoint=c.get("checkpoint", None, model=name),
            model_name=name,
        )
    except NnUNetImportError as e:
        return None, _failed(name, given, e)
    return model, None


def serve_pretrained(store: ModelStore, model: NnUNetModel, name: str) -> str | None:
    """Import the model into ``store`` unless a version serves already; the error that stopped it, or None."""
    if store.serving() is not None:
        return None
    try:
        import_into_store(store, model, name)
    except NnUNetImportError as e:
        return _failed(name, model.source, e)
    return None


def _failed(name: str, given: str, error: Exception) -> str:
    message = f"{name}.pretrained {os.path.basename(os.path.normpath(given))}: {error}"
    logger.error(f"{message}; model '{name}' does not serve (the other models do)")
    return message


def import_into_store(store: ModelStore, model: NnUNetModel, model_name: str) -> VersionRecord:
    """Add the model as a new version (``source: imported``) that serves from the next request on."""
    state, meta = convert(model, model_name)
    folds = ",".join(model.folds)
    rec = store.add(
        state,
        meta,
        state_name="candidate",
        reason=f"imported from nnU-Net {model.name} (folds {folds}, {model.checkpoint})",
        serve=True,
    )
    logger.info(f"{model_name}: nnU-Net model {model.name} (folds {folds}) imported as {rec.id}")
    return rec


def write_checkpoint(model: NnUNetModel, model_name: str, out_dir: str) -> str:
    """The model as a unet_seg model file in ``out_dir`` (the command line's ``--ckpt``); returns its path."""
    state, meta = convert(model, model_name)
    os.makedirs(out_dir, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model.name}_folds{'-'.join(model.folds)}_{model.checkpoint[:-4]}")
    path = os.path.join(out_dir, f"{stem}.pt")
    tmp = f"{path}.tmp-{os.getpid()}"
    save_checkpoint(tmp, state, meta)
    os.replace(tmp, path)
    return path


def checkpoint_from_source(path: str, model_name: str, dims: int, conf: Mapping[str, str], out_dir: str) -> str:
    """The command line's ``--ckpt <folder or zip>``: the nnU-Net model as a unet_seg model file in ``out_dir``.

    ``conf`` (the ``--conf`` pairs) may choose ``configuration``, ``folds`` and ``checkpoint``.
    """
    model = open_model(
        os.path.abspath(path),
        dims,
        configuration=conf.get("configuration"),
        folds=conf.get("folds"),
        checkpoint=conf.get("checkpoint"),
        model_name=model_name,
    )
    return write_checkpoint(model, model_name, out_dir)


def imported_info(meta: CheckpointMeta | None) -> dict[str, Any] | None:
    """The ``nnunet_v2`` block of a version imported from nnU-Net (or fine-tuned from one), else None."""
    plan = meta.plan if meta is not None else None
    block = plan.get(KIND) if isinstance(plan, Mapping) else None
    return dict(block) if isinstance(block, Mapping) else None


def fine_tune_start(store: ModelStore, pretrained: bool) -> CheckpointMeta | None:
    """The serving version when the trainer fine-tunes an imported nnU-Net model (or a fine-tune of one), else None.

    Training then keeps that model's plan, network and nnU-Net pre-processing. A fold ensemble is
    several networks, which the trainer cannot fine-tune as one: that is an error saying what to do.
    """
    rec = store.serving() if pretrained else None
    if rec is None:
        return None
    meta = store.meta(rec.id)
    info = imported_info(meta)
    if info is None:
        return None
    folds = int(meta.spec.get("folds", 1) or 1)
    if folds > 1:
        raise NnUNetImportError(
            f"{rec.id} is an ensemble of {folds} nnU-Net folds ({', '.join(map(str, info.get('folds', [])))}); the "
            f"trainer fine-tunes one network: import a single fold ({meta.model}.folds 0) to fine-tune it, or train "
            "from scratch with unet_seg's own plan (request pretrained: false)"
        )
    return meta


# ---- pre-processing in nnU-Net's axis convention ---------------------------------------------


def _to_nnunet(x: torch.Tensor, forward: Sequence[int]) -> torch.Tensor:
    """(C, i, j, k) -> (C, *nnU-Net axes): reversed (SimpleITK's z, y, x), then ``transpose_forward``."""
    return x.permute(0, 3, 2, 1).permute(0, *[1 + a for a in forward])


def _from_nnunet(x: torch.Tensor, forward: Sequence[int]) -> torch.Tensor:
    back = [int(i) for i in np.argsort(forward)]
    return x.permute(0, *[1 + a for a in back]).permute(0, 3, 2, 1)


def _like(x: Any, value: torch.Tensor) -> MetaTensor:
    """``value`` with the meta data and the applied operations of ``x`` (a MetaTensor or a plain tensor)."""
    meta = dict(x.meta) if isinstance(x, MetaTensor) else {}
    ops = list(x.applied_operations) if isinstance(x, MetaTensor) else []
    return MetaTensor(value, meta=meta, applied_operations=ops)


class _Undoable(MapTransform, InvertibleTransform):
    """A dictionary transform traced on each key's MetaTensor; ``undo`` reverts one key (the inverse)."""

    def undo(self, x: torch.Tensor, size: list[int], info: Mapping[str, Any]) -> torch.Tensor:
        """``x`` back on the grid of ``size`` (the traced original size) given the traced ``info``."""
        raise NotImplementedError

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            op = self.pop_transform(x)
            size = [int(s) for s in op[TraceKeys.ORIG_SIZE]]
            d[key] = _like(x, self.undo(torch.as_tensor(x), size, op[TraceKeys.EXTRA_INFO]))
        return d


class NnUNetCropd(_Undoable):
    """Reverse the voxel axes to nnU-Net's order (then ``transpose_forward``) and crop to the non-zero box.

    The box is that of the image (any channel non-zero, as nnU-Net's ``crop_to_nonzero``); the
    spacing in nnU-Net's order is left in ``<key>_nnunet_spacing``. The inverse puts a label back
    into the full grid (zeros outside the box) in the original axis order.
    """

    def __init__(self, keys: KeysCollection, transpose_forward: Sequence[int], image_key: str = "image") -> None:
        super().__init__(keys)
        self.forward = [int(a) for a in transpose_forward]
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.image_key]
        affine = np.asarray(img.affine) if isinstance(img, MetaTensor) else np.eye(4)
        spacing = spacing_from_affine(affine)
        d["nnunet_spacing"] = [spacing[::-1][a] for a in self.forward]
        mask = (_to_nnunet(torch.as_tensor(img), self.forward) != 0).any(0)
        if mask.any():
            idx = [
                torch.nonzero(mask.any(dim=tuple(o for o in range(mask.ndim) if o != a))).flatten() for a in range(3)
            ]
            box = [[int(i[0]), int(i[-1]) + 1] for i in idx]
        else:
            box = [[0, s] for s in mask.shape]
        for key in self.key_iterator(d):
            x = d[key]
            t = _to_nnunet(torch.as_tensor(x), self.forward)
            out = _like(x, t[(slice(None), *[slice(a, b) for a, b in box])].contiguous())
            self.push_transform(out, orig_size=list(t.shape[1:]), extra_info={"box": box})
            d[key] = out
        return d

    def undo(self, x: torch.Tensor, size: list[int], info: Mapping[str, Any]) -> torch.Tensor:
        full = torch.zeros((x.shape[0], *size), dtype=x.dtype)
        full[(slice(None), *[slice(a, b) for a, b in info["box"]])] = x
        return _from_nnunet(full, self.forward).contiguous()


def resample_to_shape(
    data: np.ndarray,
    new_shape: Sequence[int],
    spacing: Sequence[float],
    new_spacing: Sequence[float],
    order: int = 3,
    order_z: int = 0,
    force_separate_z: bool | None = None,
) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for images (C, ...): skimage ``resize`` (edge mode, no
    anti-aliasing), the low-resolution axis on its own with ``order_z`` when the spacing is anisotropic."""
    from scipy.ndimage import map_coordinates
    from skimage.transform import resize

    shape = np.array(data.shape[1:])
    new_shape = np.array([int(s) for s in new_shape])
    if np.all(shape == new_shape):
        return data
    axis = None
    if force_separate_z is not None:
        separate = bool(force_separate_z)
        lows = np.where(max(spacing) / np.array(spacing) == 1)[0] if separate else []
    else:
        separate, lows = False, []
        for sp in (spacing, new_spacing):
            if max(sp) / min(sp) > ANISO_THRESHOLD:
                separate, lows = True, np.where(max(sp) / np.array(sp) == 1)[0]
                break
    if separate and len(lows) == 1:
        axis = int(lows[0])
    kwargs = {"mode": "edge", "anti_aliasing": False}
    out = np.zeros((data.shape[0], *new_shape), dtype=np.float32)
    for c in range(data.shape[0]):
        x = data[c].astype(float)
        if axis is None:
            out[c] = resize(x, new_shape, order, **kwargs)
            continue
        plane = [int(s) for a, s in enumerate(new_shape) if a != axis]
        tmp = np.stack([resize(np.take(x, i, axis), plane, order, **kwargs) for i in range(shape[axis])], axis=axis)
        if shape[axis] == new_shape[axis]:
            out[c] = tmp
            continue
        grids = np.mgrid[tuple(slice(0, s) for s in new_shape)].astype(float)
        scales = np.array(tmp.shape, dtype=float) / new_shape
        coords = np.array([scales[a] * (grids[a] + 0.5) - 0.5 for a in range(3)])
        out[c] = map_coordinates(tmp, coords, order=order_z, mode="nearest")
    return out


class NnUNetResampled(_Undoable):
    """Resample to the plan's spacing when nnU-Net would (the shape changes): images third order, labels nearest.

    The new shape is nnU-Net's ``round(spacing / target * shape)``; in 2D plans the slice axis
    keeps its spacing. The inverse resamples a label back (nearest; linear for probabilities).
    """

    def __init__(
        self,
        keys: KeysCollection,
        target_spacing: Sequence[float],
        order: int = 3,
        order_z: int = 0,
        force_separate_z: bool | None = None,
        label_keys: Sequence[str] = ("label",),
    ) -> None:
        super().__init__(keys)
        self.target = [float(s) for s in target_spacing]
        self.order, self.order_z, self.force_separate_z = order, order_z, force_separate_z
        self.label_keys = set(label_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        spacing = list(d.pop("nnunet_spacing"))
        target = self.target if len(self.target) == 3 else [spacing[0], *self.target]
        target = [spacing[a] if t <= 0 else t for a, t in enumerate(target)]
        for key in self.key_iterator(d):
            x = d[key]
            shape = list(x.shape[1:])
            new_shape = [int(round(s / t * n)) for s, t, n in zip(spacing, target, shape, strict=True)]
            arr = np.asarray(torch.as_tensor(x))
            if new_shape != shape:
                if key in self.label_keys:
                    out = resample_to_shape(arr, new_shape, spacing, target, 0, 0, self.force_separate_z)
                else:
                    out = resample_to_shape(
                        arr, new_shape, spacing, target, self.order, self.order_z, self.force_separate_z
                    )
                arr = out.astype(arr.dtype if key in self.label_keys else np.float32)
            y = _like(x, torch.as_tensor(np.ascontiguousarray(arr)))
            self.push_transform(
                y,
                orig_size=shape,
                extra_info={"spacing": spacing, "target": target, "mode": "bilinear"},
            )
            d[key] = y
        return d

    def undo(self, x: torch.Tensor, size: list[int], info: Mapping[str, Any]) -> torch.Tensor:
        if list(x.shape[1:]) == size:  # nothing was resampled (or the caller brought it back already)
            return x
        order = 0 if info.get("mode") == "nearest" else 1
        back = resample_to_shape(np.asarray(x.float()), size, info["target"], info["spacing"], order, 0)
        return torch.as_tensor(back).to(x.dtype)


def probabilities_before_resampling(
    probs: torch.Tensor, image: Any, order: int = 1, order_z: int = 0, force_separate_z: bool | None = None
) -> torch.Tensor:
    """Probabilities ``(1, K, ...)`` on the grid ``NnUNetResampled`` made, brought back to the grid before it.

    As nnU-Net's export: its logits are resampled (``resampling_fn_probabilities``, linear), then
    the argmax is taken. The log-probabilities differ from the logits by one value per voxel, and
    linear interpolation keeps that, so resampling them gives the same argmax. Unchanged when the
    image was not resampled (its ``NnUNetResampled`` inverse is then a no-op for the label).
    """
    ops = [op for op in getattr(image, "applied_operations", []) if op.get(TraceKeys.CLASS_NAME) == "NnUNetResampled"]
    if not ops:
        return probs
    shape = [int(s) for s in ops[-1][TraceKeys.ORIG_SIZE]]
    if list(probs.shape[2:]) == shape:
        return probs
    info = ops[-1][TraceKeys.EXTRA_INFO]
    logp = probs[0].float().clamp_min(1e-12).log().cpu().numpy()
    back = resample_to_shape(logp, shape, info["target"], info["spacing"], order, order_z, force_separate_z)
    return torch.softmax(torch.as_tensor(back), dim=0)[None].to(probs.device)


def preprocess_chain(
    keys: Sequence[str],
    plan: Mapping[str, Any],
    channels: int,
    modality_names: Sequence[str] | None = None,
    label_values: Sequence[int] | None = None,
) -> list:
    """Load and pre-process as nnU-Net does for an imported model (its plan's ``nnunet_v2`` block).

    Image only (inference) or image and label (fine-tuning); every geometric step is invertible.
    """
    info = plan[KIND]
    keys = list(keys)
    orientation = "RAS" if info.get("reader") == "NibabelIOWithReorient" else None
    return [
        *load_chain(keys, channels, 3, label_values, orientation, modality_names),
        NnUNetCropd(keys, info.get("transpose_forward", [0, 1, 2])),
        NormalizeFromPland(keys="image", schemes=plan["normalization"]),
        NnUNetResampled(
            keys,
            info.get("spacing") or plan["target_spacing"],
            order=int(info.get("order", 3)),
            order_z=int(info.get("order_z", 0)),
            force_separate_z=info.get("force_separate_z"),
        ),
    ]

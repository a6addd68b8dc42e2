"""Export a served model as a MONAI bundle that runs with MONAI alone (``python -m monai.bundle run``,
MONAI Label's ``BundleInferTask``), with no unet_seg import.

The bundle's pieces are translated from what the model's inferer really runs, so the two stay
the same: the network from the served checkpoint (a MONAI ``DynUNet`` whose constructor
arguments are read off the built network, so ``models/model.pt`` loads strictly), the
pre-processing from the inferer's own ``pre_transforms()`` (each of our transforms mapped to the
MONAI transform that computes the same thing; validation-only steps are dropped), the sliding
window from the engine's defaults (Gaussian blending, overlap, ``sigma_scale``), and the
post-processing from the checkpoint's meta (argmax, largest connected component where the model
says so, ``Invertd`` back to the input's original geometry, ``SaveImaged``).

Test-time augmentation has the model's ``/infer`` default (off for unet3d, on for nnunet and
nnunet2d); ``tta`` in ``inference.json`` switches it (``--tta False`` / ``--tta True`` on the
command line, ``{"tta": true}`` through MONAI Label, where it is a displayable config) and, when
on, averages the softmax over every combination of flipped spatial axes (the in-plane ones for
2D models), as our engine does. AMP is not used: the bundle runs in float32.

Not expressible, refused with a message: UNet2D (our own network class, not a MONAI network:
export it with ``--formats torchscript,onnx``) and plans that mix normalisation schemes across
channels.

Layout written (``configs/metadata.json``, ``configs/inference.json``, ``models/model.pt``,
``docs/README.md``, ``docs/license.txt``): see the MONAI bundle specification.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

#: the metadata schema MONAI's model zoo bundles name (MONAI's ``verify_metadata`` fetches it; the export does not)
METADATA_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
#: file suffixes the bundle's data list picks up in ``dataset_dir``
IMAGE_PATTERNS = ("*.nii.gz", "*.nii", "*.nrrd", "*.mha", "*.mhd")


class BundleError(ValueError):
    """The model cannot be expressed as a MONAI bundle (the message says why and what to do instead)."""


# ---- network -------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON form of constructor arguments (tuples to lists, numpy scalars to numbers)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def network_config(net: torch.nn.Module, model: str) -> dict[str, Any]:
    """``network_def`` of the bundle: MONAI's ``DynUNet`` with the arguments the built network was made with."""
    from monai.networks.blocks.dynunet_block import UnetResBlock
    from monai.networks.nets import DynUNet

    if not isinstance(net, DynUNet):
        raise BundleError(
            f"model '{model}' uses {type(net).__name__}, unet_seg's own network class, which MONAI cannot rebuild "
            "from a bundle config; export it with --formats torchscript,onnx instead (only the DynUNet-based "
            "models unet3d, nnunet and nnunet2d export as bundles)"
        )
    return {
        "_target_": "DynUNet",
        "spatial_dims": int(net.spatial_dims),
        "in_channels": int(net.in_channels),
        "out_channels": int(net.out_channels),
        "kernel_size": _plain(net.kernel_size),
        "strides": _plain(net.strides),
        "upsample_kernel_size": _plain(net.upsample_kernel_size),
        "filters": _plain(net.filters),
        "dropout": _plain(net.dropout),
        "norm_name": _plain(net.norm_name),
        "act_name": _plain(net.act_name),
        "deep_supervision": bool(net.deep_supervision),
        "deep_supr_num": int(net.deep_supr_num),
        "res_block": net.conv_block is UnetResBlock,
        "trans_bias": bool(net.trans_bias),
    }


# ---- pre-processing ------------------------------------------------------------------------------


def _normalisation_config(schemes: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    """MONAI transform for an nnU-Net plan's per-channel normalisation (one scheme for every channel).

    CT: clip then z-score with the dataset's statistics is one linear map with clipping
    (``ScaleIntensityRanged``). z-score: ``NormalizeIntensityd``, which divides by the population
    standard deviation where the plan's z-score uses the sample one (N - 1): a relative difference
    of 1/(2N), about 1e-5 on a hippocampus volume.
    """
    first = dict(schemes[0])
    if any(dict(s) != first for s in schemes[1:]):
        raise BundleError(
            f"the plan normalises its {len(schemes)} channels differently ({[s.get('scheme') for s in schemes]}); "
            "a bundle expresses one scheme for all channels"
        )
    if first.get("scheme") == "ct":  # clip to the dataset's percentiles, then the dataset's z-score
        lo, hi = float(first["clip_min"]), float(first["clip_max"])
        mean, std = float(first["mean"]), max(float(first["std"]), 1e-8)
        return {
            "_target_": "ScaleIntensityRanged",
            "keys": key,
            "a_min": lo,
            "a_max": hi,
            "b_min": (lo - mean) / std,
            "b_max": (hi - mean) / std,
            "clip": True,
        }
    return {
        "_target_": "NormalizeIntensityd",
        "keys": key,
        "nonzero": bool(first.get("use_nonzero_mask", False)),
        "channel_wise": True,
    }


def _aside(key: str, name: str) -> list[dict[str, Any]]:
    """Move ``key`` to ``name`` (when present).

    MONAI Label keeps the request's path under ``image_path``; MONAI's ``Spacingd`` updates every
    ``image_*`` entry as a meta dict of ``image`` and fails on that string, so the bundle moves it
    aside around ``Spacingd`` and back (MONAI Label's writer takes the file type from it).
    """
    return [
        {"_target_": "CopyItemsd", "keys": key, "names": name, "allow_missing_keys": True},
        {"_target_": "DeleteItemsd", "keys": key},
    ]


def preprocessing_config(transforms: Sequence[Any], key: str = "image") -> list[dict[str, Any]]:
    """The inferer's pre-transforms as MONAI transform configs; validation-only steps are left out.

    Every transform type the inferers use is mapped explicitly; anything else is refused, so a new
    step in an inferer cannot silently go missing from its bundle.
    """
    from monai.transforms import (
        CropForegroundd,
        EnsureChannelFirstd,
        EnsureTyped,
        NormalizeIntensityd,
        Orientationd,
        Spacingd,
    )

    from .transforms import (
        CheckChannelsd,
        CheckImaged,
        NormalizeFromPland,
        SafeLoadImaged,
        nonzero,
    )

    out: list[dict[str, Any]] = []
    for t in transforms:
        if isinstance(t, SafeLoadImaged):  # float32 as CheckImaged casts; MONAI Label swaps in its own loader
            out.append({"_target_": "LoadImaged", "keys": key, "image_only": True, "dtype": "$np.float32"})
        elif isinstance(t, (CheckImaged, CheckChannelsd)):
            continue  # checks only (CheckImaged's float32 cast is the loader's dtype above)
        elif isinstance(t, EnsureChannelFirstd):
            out.append({"_target_": "EnsureChannelFirstd", "keys": key})
        elif isinstance(t, Orientationd):
            o = t.ornt_transform
            out.append({"_target_": "Orientationd", "keys": key, "axcodes": o.axcodes, "labels": _plain(o.labels)})
        elif isinstance(t, NormalizeIntensityd):  # MONAI divides by the population std, as our z-score does
            n = t.normalizer
            if n.subtrahend is not None or n.divisor is not None:
                raise BundleError("fixed subtrahend/divisor normalisation is not exported")
            out.append(
                {"_target_": "NormalizeIntensityd", "keys": key, "nonzero": n.nonzero, "channel_wise": n.channel_wise}
            )
        elif isinstance(t, EnsureTyped):
            dtype = t.dtype[0]
            if not isinstance(dtype, torch.dtype):
                raise BundleError(f"EnsureTyped with dtype {dtype!r} is not exported")
            out.append({"_target_": "EnsureTyped", "keys": key, "dtype": f"${dtype}"})
        elif isinstance(t, CropForegroundd):
            c = t.cropper
            if c.select_fn is not nonzero or c.channel_indices is not None or np.any(np.asarray(c.margin) != 0):
                raise BundleError("only crop-to-non-zero foreground cropping is exported")
            out.append(
                {
                    "_target_": "CropForegroundd",
                    "keys": key,
                    "source_key": key,
                    "select_fn": "$lambda x: x != 0",
                    "allow_smaller": bool(c.allow_smaller),
                }
            )
        elif isinstance(t, Spacingd):
            s = t.spacing_transform
            out += _aside(f"{key}_path", "source_path")
            out.append(
                {
                    "_target_": "Spacingd",
                    "keys": key,
                    "pixdim": _plain(list(s.pixdim)),
                    "diagonal": bool(s.diagonal),
                    "mode": _plain(t.mode[0]),
                    "padding_mode": _plain(t.padding_mode[0]),
                }
            )
            out += _aside("source_path", f"{key}_path")[:1]
        elif isinstance(t, NormalizeFromPland):
            out.append(_normalisation_config(t.schemes, key))
        else:
            raise BundleError(f"pre-transform {type(t).__name__} has no MONAI equivalent in the bundle export")
    return out


# ---- inference.json ------------------------------------------------------------------------------


def flip_sets(spatial_dims: int, slice_axis: int | None) -> list[list[int]]:
    """Tensor axes flipped by each TTA pass (identity first); a 2D net on volumes flips only in-plane axes."""
    import itertools

    axes = [2 + i for i in range(spatial_dims) if slice_axis is None or i != slice_axis]
    return [list(c) for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def inference_config(
    net_def: dict[str, Any],
    pre: list[dict[str, Any]],
    roi_size: Sequence[int],
    slice_axis: int | None,
    overlap: float,
    sigma_scale: float,
    largest_component: Sequence[int],
    tta: bool = False,
) -> dict[str, Any]:
    """The bundle's ``inference.json``: MONAI's SupervisedEvaluator over the files of ``dataset_dir``.

    ``tta`` is the default of its ``tta`` switch (our inferer's default for the model).
    """
    window: dict[str, Any] = {
        "_target_": "SliceInferer" if slice_axis is not None else "SlidingWindowInferer",
        "roi_size": list(roi_size),
        "sw_batch_size": 1,
        "overlap": overlap,
        "mode": "gaussian",
        "sigma_scale": sigma_scale,
    }
    if slice_axis is not None:
        window["spatial_dim"] = int(slice_axis)
    post: list[dict[str, Any]] = [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]
    if largest_component:
        post.append(
            {
                "_target_": "KeepLargestConnectedComponentd",
                "keys": "pred",
                "applied_labels": list(largest_component),
                "is_onehot": False,
                "independent": True,
            }
        )
    post += [
        {
            "_target_": "Invertd",
            "keys": "pred",
            "transform": "@preprocessing",
            "orig_keys": "image",
            "nearest_interp": True,
            "to_tensor": True,
        },
        {
            "_target_": "SaveImaged",
            "keys": "pred",
            "output_dir": "@output_dir",
            "output_postfix": "seg",
            "output_dtype": "$np.uint8",
            "resample": False,
            "separate_folder": False,
            "print_log": False,
        },
    ]
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist": "$sorted(set(sum([glob.glob(os.path.join(@dataset_dir, p)) for p in @image_patterns], [])))",
        "image_patterns": list(IMAGE_PATTERNS),
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "displayable_configs": {"tta": bool(tta)},
        "tta": "@displayable_configs#tta",
        "network_def": net_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": pre},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "window_inferer": window,
        "flips": flip_sets(len(roi_size) if slice_axis is None else 3, slice_axis),
        "tta_inferer": (
            "$lambda x, net: torch.stack([torch.softmax(@window_inferer(x.flip(f), net), 1).flip(f)"
            " for f in @flips]).mean(0)"
        ),
        "inferer": "$@tta_inferer if str(@tta).lower() in ('true', '1') else @window_inferer",
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "@ckpt_path",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
                "strict": True,
            }
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


# ---- metadata.json -------------------------------------------------------------------------------


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def bundle_version(store_version: str | None) -> str:
    """Semantic version of the bundle: 1.0.K for store version vK (1.0.0 when unknown)."""
    text = (store_version or "").lstrip("v")
    return f"1.0.{int(text)}" if text.isdigit() else "1.0.0"


def metadata(task: Any, meta: Any, schemes: Sequence[Mapping[str, Any]] | None, tta: bool) -> dict[str, Any]:
    """``metadata.json``: the keys the MONAI bundle specification makes mandatory, plus where the weights came from."""
    import monai

    labels = sorted(meta.labels.items(), key=lambda kv: kv[1])
    values = [v for _, v in labels]
    if values != list(range(1, len(values) + 1)):
        raise BundleError(f"label values must be 1..N for a bundle's channel_def, got {dict(meta.labels)}")
    names = list(getattr(task, "modality_names", None) or []) or [f"channel{i}" for i in range(meta.in_channels)]
    ct = bool(schemes) and all(s.get("scheme") == "ct" for s in schemes)
    channel_def = {"0": "background", **{str(v): name for name, v in labels}}
    created = f"{meta.model} version {meta.version or 'unknown'} ({meta.source}, created {meta.created or 'unknown'})"
    md: dict[str, Any] = {
        "schema": METADATA_SCHEMA,
        "version": bundle_version(meta.version),
        "changelog": {bundle_version(meta.version): f"exported from unet_seg {created}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {
            "nibabel": _package_version("nibabel"),
            "pytorch-ignite": _package_version("pytorch-ignite"),
        },
        "name": f"unet_seg {meta.model}",
        "task": f"Segmentation of {', '.join(n for n, _ in labels)}",
        "description": (
            f"{task.description}. Exported from unet_seg {created}. Pre-processing, sliding-window inference "
            "(Gaussian blending) and post-processing are those of unet_seg's own inferer; the output label has "
            "the input image's shape and affine with values 1..N as in channel_def. Flip test-time augmentation: "
            f"{'on' if tta else 'off'} by default (the tta setting)."
        ),
        "authors": "unet_seg",
        "copyright": "See docs/license.txt",
        "intended_use": "Research; not for clinical use",
        "data_type": "nibabel",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if ct else "magnitude",
                    "modality": "CT" if ct else "n/a",
                    "num_channels": int(meta.in_channels),
                    "spatial_shape": list(meta.roi_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): n for i, n in enumerate(names)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "modality": "n/a",
                    "num_channels": len(labels) + 1,
                    "spatial_shape": list(meta.roi_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": channel_def,
                }
            },
        },
        "unet_seg": {
            "model": meta.model,
            "version": meta.version,
            "created": meta.created,
            "source": meta.source,
            "val_mean_dice": meta.val_mean_dice,
            "spec": meta.spec,
            "plan": meta.plan,
            "postprocessing": meta.postprocessing,
            "tta": bool(tta),
        },
    }
    if meta.val_mean_dice is not None:
        md["eval_metrics"] = {"val_mean_dice": meta.val_mean_dice}
    return md


# ---- docs ----------------------------------------------------------------------------------------


def readme(md: dict[str, Any], name: str) -> str:
    """``docs/README.md``: what the bundle does and how to run it."""
    origin = md["unet_seg"]
    labels = ", ".join(f"{k} = {v}" for k, v in md["network_data_format"]["outputs"]["pred"]["channel_def"].items())
    return f"""# {md["name"]} (MONAI bundle)

{md["description"]}

Labels: {labels}.

## Run with MONAI

```bash
python -m monai.bundle run --config_file {name}/configs/inference.json --bundle_root {name} \\
    --dataset_dir DIR_WITH_IMAGES --output_dir OUT
```

Every image in `dataset_dir` ({", ".join(IMAGE_PATTERNS)}) gives `OUT/<image name>_seg.nii.gz`.
Flip test-time augmentation (all axis combinations, softmax averaged) is {"on" if origin["tta"] else "off"}
by default; `--tta True` / `--tta False` switches it.
Runs on the first CUDA device when there is one, else on the CPU, in float32.

## Serve with MONAI Label

Give the folder to MONAI Label's `BundleInferTask` (`monailabel.tasks.infer.bundle.BundleInferTask(path, conf)`),
or put it in the `model/` folder of a MONAI Label bundle app and start it with `--conf models {name}`.
`{{"tta": true}}` / `{{"tta": false}}` in the request switches test-time augmentation.

## Provenance

Weights: unet_seg `{origin["model"]}` version `{origin["version"] or "unknown"}`, {origin["source"]},
created {origin["created"] or "unknown"}, validation mean Dice {origin["val_mean_dice"]}.
Made with MONAI {md["monai_version"]} and PyTorch {md["pytorch_version"]}.
"""


LICENSE_NOTE = """The configuration files of this bundle use MONAI components only (MONAI: Apache License 2.0).

The weights in models/model.pt were trained by unet_seg on the data its owner chose; they carry
that data's terms. For example, models trained on the Medical Segmentation Decathlon are shared
under CC-BY-SA 4.0 like the data. Research use only; not a medical device.
"""


# ---- export --------------------------------------------------------------------------------------


def export_bundle(task: Any, out_dir: str, tolerance: float, overwrite: bool = False) -> dict[str, Any]:
    """Write the served model of ``task`` as a MONAI bundle in ``out_dir`` and check it.

    The bundle is assembled in a temporary sibling folder, checked (its ``network_def`` built by
    MONAI's ConfigParser and loaded strictly from ``models/model.pt`` must give our network's
    logits within ``tolerance``; its pre/post-processing and inferer must instantiate), and only
    then moved into place. An existing ``out_dir`` is refused unless ``overwrite``.
    """
    from .inference import predict_probabilities

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it, or choose another folder")
    net, meta = task.load_network(torch.device("cpu"))
    net = net.eval()
    net_def = network_config(net, task.model_name)
    pre_transforms = task.pre_transforms()
    pre = preprocessing_config(pre_transforms)
    schemes = next((list(t.schemes) for t in pre_transforms if hasattr(t, "schemes")), None)
    lcc_names = list((meta.postprocessing or {}).get("largest_component", []))
    config = inference_config(
        net_def,
        pre,
        meta.roi_size,
        meta.slice_axis,
        overlap=float(task.config().get("overlap", 0.5)),
        sigma_scale=float(_default(predict_probabilities, "sigma_scale")),
        largest_component=[meta.labels[n] for n in lcc_names if n in meta.labels],
        tta=bool(task.config().get("tta", False)),
    )
    md = metadata(task, meta, schemes, tta=config["displayable_configs"]["tta"])
    name = os.path.basename(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", dir=parent)
    try:
        for sub in ("configs", "models", "docs"):
            os.makedirs(os.path.join(tmp, sub))
        with open(os.path.join(tmp, "configs", "inference.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "configs", "metadata.json"), "w", encoding="utf-8") as f:
            json.dump(md, f, indent=2)
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, os.path.join(tmp, "models", "model.pt"))
        with open(os.path.join(tmp, "docs", "README.md"), "w", encoding="utf-8") as f:
            f.write(readme(md, name))
        with open(os.path.join(tmp, "docs", "license.txt"), "w", encoding="utf-8") as f:
            f.write(LICENSE_NOTE)
        diff = check_bundle(tmp, net, meta.in_channels, meta.roi_size)
        if diff > tolerance:
            raise ValueError(f"the bundle's network differs from the served one by {diff:.3g} (> {tolerance})")
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "path": out_dir,
        "max_abs_diff": diff,
        "model_version": meta.version,
        "bundle_version": md["version"],
        "run": f"python -m monai.bundle run --config_file {out_dir}/configs/inference.json --bundle_root {out_dir} "
        "--dataset_dir DIR --output_dir OUT",
    }


def _default(fn: Any, name: str) -> Any:
    import inspect

    return inspect.signature(fn).parameters[name].default


def check_bundle(bundle_dir: str, net: torch.nn.Module, in_channels: int, roi_size: Sequence[int]) -> float:
    """Build the bundle with MONAI's ConfigParser: max abs logit difference of its network against ``net``.

    Also instantiates its pre-processing, post-processing and both inferers (so a config that
    MONAI cannot parse fails the export, not the user's first run).
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle_dir, "configs", "inference.json"))
    parser.read_meta(os.path.join(bundle_dir, "configs", "metadata.json"))
    parser["bundle_root"] = bundle_dir
    parser["device"] = "$torch.device('cpu')"
    bundle_net = parser.get_parsed_content("network_def", instantiate=True)
    bundle_net.load_state_dict(torch.load(parser.get_parsed_content("ckpt_path"), weights_only=True), strict=True)
    bundle_net.eval()
    for key in ("preprocessing", "postprocessing", "window_inferer", "tta_inferer", "inferer"):
        parser.get_parsed_content(key, instantiate=True)
    x = torch.randn(1, in_channels, *roi_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = net(x), bundle_net(x)
    return float((torch.as_tensor(got) - torch.as_tensor(ref)).abs().max())

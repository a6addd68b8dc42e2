"""Inferer base shared by every model: honest readiness, the shared engine, original geometry out.

* The model store (``lib.modelstore``) says which version serves. ``is_valid()`` is True only
  when a version serves whose meta matches the model's labels and channels; otherwise
  ``not_ready_reason()`` says why, /info lists the model under ``models_not_ready`` and
  /infer answers 409.
* The network is rebuilt from the version's meta (``spec_class``) and cached by file; a
  promotion, a rollback or a better epoch of the first model's training serves from the next
  request on, and every reply names the version that answered (``model_version``).
* Inference goes through ``lib.inference.predict_volume`` (sliding window, Gaussian
  blending, ``tta`` flips, ``amp``), then argmax, then MONAI's inverse of the invertible
  pre-transforms so the label has the request image's exact shape and affine, with values
  1..N in the order of the label names.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from ..checkpoints import CheckpointMeta, incompatibility, read_checkpoint
from ..conf import ConfError, parse_bool, parse_float, parse_int, parse_size
from ..inference import entropy, largest_component, predict_volume
from ..leannet import LeanDynUNet
from ..modelstore import ModelStore
from ..runtime import resolve_amp, resolve_device

logger = logging.getLogger(__name__)


class ModelNotReady(RuntimeError):
    """The model has no usable trained weights; the message says why and what to do."""


class SegInferTask(BasicInferTask):
    """Shared segmentation inferer (see module docstring)."""

    #: the network spec class of this model (``from_dict(spec).build()`` makes the network)
    spec_class: Any = None

    def __init__(
        self,
        *,
        model_name: str,
        store: ModelStore,
        labels: Mapping[str, int],
        spatial_dims: int,
        in_channels: int,
        roi_size: Sequence[int],
        description: str,
        config: Mapping[str, Any] | None = None,
        network_dims: int | None = None,
    ) -> None:
        self.model_name = model_name
        self.store = store
        self.network_dims = network_dims or spatial_dims
        self.in_channels = in_channels
        self._file: str | None = None  # serve this file instead of the store (main.py --ckpt)
        self._lock = threading.Lock()
        self._mc_lock = threading.Lock()
        self._loaded: dict[str, tuple[tuple[str, int], torch.nn.Module, CheckpointMeta]] = {}
        cfg = {"tta": False, "overlap": 0.5, "amp": True, "sw_batch_size": 1, "device": "auto"}
        cfg.update(config or {})
        super().__init__(
            path=[],
            network=None,
            type=InferType.SEGMENTATION,
            labels=dict(labels),
            dimension=spatial_dims,
            description=description,
            config=cfg,
            roi_size=tuple(roi_size),
        )

    # ---- readiness --------------------------------------------------------------------------
    def expected_meta(self) -> dict[str, Any]:
        """What a version must match to be served."""
        return {"labels": dict(self.labels), "in_channels": self.in_channels, "spatial_dims": self.network_dims}

    def serve_file(self, path: str) -> None:
        """Serve one model file instead of the store's serving version (the command line's ``--ckpt``)."""
        self._file = os.path.abspath(path)
        self.clear_cache()

    @staticmethod
    def _meta_of(path: str) -> CheckpointMeta:
        return CheckpointMeta.from_dict(read_checkpoint(path)[1])

    def _candidate(self) -> tuple[str | None, CheckpointMeta | None, str | None]:
        """(file, meta, reason): what serves the next request, or why nothing can."""
        if self._file:
            path, label = self._file, os.path.basename(self._file)
        else:
            rec = self.store.serving()
            if rec is None:
                return None, None, "no version serves yet"
            path, label = self.store.path(rec.id), rec.id
        try:
            meta = self._meta_of(path) if self._file else self.store.meta(label)
        except Exception as e:
            return None, None, f"{label} cannot be read ({e})"
        reason = incompatibility(meta, self.expected_meta())
        if reason is not None:
            return None, None, f"{label}: {reason} (promote a version that fits, or train one)"
        return path, meta, None

    def ensemble_members(self) -> list[str]:
        """Files of the serving version and the newest version of each fold that share its window, for ensembling."""
        path, meta, _ = self._candidate()
        if path is None or meta is None:
            return []
        members = [path]
        for rec in self.store.latest_per_fold().values():
            other = self.store.meta(rec.id)
            same = (other.roi_size, other.slice_axis, other.plan) == (meta.roi_size, meta.slice_axis, meta.plan)
            p = self.store.path(rec.id)
            if same and p not in members and incompatibility(other, self.expected_meta()) is None:
                members.append(p)
        return members

    def is_valid(self) -> bool:
        return self._candidate()[0] is not None

    def not_ready_reason(self) -> str | None:
        """Why the model cannot serve, or None when it can."""
        path, _, reason = self._candidate()
        if path:
            return None
        return (
            f"model '{self.model_name}' has no trained weights ({reason}); train it with "
            f"POST /train/{self.model_name} or start the server with --conf {self.model_name}.pretrained <file>"
        )

    def info(self) -> dict[str, Any]:
        out = super().info()
        path, meta, _ = self._candidate()
        out["ready"] = path is not None
        if path and meta:
            out["version"] = meta.summary()
        else:
            out["not_ready_reason"] = self.not_ready_reason()
        out["versions"] = self.store.describe()
        out["channels"] = self.in_channels  # what an image of this model holds (channels last in one file)
        names = list(getattr(self, "modality_names", None) or [f"channel{i}" for i in range(self.in_channels)])
        out["modalities"] = ["image"] if names == ["channel0"] else names  # one unnamed channel: just the image
        return out

    # ---- network ----------------------------------------------------------------------------
    def build_network(self, meta: CheckpointMeta) -> torch.nn.Module:
        """Rebuild the network from a version's meta."""
        return self.spec_class.from_dict(dict(meta.spec)).build()

    def window_divisor(self, meta: CheckpointMeta) -> int | Sequence[int]:
        """What every window size must be a multiple of (one factor per down-sampling of the network)."""
        return self.spec_class.from_dict(dict(meta.spec)).divisor

    def load_network(
        self, device: torch.device, path: str | None = None, dropout: float | None = None, lean: bool = False
    ) -> tuple[torch.nn.Module, CheckpointMeta]:
        """A served network on ``device`` (the serving version unless ``path``), reloaded when its file changes.

        ``dropout`` rebuilds it with that dropout rate (same weights: dropout layers hold none), for
        Monte-Carlo dropout on a model trained with a different rate. ``lean`` gives the inference-only
        :class:`~lib.leannet.LeanDynUNet` twin where the network is a plain DynUNet (the same output,
        faster; no dropout, no training), else the network itself.
        """
        if path is None:
            path, _, _ = self._candidate()
        if not path:
            raise ModelNotReady(self.not_ready_reason())
        key = (path, os.stat(path).st_mtime_ns)
        cache_key = f"{device}|{path}|{dropout}|{lean}"
        with self._lock:
            cached = self._loaded.get(cache_key)
            if cached and cached[0] == key:
                return cached[1], cached[2]
            state, raw = read_checkpoint(path)
            meta = CheckpointMeta.from_dict(raw)
            build_meta = meta
            if dropout is not None:
                build_meta = dataclasses.replace(meta, spec={**meta.spec, "dropout": float(dropout)})
            net = self.build_network(build_meta)
            net.load_state_dict(state, strict=True)
            if lean and dropout is None and LeanDynUNet.supports(meta.spec):
                net = LeanDynUNet.from_spec(meta.spec, net.state_dict())
            net.to(device).eval()
            self._loaded[cache_key] = (key, net, meta)
            logger.info(
                f"{self.model_name}: loaded {meta.version or os.path.basename(path)} on {device}"
                + (f" with dropout {dropout}" if dropout is not None else "")
            )
            return net, meta

    def _engine_inputs(
        self, data: dict[str, Any], meta: CheckpointMeta, dev: torch.device, default_overlap: float
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The batch ``(1, C, ...)`` and the engine arguments (window, slice axis, overlap, AMP) a request asks for."""
        roi_dims = len(meta.roi_size or self.roi_size)
        roi = parse_size(data.get("roi_size") or meta.roi_size or self.roi_size, roi_dims, "roi_size")
        if data.get("roi_size"):
            div = self.window_divisor(meta)
            divs = [int(div)] * roi_dims if isinstance(div, int) else [int(d) for d in div][-roi_dims:]
            if any(r % d for r, d in zip(roi, divs, strict=False)):
                raise ConfError(
                    f"roi_size: {list(roi)} is not a multiple of {divs} (the network halves each axis "
                    f"that many times); try {[max(d, (r // d) * d) for r, d in zip(roi, divs, strict=False)]}"
                )
        engine = {
            "roi_size": roi,
            "slice_axis": meta.slice_axis,
            "device": dev,
            "overlap": parse_float(data.get("overlap", default_overlap), "overlap"),
            "sw_batch_size": parse_int(data.get("sw_batch_size", 1), "sw_batch_size", 1),
            "amp": resolve_amp(data.get("amp", True), dev),
        }
        return torch.as_tensor(data[self.input_key])[None], engine

    def mc_dropout_statistics(
        self, data: dict[str, Any], dev: torch.device, samples: int, dropout: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Monte-Carlo dropout over the pre-processed image: ``samples`` passes with the dropout layers sampling.

        Returns the mean softmax ``(K, ...)``, the mean per-sample entropy ``(...)`` (nats) and run
        info. Uses the dropout rate the served model was trained with unless ``dropout`` is given
        (test-time dropout on these weights); a model trained without dropout and no ``dropout``
        given is an error, never a silent zero score. The sampling network is a separate instance,
        so requests served meanwhile never see dropout switched on.
        """
        if samples < 2:
            raise ConfError(f"MC dropout needs at least 2 samples, got {samples}")
        _, meta = self.load_network(dev)
        trained = float(meta.spec.get("dropout", 0.0) or 0.0)
        if dropout is None and trained <= 0:
            raise ModelNotReady(
                f"model '{self.model_name}' (version {meta.version}) was trained without dropout, so MC dropout "
                f"has nothing to sample; train it with conf {self.model_name}.dropout=0.1 (or similar), or pass "
                f'{{"dropout": 0.1}} to sample test-time dropout on these weights'
            )
        rate = trained if dropout is None else float(dropout)
        if not 0.0 < rate < 1.0:
            raise ConfError(f"dropout must be in (0, 1), got {dropout}")
        net, meta = self.load_network(dev, dropout=rate)
        image, engine = self._engine_inputs(data, meta, dev, default_overlap=0.25)
        mean_p: torch.Tensor | None = None
        mean_h: torch.Tensor | None = None
        with self._mc_lock, torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(0)  # the same study gets the same score from the same model
            for _ in range(samples):
                p = predict_volume(net, image, tta=False, mc_dropout=True, **engine)[0]
                h = entropy(p)
                mean_p = p / samples if mean_p is None else mean_p + p / samples
                mean_h = h / samples if mean_h is None else mean_h + h / samples
        assert mean_p is not None and mean_h is not None
        info = {
            "samples": samples,
            "dropout": rate,
            "dropout_source": "trained" if dropout is None else "test-time",
            "model_version": meta.version,
        }
        return mean_p, mean_h, info

    def clear_cache(self) -> None:
        self._loaded.clear()

    # ---- running ----------------------------------------------------------------------------
    def __call__(self, request: dict, callbacks: Any = None) -> tuple[Any, dict]:
        if not self.is_valid():
            raise ModelNotReady(self.not_ready_reason())
        request = dict(request)
        request["device"] = resolve_device(request.get("device")).type
        label, result = super().__call__(request, callbacks)
        return label, result

    def inferer(self, data: Any = None) -> Any:
        raise NotImplementedError("SegInferTask runs the shared engine in run_inferer")

    def compute_probabilities(
        self, data: dict[str, Any], dev: torch.device
    ) -> tuple[torch.Tensor, dict, dict[str, Any]]:
        """Softmax probabilities ``(1, K, ...)`` of the pre-processed image (ensemble summed), the serving meta,
        run info."""
        net, meta = self.load_network(dev, lean=True)
        members = [(net, meta)]
        if parse_bool(data.get("ensemble", False), "ensemble"):
            members = [self.load_network(dev, path, lean=True) for path in self.ensemble_members()] or members
        tta = parse_bool(data.get("tta", False), "tta")
        image, engine = self._engine_inputs(data, meta, dev, default_overlap=0.5)
        probs = None
        for member, _ in members:
            p = predict_volume(member, image, blend=str(data.get("blend", "gaussian")), tta=tta, **engine)
            probs = p if probs is None else probs + p
        assert probs is not None
        info = {
            "tta": tta,
            "amp": engine["amp"].describe(),
            "roi_size": list(engine["roi_size"]),
            "model_version": meta.version,
            "ensemble": len(members),
        }
        return probs / len(members), meta, info

    def save_probabilities(self, image: Any, path: str, request: dict[str, Any]) -> str:
        """Write the softmax probabilities of ``image`` in its ORIGINAL geometry as NIfTI (channels last).

        Returns ``path``.
        """
        import nibabel as nib

        if not self.is_valid():
            raise ModelNotReady(self.not_ready_reason())
        dev = resolve_device(request.get("device"))
        data = self.run_pre_transforms({**request, self.input_key: image}, self.pre_transforms())
        probs, _, _ = self.compute_probabilities(data, dev)
        source = data[self.input_key]
        out: Any = probs[0].cpu()
        if isinstance(source, MetaTensor):
            out = MetaTensor(out, meta=dict(source.meta), applied_operations=list(source.applied_operations))
            if out.applied_operations:
                out = Invertd(
                    keys="probs",
                    transform=Compose(data["_pre_transforms"]),
                    orig_keys=self.input_key,
                    nearest_interp=False,
                    to_tensor=True,
                )({"probs": out, self.input_key: source})["probs"]
        arr = np.moveaxis(np.asarray(out, dtype=np.float32), 0, -1)
        affine = np.asarray(out.affine) if isinstance(out, MetaTensor) and out.affine.shape == (4, 4) else np.eye(4)
        nib.save(nib.Nifti1Image(arr, affine), path)
        return path

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> dict[str, Any]:
        dev = torch.device(device)
        probs, meta, info = self.compute_probabilities(data, dev)
        label = torch.argmax(probs, dim=1).to(torch.uint8 if len(self.labels) < 255 else torch.int16).cpu()
        lcc = []
        if parse_bool(data.get("postprocess", True), "postprocess"):
            lcc = list((meta.postprocessing or {}).get("largest_component", []))
            label[0] = largest_component(label[0], [self.labels[n] for n in lcc if n in self.labels])
        source = data[self.input_key]
        if isinstance(source, MetaTensor):
            label = MetaTensor(label, meta=dict(source.meta), applied_operations=list(source.applied_operations))
        data[self.output_label_key] = label
        data["_infer_info"] = {**info, "largest_component": lcc}
        return data

    def run_pre_transforms(self, data: dict[str, Any], transforms: Sequence[Any]) -> dict[str, Any]:
        # MONAI's Spacingd treats every "image_*" key as a meta dict; keep MONAI Label's path string aside
        path = data.pop("image_path", None)
        out = super().run_pre_transforms(data, transforms)
        if path is not None:
            out["image_path"] = path
        out["_pre_transforms"] = list(transforms)  # the same instances must invert what they did
        return out

    def post_transforms(self, data: Any = None) -> Sequence[Any]:
        return [RestoreGeometry(self)]

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: str | None = None) -> tuple[Any, dict]:
        if not data.get("result_extension"):
            path = data.get("image_path")
            ext = ".nii.gz"
            lower = path.lower() if isinstance(path, str) else ""
            if lower.endswith((".nrrd", ".nii", ".nii.gz", ".mha", ".mhd")):
                ext = ".nii.gz" if lower.endswith(".nii.gz") else os.path.splitext(lower)[1]
            elif lower.endswith((".png", ".jpg", ".jpeg", ".bmp")):
                ext = ".png"  # lossless, whatever the image's format
            elif lower.endswith((".tif", ".tiff")):
                ext = ".tif"
            data["result_extension"] = ext
        data.setdefault("result_dtype", "uint8" if len(self.labels) < 255 else "int16")
        if str(data["result_extension"]).lower() in (".nii", ".nii.gz"):
            label_file, result = self._write_nifti(data)  # ITK's writer drops/permutes singleton axes
        else:
            label_file, result = super().writer(data, extension, dtype)
        result = dict(result or {})
        result.update(data.get("_infer_info", {}))
        result["label_values"] = dict(self.labels)
        return label_file, result

    def _write_nifti(self, data: dict[str, Any]) -> tuple[str, dict]:
        """The label as NIfTI with exactly the request image's shape and affine (temp file; the route removes it)."""
        import tempfile

        import nibabel as nib

        label = data[self.output_label_key]
        arr = np.asarray(label.array if isinstance(label, MetaTensor) else label).astype(str(data["result_dtype"]))
        affine = np.asarray(label.affine, dtype=np.float64) if isinstance(label, MetaTensor) else np.eye(4)
        fd, path = tempfile.mkstemp(suffix=str(data["result_extension"]).lower())
        os.close(fd)
        try:
            nib.save(nib.Nifti1Image(arr, affine), path)
        except Exception:
            os.remove(path)
            raise
        return path, dict(data.get(self.output_json_key) or {})


class RestoreGeometry:
    """Post-transform: invert the pre-transforms so the label has the request image's grid."""

    def __init__(self, task: SegInferTask) -> None:
        self.task = task

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        key = self.task.output_label_key
        label = data[key]
        if isinstance(label, MetaTensor) and label.applied_operations:
            inverted = Invertd(
                keys=key,
                transform=Compose(data["_pre_transforms"]),
                orig_keys=self.task.input_key,
                nearest_interp=True,
                to_tensor=True,
            )(data)
            label = inverted[key]
        if isinstance(label, MetaTensor):
            out = MetaTensor(label[0].as_tensor().round().to(torch.int16), affine=label.affine)
        else:
            out = torch.as_tensor(label)[0]
        data[key] = out
        return data

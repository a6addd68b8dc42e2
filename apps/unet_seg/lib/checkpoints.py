"""Model files and their typed meta: ``{"model": state_dict, "meta": CheckpointMeta}``.

The meta block says how to rebuild the network (spec, plan), which labels it predicts, its
window and channels, and where it came from (source, parent version, run, epoch), with the
validation Dice it reached and the cases that Dice was computed on. Inferers build the network
from it, so a served model never depends on today's conf matching yesterday's.

Only ``lib.modelstore`` reads and writes model files; this module is the format it uses.
Meta written before the schema existed (unet_seg's first single-file models) is upgraded
on reading; meta from a newer schema is refused.
"""

from __future__ import annotations

import os
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

#: version of the meta layout below; bump it when a field changes meaning
META_SCHEMA = 2
SOURCES = ("trained", "uploaded", "imported")


class MetaError(ValueError):
    """A checkpoint or its meta block that cannot be used (names what is wrong)."""


@dataclass
class Validation:
    """Validation result of a version and the cases it was computed on."""

    mean_dice: float | None
    per_class: dict[str, float | None] = field(default_factory=dict)
    cases: list[str] = field(default_factory=list)  # validation case ids (empty: unknown, e.g. imported models)


@dataclass
class CheckpointMeta:
    """Everything stored beside the weights (schema ``META_SCHEMA``)."""

    model: str
    labels: dict[str, int]
    in_channels: int
    spatial_dims: int
    spec: dict[str, Any]
    roi_size: list[int]
    slice_axis: int | None = None
    plan: dict[str, Any] | None = None
    modalities: list[str] = field(default_factory=list)
    normalisation: str | None = None
    orientation: str | None = None
    label_map: dict[str, int] = field(default_factory=dict)
    loss: str | None = None
    postprocessing: dict[str, Any] | None = None
    validation: Validation | None = None
    data_fingerprint: str | None = None
    parent: str | None = None  # version this one was fine-tuned from
    created: str = ""
    source: str = "trained"
    version: str | None = None  # store id ("v3"), written by the model store
    run_id: str | None = None
    epoch: int | None = None
    fold: int | None = None
    amp: str | None = None
    world_size: int = 1
    schema_version: int = META_SCHEMA

    # ---- conversion ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form (what is saved)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], strict: bool = False) -> CheckpointMeta:
        """Typed meta from a saved block; older layouts are upgraded. ``strict`` refuses unknown keys (uploads)."""
        if not isinstance(data, Mapping) or not data:
            raise MetaError("checkpoint has no meta block (not written by unet_seg)")
        data = dict(data)
        schema = data.get("schema_version", 1)
        if not isinstance(schema, int) or schema > META_SCHEMA:
            raise MetaError(f"meta schema_version {schema!r} is newer than this unet_seg understands ({META_SCHEMA})")
        if schema < META_SCHEMA:
            data = _upgrade_v1(data)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown and strict:
            raise MetaError(f"meta has unknown keys: {', '.join(unknown[:10])}")
        missing = [
            k for k in ("model", "labels", "in_channels", "spatial_dims", "spec", "roi_size") if data.get(k) is None
        ]
        if missing:
            raise MetaError(f"meta lacks {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        val = kwargs.get("validation")
        if isinstance(val, Mapping):
            kwargs["validation"] = Validation(
                mean_dice=_opt_float(val.get("mean_dice")),
                per_class={str(k): _opt_float(v) for k, v in dict(val.get("per_class") or {}).items()},
                cases=[str(c) for c in val.get("cases") or []],
            )
        elif val is not None:
            raise MetaError("meta validation must be an object")
        meta = cls(**kwargs)
        meta.check()
        return meta

    def check(self) -> None:
        """Types and ranges of the fields a server relies on."""
        if not isinstance(self.model, str) or not self.model:
            raise MetaError("meta model must be a name")
        if (
            not isinstance(self.labels, Mapping)
            or not self.labels
            or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
                for k, v in self.labels.items()
            )
        ):
            raise MetaError(f"meta labels must map names to values >= 1, got {self.labels!r}"[:200])
        if not isinstance(self.in_channels, int) or self.in_channels < 1:
            raise MetaError(f"meta in_channels must be >= 1, got {self.in_channels!r}")
        if self.spatial_dims not in (2, 3):
            raise MetaError(f"meta spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if not isinstance(self.spec, Mapping):
            raise MetaError("meta spec must be an object")
        if not isinstance(self.roi_size, Sequence) or not all(isinstance(s, int) and s > 0 for s in self.roi_size):
            raise MetaError(f"meta roi_size must be positive integers, got {self.roi_size!r}"[:200])
        if self.source not in SOURCES:
            raise MetaError(f"meta source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        self.roi_size = [int(s) for s in self.roi_size]

    # ---- what readers ask -----------------------------------------------------------------------
    @property
    def val_mean_dice(self) -> float | None:
        """Validation mean Dice (None when unknown)."""
        return self.validation.mean_dice if self.validation else None

    def summary(self) -> dict[str, Any]:
        """The short form /info and the CLI show."""
        return {
            "version": self.version,
            "created": self.created,
            "source": self.source,
            "epoch": self.epoch,
            "parent": self.parent,
            "fold": self.fold,
            "val_mean_dice": self.val_mean_dice,
            "val_dice_per_class": dict(self.validation.per_class) if self.validation else {},
            "val_cases": len(self.validation.cases) if self.validation else 0,
        }


def _opt_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if out != out else out  # NaN -> None


def _upgrade_v1(old: Mapping[str, Any]) -> dict[str, Any]:
    """Meta of the single-file models written before the schema: same facts, other names."""
    renamed = ("version", "published_at", "val_mean_dice", "val_dice_per_class", "initialised_from", "schema_version")
    data = {k: v for k, v in old.items() if k not in renamed}
    data["created"] = str(old.get("published_at") or "")
    data["parent"] = None
    data["run_id"] = old.get("run_id") or old.get("version")
    if old.get("val_mean_dice") is not None or old.get("val_dice_per_class"):
        data["validation"] = {
            "mean_dice": old.get("val_mean_dice"),
            "per_class": old.get("val_dice_per_class") or {},
            "cases": [],
        }
    data["schema_version"] = META_SCHEMA
    return data


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, raw meta block) of a model file; meta is {} for plain state dicts."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, Mapping):
        raise MetaError("not a checkpoint dictionary")
    state = ckpt.get("model", ckpt)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetaError("the checkpoint's 'model' entry is not a state dict of tensors")
    return dict(state), dict(ckpt.get("meta") or {})


def is_nnunet_source(path: str) -> bool:
    """True for a folder or a zip archive that is not a torch file: what ``pretrained`` and ``--ckpt`` read as an
    nnU-Net v2 results folder or export zip (``lib.nnunetv2``). unet_seg's model files are torch archives (zip
    files holding ``data.pkl``) or legacy pickles."""
    if os.path.isdir(path):
        return True
    if not os.path.isfile(path) or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return not any(n.endswith("data.pkl") for n in zf.namelist())


def save_checkpoint(path: str, state: Mapping[str, torch.Tensor], meta: CheckpointMeta) -> None:
    """Write a model file (not atomic by itself: the store writes to a temp name and renames)."""
    torch.save({"model": dict(state), "meta": meta.to_dict()}, path)


def incompatibility(meta: CheckpointMeta, expected: Mapping[str, Any]) -> str | None:
    """Why a version cannot serve a model configured with ``expected`` (labels, channels, dims), or None."""
    for key in ("labels", "in_channels", "spatial_dims"):
        if key in expected and getattr(meta, key) != expected[key]:
            return f"it has {key}={getattr(meta, key)!r} but the model is configured with {key}={expected[key]!r}"
    return None


def now_iso() -> str:
    """Local time stamp used in meta and records."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")

"""Request parameter schemas for ``/infer`` and ``/train``: a JSON object, known keys, types, ranges, enums.

Every key a request may carry is listed once here with what it accepts; anything else gets a
``ConfError`` naming the key and what is allowed (the route answers 422). Values keep their
JSON types (the tasks parse them again with ``lib.conf``), so checking never changes meaning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..conf import FALSE_WORDS, TRUE_WORDS, ConfError, parse_size
from ..runtime import AMP_WORDS

Check = Callable[[str, Any], None]


@dataclass(frozen=True)
class Field:
    """One accepted key: a checker and the words that say what it accepts."""

    check: Check
    allowed: str


def _bool(key: str, v: Any) -> None:
    if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
        return
    if isinstance(v, str) and v.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return
    raise ConfError(f"{key}: expected true or false, got {v!r}")


def _number(
    lo: float | None, hi: float | None, integer: bool = False, lo_open: bool = False, hi_open: bool = False
) -> Check:
    def check(key: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ConfError(f"{key}: expected {'an integer' if integer else 'a number'}, got {v!r}")
        try:
            x = float(v)
        except ValueError:
            raise ConfError(f"{key}: expected {'an integer' if integer else 'a number'}, got {v!r}") from None
        if not math.isfinite(x) or (integer and not x.is_integer()):
            raise ConfError(f"{key}: expected {'an integer' if integer else 'a finite number'}, got {v!r}")
        bad_lo = lo is not None and (x <= lo if lo_open else x < lo)
        bad_hi = hi is not None and (x >= hi if hi_open else x > hi)
        if bad_lo or bad_hi:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            raise ConfError(
                f"{key}: must be in {left}{lo if lo is not None else '-inf'}, "
                f"{hi if hi is not None else 'inf'}{right}, got {v!r}"
            )

    return check


def _enum(*values: str) -> Check:
    def check(key: str, v: Any) -> None:
        if not isinstance(v, str) or v.strip().lower() not in values:
            raise ConfError(f"{key}: expected one of {', '.join(values)}; got {v!r}")

    return check


def _amp(key: str, v: Any) -> None:
    if isinstance(v, bool) or (isinstance(v, str) and v.strip().lower() in AMP_WORDS):
        return
    raise ConfError(f"{key}: expected true/false/bf16/fp16, got {v!r}")


def _device(key: str, v: Any) -> None:
    items = v if isinstance(v, list) else [v]  # MONAI Label viewers echo the device list from /info
    for item in items:
        text = str(item).strip().lower() if item is not None else "auto"
        if text in ("auto", "cpu", "cuda", "") or (text.startswith("cuda:") and text[5:].isdigit()):
            continue
        raise ConfError(f"{key}: expected auto, cpu, cuda or cuda:N, got {v!r}")


def _size(minimum: int, maximum: int) -> Check:
    def check(key: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, (int, str, list)):
            raise ConfError(f"{key}: expected a size such as 96 or [96, 96, 64], got {v!r}")
        dims = len(v) if isinstance(v, list) else len([p for p in str(v).replace("x", ",").split(",") if p.strip()])
        sizes = parse_size(v, max(dims, 1), key)
        if any(s < minimum or s > maximum for s in sizes):
            raise ConfError(f"{key}: every size must be in [{minimum}, {maximum}], got {v!r}")

    return check


def _text(max_len: int) -> Check:
    def check(key: str, v: Any) -> None:
        if not isinstance(v, str) or len(v) > max_len:
            raise ConfError(f"{key}: expected a string of at most {max_len} characters")

    return check


def _json_value(max_len: int) -> Check:
    def check(key: str, v: Any) -> None:
        if len(json.dumps(v)) > max_len:
            raise ConfError(f"{key}: value too long (over {max_len} characters as JSON)")

    return check


INFER_FIELDS: dict[str, Field] = {
    "tta": Field(_bool, "true/false"),
    "ensemble": Field(_bool, "true/false"),
    "postprocess": Field(_bool, "true/false"),
    "overlap": Field(_number(0.0, 1.0, hi_open=True), "a number in [0, 1)"),
    "blend": Field(_enum("gaussian", "constant"), "gaussian or constant"),
    "amp": Field(_amp, "true/false/bf16/fp16"),
    "sw_batch_size": Field(_number(1, 64, integer=True), "an integer in [1, 64]"),
    "roi_size": Field(_size(8, 1024), "sizes in [8, 1024] that are multiples of the network's downsampling factor"),
    "device": Field(_device, "auto, cpu, cuda, cuda:N"),
    "result_extension": Field(
        _enum(".nii.gz", ".nii", ".nrrd", ".png", ".tif", ".tiff"), ".nii.gz, .nii, .nrrd, .png, .tif, .tiff"
    ),
    "result_dtype": Field(_enum("uint8", "int16", "uint16", "int32"), "uint8, int16, uint16, int32"),
    "result_compress": Field(_bool, "true/false"),
    # keys MONAI Label viewers send along (OHIF, Slicer): accepted and not used for segmentation
    "label_info": Field(_json_value(100_000), "viewer label metadata"),
    "largest_cc": Field(_bool, "true/false"),
    "restore_label_idx": Field(_bool, "true/false"),
    "client_id": Field(_text(200), "a string"),
}

TRAIN_FIELDS: dict[str, Field] = {
    "max_epochs": Field(_number(1, 100_000, integer=True), "an integer in [1, 100000]"),
    "max_steps": Field(_number(0, 10**9, integer=True), "an integer >= 0"),
    "iterations_per_epoch": Field(_number(0, 10**7, integer=True), "an integer >= 0"),
    "amp": Field(_amp, "true/false/bf16/fp16"),
    "device": Field(_device, "auto, cpu, cuda, cuda:N"),
    "world_size": Field(_number(1, 1024, integer=True), "an integer in [1, 1024]"),
    "multi_gpu": Field(_bool, "true/false"),
    "gpus": Field(_text(100), "all or a comma list of GPU ids"),
    "val_split": Field(_number(0.0, 1.0, lo_open=True, hi_open=True), "a number in (0, 1)"),
    "resplit": Field(_bool, "true/false"),
    "split_seed": Field(_number(0, 2**31 - 1, integer=True), "an integer >= 0"),
    "train_batch_size": Field(_number(1, 4096, integer=True), "an integer in [1, 4096]"),
    "val_batch_size": Field(_number(1, 4096, integer=True), "an integer in [1, 4096]"),
    "num_samples": Field(_number(1, 256, integer=True), "an integer in [1, 256]"),
    "pos_fraction": Field(_number(0.0, 1.0), "a number in [0, 1]"),
    "learning_rate": Field(_number(0.0, 10.0, lo_open=True), "a number in (0, 10]"),
    "grad_clip": Field(_number(0.0, None), "a number >= 0"),
    "dataset": Field(
        _enum("auto", "cachedataset", "dataset", "persistentdataset", "smartcachedataset"),
        "auto, CacheDataset, Dataset, PersistentDataset, SmartCacheDataset",
    ),
    "dataloader": Field(_enum("threaddataloader", "dataloader"), "ThreadDataLoader or DataLoader"),
    "tracking": Field(_enum("mlflow", "none", ""), "mlflow or none"),
    "pretrained": Field(_bool, "true/false"),
    "fold": Field(_number(0, 99, integer=True), "an integer in [0, 99]"),
    "nfolds": Field(_number(2, 100, integer=True), "an integer in [2, 100]"),
    "replan": Field(_bool, "true/false"),
    "resume": Field(_bool, "true/false"),
    "roi_size": Field(_size(8, 1024), "sizes in [8, 1024]"),
    "optimizer": Field(_enum("adam", "sgd"), "adam or sgd"),
    "loss": Field(_enum("ce_dice", "weighted_ce_dice"), "ce_dice or weighted_ce_dice"),
    "w0": Field(_number(0.0, None), "a number >= 0"),
    "sigma": Field(_number(0.0, None, lo_open=True), "a number > 0"),
    "val_interval": Field(_number(1, 10_000, integer=True), "an integer >= 1"),
    "early_stop_patience": Field(_number(-1, 10_000, integer=True), "an integer >= -1"),
    "name": Field(_text(100), "a task name"),
}


def parse_params(text: Any, what: str) -> dict[str, Any]:
    """The ``params`` form field (JSON text) or a JSON body as a dict; ConfError naming ``what`` otherwise."""
    if text is None or text == "":
        return {}
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8", errors="replace")
    if isinstance(text, str):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfError(f"{what}: not valid JSON ({e.msg} at character {e.pos})") from None
    else:
        value = text
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfError(f'{what}: expected a JSON object such as {{"tta": true}}, got {type(value).__name__}')
    return dict(value)


def check_params(
    params: Mapping[str, Any], fields: Mapping[str, Field], what: str, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """Check every key of ``params`` against ``fields``; ``extra`` keys are accepted unchecked (e.g. per-model)."""
    for key, value in params.items():
        if key in extra:
            continue
        field = fields.get(key)
        if field is None:
            raise ConfError(
                f"{what}: unknown parameter {str(key)[:60]!r}; allowed: {', '.join(sorted([*fields, *extra]))}"
            )
        field.check(key, value)
    return dict(params)


def check_info_size(params: Mapping[str, Any], limit: int = 100_000) -> dict[str, Any]:
    """Free-form upload ``params`` (stored as image/label info) bounded in size; ConfError otherwise."""
    if len(json.dumps(params)) > limit:
        raise ConfError(f"params: too long (over {limit:,} characters)")
    return dict(params)

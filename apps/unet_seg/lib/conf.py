"""The one place where MONAI Label ``--conf`` strings and request values are parsed.

``--conf`` values always arrive as strings (and reach training subprocesses through the
``MONAI_LABEL_APP_CONF`` environment variable as JSON); request fields arrive as JSON values
or strings. Everything that turns them into typed values lives here so that every model and
the CLI agree on the syntax:

* booleans: true/false/1/0/yes/no/on/off
* sizes: ``"96"`` (isotropic) or ``"96,96,64"``
* labels: ``"anterior,posterior"`` (values 1..N in order) or JSON ``{"anterior": 1, ...}``
* model lists: ``"unet3d,nnunet"`` or ``"all"``

A key may be given per model as ``<model>.<key>`` (e.g. ``unet3d.roi_size``); that wins over
the plain ``<key>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

TRUE_WORDS = {"true", "1", "yes", "on", "y", "t"}
FALSE_WORDS = {"false", "0", "no", "off", "n", "f", "none", ""}


class ConfError(ValueError):
    """A configuration or request value that cannot be understood (names the key)."""


def parse_bool(value: Any, key: str = "value") -> bool:
    """Parse a boolean given as bool/int/string."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfError(f"{key}: expected true/false, got {value!r}")


def parse_int(value: Any, key: str = "value", minimum: int | None = None) -> int:
    """Parse an integer (strings allowed), optionally with a lower bound."""
    try:
        out = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError as e:
        raise ConfError(f"{key}: expected an integer, got {value!r}") from e
    if minimum is not None and out < minimum:
        raise ConfError(f"{key}: must be >= {minimum}, got {out}")
    return out


def parse_float(value: Any, key: str = "value") -> float:
    """Parse a float (strings allowed)."""
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ConfError(f"{key}: expected a number, got {value!r}") from e


def parse_size(value: Any, dims: int, key: str = "roi_size") -> tuple[int, ...]:
    """Parse ``"96"``/``96`` (isotropic) or ``"96,96,64"``/``[96, 96, 64]`` into a dims-tuple."""
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").replace(" ", ",").split(",") if p]
    elif isinstance(value, Sequence):
        parts = list(value)
    else:
        parts = [value]
    sizes = [parse_int(p, key, minimum=1) for p in parts]
    if len(sizes) == 1:
        sizes = sizes * dims
    if len(sizes) != dims:
        raise ConfError(f"{key}: expected 1 or {dims} sizes, got {value!r}")
    return tuple(sizes)


def parse_labels(value: Any, key: str = "labels") -> dict[str, int]:
    """Parse label names into ``{name: value}`` with values 1..N in the given order.

    Accepts a comma list, a JSON list, or a JSON/dict mapping. Values are re-numbered
    1..N in order (background 0 is implicit and may be given as "background"). This keeps
    the served label values contiguous, which MONAI Label's viewers rely on.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{") or text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfError(f"{key}: invalid JSON {text!r}: {e}") from e
        else:
            value = [p.strip() for p in text.split(",") if p.strip()]
    if isinstance(value, Mapping):
        items = sorted(((str(k), parse_int(v, f"{key}.{k}")) for k, v in value.items()), key=lambda kv: kv[1])
        names = [k for k, v in items if v != 0 and k.lower() != "background"]
    elif isinstance(value, Sequence):
        names = [str(v) for v in value if str(v).lower() != "background"]
    else:
        raise ConfError(f"{key}: expected a list or mapping of label names, got {value!r}")
    if not names:
        raise ConfError(f"{key}: at least one foreground label is required")
    if len(set(names)) != len(names):
        raise ConfError(f"{key}: duplicate label names in {names}")
    return {name: i + 1 for i, name in enumerate(names)}


def parse_modalities(value: Any, key: str = "modalities") -> list[str]:
    """``"4"`` -> 4 unnamed channels; ``"flair,t1,t1c,t2"`` -> named channels."""
    text = str(value).strip()
    if text.isdigit():
        return [f"channel{i}" for i in range(parse_int(text, key, minimum=1))]
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise ConfError(f"{key}: give a channel count or comma-separated names, got {value!r}")
    return names


def parse_label_map(value: Any, key: str = "label_map") -> dict[int, int]:
    """Stored label value -> model label value, e.g. ``"255:1"`` or ``"255=1,128=2"``; empty/none -> {}."""
    if value is None or isinstance(value, dict):
        return {int(k): int(v) for k, v in (value or {}).items()}
    text = str(value).strip()
    if text.lower() in ("", "none"):
        return {}
    out: dict[int, int] = {}
    for part in text.split(","):
        pieces = part.replace("=", ":").split(":")
        if len(pieces) != 2:
            raise ConfError(f"{key}: expected pairs like '255:1', got {part!r}")
        try:
            src, dst = int(pieces[0]), int(pieces[1])
        except ValueError as e:
            raise ConfError(f"{key}: label values must be integers, got {part!r}") from e
        if src < 0 or dst < 0:
            raise ConfError(f"{key}: label values must be >= 0, got {part!r}")
        out[src] = dst
    return out


def parse_names(value: Any, valid: Sequence[str], key: str = "models") -> list[str]:
    """Parse a comma list of names (or ``all``) and check every name against ``valid``."""
    text = str(value).strip() if value is not None else "all"
    if text.lower() in ("", "all"):
        return list(valid)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ConfError(f"{key}: unknown name(s) {unknown}; valid names are: {', '.join(valid)} (or 'all')")
    return list(dict.fromkeys(names))


class AppConf:
    """Typed view over the app's string ``--conf`` dict, with per-model overrides."""

    def __init__(self, conf: Mapping[str, Any] | None = None) -> None:
        self.raw: dict[str, Any] = dict(conf or {})

    def get(self, key: str, default: Any = None, model: str | None = None) -> Any:
        """Raw value for ``key`` (``<model>.<key>`` first), else ``default``."""
        if model and f"{model}.{key}" in self.raw:
            return self.raw[f"{model}.{key}"]
        return self.raw.get(key, default)

    def bool(self, key: str, default: bool, model: str | None = None) -> bool:
        """Boolean conf value."""
        return parse_bool(self.get(key, default, model), key)

    def int(self, key: str, default: int, model: str | None = None, minimum: int | None = None) -> int:
        """Integer conf value."""
        return parse_int(self.get(key, default, model), key, minimum)

    def float(self, key: str, default: float, model: str | None = None) -> float:
        """Float conf value."""
        return parse_float(self.get(key, default, model), key)

    def dropout(self, model: str | None = None) -> float:
        """``dropout`` conf value: a rate in [0, 1) (default 0: none; > 0 also lets MC dropout use the trained rate)."""
        rate = self.float("dropout", 0.0, model)
        if not 0.0 <= rate < 1.0:
            raise ConfError(f"{model + '.' if model else ''}dropout must be in [0, 1), got {rate}")
        return rate

    def str(self, key: str, default: str, model: str | None = None) -> str:
        """String conf value."""
        return str(self.get(key, default, model))

    def size(self, key: str, default: Any, dims: int, model: str | None = None) -> tuple[int, ...]:
        """Spatial size conf value."""
        return parse_size(self.get(key, default, model), dims, key)

    def labels(self, default: Any, model: str | None = None) -> dict[str, int]:
        """Label names conf value (values 1..N)."""
        return parse_labels(self.get("labels", default, model), "labels")

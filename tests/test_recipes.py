"""Tests of lib.recipes: every default is written once, README.md's conf tables agree with it, and
the configs and trainers start from it."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

from conftest import APP_DIR, ROOT
from lib.recipes import (
    CONF,
    FIXED,
    LIFECYCLE,
    RECIPES,
    REQUEST,
    NnUNetRecipe,
    UNet2DRecipe,
    UNet3DRecipe,
    readme_defaults,
    recipe_for,
)

README = ROOT / "README.md"
GENERAL = "general"
FIRST_HEADING = "### Configuration (`--conf key value`)"
LAST_HEADING = "### Training request fields"


# --------------------------------------------------------------------------------------------------
# README parsing
# --------------------------------------------------------------------------------------------------


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _row_defaults(key_cell: str, default_cell: str) -> dict[str, str]:
    """``{key: default}`` of one table row; a row may name several keys (``a``, ``b`` | 1, 2)."""
    keys = re.findall(r"`([^`]+)`", key_cell)
    if len(keys) <= 1:
        return {k: default_cell for k in keys}
    parts = [p.strip() for p in re.split(r",\s+", default_cell)]
    if len(parts) == len(keys):
        return dict(zip(keys, parts, strict=True))
    if len(parts) == 1:
        return {k: parts[0] for k in keys}
    raise AssertionError(f"README row {key_cell!r}: {len(keys)} keys but defaults {default_cell!r}")


def readme_conf_tables(text: str) -> dict[str, dict[str, str]]:
    """``{section: {key: default cell}}`` of the conf tables from FIRST_HEADING up to LAST_HEADING.

    The first section is ``general``; a model subsection is named by each backticked config name in
    its heading (``### nnU-Net (`nnunet`, `nnunet2d`)`` gives both).
    """
    start = text.index(FIRST_HEADING)
    end = text.index(LAST_HEADING, start)
    tables: dict[str, dict[str, str]] = {}
    names = [GENERAL]
    for line in text[start:end].splitlines():
        if line.startswith("### "):
            names = [GENERAL] if line.startswith(FIRST_HEADING) else re.findall(r"`([^`]+)`", line)
            continue
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = _cells(line)
        if len(cells) < 3 or cells[1] == "default":
            continue
        for name in names:
            tables.setdefault(name, {}).update(_row_defaults(cells[0], cells[1]))
    return tables


def documented_defaults(tables: dict[str, dict[str, str]], config: str) -> dict[str, str]:
    """What the README says a config's defaults are: the general table, overridden by the model's subsection."""
    return {**tables[GENERAL], **tables.get(config, {})}


def same_default(cell: str, value: object) -> bool:
    """Whether a README default cell (``128``, `` `RAS` ``, ``2e-4``, ``false``) states ``value``."""
    text = cell.strip().strip("`").strip()
    if value is None:
        return text in ("–", "-", "none", "")
    if isinstance(value, bool):
        return text.lower() == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return float(text) == pytest.approx(float(value))
        except ValueError:
            return False
    return text == str(value)


@pytest.fixture(scope="module")
def tables() -> dict[str, dict[str, str]]:
    return readme_conf_tables(README.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# README <-> recipes
# --------------------------------------------------------------------------------------------------


def test_readme_parser_reads_every_conf_table(tables: dict[str, dict[str, str]]) -> None:
    assert {GENERAL, "unet2d", "nnunet", "nnunet2d"} <= set(tables)
    assert tables[GENERAL]["roi_size"] == "`128`" and tables["unet2d"]["roi_size"] == "`256`"
    assert tables[GENERAL]["learning_rate"] == "2e-4"  # split out of a three-key row
    assert tables["nnunet2d"] == tables["nnunet"]


@pytest.mark.parametrize("config", sorted(RECIPES))
def test_readme_documents_every_recipe_conf_default(tables: dict[str, dict[str, str]], config: str) -> None:
    documented = documented_defaults(tables, config)
    pairs = readme_defaults(recipe_for(config))
    assert pairs, f"{config}: the recipe has no conf keys"
    missing = [key for key, _ in pairs if key not in documented]
    assert not missing, f"README.md does not document {config}'s conf key(s) {missing}"
    wrong = {key: (documented[key], value) for key, value in pairs if not same_default(documented[key], value)}
    assert not wrong, f"README.md and lib/recipes.py disagree on {config} defaults (README, recipe): {wrong}"


def test_readme_documents_the_model_store_defaults(tables: dict[str, dict[str, str]]) -> None:
    documented = tables[GENERAL]
    for key, value in readme_defaults(LIFECYCLE):
        assert key in documented and same_default(documented[key], value), (key, documented.get(key), value)


def test_readme_nnunet_schedules_match_the_recipe(tables: dict[str, dict[str, str]]) -> None:
    text = README.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `schedule` |"))
    meaning = _cells(row)[2]
    r = recipe_for("nnunet")
    assert f"`fast` = {r.fast_schedule[0]} epochs x {r.fast_schedule[1]} iterations" in meaning
    assert f"{r.nnunet_schedule[0]} x {r.nnunet_schedule[1]}" in meaning


def test_same_default_is_strict() -> None:
    assert same_default("2e-4", 0.0002) and not same_default("2e-4", 0.0003)
    assert same_default("`false`", False) and not same_default("`true`", False)
    assert same_default("`anterior,posterior`", "anterior,posterior") and not same_default(
        "`cell`", "anterior,posterior"
    )
    assert same_default("8", 8.0) and same_default("–", None)


def test_a_default_changed_in_one_place_only_is_caught(tables: dict[str, dict[str, str]]) -> None:
    changed = dataclasses.replace(recipe_for("unet3d"), learning_rate=1e-3)
    documented = documented_defaults(tables, "unet3d")
    assert not all(same_default(documented[k], v) for k, v in readme_defaults(changed))
    edited = README.read_text(encoding="utf-8").replace("| 50, 2e-4, 2 |", "| 50, 3e-4, 2 |")
    documented = documented_defaults(readme_conf_tables(edited), "unet3d")
    assert not all(same_default(documented[k], v) for k, v in readme_defaults(recipe_for("unet3d")))


# --------------------------------------------------------------------------------------------------
# the recipes themselves
# --------------------------------------------------------------------------------------------------


def test_recipes_are_frozen_documented_and_typed() -> None:
    assert set(RECIPES) == {"unet3d", "unet2d", "nnunet", "nnunet2d"}
    assert isinstance(RECIPES["unet3d"], UNet3DRecipe) and isinstance(RECIPES["unet2d"], UNet2DRecipe)
    assert isinstance(RECIPES["nnunet"], NnUNetRecipe) and RECIPES["nnunet"].dims == 3 and RECIPES["nnunet2d"].dims == 2
    for recipe in RECIPES.values():
        with pytest.raises(dataclasses.FrozenInstanceError):
            recipe.labels = "x"  # type: ignore[misc]
        assert all(f.metadata.get("kind") in (CONF, REQUEST, FIXED) for f in dataclasses.fields(recipe))
    with pytest.raises(KeyError, match="no recipe for config 'nope'"):
        recipe_for("nope")
    # a docstring under every field
    tree = ast.parse((APP_DIR / "lib" / "recipes.py").read_text(encoding="utf-8"))
    assert ast.get_docstring(tree)
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Recipe")):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                nxt = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant), (
                    f"{cls.name}.{node.target.id}: no docstring"
                )


def test_recipes_import_nothing_that_builds_on_them() -> None:
    tree = ast.parse((APP_DIR / "lib" / "recipes.py").read_text(encoding="utf-8"))
    modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in modules if re.search(r"(^|\.)(configs|trainers|infers)(\.|$)", m)], modules


# --------------------------------------------------------------------------------------------------
# configs and trainers start from the recipe
# --------------------------------------------------------------------------------------------------


def _config(name: str, tmp_path: Path):
    from lib.configs import load_config_class

    cfg = load_config_class(name)()
    cfg.init(name, str(tmp_path / "model"), {}, None)
    return cfg


def test_configs_and_trainers_take_their_defaults_from_the_recipe(tmp_path: Path) -> None:
    r3 = recipe_for("unet3d")
    c3 = _config("unet3d", tmp_path)
    assert c3.roi_size == (r3.roi_size,) * 3 and c3.preset == r3.preset and c3.orientation == r3.orientation
    assert list(c3.labels) == r3.labels.split(",") and c3.cache_mb == r3.cache_mb and c3.tracking == r3.tracking
    assert c3.train_defaults == {
        "max_epochs": r3.max_epochs,
        "learning_rate": r3.learning_rate,
        "train_batch_size": r3.train_batch_size,
    }
    t3 = c3.trainer()._config
    assert (t3["num_samples"], t3["pos_fraction"], t3["learning_rate"]) == (
        r3.num_samples,
        r3.pos_fraction,
        r3.learning_rate,
    )

    r2 = recipe_for("unet2d")
    c2 = _config("unet2d", tmp_path)
    assert c2.roi_size == (r2.roi_size,) * 2 and c2.slice_axis == r2.slice_axis and c2.label_map == {255: 1}
    assert c2.spec.padding == r2.padding and c2.spec.batch_norm == r2.batch_norm
    assert c2.train_defaults == {
        "max_epochs": r2.max_epochs,
        "learning_rate": r2.learning_rate,
        "train_batch_size": r2.train_batch_size,
        "optimizer": r2.optimizer,
        "loss": r2.loss,
    }
    t2 = c2.trainer()._config
    assert {k: t2[k] for k in ("num_samples", "pos_fraction", "w0", "sigma")} == {
        "num_samples": r2.num_samples,
        "pos_fraction": r2.pos_fraction,
        "w0": r2.w0,
        "sigma": r2.sigma,
    }

    for name in ("nnunet", "nnunet2d"):
        rn = recipe_for(name)
        cn = _config(name, tmp_path / name)
        assert cn.dims == rn.dims and cn.kinds == [rn.modality] and cn.gpu_memory_gb == rn.gpu_memory_gb
        assert (cn.max_epochs, cn.iterations) == rn.schedules()[rn.schedule]
        tn = cn.trainer()._config
        assert {k: tn[k] for k in ("learning_rate", "grad_clip", "replan", "train_batch_size", "pos_fraction")} == {
            "learning_rate": rn.learning_rate,
            "grad_clip": rn.grad_clip,
            "replan": rn.replan,
            "train_batch_size": rn.train_batch_size,
            "pos_fraction": rn.pos_fraction,
        }

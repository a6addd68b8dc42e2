"""Model configs: one TaskConfig per model family; the file name is the config name."""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
from typing import Any

from monailabel.interfaces.config import TaskConfig

from ..checkpoints import CheckpointMeta, MetaError, is_nnunet_source
from ..conf import AppConf, ConfError
from ..modelstore import ModelStore
from ..recipes import CONFIG_NAMES, LIFECYCLE  # noqa: F401  (CONFIG_NAMES re-exported)

logger = logging.getLogger(__name__)


def load_config_class(name: str) -> type[TaskConfig]:
    """The TaskConfig subclass defined in lib/configs/<name>.py."""
    if name not in CONFIG_NAMES:
        raise ValueError(f"unknown model config {name!r}; valid names are: {', '.join(CONFIG_NAMES)}")
    module = importlib.import_module(f"{__name__}.{name}")
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if issubclass(cls, TaskConfig) and cls is not TaskConfig and cls.__module__ == module.__name__:
            return cls
    raise ImportError(f"lib/configs/{name}.py defines no TaskConfig subclass")


def lifecycle(
    conf: dict[str, str], name: str, model_dir: str, pretrained: str | None, nnunet_sources: bool = False
) -> tuple[ModelStore, dict[str, Any]]:
    """The model's store (legacy files and the ``pretrained`` file imported) and the trainer's promotion settings.

    Conf keys (plain or ``<model>.``-prefixed): ``keep_versions`` (5), ``promotion``
    (gate / always / never; default gate) and ``promotion_margin`` (0.01). A ``pretrained``
    folder or zip is an nnU-Net model: left to configs that import those (``nnunet_sources``).
    """
    c = AppConf(conf)
    store = ModelStore(model_dir, name, keep=c.int("keep_versions", LIFECYCLE.keep_versions, model=name, minimum=1))
    store.import_legacy()
    if pretrained and is_nnunet_source(pretrained):
        if not nnunet_sources:
            raise ConfError(
                f"{name}.pretrained {os.path.basename(pretrained)}: a folder or zip (an nnU-Net model?) is served by "
                "the nnunet and nnunet2d configs only; give this model a unet_seg model file"
            )
    elif pretrained and os.path.exists(pretrained) and store.serving() is None:
        try:
            store.import_file(pretrained, source="imported", serve=True)
        except (MetaError, OSError, RuntimeError) as e:
            raise ConfError(f"{name}.pretrained {os.path.basename(pretrained)}: {e}") from e
    promotion = {
        "promotion": c.str("promotion", LIFECYCLE.promotion, model=name).lower(),
        "promotion_margin": c.float("promotion_margin", LIFECYCLE.promotion_margin, model=name),
    }
    return store, promotion


def conf_from_meta(name: str, meta: CheckpointMeta) -> dict[str, str]:
    """Conf that makes config ``name`` match a model file: labels and channels, plus what the config adds."""
    conf = {"labels": json.dumps(meta.labels), "modalities": str(meta.in_channels)}
    own = getattr(load_config_class(name), "conf_from_meta", None)
    if own is not None:
        conf.update(own(meta))
    return conf


class SegConfig(TaskConfig):
    """What every model's config reads the same way: pretrained file, tracking, cache budget, store, promotion."""

    #: spatial dimensions of the network (2D models also take volumes, slice by slice)
    dims = 3
    #: whether ``pretrained`` may name an nnU-Net results folder or export zip (the config imports it)
    nnunet_sources = False

    def init_shared(self, conf: dict[str, str], name: str, model_dir: str, recipe: Any) -> None:
        """Read the shared keys (defaults from the model's recipe) and open the model's store."""
        c = AppConf(conf)
        pretrained = c.get("pretrained", None, model=name)
        self.pretrained = os.path.abspath(pretrained) if pretrained else None
        if self.pretrained and not os.path.exists(self.pretrained):
            logger.warning(
                f"{name}.pretrained {self.pretrained} does not exist; the model stays not ready until trained"
            )
        self.tracking = c.str("tracking", recipe.tracking, model=name)
        self.cache_mb = c.int("cache_mb", recipe.cache_mb, model=name, minimum=0)
        self.store, self.promotion = lifecycle(conf, name, model_dir, self.pretrained, self.nnunet_sources)

    def _common(self) -> dict[str, Any]:
        """Constructor arguments the model's inferer and trainer share."""
        return {"model_name": self.name, "store": self.store, "labels": self.labels, "modality_names": self.modalities}

    def _train_common(self) -> dict[str, Any]:
        """Constructor arguments every trainer takes."""
        return {"tracking": self.tracking, "cache_mb": self.cache_mb, **self.promotion}

"""Model configs: one TaskConfig per model family; the file name is the config name."""

from __future__ import annotations

import importlib
import inspect

from monailabel.interfaces.config import TaskConfig

# Config names the app knows, in the order /info lists them. A name maps to lib/configs/<name>.py.
CONFIG_NAMES: tuple[str, ...] = ("unet2d", "unet3d", "nnunet", "nnunet2d")


def load_config_class(name: str) -> type[TaskConfig]:
    """The TaskConfig subclass defined in lib/configs/<name>.py."""
    if name not in CONFIG_NAMES:
        raise ValueError(f"unknown model config {name!r}; valid names are: {', '.join(CONFIG_NAMES)}")
    module = importlib.import_module(f"{__name__}.{name}")
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if issubclass(cls, TaskConfig) and cls is not TaskConfig and cls.__module__ == module.__name__:
            return cls
    raise ImportError(f"lib/configs/{name}.py defines no TaskConfig subclass")

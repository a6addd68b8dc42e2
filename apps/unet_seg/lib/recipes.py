"""The recipe card of every model family: each default written once, as a frozen dataclass.

A recipe holds the numbers and names a config starts from before ``--conf`` or a training request
overrides them: label names, channels, window size, network preset, schedule, learning rate, crop
sampling, loss. ``lib/configs/*`` (``--conf`` parsing) and ``lib/trainers/*`` (training request
fallbacks) read their defaults from here; README.md's conf tables document the same values and
``tests/test_recipes.py`` checks that they agree.

Every field is one of three kinds (the ``kind`` entry of its dataclass field metadata):

* ``conf``     a ``--conf`` key the config reads (and README.md documents in its conf tables);
* ``request``  a training-request field whose default the trainer fills in (not a ``--conf`` key);
* ``fixed``    a constant of the recipe that neither overrides (e.g. the optimizers' own learning rates).

This module imports nothing from ``lib.configs``, ``lib.trainers`` or ``lib.infers``: they build on
it, never the other way round.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

CONF = "conf"
REQUEST = "request"
FIXED = "fixed"


def _conf(default: Any, readme: str | None = None) -> Any:
    """A ``--conf`` key; ``readme`` is how the README writes the default when it is not the value itself."""
    return field(default=default, metadata={"kind": CONF, "readme": readme})


def _request(default: Any) -> Any:
    """A training-request default (not a ``--conf`` key)."""
    return field(default=default, metadata={"kind": REQUEST})


def _fixed(default: Any) -> Any:
    """A constant of the recipe."""
    return field(default=default, metadata={"kind": FIXED})


# Config names the app knows, in the order /info lists them. A name maps to lib/configs/<name>.py.
CONFIG_NAMES: tuple[str, ...] = ("unet2d", "unet3d", "nnunet", "nnunet2d")


@dataclass(frozen=True)
class UNet3DRecipe:
    """NVIDIA UNet_3D_Medical (3D U-Net with the No New-Net changes); fits the embedded MSD hippocampus sample."""

    labels: str = _conf("anterior,posterior")
    """Label names, served values 1..N in this order."""
    modalities: str = _conf("1")
    """Input channels: a count (``4``) or names (``flair,t1,t1c,t2``)."""
    preset: str = _conf("full")
    """Network size: ``full`` (32 -> 320 filters, 5 levels), ``small``, ``tiny``."""
    roi_size: int = _conf(128)
    """Training crop and inference window edge (isotropic), a multiple of 2^(levels-1)."""
    orientation: str = _conf("RAS")
    """Axcodes images are reoriented to (``none`` keeps the file's)."""
    tracking: str = _conf("mlflow")
    """Experiment tracking: ``mlflow`` or ``none``."""
    max_epochs: int = _conf(50)
    """Training epochs."""
    learning_rate: float = _conf(2e-4)
    """Adam learning rate."""
    train_batch_size: int = _conf(2)
    """Studies per training batch."""
    cache_mb: int = _conf(2048)
    """``dataset: auto`` caches decoded studies only when they fit this budget (MB)."""
    num_samples: int = _request(2)
    """Random crops drawn per study per epoch."""
    pos_fraction: float = _request(0.5)
    """Share of crops centred on foreground."""


@dataclass(frozen=True)
class UNet2DRecipe:
    """The original U-Net (Ronneberger 2015; NVIDIA UNet_Medical on ISBI 2012 EM), 2D images and volume slices."""

    labels: str = _conf("cell")
    """Label names, served values 1..N in this order (ISBI 2012: the cell interior)."""
    label_map: str = _conf("255:1")
    """Stored value -> label value for training labels (``none`` disables)."""
    modalities: str = _conf("1")
    """Input channels: a count (``3`` for RGB) or names."""
    preset: str = _conf("full")
    """Network size: ``full`` (the paper: 64 -> 1024 filters, 4 poolings), ``small``, ``tiny``."""
    padding: str = _conf("same")
    """``same``, or ``valid`` (the paper's unpadded convolutions with overlap-tile mirroring)."""
    batch_norm: bool = _conf(False)
    """Batch normalisation after every convolution (not in the paper)."""
    roi_size: int = _conf(256)
    """Training and inference window edge, a multiple of 2^depth."""
    slice_axis: int = _conf(2)
    """Array axis volumes are cut along (NIfTI: the third axis; TIFF stacks: the pages)."""
    tracking: str = _conf("mlflow")
    """Experiment tracking: ``mlflow`` or ``none``."""
    max_epochs: int = _conf(50)
    """Training epochs."""
    learning_rate: float = _conf(0.0)
    """Learning rate; 0 means the optimizer's own (``adam_learning_rate`` / ``sgd_learning_rate``)."""
    train_batch_size: int = _conf(4)
    """Windows per training batch."""
    optimizer: str = _conf("adam")
    """``adam`` (NVIDIA's reference) or ``sgd`` (the paper: momentum 0.99)."""
    loss: str = _conf("ce_dice")
    """``ce_dice`` (cross-entropy + soft Dice) or ``weighted_ce_dice`` (the paper's border-weighted CE + Dice)."""
    cache_mb: int = _conf(2048)
    """``dataset: auto`` caches decoded studies only when they fit this budget (MB)."""
    num_samples: int = _request(2)
    """Random windows drawn per sample."""
    pos_fraction: float = _request(0.5)
    """Share of slices and windows centred on foreground."""
    w0: float = _request(10.0)
    """Border weight amplitude of ``weighted_ce_dice`` (the paper's w0)."""
    sigma: float = _request(5.0)
    """Border weight width in pixels of ``weighted_ce_dice`` (the paper's sigma)."""
    adam_learning_rate: float = _fixed(1e-4)
    """Adam's learning rate when ``learning_rate`` is 0."""
    sgd_learning_rate: float = _fixed(0.01)
    """SGD's learning rate when ``learning_rate`` is 0."""

    def optimizer_learning_rates(self) -> dict[str, float]:
        """Optimizer name -> its own learning rate (used when ``learning_rate`` is 0)."""
        return {"adam": self.adam_learning_rate, "sgd": self.sgd_learning_rate}


@dataclass(frozen=True)
class NnUNetRecipe:
    """Self-configuring nnU-Net (planned from the labelled studies); ``dims`` 3 for ``nnunet``, 2 for ``nnunet2d``."""

    dims: int = _fixed(3)
    """Spatial dimensions of the plan and network (2: trained and run slice by slice)."""
    labels: str = _conf("anterior,posterior")
    """Label names, served values 1..N in this order."""
    modalities: str = _conf("1")
    """Input channels: a count or names."""
    modality: str = _conf("MRI")
    """``MRI`` (per-image z-score) or ``CT`` (clip + dataset z-score); once or per channel."""
    schedule: str = _conf("fast")
    """``fast`` (``fast_schedule``) or ``nnunet`` (``nnunet_schedule``)."""
    gpu_memory_gb: float = _conf(8.0)
    """Memory budget the plan's patch and batch are sized for (nnU-Net's reference)."""
    base_filters: int = _conf(0, readme="nnU-Net's")
    """Filters of the first stage; 0 keeps the planner's (nnU-Net's 32)."""
    max_filters: int = _conf(0, readme="nnU-Net's")
    """Filter cap; 0 keeps the planner's (nnU-Net's 320 in 3D, 512 in 2D)."""
    max_patch_voxels: int = _conf(0, readme="nnU-Net's")
    """Initial patch budget in voxels; 0 keeps the planner's (256^3 in 3D, 2048^2 in 2D)."""
    tracking: str = _conf("mlflow")
    """Experiment tracking: ``mlflow`` or ``none``."""
    cache_mb: int = _conf(2048)
    """``dataset: auto`` caches decoded studies only when they fit this budget (MB)."""
    fast_schedule: tuple[int, int] = _fixed((50, 50))
    """(epochs, iterations per epoch) of the ``fast`` schedule (interactive use)."""
    nnunet_schedule: tuple[int, int] = _fixed((1000, 250))
    """(epochs, iterations per epoch) of the ``nnunet`` schedule (nnU-Net's own)."""
    learning_rate: float = _request(0.01)
    """Initial SGD learning rate (poly(0.9) decay per epoch)."""
    grad_clip: float = _request(12.0)
    """Gradient-norm clipping."""
    replan: bool = _request(False)
    """Fingerprint and plan again instead of reusing the saved plan."""
    train_batch_size: int = _request(0)
    """Batch size; 0 takes the plan's."""
    pos_fraction: float = _request(1 / 3)
    """Share of patches centred on foreground (nnU-Net's 33 % oversampling)."""

    def schedules(self) -> dict[str, tuple[int, int]]:
        """Schedule name -> (epochs, iterations per epoch)."""
        return {"fast": self.fast_schedule, "nnunet": self.nnunet_schedule}


Recipe = UNet3DRecipe | UNet2DRecipe | NnUNetRecipe


@dataclass(frozen=True)
class LifecycleRecipe:
    """Model store and promotion defaults, the same for every model (``lib.configs.lifecycle``)."""

    keep_versions: int = _conf(5)
    """Versions kept per model besides the serving one, pinned ones and each fold's newest."""
    promotion: str = _conf("gate")
    """What a finished training does with its version: gate, always or never."""
    promotion_margin: float = _conf(0.01)
    """How much lower than the serving version's validation Dice a candidate may be and still serve."""


LIFECYCLE = LifecycleRecipe()
UNET3D = UNet3DRecipe()
UNET2D = UNet2DRecipe()
NNUNET = NnUNetRecipe()
NNUNET_2D = NnUNetRecipe(dims=2)

RECIPES: dict[str, Recipe] = {"unet3d": UNET3D, "unet2d": UNET2D, "nnunet": NNUNET, "nnunet2d": NNUNET_2D}
"""Config name (= file name in ``lib/configs``) -> its recipe."""


def recipe_for(name: str) -> Recipe:
    """The recipe of config ``name``; an unknown name raises ``KeyError`` listing the known ones."""
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"no recipe for config {name!r}; known: {', '.join(RECIPES)}") from None


def readme_defaults(recipe: Recipe) -> list[tuple[str, Any]]:
    """``(key, default)`` of every ``--conf`` key README.md documents for this recipe, in field order.

    The default is the value itself, or the README's wording where the value is a sentinel
    (``0`` = "nnU-Net's").
    """
    out = []
    for f in dataclasses.fields(recipe):
        if f.metadata.get("kind") == CONF:
            readme = f.metadata.get("readme")
            out.append((f.name, readme if readme is not None else getattr(recipe, f.name)))
    return out

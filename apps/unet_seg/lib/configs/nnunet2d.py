"""nnU-Net 2D recipe card: the same self-configuring recipe with a 2D plan, trained and run slice by slice.

Conf keys as for ``nnunet`` (prefix ``nnunet2d.`` to set them for this model only).
"""

from __future__ import annotations

from ..recipes import NNUNET_2D, NnUNetRecipe
from .nnunet import NnUNet


class NnUNet2D(NnUNet):
    """TaskConfig registering the 2D nnU-Net inferer and trainer."""

    recipe: NnUNetRecipe = NNUNET_2D
    dims = NNUNET_2D.dims

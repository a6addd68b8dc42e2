"""UNetSegLib: the Slicer module's pure-Python part (no slicer/qt imports): REST client and helpers."""

from .client import ServerError, UNetSegClient, parse_multipart

__all__ = ["ServerError", "UNetSegClient", "parse_multipart"]
from .labelmap import colour_table, label_info, remap  # noqa: E402

__all__ += ["colour_table", "label_info", "remap"]

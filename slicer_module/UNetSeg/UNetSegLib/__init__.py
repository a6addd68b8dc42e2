"""UNetSegLib: the Slicer module's pure-Python part (no slicer/qt imports): REST client and helpers."""

from .client import (
    REFRESH_MARGIN_S,
    ServerError,
    UNetSegClient,
    check_id,
    declared_modalities,
    model_modalities,
    model_versions,
    parse_multipart,
    sha256_of,
    token_expiry,
)
from .labelmap import colour_table, label_info, remap

__all__ = [
    "REFRESH_MARGIN_S",
    "ServerError",
    "UNetSegClient",
    "check_id",
    "colour_table",
    "declared_modalities",
    "label_info",
    "model_modalities",
    "model_versions",
    "parse_multipart",
    "remap",
    "sha256_of",
    "token_expiry",
]

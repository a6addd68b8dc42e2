"""Checks on images and labels that every entry point shares (server uploads, /infer, training, CLI).

Pure functions over file headers and arrays; they raise ``InputError`` (or ``TooLarge`` for
limits) with a message that names what was wrong, and know nothing about HTTP:

* ``probe_file``   format from the file name, shape and data type from the HEADER only, so a
                   decompression bomb or an absurd header is refused before any voxel is decoded
* ``check_image``  real numeric data type, finite voxels (counts NaN and Inf), finite and
                   invertible affine, no empty axis
* ``check_label``  integer-valued finite values within the allowed set, the image's shape, an
                   affine within a tolerance of the image's (offset named in mm), not constant
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Formats the models can read, by file-name suffix (longest first so ".nii.gz" wins over ".gz").
FORMATS: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".tif": "tiff",
    ".tiff": "tiff",
}


class InputError(ValueError):
    """Bad user input (file, shape, channels, values, geometry); the message names what was wrong."""


class TooLarge(InputError):
    """Input over a configured limit (bytes or voxels)."""


@dataclass(frozen=True)
class FileHeader:
    """What a file's header says, read without decoding its voxels."""

    format: str
    suffix: str
    shape: tuple[int, ...]
    dtype: np.dtype | None
    affine: np.ndarray | None = None

    @property
    def voxels(self) -> int:
        return int(np.prod([int(s) for s in self.shape], dtype=object)) if self.shape else 0


def file_suffix(name: str) -> str:
    """The supported format suffix of ``name`` (lower case), or InputError naming the formats."""
    lower = name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if lower.endswith(suffix):
            return suffix
    tail = os.path.basename(name)[-40:]
    raise InputError(f"unsupported file format ({tail!r}); supported formats: {', '.join(FORMATS)}")


def _gzip_ok_prefix(path: str) -> None:
    """Fail early with 'cannot be read' on a .gz file that is not gzip at all."""
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != b"\x1f\x8b":
        raise InputError("cannot be read: not a gzip-compressed file (wrong magic bytes)")


_verified: dict[tuple[str, int, int], bool] = {}


def verify_gzip(path: str, max_bytes: int | None = None) -> None:
    """Decompress a .gz file to its end so its CRC and length are checked (nibabel stops reading early).

    Stops with InputError once more than ``max_bytes`` come out (a stream longer than its header
    declares). Results are cached by (path, mtime, size), so a stored study is verified once.
    """
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key in _verified:
        return
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(4 * 1024 * 1024):
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise InputError(
                        f"cannot be read: the compressed stream holds more than {max_bytes:,} bytes, "
                        f"more than its header declares"
                    )
    except InputError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(
            f"cannot be read: the gzip data is truncated or corrupt ({type(e).__name__}: {_short(e)})"
        ) from e
    if len(_verified) > 10_000:
        _verified.clear()
    _verified[key] = True


def nifti_bytes(header: FileHeader, offset: int = 0) -> int:
    """Bytes a NIfTI file's data block should decompress to (header, extensions and voxels), with slack."""
    itemsize = header.dtype.itemsize if header.dtype is not None else 8
    return offset + header.voxels * itemsize + 1024 * 1024


def probe_file(path: str, name: str, max_voxels: int | None = None) -> FileHeader:
    """Read only the header of ``path`` (a file called ``name`` by the client) and check the voxel limit.

    Raises ``InputError`` ("cannot be read ...") for a file whose header cannot be parsed and
    ``TooLarge`` when the header declares more than ``max_voxels`` voxels (channels included).
    """
    suffix = file_suffix(name)
    fmt = FORMATS[suffix]
    if os.path.getsize(path) == 0:
        raise InputError("cannot be read: the file is empty (0 bytes)")
    try:
        if fmt == "nifti":
            import nibabel as nib

            if suffix == ".nii.gz":
                _gzip_ok_prefix(path)
            img = nib.load(path)
            header = FileHeader(
                fmt, suffix, tuple(int(s) for s in img.shape), img.get_data_dtype(), np.asarray(img.affine)
            )
            vox_offset = int(img.header.get("vox_offset", 0) or 0)
        elif fmt == "nrrd":
            import nrrd

            hdr = nrrd.read_header(path)
            header = FileHeader(fmt, suffix, tuple(int(s) for s in hdr["sizes"]), None)
        elif fmt in ("png", "jpeg"):
            from PIL import Image

            with Image.open(path) as im:
                bands = len(im.getbands())
                header = FileHeader(fmt, suffix, (im.size[1], im.size[0]) + ((bands,) if bands > 1 else ()), None)
        else:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                header = FileHeader(fmt, suffix, tuple(int(s) for s in series.shape), np.dtype(series.dtype))
    except InputError:
        raise
    except (Exception, zlib.error, gzip.BadGzipFile) as e:  # noqa: B014 - readers raise anything
        raise InputError(f"cannot be read: not a valid {fmt} file ({type(e).__name__}: {_short(e)})") from e
    if any(s < 0 for s in header.shape):
        raise InputError(f"cannot be read: the header declares negative dimensions {header.shape}")
    if max_voxels is not None and header.voxels > max_voxels:
        raise TooLarge(
            f"too many voxels: the header declares shape {header.shape} = {header.voxels:,} voxels, "
            f"over the server's limit of {max_voxels:,} voxels (conf max_voxels)"
        )
    if suffix == ".nii.gz":
        verify_gzip(path, nifti_bytes(header, vox_offset))
    return header


def _short(e: BaseException, limit: int = 160) -> str:
    """An exception's text without file paths, cut to ``limit`` characters."""
    text = str(e)
    for token in text.split():
        if token.strip("'\"(),:").startswith("/"):
            text = text.replace(token, os.path.basename(token.strip("'\"(),:")) or "<file>")
    return text[:limit]


def read_voxels(path: str, header: FileHeader) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode every voxel of a probed file (catches truncated and corrupt data): (array, affine or None)."""
    try:
        if header.format == "nifti":
            import nibabel as nib

            img = nib.load(path)
            return np.asanyarray(img.dataobj), np.asarray(img.affine)
        from monai.transforms import LoadImage

        return np.asarray(LoadImage(image_only=True)(path)), None
    except (Exception, zlib.error) as e:  # noqa: B014
        raise InputError(f"cannot be read: the data is truncated or corrupt ({type(e).__name__}: {_short(e)})") from e


def check_dtype(arr: np.ndarray, what: str) -> None:
    """Real numbers only: no complex, no RGB/structured records, no strings or objects."""
    if arr.dtype.names is not None or arr.dtype.kind not in "biuf":
        kind = "complex" if arr.dtype.kind == "c" else ("RGB/structured" if arr.dtype.names else arr.dtype.kind)
        raise InputError(
            f"{what} has an unsupported data type {arr.dtype} ({kind}); expected real numbers "
            f"(integer or floating point)"
        )


def count_non_finite(arr: np.ndarray) -> tuple[int, int]:
    """(NaN count, Inf count) of a floating array (0, 0 for integers)."""
    if arr.dtype.kind != "f":
        return 0, 0
    nan = int(np.count_nonzero(np.isnan(arr)))
    inf = int(np.count_nonzero(np.isinf(arr)))
    return nan, inf


def check_finite(arr: np.ndarray, what: str) -> None:
    nan, inf = count_non_finite(arr)
    if nan or inf:
        parts = [f"{n:,} {kind} voxel{'s' if n != 1 else ''}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n]
        raise InputError(
            f"{what} has non-finite values: {' and '.join(parts)} of {arr.size:,}; every voxel must be a finite number"
        )


def check_affine(affine: Any, what: str) -> None:
    """A finite affine whose 3x3 part is invertible (voxel -> world must be a real mapping)."""
    if affine is None:
        return
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise InputError(f"{what} has an invalid affine (non-finite values): {np.array2string(a, precision=3)}")
    lin = a[:3, :3]
    scale = max(float(np.abs(lin).max()), 1e-12)
    if abs(float(np.linalg.det(lin / scale))) < 1e-9:
        raise InputError(
            f"{what} has a singular affine (voxel axes are degenerate: zero spacing or collinear "
            f"directions), so it has no geometry"
        )


def check_image(arr: np.ndarray, affine: Any, what: str = "image") -> None:
    """Data type, finite values, non-empty axes and affine of a decoded image."""
    check_dtype(arr, what)
    if arr.size == 0 or min(arr.shape, default=0) < 1:
        raise InputError(f"{what} has an empty dimension: shape {tuple(arr.shape)}")
    check_finite(arr, what)
    check_affine(affine, what)


def affine_offset_mm(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> float:
    """Largest distance (mm) between where the two affines put the corners of a grid of ``shape``."""
    corners = np.array(np.meshgrid(*[[0, max(int(s) - 1, 0)] for s in shape[:3]], indexing="ij")).reshape(
        len(shape[:3]), -1
    )
    corners = np.vstack([corners, np.zeros((3 - corners.shape[0], corners.shape[1])), np.ones((1, corners.shape[1]))])
    pa = np.asarray(a, dtype=np.float64) @ corners
    pb = np.asarray(b, dtype=np.float64) @ corners
    return float(np.max(np.linalg.norm(pa[:3] - pb[:3], axis=0)))


def check_label(
    label: np.ndarray,
    allowed: Iterable[int],
    what: str = "label",
    *,
    image_shape: Sequence[int] | None = None,
    label_affine: Any = None,
    image_affine: Any = None,
    tolerance_mm: float = 0.5,
    allow_empty: bool = False,
) -> np.ndarray:
    """Check a decoded label map; returns it as integers (int16/int32). See the module docstring."""
    check_dtype(label, what)
    check_finite(label, what)
    lab = label
    if image_shape is not None:
        if lab.ndim > len(image_shape):
            lab = (
                np.squeeze(lab, axis=tuple(range(len(image_shape), lab.ndim)))
                if all(s == 1 for s in lab.shape[len(image_shape) :])
                else lab
            )
        if tuple(lab.shape) != tuple(image_shape):
            raise InputError(f"{what} shape {tuple(label.shape)} does not match the image's shape {tuple(image_shape)}")
    if label_affine is not None:
        check_affine(label_affine, what)
        if image_affine is not None:
            offset = affine_offset_mm(label_affine, image_affine, lab.shape)
            if offset > tolerance_mm:
                raise InputError(
                    f"{what} geometry differs from the image's by {offset:.2f} mm (corner distance; "
                    f"tolerance {tolerance_mm} mm): it was drawn on another grid or position"
                )
    if lab.dtype.kind == "f" and not np.all(lab == np.rint(lab)):
        raise InputError(
            f"{what} values must be integers (got fractional values such as "
            f"{float(lab[lab != np.rint(lab)].flat[0]):g})"
        )
    allowed_set = {0, *[int(v) for v in allowed]}
    values = np.unique(lab)
    unknown = [v for v in values.tolist() if v not in allowed_set]
    if unknown:
        shown = ", ".join(f"{int(v)}" if float(v).is_integer() and abs(v) < 2**63 else f"{v:g}" for v in unknown[:10])
        more = f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise InputError(
            f"{what} has values [{shown}]{more} that are not label values of the model; "
            f"allowed values: {sorted(allowed_set)}"
        )
    if len(values) == 1 and int(values[0]) != 0:
        raise InputError(f"{what} is constant (every voxel is {int(values[0])}): a label must mark background (0) too")
    if not allow_empty and not np.any(lab):
        raise InputError(f'{what} is empty (all background); send params {{"allow_empty": true}} to store it anyway')
    return lab.astype(np.int16 if max(allowed_set) < 2**15 else np.int32)

"""Just enough NIfTI-1 for the module: split a multi-channel study, stack per-modality volumes (numpy only).

3D Slicer ships numpy but not nibabel, so the module reads and writes NIfTI-1 itself:

* ``split_channels``: a 4D NIfTI with the channels last (``X, Y, Z, C``; also ``X, Y, Z, 1, C``)
  becomes one 3D NIfTI per channel. NIfTI stores voxels x-fastest, so a channel is one contiguous
  block: each output gets a byte copy of the input header (same qform, sform, pixdim, datatype
  and scaling, so the same affine exactly) and that block, without any decoding.
* ``stack_volumes``: per-modality 3D NIfTI files -> one 4D NIfTI (channels last) for a
  multi-modal model, after checking that every volume has the same shape and affine.
* ``read_header`` / ``affine``: shape, datatype and the voxel-to-world affine (sform when its
  code is set, else qform, as nibabel does).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

HEADER_SIZE = 348
DATA_OFFSET = 352  # header + the 4-byte extension flag (no extensions written)
VECTOR_INTENT = 1007  # NIFTI_INTENT_VECTOR: channels on the 5th dimension

# NIfTI datatype code -> numpy dtype (little-endian form; the byte order follows the header)
DTYPES: dict[int, str] = {
    2: "u1",
    4: "i2",
    8: "i4",
    16: "f4",
    64: "f8",
    256: "i1",
    512: "u2",
    768: "u4",
    1024: "i8",
    1280: "u8",
}


@dataclass
class Header:
    """The fields of a NIfTI-1 header the module needs, plus the raw bytes to copy."""

    raw: bytes
    endian: str  # "<" or ">"
    dim: tuple[int, ...]  # dim[0] = number of dimensions, then the sizes
    datatype: int
    bitpix: int
    vox_offset: int
    scl_slope: float
    scl_inter: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.dim[1 : 1 + self.dim[0]])

    @property
    def dtype(self) -> np.dtype:
        if self.datatype not in DTYPES:
            raise ValueError(f"NIfTI datatype {self.datatype} is not supported here (use integers or floats)")
        return np.dtype(self.endian + DTYPES[self.datatype])

    def field(self, fmt: str, offset: int) -> tuple:
        return struct.unpack_from(self.endian + fmt, self.raw, offset)


def is_nifti(path: str) -> bool:
    return path.endswith((".nii", ".nii.gz"))


def _open(path: str) -> object:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def parse_header(raw: bytes, where: str = "file") -> Header:
    """A ``Header`` from the first 348 bytes; ``ValueError`` in words for anything but NIfTI-1 single file."""
    if len(raw) < HEADER_SIZE:
        raise ValueError(f"{where}: too short for a NIfTI header ({len(raw)} bytes)")
    if struct.unpack_from("<i", raw, 0)[0] == HEADER_SIZE:
        endian = "<"
    elif struct.unpack_from(">i", raw, 0)[0] == HEADER_SIZE:
        endian = ">"
    elif struct.unpack_from("<i", raw, 0)[0] == 540 or struct.unpack_from(">i", raw, 0)[0] == 540:
        raise ValueError(f"{where}: NIfTI-2 files are not handled by the module; save it as NIfTI-1")
    else:
        raise ValueError(f"{where}: not a NIfTI-1 file")
    magic = raw[344:348]
    if magic != b"n+1\x00":
        raise ValueError(f"{where}: only single-file NIfTI-1 (.nii / .nii.gz) is handled, magic {magic!r}")
    dim = struct.unpack_from(endian + "8h", raw, 40)
    if not 1 <= dim[0] <= 7 or any(d < 1 for d in dim[1 : 1 + dim[0]]):
        raise ValueError(f"{where}: bad NIfTI dimensions {dim}")
    datatype, bitpix = struct.unpack_from(endian + "2h", raw, 70)
    vox_offset, scl_slope, scl_inter = struct.unpack_from(endian + "3f", raw, 108)
    return Header(bytes(raw[:HEADER_SIZE]), endian, dim, datatype, bitpix, int(vox_offset), scl_slope, scl_inter)


def read_header(path: str) -> Header:
    with _open(path) as f:
        return parse_header(f.read(HEADER_SIZE), os.path.basename(path))


def affine(header: Header) -> np.ndarray:
    """Voxel -> world (RAS+ mm) 4x4: sform if its code is set, else qform, else the pixel sizes."""
    (sform_code,) = header.field("h", 254)
    (qform_code,) = header.field("h", 252)
    pixdim = header.field("8f", 76)
    out = np.eye(4)
    if sform_code > 0:
        out[0] = header.field("4f", 280)
        out[1] = header.field("4f", 296)
        out[2] = header.field("4f", 312)
        return out
    if qform_code > 0:
        b, c, d = header.field("3f", 256)
        a2 = 1.0 - (b * b + c * c + d * d)
        a = math.sqrt(a2) if a2 > 1e-7 else 0.0
        if a == 0.0:  # normalise (b, c, d) as the standard does when a rounds to zero
            norm = math.sqrt(b * b + c * c + d * d) or 1.0
            b, c, d = b / norm, c / norm, d / norm
        rot = np.array(
            [
                [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c],
            ]
        )
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        zooms = np.array([pixdim[1], pixdim[2], pixdim[3] * qfac])
        out[:3, :3] = rot * zooms
        out[:3, 3] = header.field("3f", 268)
        return out
    out[:3, :3] = np.diag([p or 1.0 for p in pixdim[1:4]])
    return out


def channel_count(header: Header) -> int:
    """Channels of a channels-last 4D (``X, Y, Z, C``) or vector 5D (``X, Y, Z, 1, C``) image; 1 for 3D."""
    shape = header.shape
    if len(shape) == 4:
        return shape[3]
    if len(shape) == 5 and shape[3] == 1:
        return shape[4]
    if len(shape) <= 3:
        return 1
    raise ValueError(f"cannot tell the channels of a NIfTI of shape {shape}")


def _with_dims(header: Header, dim: list[int], datatype: int | None = None, unscaled: bool = False) -> bytearray:
    raw = bytearray(header.raw)
    struct.pack_into(header.endian + "8h", raw, 40, *dim)
    if datatype is not None:
        bitpix = np.dtype(DTYPES[datatype]).itemsize * 8
        struct.pack_into(header.endian + "2h", raw, 70, datatype, bitpix)
    if unscaled:
        struct.pack_into(header.endian + "2f", raw, 112, 1.0, 0.0)
    struct.pack_into(header.endian + "f", raw, 108, float(DATA_OFFSET))
    if dim[0] <= 4:
        struct.pack_into(header.endian + "h", raw, 68, 0)  # intent_code: a vector intent no longer applies
    return raw


def _write(path: str, header: bytes, blocks: list[bytes], compresslevel: int = 1) -> None:
    tmp = f"{path}.part"
    gz = path.endswith(".gz")
    with gzip.open(tmp, "wb", compresslevel=compresslevel) if gz else open(tmp, "wb") as f:
        f.write(header)
        f.write(b"\x00\x00\x00\x00")
        for block in blocks:
            f.write(block)
    os.replace(tmp, path)


def split_channels(path: str, out_paths: list[str]) -> list[str]:
    """Write channel k of the channels-last NIfTI ``path`` to ``out_paths[k]`` (same header, same affine)."""
    with _open(path) as f:
        data = f.read()
    header = parse_header(data[:HEADER_SIZE], os.path.basename(path))
    channels = channel_count(header)
    if channels != len(out_paths):
        raise ValueError(f"{os.path.basename(path)} has {channels} channels, {len(out_paths)} names were given")
    x, y, z = (list(header.shape) + [1, 1])[:3]
    block = x * y * z * (header.bitpix // 8)
    if header.vox_offset + block * channels > len(data):
        raise ValueError(f"{os.path.basename(path)} is truncated")
    raw = bytes(_with_dims(header, [3, x, y, z, 1, 1, 1, 1]))
    for k, out in enumerate(out_paths):
        start = header.vox_offset + k * block
        _write(out, raw, [data[start : start + block]])
    return out_paths


def read_array(path: str) -> tuple[Header, np.ndarray]:
    """Header and the stored (unscaled) voxel array in file order (x fastest), flattened."""
    with _open(path) as f:
        data = f.read()
    header = parse_header(data[:HEADER_SIZE], os.path.basename(path))
    count = int(np.prod(header.shape))
    arr = np.frombuffer(data, dtype=header.dtype, count=count, offset=header.vox_offset)
    return header, arr


def stack_volumes(paths: list[str], out_path: str, tolerance_mm: float = 1e-4) -> str:
    """One channels-last 4D NIfTI from 3D NIfTI volumes of equal shape and affine (``ValueError`` naming a misfit)."""
    if not paths:
        raise ValueError("no volumes to stack")
    for p in paths:
        if not is_nifti(p):
            raise ValueError(f"{os.path.basename(p)}: stacking needs NIfTI files (.nii / .nii.gz)")
    loaded = [read_array(p) for p in paths]
    first, _ = loaded[0]
    shape = _spatial(first, paths[0])
    ref = affine(first)
    for p, (h, _) in zip(paths, loaded, strict=True):
        if _spatial(h, p) != shape:
            raise ValueError(
                f"{os.path.basename(p)} has shape {h.shape}, {os.path.basename(paths[0])} has {first.shape}: "
                "the modalities must be volumes on the same grid (resample them first)"
            )
        if not np.allclose(affine(h), ref, atol=tolerance_mm):
            raise ValueError(
                f"{os.path.basename(p)} lies elsewhere in space than {os.path.basename(paths[0])} "
                f"(affine {np.round(affine(h), 4).tolist()} vs {np.round(ref, 4).tolist()}): "
                "the modalities must be on the same grid (resample them first)"
            )
    kind = (first.datatype, _scaling(first), first.endian)
    same = all((h.datatype, _scaling(h), h.endian) == kind for h, _ in loaded)
    dim = [4, *shape, len(paths), 1, 1, 1]
    if same:
        header = _with_dims(first, dim)
        blocks = [a.tobytes() for _, a in loaded]
    else:  # different types or scalings: the real values, as float32
        header = _with_dims(first, dim, datatype=16, unscaled=True)
        blocks = [_scaled(h, a).astype(first.endian + "f4").tobytes() for h, a in loaded]
    _write(out_path, bytes(header), blocks)
    return out_path


def _spatial(header: Header, path: str) -> tuple[int, int, int]:
    """``(X, Y, Z)`` of a single-channel volume (2D images count as Z = 1)."""
    shape = header.shape
    if len(shape) > 3 and any(d != 1 for d in shape[3:]):
        raise ValueError(f"{os.path.basename(path)} has shape {shape}: give one 3D volume per modality")
    x, y, z = (list(shape[:3]) + [1, 1])[:3]
    return x, y, z


def _scaling(header: Header) -> tuple[float, float]:
    """``(slope, intercept)``; a slope of 0 or NaN means no scaling (the standard's rule)."""
    if not header.scl_slope or not math.isfinite(header.scl_slope):
        return 1.0, 0.0
    return header.scl_slope, header.scl_inter if math.isfinite(header.scl_inter) else 0.0


def _scaled(header: Header, arr: np.ndarray) -> np.ndarray:
    slope, inter = _scaling(header)
    return arr.astype(np.float64) * slope + inter

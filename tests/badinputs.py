"""Bad inputs for the served app, built from the real sample study (hippocampus_003 and its label).

Each ``BadInput`` differs from a good file in exactly one defect and says through which channels
it is bad (``image``: ``PUT /datastore/image``; ``label``: ``PUT /datastore/label`` onto
hippocampus_003; ``infer``: ``POST /infer/unet3d`` with the file), the HTTP status a correct
server answers and words its ``detail`` must contain (any one of them). ``bad_params()`` and
``bad_train_bodies()`` list bad request parameters for ``/infer`` and bad ``/train`` bodies.

The good bases: the image is hippocampus_003 (float32, 34x52x35, 1 mm, sform/qform 1) and its
label (float32 values 0, 1, 2, same grid). The label is ALSO a good image and a good input for
inference (a float volume), so defects meant for all three channels are built on it where the
defect is not a file-level one; then each channel sees exactly one defect. Defects that only
make an image bad (NaN intensities, ...) are built on the image and target image + infer; a
label-only defect (value 7, ...) is a good image, so it targets the label channel only.

Run ``python tests/badinputs.py`` for a table of the inputs and what nibabel makes of them.
"""

from __future__ import annotations

import functools
import gzip
import io
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample" / "studies"
IMAGE_FILE = SAMPLE / "hippocampus_003.nii.gz"
LABEL_FILE = SAMPLE / "labels" / "final" / "hippocampus_003.nii.gz"
LABEL_IMAGE_ID = "hippocampus_003"  # labels are uploaded onto this study
INFER_IMAGE_ID = "hippocampus_015"  # bad request parameters are sent for this study

MAX_UPLOAD_MB = 8  # server conf max_upload_mb
MAX_VOXELS = 20_000_000  # server conf max_voxels
BOMB_SHAPE = (2000, 2000, 1000)  # uint8 zeros: 4e9 voxels (200x max_voxels), about 3.9 MB as .nii.gz
ALL = frozenset({"image", "label", "infer"})
IMAGE_INFER = frozenset({"image", "infer"})
LABEL = frozenset({"label"})
LABEL_INFER = frozenset({"label", "infer"})

CANNOT_READ = ("cannot be read",)


@dataclass(frozen=True)
class BadInput:
    """One bad file: bad through ``targets``; a correct server answers ``status`` and a ``detail``
    containing one of ``keywords`` (and all of ``mentions``, e.g. the unknown label value)."""

    name: str
    filename: str
    payload: bytes = field(repr=False)
    targets: frozenset[str]
    status: int
    keywords: tuple[str, ...]
    kind: str  # file | name | value | geometry | dimension | label (for grouping reports)
    also_status: tuple[int, ...] = ()  # other acceptable statuses (415 for an unsupported format)
    mentions: tuple[str, ...] = ()  # numbers the detail must name (unknown label values)
    ok_allowed: bool = False  # a 2xx is acceptable too (a name with path parts may be sanitised)
    nibabel_reads: bool | None = None  # sanity: does nibabel load header AND data? (None: not checked)


@dataclass(frozen=True)
class BadParam:
    """A bad ``POST /infer/unet3d`` request: ``query`` and the ``params`` form field (None: not sent)."""

    name: str
    query: dict
    params: str | None
    status: int
    keywords: tuple[str, ...]
    also_status: tuple[int, ...] = ()
    encoding: str = "multipart"  # how the form is sent: multipart (as MONAI Label clients do) or urlencoded


@dataclass(frozen=True)
class BadTrain:
    """A bad ``POST /train/unet3d`` body."""

    name: str
    body: bytes = field(repr=False)
    status: int
    keywords: tuple[str, ...]


# ---- keyword matching -------------------------------------------------------------------------


def detail_text(reply_json: object) -> str:
    """The reply's ``detail`` as lower-case text (FastAPI validation errors carry a list)."""
    detail = reply_json.get("detail", reply_json) if isinstance(reply_json, dict) else reply_json
    return (detail if isinstance(detail, str) else repr(detail)).lower()


def has_keyword(text: str, keywords: tuple[str, ...]) -> bool:
    """True when ``text`` holds one of ``keywords`` at the start of a word.

    "mm" must not match "command", "inf" must not match "infer"/"info"/"infant".
    """
    text = text.lower()
    for k in keywords:
        pattern = r"(?<![a-z])" + re.escape(k.lower())
        if k.lower() == "inf":
            pattern += r"(?!o|er|ant)"
        if re.search(pattern, text):
            return True
    return False


def mentions_all(text: str, numbers: tuple[str, ...]) -> bool:
    """Every number in ``numbers`` appears in ``text`` as a whole number ("7" in "[7]" or "7.0", not in "17")."""
    return all(re.search(r"(?<![\d.])" + re.escape(n) + r"(?!\d)", text) for n in numbers)


# ---- building blocks --------------------------------------------------------------------------

HDR1 = nib.Nifti1Header().structarr.dtype  # 348 bytes, native endian (nibabel writes native)
HDR2 = nib.Nifti2Header().structarr.dtype  # 540 bytes


def gz(raw: bytes) -> bytes:
    return gzip.compress(raw, compresslevel=6, mtime=0)


def nii(arr: np.ndarray, affine: np.ndarray, dtype: object = None, nifti2: bool = False) -> bytes:
    """Uncompressed single-file NIfTI bytes written by nibabel (sform code 2, qform code 0)."""
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = cls(arr, affine, dtype=dtype) if dtype is not None else cls(arr, affine)
    return img.to_bytes()


def patch(raw: bytes, nifti2: bool = False, **fields: object) -> bytes:
    """``raw`` NIfTI bytes with header fields replaced (``dim``, ``srow_x``, ``qform_code``, ...)."""
    dt = HDR2 if nifti2 else HDR1
    hdr = np.frombuffer(raw[: dt.itemsize], dtype=dt).copy()
    for key, value in fields.items():
        hdr[key] = value
    return hdr.tobytes() + raw[dt.itemsize :]


def affine_fields(a: np.ndarray) -> dict:
    """sform rows of ``a`` (NaN/Inf/singular allowed), sform used (code 1), qform off."""
    return {"srow_x": a[0], "srow_y": a[1], "srow_z": a[2], "sform_code": 1, "qform_code": 0}


def png_bytes() -> bytes:
    """A real 8x8 grey PNG (no imaging library needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(range(0, 256, 32)) for _ in range(8))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _gf2_times(mat: list[int], vec: int) -> int:
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= mat[i]
        vec >>= 1
        i += 1
    return out


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, mat[n]) for n in range(32)]


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib's crc32_combine: CRC of A+B from crc(A), crc(B) and len(B), without reading B."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # operator for one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        even = _gf2_square(odd)
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def zeros_crc32(n: int) -> int:
    """CRC-32 of ``n`` zero bytes (by doubling; never allocates them)."""
    crc, length, result, have = zlib.crc32(b"\0"), 1, 0, 0
    while n:
        if n & 1:
            result = crc32_combine(result, crc, length) if have else crc
            have = 1
        crc = crc32_combine(crc, crc, length)
        length *= 2
        n >>= 1
    return result


def gzip_bomb(shape: tuple[int, int, int], affine: np.ndarray) -> bytes:
    """A valid .nii.gz: NIfTI-1 header declaring ``shape`` uint8, then that many zero bytes, deflated
    chunk by chunk (each chunk compressed once by a fresh compressor and repeated: no back-references
    cross chunks, so the concatenation is one valid deflate stream). Nothing of the full size is ever held."""
    header = patch(nii(np.zeros((1, 1, 1), np.uint8), affine), dim=[3, *shape, 1, 1, 1, 1])[:352]
    total = int(np.prod(shape))
    chunk = 1 << 24

    def deflated(data: bytes, final: bool = False) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
        return c.compress(data) + c.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)

    full, rest = divmod(total, chunk)
    body = (
        deflated(header)
        + deflated(bytes(chunk)) * full
        + (deflated(bytes(rest)) if rest else b"")
        + deflated(b"", final=True)
    )
    crc = crc32_combine(zlib.crc32(header), zeros_crc32(total), total)
    head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # gzip member header, mtime 0, max compression
    return head + body + struct.pack("<II", crc, (len(header) + total) & 0xFFFFFFFF)


# ---- the sample ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def sample() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32, label float32 values 0/1/2, affine) of hippocampus_003."""
    img, lab = nib.load(IMAGE_FILE), nib.load(LABEL_FILE)
    image = np.asanyarray(img.dataobj).astype(np.float32)
    label = np.asanyarray(lab.dataobj).astype(np.float32)
    assert image.shape == label.shape and np.allclose(img.affine, lab.affine)
    assert set(np.unique(label).tolist()) == {0.0, 1.0, 2.0}
    return image, label, img.affine.copy()


def good_image() -> bytes:
    """The good image as this generator writes it (the base every image defect differs from)."""
    image, _, aff = sample()
    return gz(nii(image, aff))


def good_label() -> bytes:
    """The good label as this generator writes it (float32 0/1/2, the image's grid)."""
    _, label, aff = sample()
    return gz(nii(label, aff))


# ---- the bad inputs -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def bad_inputs() -> list[BadInput]:
    image, label, aff = sample()
    img_gz = IMAGE_FILE.read_bytes()  # the real file as it came (sform/qform code 1)
    lab_gz = LABEL_FILE.read_bytes()  # stored label bytes: a good image, label and inference input
    img_nii = nii(image, aff)  # plain .nii, 352 + 247520 bytes
    lab_nii = nii(label, aff)
    rng = np.random.default_rng(20240603)
    out: list[BadInput] = []

    def add(
        name: str,
        payload: bytes,
        targets: frozenset[str],
        keywords: tuple[str, ...],
        kind: str,
        status: int = 422,
        ext: str = ".nii.gz",
        **kw: object,
    ) -> None:
        out.append(
            BadInput(
                name=name,
                filename=kw.pop("filename", None) or f"{name}{ext}",
                payload=payload,  # type: ignore[arg-type]
                targets=targets,
                status=status,
                keywords=keywords,
                kind=kind,
                **kw,
            )
        )  # type: ignore[arg-type]

    # -- file level: unreadable in every channel. Built on the stored label, which is also a good image
    # and a good inference input, so in each channel the damage is the only defect. ----------------------
    add("zero_bytes", b"", ALL, CANNOT_READ, "file", nibabel_reads=False)
    add("random_10_bytes", rng.bytes(10), ALL, CANNOT_READ, "file", nibabel_reads=False)
    add("png_named_nii_gz", png_bytes(), ALL, CANNOT_READ, "file", nibabel_reads=False)
    add(
        "text_named_nii_gz",
        b"patient: 003\nthis is a text file, not a NIfTI image\n",
        ALL,
        CANNOT_READ,
        "file",
        nibabel_reads=False,
    )
    add("text_named_nii", b"hello " * 100, ALL, CANNOT_READ, "file", ext=".nii", nibabel_reads=False)
    add("gzip_of_text", gz(b"not a nifti header " * 40), ALL, CANNOT_READ, "file", nibabel_reads=False)
    add("gzip_header_only", lab_gz[:10], ALL, CANNOT_READ, "file", nibabel_reads=False)

    def gzip_damage(prefix: str, data: bytes, plain: bytes, targets: frozenset[str]) -> None:
        for pct in (10, 50, 99):
            add(
                f"{prefix}gzip_truncated_{pct}pct",
                data[: len(data) * pct // 100],
                targets,
                CANNOT_READ,
                "file",
                nibabel_reads=False,
            )
        # nibabel reads the next four without complaint (it never checks the gzip trailer): only
        # reading the stream to its end finds the damage
        add(f"{prefix}gzip_truncated_no_trailer", data[:-8], targets, CANNOT_READ, "file", nibabel_reads=True)
        mid = len(data) // 2
        add(
            f"{prefix}gzip_flipped_middle",
            data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 16]) + data[mid + 16 :],
            targets,
            CANNOT_READ,
            "file",
        )
        crc = struct.unpack("<I", data[-8:-4])[0]
        add(
            f"{prefix}gzip_bad_crc",
            data[:-8] + struct.pack("<I", crc ^ 0xDEADBEEF) + data[-4:],
            targets,
            CANNOT_READ,
            "file",
            nibabel_reads=True,
        )
        add(
            f"{prefix}gzip_bad_isize",
            data[:-4] + struct.pack("<I", (len(plain) + 1000) & 0xFFFFFFFF),
            targets,
            CANNOT_READ,
            "file",
            nibabel_reads=True,
        )
        add(
            f"{prefix}nii_truncated_in_data",
            plain[: 352 + (len(plain) - 352) // 2],
            targets,
            CANNOT_READ,
            "file",
            ext=".nii",
            nibabel_reads=False,
        )

    gzip_damage("", lab_gz, lab_nii, ALL)
    gzip_damage("image_", img_gz, img_nii, IMAGE_INFER)  # the same damage to the 75 KB image (image channels only:
    # the undamaged image is no label)
    add("nii_truncated_in_header", lab_nii[:200], ALL, CANNOT_READ, "file", ext=".nii", nibabel_reads=False)
    add("nii_missing_last_byte", lab_nii[:-1], ALL, CANNOT_READ, "file", ext=".nii", nibabel_reads=False)
    add("nii_gz_truncated_in_data", gz(lab_nii[: 352 + 1000]), ALL, CANNOT_READ, "file", nibabel_reads=False)
    add(
        "nifti_bad_magic", gz(patch(lab_nii, magic=b"xyz")), ALL, CANNOT_READ + ("format",), "file", nibabel_reads=False
    )
    add(
        "nifti_vox_offset_past_end",
        gz(patch(lab_nii, vox_offset=10_000_000)),
        ALL,
        CANNOT_READ,
        "file",
        nibabel_reads=False,
    )
    add(
        "nifti_negative_dim",
        gz(patch(lab_nii, dim=[3, 34, -52, 35, 1, 1, 1, 1])),
        ALL,
        CANNOT_READ + ("dimension",),
        "file",
        nibabel_reads=False,
    )
    add(
        "nifti_scl_inter_nan",
        gz(patch(lab_nii, scl_slope=1.0, scl_inter=np.nan)),
        ALL,
        CANNOT_READ + ("nan",),
        "file",
        nibabel_reads=False,
    )
    add(
        "datatype_binary_1bit",
        gz(patch(lab_nii, datatype=1, bitpix=1)),
        ALL,
        ("data type",) + CANNOT_READ,
        "file",
        nibabel_reads=False,
    )
    add(
        "datatype_unknown_code",
        gz(patch(lab_nii, datatype=9999)),
        ALL,
        ("data type",) + CANNOT_READ,
        "file",
        nibabel_reads=False,
    )
    # too large: bytes, declared voxels, decompressed size
    add(
        "absurd_dims_nifti1",
        gz(patch(lab_nii, dim=[3, 32767, 32767, 32767, 1, 1, 1, 1])),
        ALL,
        ("voxels",),
        "file",
        status=413,
        nibabel_reads=False,
    )
    n2 = nii(label, aff, nifti2=True)
    add(
        "absurd_dims_nifti2",
        gz(patch(n2, nifti2=True, dim=[3, 100000, 100000, 100000, 1, 1, 1, 1])),
        ALL,
        ("voxels",),
        "file",
        status=413,
        nibabel_reads=False,
    )
    add("gzip_bomb", gzip_bomb(BOMB_SHAPE, aff), ALL, ("voxels",), "file", status=413)
    add(
        "oversized_random",
        rng.bytes((MAX_UPLOAD_MB + 1) << 20),
        ALL,
        ("too large",),
        "file",
        status=413,
        nibabel_reads=False,
    )

    # -- file names: the payload is the stored label (a good image, label and inference input) ---------
    fmt = ("format",)
    add("name_long_suffix", lab_gz, ALL, fmt + ("too long",), "name", filename="x." + "a" * 283, also_status=(415,))
    add("name_exe", lab_gz, ALL, fmt, "name", ext=".exe", also_status=(415,))
    add("name_no_extension", lab_gz, ALL, fmt, "name", ext="", also_status=(415,))
    add("name_txt", lab_gz, ALL, fmt, "name", ext=".txt", also_status=(415,))
    add("name_path_parts", lab_gz, ALL, ("name", "path"), "name", filename="../../etc/x.nii.gz", ok_allowed=True)

    # -- intensity values (image-only defects: built on the image) ---------------------------------------
    def with_values(**where: float) -> np.ndarray:
        a = image.copy()
        for key, value in where.items():
            if key == "one":
                a[17, 26, 17] = value
            elif key == "many":
                a.flat[rng.choice(a.size, a.size // 10, replace=False)] = value
            elif key == "all":
                a[...] = value
        return a

    add("nan_one_voxel", gz(nii(with_values(one=np.nan), aff)), IMAGE_INFER, ("nan",), "value", nibabel_reads=True)
    add("nan_ten_percent", gz(nii(with_values(many=np.nan), aff)), IMAGE_INFER, ("nan",), "value", nibabel_reads=True)
    add("nan_all", gz(nii(with_values(all=np.nan), aff)), IMAGE_INFER, ("nan",), "value", nibabel_reads=True)
    add(
        "nan_float64",
        gz(nii(with_values(one=np.nan).astype(np.float64), aff)),
        IMAGE_INFER,
        ("nan",),
        "value",
        nibabel_reads=True,
    )
    add("posinf_one_voxel", gz(nii(with_values(one=np.inf), aff)), IMAGE_INFER, ("inf",), "value", nibabel_reads=True)
    add("neginf_one_voxel", gz(nii(with_values(one=-np.inf), aff)), IMAGE_INFER, ("inf",), "value", nibabel_reads=True)
    add(
        "posinf_ten_percent", gz(nii(with_values(many=np.inf), aff)), IMAGE_INFER, ("inf",), "value", nibabel_reads=True
    )
    add(
        "complex64_image",
        gz(nii(image.astype(np.complex64), aff)),
        IMAGE_INFER,
        ("data type",),
        "value",
        nibabel_reads=True,
    )
    rgb_dt = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
    grey = np.clip(image / image.max() * 255, 0, 255).astype(np.uint8)
    rgb = np.zeros(image.shape, rgb_dt)
    for c in "RGB":
        rgb[c] = grey
    add("rgb24_image", gz(nii(rgb, aff)), IMAGE_INFER, ("data type",), "value", nibabel_reads=True)
    rgba = np.zeros(image.shape, np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")]))
    for c in "RGB":
        rgba[c] = grey
    rgba["A"] = 255
    add("rgba32_image", gz(nii(rgba, aff)), IMAGE_INFER, ("data type",), "value", nibabel_reads=True)

    # -- geometry: the image with a broken affine (image + infer) and the label with one (label) ------------
    nan_aff, inf_aff, singular_aff = aff.copy(), aff.copy(), aff.copy()
    nan_aff[0, 0] = np.nan  # a NaN voxel size
    inf_aff[0, 3] = np.inf  # an infinite origin
    singular_aff[:3, 1] = 0.0  # a zero column: the y axis has no direction
    bad_affines = {"nan": nan_aff, "inf": inf_aff, "zero_column": singular_aff, "all_zero": np.zeros((4, 4))}
    for base, (payload_arr, targets, prefix) in {
        "image": (img_nii, IMAGE_INFER, "affine"),
        "label": (lab_nii, LABEL, "label_affine"),
    }.items():
        for what, a in bad_affines.items():
            add(
                f"{prefix}_sform_{what}",
                gz(patch(payload_arr, **affine_fields(a))),
                targets,
                ("affine",),
                "geometry" if base == "image" else "label",
                nibabel_reads=True,
            )
        # qform used (sform off): a NaN quaternion, an infinite offset (a quaternion affine cannot be
        # singular; a zero voxel size nibabel silently repairs to 1, so it is not used here)
        add(
            f"{prefix}_qform_nan",
            gz(patch(payload_arr, qform_code=1, sform_code=0, quatern_b=np.nan)),
            targets,
            ("affine",),
            "geometry" if base == "image" else "label",
        )
        add(
            f"{prefix}_qform_inf",
            gz(patch(payload_arr, qform_code=1, sform_code=0, qoffset_x=np.inf)),
            targets,
            ("affine",),
            "geometry" if base == "image" else "label",
        )

    # -- dimensions: built on the label data (a good image and label), so each channel sees one defect -----
    dims = ("dimension", "shape")
    add("slice_2d", gz(nii(label[:, :, 17].copy(), aff)), LABEL_INFER, dims, "dimension", nibabel_reads=True)
    add(
        "channels_2",
        gz(nii(np.stack([label] * 2, -1), aff)),
        LABEL_INFER,
        ("channel",) + dims,
        "dimension",
        nibabel_reads=True,
    )
    add(
        "channels_5",
        gz(nii(np.stack([label] * 5, -1), aff)),
        LABEL_INFER,
        ("channel",) + dims,
        "dimension",
        nibabel_reads=True,
    )
    add(
        "five_d",
        gz(nii(np.stack([label] * 2, -1)[..., None, :], aff)),
        ALL,
        ("dimension", "shape", "channel"),
        "dimension",
        nibabel_reads=True,
    )
    line = np.zeros((1, 1, 64), np.float32)
    line[0, 0, 20:40] = 1
    # a 1x1x64 image is servable (padded to the window; the label comes back 1x1x64, tested in
    # test_server_sharing.py): it is bad only as the label of a 34x52x35 image
    add("line_1x1x64", gz(nii(line, aff)), LABEL, ("dimension", "shape", "too small"), "dimension", nibabel_reads=True)
    add(
        "zero_size_axis",
        gz(nii(np.zeros((0, 10, 10), np.float32), aff)),
        ALL,
        ("dimension", "shape", "empty"),
        "dimension",
        nibabel_reads=True,
    )
    add(
        "ndim_zero",
        gz(patch(lab_nii, dim=[0, 34, 52, 35, 1, 1, 1, 1])),
        ALL,
        ("dimension", "shape"),
        "dimension",
        nibabel_reads=True,
    )

    # -- labels only (each a good image; the label carries one defect) --------------------------------------
    def lab_with(value: float, dtype: object = np.float32, n: int = 1) -> np.ndarray:
        a = label.astype(dtype)
        fg = np.argwhere(label > 0)[:n]
        for idx in fg:
            a[tuple(idx)] = value
        return a

    add("label_value_7", gz(nii(lab_with(7), aff)), LABEL, ("values",), "label", mentions=("7",), nibabel_reads=True)
    add(
        "label_value_3",
        gz(nii(lab_with(3, np.uint8), aff)),
        LABEL,
        ("values",),
        "label",
        mentions=("3",),
        nibabel_reads=True,
    )
    add(
        "label_value_255_uint8",
        gz(nii(lab_with(255, np.uint8, n=50), aff)),
        LABEL,
        ("values",),
        "label",
        mentions=("255",),
        nibabel_reads=True,
    )
    add(
        "label_value_2pow40_int64",
        gz(nii(lab_with(2**40, np.int64), aff, dtype=np.int64)),
        LABEL,
        ("values",),
        "label",
        mentions=(str(2**40),),
        nibabel_reads=True,
    )
    add("label_value_3e38_float32", gz(nii(lab_with(3e38), aff)), LABEL, ("values",), "label", nibabel_reads=True)
    add("label_fraction_0_5", gz(nii(lab_with(0.5), aff)), LABEL, ("integer",), "label", nibabel_reads=True)
    add("label_fraction_1_5", gz(nii(lab_with(1.5), aff)), LABEL, ("integer",), "label", nibabel_reads=True)
    add(
        "label_negative_1_int16",
        gz(nii(lab_with(-1, np.int16), aff)),
        LABEL,
        ("values", "negative"),
        "label",
        nibabel_reads=True,
    )
    add(
        "label_negative_1_float", gz(nii(lab_with(-1), aff)), LABEL, ("values", "negative"), "label", nibabel_reads=True
    )
    add("label_nan", gz(nii(lab_with(np.nan), aff)), LABEL, ("nan", "integer"), "label", nibabel_reads=True)
    add("label_posinf", gz(nii(lab_with(np.inf), aff)), LABEL, ("inf", "integer"), "label", nibabel_reads=True)
    add("label_complex64", gz(nii(label.astype(np.complex64), aff)), LABEL, ("data type",), "label", nibabel_reads=True)
    lrgb = np.zeros(label.shape, rgb_dt)
    lrgb["R"] = label.astype(np.uint8)
    add("label_rgb24", gz(nii(lrgb, aff)), LABEL, ("data type",), "label", nibabel_reads=True)
    add("label_is_the_image", img_gz, LABEL, ("integer", "values"), "label", nibabel_reads=True)
    add("label_all_zero", gz(nii(np.zeros_like(label, np.uint8), aff)), LABEL, ("empty",), "label", nibabel_reads=True)
    add(
        "label_constant_1",
        gz(nii(np.ones_like(label, np.uint8), aff)),
        LABEL,
        ("constant",),
        "label",
        nibabel_reads=True,
    )
    add(
        "label_constant_2",
        gz(nii(np.full_like(label, 2, np.uint8), aff)),
        LABEL,
        ("constant",),
        "label",
        nibabel_reads=True,
    )
    small = np.zeros((20, 20, 20), np.uint8)
    small[5:10, 5:10, 5:10], small[10:15, 10:15, 10:15] = 1, 2
    add("label_wrong_shape", gz(nii(small, aff)), LABEL, ("shape",), "label", nibabel_reads=True)
    add(
        "label_one_voxel_more_x",
        gz(nii(np.concatenate([label, np.zeros_like(label[:1])], 0), aff)),
        LABEL,
        ("shape",),
        "label",
        nibabel_reads=True,
    )
    add("label_one_voxel_less_z", gz(nii(label[:, :, :-1].copy(), aff)), LABEL, ("shape",), "label", nibabel_reads=True)
    shifted = aff.copy()
    shifted[0, 3] += 50.0
    add("label_shifted_50mm", gz(nii(label, shifted)), LABEL, ("mm",), "label", nibabel_reads=True)
    zoomed = aff.copy()
    zoomed[:3, :3] *= 2.0
    add("label_spacing_2mm", gz(nii(label, zoomed)), LABEL, ("mm", "affine"), "label", nibabel_reads=True)
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rotated = aff.copy()
    rotated[:3, :3] = aff[:3, :3] @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    add("label_rotated_20deg", gz(nii(label, rotated)), LABEL, ("mm", "affine"), "label", nibabel_reads=True)
    return out


def bad_params() -> list[BadParam]:
    """Bad ``POST /infer/unet3d`` requests for the good study ``INFER_IMAGE_ID``."""
    q = {"image": INFER_IMAGE_ID, "output": "image"}

    def p(name: str, params: object, keywords: tuple[str, ...], status: int = 422, **kw: object) -> BadParam:
        text = params if isinstance(params, str) or params is None else __import__("json").dumps(params)
        return BadParam(name=name, query=dict(q), params=text, status=status, keywords=keywords, **kw)  # type: ignore[arg-type]

    out = [
        p("params_not_json", "{not json", ("params", "json")),
        p("params_json_list", "[1, 2]", ("params", "json", "object")),
        p("params_json_string", '"tta"', ("params", "json", "object")),
        p("overlap_1_5", {"overlap": 1.5}, ("overlap",)),
        p("overlap_negative", {"overlap": -0.1}, ("overlap",)),
        p("overlap_text", {"overlap": "abc"}, ("overlap",)),
        p("overlap_nan", {"overlap": "nan"}, ("overlap",)),
        p("blend_cubic", {"blend": "cubic"}, ("blend",)),
        p("roi_size_1", {"roi_size": 1}, ("roi_size",)),
        p("roi_size_zeros", {"roi_size": [0, 0, 0]}, ("roi_size",)),
        p("roi_size_letters", {"roi_size": "a,b,c"}, ("roi_size",)),
        p("sw_batch_size_0", {"sw_batch_size": 0}, ("sw_batch_size",)),
        p("sw_batch_size_1e9", {"sw_batch_size": 10**9}, ("sw_batch_size",)),
        p("tta_maybe", {"tta": "maybe"}, ("tta",)),
        p("amp_fast", {"amp": "fast"}, ("amp",)),
        p("result_extension_parent_path", {"result_extension": "../../x.nii.gz"}, ("result_extension",)),
        p("result_extension_absolute", {"result_extension": "/etc/passwd"}, ("result_extension",)),
        p("result_dtype_float128", {"result_dtype": "float128"}, ("result_dtype",)),
        p("device_tpu", {"device": "tpu"}, ("device",)),
        p("unknown_key", {"foo": 1}, ("foo",)),
        p("image_path_in_params", {"image": "/etc/hostname"}, ("image",)),
        # the same form sent url-encoded (requests' data=..., as tests/test_server.py does): checked alike
        p("params_not_json_urlencoded", "{not json", ("params", "json"), encoding="urlencoded"),
        p("overlap_1_5_urlencoded", {"overlap": 1.5}, ("overlap",), encoding="urlencoded"),
    ]
    out += [
        BadParam("output_dicom_seg", {"image": INFER_IMAGE_ID, "output": "dicom_seg"}, "{}", 422, ("dicom_seg",)),
        BadParam("output_xml", {"image": INFER_IMAGE_ID, "output": "xml"}, "{}", 422, ("output",)),
        BadParam("no_image_no_file", {"output": "image"}, "{}", 422, ("image",)),
        BadParam(
            "image_parent_path",
            {"image": "../../etc/passwd", "output": "image"},
            "{}",
            422,
            ("image",),
            also_status=(404,),
        ),
        BadParam(
            "image_absolute_path",
            {"image": "/etc/passwd", "output": "image"},
            "{}",
            422,
            ("image",),
            also_status=(404,),
        ),
        BadParam(
            "image_unknown_id", {"image": "no_such_study_42", "output": "image"}, "{}", 404, ("no_such_study_42",)
        ),
    ]
    return out


def bad_train_bodies() -> list[BadTrain]:
    """Bad ``POST /train/unet3d`` bodies (JSON content type)."""
    import json

    padded = b'{"max_epochs": 1,' + b" " * (300 * 1024) + b'"val_split": 0.25}'  # valid JSON; only too big
    return [
        BadTrain("not_json", b"{not json", 422, ("json",)),
        BadTrain("json_list", b"[1, 2]", 422, ("json", "object", "dict")),
        BadTrain("body_300kb", padded, 413, ("too large",)),
        BadTrain("max_epochs_negative", json.dumps({"max_epochs": -1}).encode(), 422, ("max_epochs",)),
        BadTrain("max_epochs_text", json.dumps({"max_epochs": "x"}).encode(), 422, ("max_epochs",)),
        BadTrain("learning_rate_text", json.dumps({"learning_rate": "fast"}).encode(), 422, ("learning_rate",)),
        BadTrain("val_split_1_5", json.dumps({"val_split": 1.5}).encode(), 422, ("val_split",)),
        BadTrain("train_batch_size_0", json.dumps({"train_batch_size": 0}).encode(), 422, ("train_batch_size",)),
        BadTrain("unknown_key", json.dumps({"foo": 1}).encode(), 422, ("foo",)),
    ]


# ---- sanity ---------------------------------------------------------------------------------------------


def nibabel_outcome(b: BadInput) -> str:
    """What ``nib.load`` + reading the data makes of the payload: 'ok <shape> <dtype> ...' or the
    exception. Payloads declaring more than MAX_VOXELS are judged by their header only."""
    import tempfile
    import warnings

    if b.name == "gzip_bomb":
        head = zlib.decompressobj(31).decompress(b.payload, 352)
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(head))
        return f"header {hdr.get_data_shape()} {hdr.get_data_dtype()} (data not read)"
    if len(b.payload) > (MAX_UPLOAD_MB << 20):
        return f"{len(b.payload)} bytes (not read)"
    suffix = ".nii.gz" if b.payload[:2] == b"\x1f\x8b" else ".nii"
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), nib.imageglobals.LoggingOutputSuppressor():
        warnings.simplefilter("ignore")
        path = Path(tmp) / f"x{suffix}"
        path.write_bytes(b.payload)
        try:
            img = nib.load(path)
            shape = img.shape
            if float(np.prod(shape, dtype=np.float64)) > MAX_VOXELS:
                return f"header {shape} (data not read)"
            arr = np.asanyarray(img.dataobj)
            return f"ok {arr.shape} {arr.dtype} affine_finite={bool(np.all(np.isfinite(img.affine)))}"
        except Exception as e:
            return f"raises {type(e).__name__}: {' '.join(str(e).split())[:70]}"


def check() -> list[str]:
    """Problems with the generator itself (empty list when all is well)."""
    problems = []
    inputs = bad_inputs()
    names = [b.name for b in inputs]
    if len(set(names)) != len(names):
        problems.append("duplicate names")
    for b in inputs:
        if not b.targets or not b.targets <= ALL:
            problems.append(f"{b.name}: targets {b.targets}")
        if not re.fullmatch(r"[a-z0-9_]+", b.name):
            problems.append(f"{b.name}: name not id-safe")
        if b.nibabel_reads is not None:
            outcome = nibabel_outcome(b)
            if b.nibabel_reads != outcome.startswith("ok"):
                problems.append(f"{b.name}: expected nibabel_reads={b.nibabel_reads}, got {outcome}")
    return problems


if __name__ == "__main__":
    for b in bad_inputs():
        print(
            f"{b.name:34s} {len(b.payload):>9d} {','.join(sorted(b.targets)):17s} {b.status} "
            f"{'/'.join(b.keywords):30s} {nibabel_outcome(b)}"
        )
    print(
        f"{len(bad_inputs())} inputs, {sum(len(b.targets) for b in bad_inputs())} cases; "
        f"{len(bad_params())} bad params; {len(bad_train_bodies())} bad train bodies"
    )
    print("problems:", check() or "none")

"""Volumes as DICOM series and back, with exact geometry; storing to and reading from a PACS over DICOMweb.

* ``volume_to_series``: a NIfTI volume (RAS affine) -> one single-frame DICOM instance per slice
  (MR Image Storage by default; CT possible) whose position, orientation and spacing describe the
  same voxels in LPS. Integer-valued images are stored as they are; others with a rescale slope.
* ``series_to_volume``: instances -> (voxels, RAS affine), slices ordered along the normal;
  refuses a series that is not a volume (one slice, mixed orientations, uneven or missing slices).
* ``store`` / ``retrieve_series``: STOW-RS and WADO-RS through ``dicomweb-client``.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .validation import InputError

SOP_CLASSES = {"MR": "1.2.840.10008.5.1.4.1.1.4", "CT": "1.2.840.10008.5.1.4.1.1.2"}
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)


def _pixels(data: np.ndarray) -> tuple[np.ndarray, float, float]:
    """int16 pixels plus (slope, intercept) that give back ``data`` (exactly when it is integer-valued in range)."""
    finite = np.isfinite(data)
    if not finite.all():
        raise InputError("the volume has NaN or Inf voxels; DICOM cannot store them")
    lo, hi = float(data.min()), float(data.max())
    if np.array_equal(data, np.round(data)) and lo >= -32768 and hi <= 32767:
        return data.astype(np.int16), 1.0, 0.0
    slope = (hi - lo) / 65535.0 or 1.0
    return np.round((data - lo) / slope - 32768).astype(np.int16), slope, lo + 32768 * slope


def volume_to_series(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    modality: str = "MR",
    patient_id: str = "anon",
    patient_name: str = "anon^",
    study_uid: str | None = None,
    series_description: str = "",
    series_number: int = 1,
) -> list[Dataset]:
    """One DICOM instance per slice (third voxel axis) with the geometry of ``affine`` (voxel -> RAS mm)."""
    if modality not in SOP_CLASSES:
        raise InputError(f"modality: expected one of {', '.join(SOP_CLASSES)}, got {modality!r}")
    if data.ndim != 3:
        raise InputError(f"a DICOM series needs a 3-D volume, got shape {data.shape}")
    lps = LPS @ np.asarray(affine, dtype=np.float64)
    cols, rows, normal = lps[:3, 0], lps[:3, 1], lps[:3, 2]  # voxel i runs along a row, j down a column
    sx, sy, sz = (float(np.linalg.norm(v)) for v in (cols, rows, normal))
    u, v, w = cols / sx, rows / sy, normal / sz
    if abs(u @ v) > 1e-6 or abs(np.cross(u, v) @ w) < 1 - 1e-6:
        raise InputError("the affine is sheared: a DICOM series needs orthogonal axes")
    pixels, slope, intercept = _pixels(np.asarray(data, dtype=np.float64))
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    now = datetime.datetime.now()
    out = []
    for k in range(data.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASSES[modality], ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality, ds.PatientID, ds.PatientName = modality, patient_id, patient_name
        ds.PatientBirthDate, ds.PatientSex = "", ""  # type 2: present, may be empty
        ds.StudyDate = ds.SeriesDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = series_number, k + 1, series_description
        ds.ImagePositionPatient = [f"{x:.6f}" for x in (lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [f"{x:.8f}" for x in (*u, *v)]
        ds.PixelSpacing = [f"{sy:.6f}", f"{sx:.6f}"]  # row spacing (between rows), column spacing
        ds.SliceThickness = f"{sz:.6f}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.preamble = b"\0" * 128  # a Part-10 file: preamble + DICM, as WADO-RS readers expect
        out.append(ds)
    return out


def series_to_volume(instances: Sequence[Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """(voxels float32 (i, j, k), RAS affine) of a single-frame series; InputError when it is not one volume."""
    if len(instances) < 2:
        raise InputError(f"the series has {len(instances)} slice(s); a volume needs at least 2")
    orientations = {tuple(round(float(x), 4) for x in ds.ImageOrientationPatient) for ds in instances}
    if len(orientations) != 1:
        raise InputError(f"the series mixes {len(orientations)} slice orientations; it is not one volume")
    iop = np.array([float(x) for x in instances[0].ImageOrientationPatient])
    u, v = iop[:3], iop[3:]
    w = np.cross(u, v)
    ordered = ordered_instances(instances)
    positions = np.array([[float(x) for x in ds.ImagePositionPatient] for ds in ordered])
    steps = np.diff(positions @ w)
    if np.any(steps <= 1e-6):
        raise InputError("the series has two slices at the same position")
    if np.ptp(steps) > max(1e-3, 0.01 * float(np.median(steps))):
        raise InputError(
            f"the slices are unevenly spaced ({float(steps.min()):.4g} to {float(steps.max()):.4g} mm): "
            f"slices are missing or the series is not one volume"
        )
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in ordered}
    if len(shapes) != 1:
        raise InputError(f"the slices have different sizes {sorted(shapes)}")
    row_spacing, col_spacing = (float(x) for x in ordered[0].PixelSpacing)
    volume = np.stack([_frame(ds).T for ds in ordered], axis=-1).astype(np.float32)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = u * col_spacing, v * row_spacing
    lps[:3, 2] = w * float(np.median(steps))
    lps[:3, 3] = positions[0]
    return volume, LPS @ lps


def ordered_instances(instances: Sequence[Dataset]) -> list[Dataset]:
    """The instances in volume order: along the slice normal (the third voxel axis)."""
    iop = np.array([float(x) for x in instances[0].ImageOrientationPatient])
    w = np.cross(iop[:3], iop[3:])
    return sorted(instances, key=lambda ds: float(np.dot([float(x) for x in ds.ImagePositionPatient], w)))


def _frame(ds: Dataset) -> np.ndarray:
    arr = ds.pixel_array.astype(np.float64)
    return arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)


def client(url: str, username: str | None = None, password: str | None = None) -> Any:
    """A dicomweb-client session on ``url`` (``.../dicom-web``), with HTTP basic auth when given."""
    import requests
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session

    session: requests.Session = create_session()
    if username:
        session.auth = (username, password or "")
    return DICOMwebClient(url=url.rstrip("/"), session=session)


def store(url: str, instances: Sequence[Dataset], **auth: str) -> None:
    """STOW-RS the instances (one study) to the PACS."""
    client(url, **auth).store_instances(list(instances))


def retrieve_series(url: str, study_uid: str, series_uid: str, **auth: str) -> list[Dataset]:
    """WADO-RS every instance of a series."""
    return list(client(url, **auth).retrieve_series(study_uid, series_uid))

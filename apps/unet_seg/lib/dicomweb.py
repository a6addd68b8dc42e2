"""The DICOMweb datastore (``--studies http://.../dicom-web``): a PACS as the server's datastore.

MONAI Label's own DICOMweb set-up downloads dcmqi binaries at start-up (no internet in a hospital
network: the server does not start), lists only CT series, converts series with no check that they
are volumes, leaves half-downloaded series in its cache, waits for a silent PACS for ever, and
writes labels through an external binary. Here:

* start-up downloads nothing; the series listed are those of ``--conf dicomweb_modalities``
  (default ``MR,CT``; a QIDO-RS comma list), asked again after ``dicomweb_listing_s`` (default 60;
  MONAI Label keeps its listing two hours, so new series from a scanner stay invisible that long);
* a series is downloaded into a temp folder renamed into the cache when complete, converted by
  ``lib.dicomseries.series_to_volume`` (refuses one slice, gaps, mixed orientations: 422) and
  cached as NIfTI in exactly that grid, so images and labels share it voxel for voxel;
* final labels go to the PACS as DICOM SEG written by highdicom (``lib.dicomseg``) after a
  geometry check (axis flips/permutations re-oriented as the file datastore does), then a local
  copy; ``/infer?output=dicom_seg`` uses the same writer for predictions;
* the labelled series are those with a SEG in the PACS, whoever wrote it: the newest SEG of a
  series is converted with highdicom (segments matched to the models' labels by name) for training;
  a SEG whose segments are not the models' labels is skipped with a warning;
* ``PUT /datastore/image`` checks the upload like the file datastore, turns it into a series of
  the first configured modality and stores it by STOW-RS (the reply names the new series);
* every request to the PACS has a timeout (``dicomweb_timeout`` seconds, default 30); a PACS that
  is down answers 503, a slow one 504, one that refuses the credentials 502 (``pacs_fault``);
* HTTP basic auth towards the PACS: ``dicomweb_user`` + ``dicomweb_password_file`` (a file only the
  server's account reads; a password on the command line is readable by every user of the
  machine, so there is no conf for it) or MONAI Label's ``MONAI_LABEL_DICOMWEB_USERNAME`` /
  ``MONAI_LABEL_DICOMWEB_PASSWORD`` environment settings.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import requests
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

from .conf import AppConf, ConfError
from .datastore import NoServerPaths, WatcherLock, align_to_image, check_id
from .dicomseg import label_to_seg, seg_to_label
from .dicomseries import series_to_volume, volume_to_series
from .validation import InputError, affine_offset_mm, probe_file, read_voxels

logger = logging.getLogger(__name__)

MODALITIES = ("MR", "CT", "PT", "US", "XA", "CR", "DX", "MG", "OT")
FINAL = DefaultLabelTag.FINAL.value
STATUS_QUIET_S = 15.0  # after a PACS fault, the datastore's counts come from memory this long


def modalities_from_conf(conf: AppConf) -> str:
    """The QIDO-RS Modality filter (comma list) from ``dicomweb_modalities``; unknown codes are refused."""
    codes = [m.strip().upper() for m in conf.str("dicomweb_modalities", "MR,CT").split(",") if m.strip()]
    unknown = [m for m in codes if m not in MODALITIES]
    if not codes or unknown:
        raise ConfError(
            f"dicomweb_modalities: expected a comma list of {', '.join(MODALITIES)}, got {unknown or codes}"
        )
    return ",".join(codes)


def pacs_fault(e: BaseException) -> tuple[int, str] | None:
    """(status, message) for a failed request to the PACS (503 down, 504 slow, 502 refused); None otherwise."""
    if isinstance(e, requests.exceptions.ConnectTimeout) or (
        isinstance(e, requests.exceptions.ConnectionError) and not isinstance(e, requests.exceptions.ReadTimeout)
    ):
        return 503, "the PACS (DICOMweb) is unreachable; nothing was changed, try again later"
    if isinstance(e, requests.exceptions.Timeout):
        return 504, "the PACS (DICOMweb) did not answer in time (conf dicomweb_timeout); nothing was changed"
    if isinstance(e, requests.exceptions.HTTPError) and e.response is not None:
        code = e.response.status_code
        if code in (401, 403):
            return 502, "the PACS refused this server's credentials (conf dicomweb_user / dicomweb_password_file)"
        return 502, f"the PACS answered HTTP {code}; nothing was changed"
    return None


class PacsSession(requests.Session):
    """A requests session whose every request has a timeout (dicomweb-client passes none)."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = (min(10.0, timeout), timeout)  # (connect, read)

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        return super().request(method, url, *args, **kwargs)


def pacs_credentials(conf: AppConf) -> tuple[str, str] | None:
    """(user, password) for HTTP basic auth towards the PACS, from the conf's password file or the env settings."""
    if conf.get("dicomweb_password") is not None:
        raise ConfError(
            "dicomweb_password: not accepted (visible to every user of the machine); use dicomweb_password_file"
        )
    user = conf.str("dicomweb_user", "")
    password_file = conf.str("dicomweb_password_file", "")
    if user or password_file:
        if not (user and password_file):
            raise ConfError("dicomweb_user and dicomweb_password_file go together")
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.read().strip("\r\n")
        except OSError as e:
            raise ConfError(f"dicomweb_password_file: cannot read it ({e.strerror})") from e
        if not password:
            raise ConfError("dicomweb_password_file: the file is empty")
        return user, password
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        return settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
    return None


def _value(entry: Mapping[str, Any], tag: str) -> str:
    """A QIDO-RS JSON attribute's first value as text ('' if absent)."""
    values = (entry.get(tag) or {}).get("Value") or [""]
    return str(values[0])


class SegDICOMWebDatastore(NoServerPaths, WatcherLock, DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with checked series, SEG labels by highdicom and PACS faults (module doc)."""

    def __init__(
        self,
        *args: Any,
        labels: Mapping[str, int],
        tolerance_mm: float = 0.5,
        upload_modality: str = "MR",
        listing_s: float = 60.0,
        **kwargs: Any,
    ) -> None:
        self.listing_s = listing_s
        self._listing: list[str] | None = None
        self._listing_until = 0.0
        super().__init__(*args, **kwargs)
        self.seg_labels = {n: v for n, v in labels.items() if v != 0}
        self.tolerance_mm = tolerance_mm
        self.upload_modality = upload_modality
        self._refs: dict[str, str] = {}  # SEG series uid -> the image series it references (immutable)
        self._last_status: dict[str, Any] = {"total": 0, "completed": 0, "label_tags": {}}
        self._quiet_until = 0.0
        self._fault = ""  # after a PACS fault, status() answers from memory for a while

    def status(self) -> dict[str, Any]:
        """Counts for ``/info`` and ``/datastore``; while the PACS fails, the last counts and what is wrong."""
        if time.monotonic() < self._quiet_until:
            return {**self._last_status, "pacs": self._fault}
        with self._mutex:  # the local tags; the PACS is asked outside the lock
            tags: dict[str, int] = {}
            for obj in self._datastore.objects.values():
                for tag in obj.labels:
                    tags[tag] = tags.get(tag, 0) + 1
        try:
            total, completed = len(self.list_images()), len(self.get_labeled_images())
            self._last_status = {"total": total, "completed": completed, "label_tags": tags, "pacs": "reachable"}
            return self._last_status
        except requests.RequestException as e:
            fault = pacs_fault(e)
            if fault is None:
                raise
            self._fault = fault[1]
            self._quiet_until = time.monotonic() + STATUS_QUIET_S
            logger.warning(f"DICOMweb datastore: {fault[1]} ({type(e).__name__})")
            return {**self._last_status, "pacs": self._fault}

    # ---- images ----------------------------------------------------------------------------
    def list_images(self) -> list[str]:
        """The series of the served modalities, asked again after ``dicomweb_listing_s`` (MONAI Label: 2 hours)."""
        if self._listing is None or time.monotonic() >= self._listing_until:
            found = self._client.search_for_series(search_filters=self._search_filter)
            self._listing = [_value(entry, "0020000E") for entry in found]
            self._listing_until = time.monotonic() + self.listing_s
        return list(self._listing)

    def _require(self, image_id: str) -> None:
        check_id(image_id)
        if image_id not in self.list_images():
            raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore (PACS)")

    def _download(self, study_id: str | None, series_id: str, folder: str) -> None:
        """The series' instances into ``folder``, which appears only once complete."""
        if os.path.isdir(folder) and os.listdir(folder):
            return
        from monailabel.datastore.utils.dicom import dicom_web_download_series

        parent = os.path.dirname(folder)
        os.makedirs(parent, exist_ok=True)
        partial = tempfile.mkdtemp(prefix=".partial-", dir=parent)
        try:
            dicom_web_download_series(study_id, series_id, partial, self._client, self._fetch_by_frame)
            if os.path.isdir(folder):
                os.rmdir(folder)  # an empty leftover
            os.replace(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def get_image_uri(self, image_id: str) -> str:
        """The series as NIfTI in ``series_to_volume``'s grid (downloaded and checked once, then cached)."""
        self._require(image_id)
        folder = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        nii = f"{folder}.nii.gz"
        with self._mutex:
            if os.path.exists(nii) and image_id in self._datastore.objects:
                return nii
            self._download(None, image_id, folder)
            volume, affine = series_to_volume(self._instances(folder))
            fd, tmp = tempfile.mkstemp(suffix=".nii.gz", dir=os.path.dirname(folder))
            os.close(fd)
            try:
                nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), tmp)
                LocalDatastore.add_image(self, image_id, tmp, self._dicom_info(image_id))
            finally:
                os.remove(tmp)
            return nii

    @staticmethod
    def _instances(folder: str) -> list[Dataset]:
        return [pydicom.dcmread(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f.endswith(".dcm")]

    def _series(self, image_id: str) -> list[Dataset]:
        """The cached instances of a series (downloaded with the image)."""
        self.get_image_uri(image_id)
        return self._instances(os.path.realpath(os.path.join(self._datastore.image_path(), image_id)))

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """An uploaded (already checked) 3D image -> a new series of ``upload_modality`` in the PACS; its uid."""
        header = probe_file(image_filename, image_filename)
        data, affine = read_voxels(image_filename, header)
        if data.ndim != 3 or affine is None:
            raise InputError(
                f"image: the PACS stores 3D volumes with a geometry (NIfTI, NRRD); got shape {tuple(data.shape)}"
                f"{'' if affine is not None else ' without a geometry'}"
            )
        series = volume_to_series(
            data,
            affine,
            modality=self.upload_modality,
            patient_id=image_id[:64],
            patient_name=f"{image_id[:60]}^",
            series_description=f"uploaded to unet_seg: {image_id}"[:64],
        )
        self._client.store_instances(series)
        uid = str(series[0].SeriesInstanceUID)
        self._listing = None  # listed from the next request on
        logger.info(f"stored uploaded image {image_id!r} in the PACS as series {uid} ({len(series)} instances)")
        return uid

    # ---- labels ----------------------------------------------------------------------------
    def seg_of(self, image_id: str, label_filename: str, *, manual: bool) -> Any:
        """A DICOM SEG of a label file over series ``image_id``, after checking the label lies on its grid."""
        source = self._series(image_id)
        _, affine = series_to_volume(source)
        img = nib.load(label_filename)
        label = np.asanyarray(img.dataobj)
        aligned = align_to_image(label, np.asarray(img.affine), affine)  # flipped/permuted axes: the series' order
        if aligned is None:  # same index order, a grid a little off at most (as on the file datastore)
            offset = affine_offset_mm(np.asarray(img.affine), affine, label.shape)
            if offset > self.tolerance_mm:
                raise InputError(
                    f"label: its grid lies {offset:.3g} mm from series {image_id}'s (tolerance {self.tolerance_mm} mm)"
                )
            aligned = label
        label = np.rint(aligned).astype(np.int64)
        description = "unet_seg label" if manual else "unet_seg prediction"
        return label_to_seg(label, source, self.seg_labels, manual=manual, series_description=description)

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        """A final label is checked against the series' geometry, stored in the PACS as a SEG, then cached locally."""
        self._require(image_id)
        if label_tag != FINAL:
            with self._mutex:
                self.get_image_uri(image_id)
                return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        seg = self.seg_of(image_id, label_filename, manual=True)
        self._client.store_instances([seg])
        logger.info(f"stored SEG {seg.SeriesInstanceUID} for series {image_id} in the PACS")
        self._refs[str(seg.SeriesInstanceUID)] = image_id
        return self._keep_label(image_id, label_filename, seg)

    def _keep_label(self, image_id: str, label_filename: str, seg: Dataset) -> str:
        info = {"SeriesInstanceUID": str(seg.SeriesInstanceUID), "Modality": "SEG"}
        info["StudyInstanceUID"] = str(seg.StudyInstanceUID)
        with self._mutex:
            return LocalDatastore.save_label(self, image_id, label_filename, FINAL, info)

    def _newest_segs(self) -> dict[str, tuple[str, str]]:
        """image series uid -> (study uid, SEG series uid) of its newest SEG in the PACS."""
        found = self._client.search_for_series(
            search_filters={"Modality": "SEG"}, fields=["SeriesDate", "SeriesTime", "StudyInstanceUID"]
        )
        newest: dict[str, tuple[tuple[str, str, str], str, str]] = {}
        for entry in found:
            study, seg_uid = _value(entry, "0020000D"), _value(entry, "0020000E")
            if seg_uid not in self._refs:
                meta = Dataset.from_json(self._client.retrieve_series_metadata(study, seg_uid)[0])
                refs = meta.get("ReferencedSeriesSequence")
                self._refs[seg_uid] = str(refs[0].SeriesInstanceUID) if refs else ""
            image = self._refs[seg_uid]
            key = (_value(entry, "00080021"), _value(entry, "00080031"), seg_uid)
            if image and (image not in newest or key > newest[image][0]):
                newest[image] = (key, study, seg_uid)
        return {image: (study, seg) for image, (_, study, seg) in newest.items()}

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Series of the served modalities that have a SEG in the PACS (whoever wrote it)."""
        if label_tag not in (None, FINAL):
            return LocalDatastore.get_labeled_images(self, label_tag, labels)
        listed = set(self.list_images())
        return sorted(image for image in self._newest_segs() if image in listed)

    def _download_labeled_data(self) -> None:
        """Bring each labelled series' newest SEG into the local cache as a label in the series' grid."""
        listed = set(self.list_images())
        newest = {image: ref for image, ref in self._newest_segs().items() if image in listed}
        for image_id, (study, seg_uid) in newest.items():
            local = self._datastore.objects.get(image_id)
            label = local.labels.get(FINAL) if local else None
            if label is not None and label.info.get("SeriesInstanceUID") == seg_uid:
                continue
            try:
                self._fetch_label(image_id, study, seg_uid)
            except InputError as e:
                logger.warning(f"SEG {seg_uid} of series {image_id} not used for training: {e}")
        for image_id, obj in list(self._datastore.objects.items()):
            label = obj.labels.get(FINAL)
            if label is not None and label.info.get("Modality") == "SEG" and image_id not in newest:
                logger.info(f"series {image_id}: its SEG left the PACS; local label removed")
                LocalDatastore.remove_label(self, image_id, FINAL)

    def _fetch_label(self, image_id: str, study: str, seg_uid: str) -> None:
        source = self._series(image_id)
        _, affine = series_to_volume(source)
        with tempfile.TemporaryDirectory(prefix="unet_seg-seg-") as tmp:
            self._download(study, seg_uid, os.path.join(tmp, "seg"))
            files = self._instances(os.path.join(tmp, "seg"))
            if len(files) != 1:
                raise InputError(f"expected one SEG instance, found {len(files)}")
            label = seg_to_label(files[0], source, self._label_names(files[0]))
            path = os.path.join(tmp, f"{image_id}.nii.gz")
            nib.save(nib.Nifti1Image(label, affine), path)
            self._keep_label(image_id, path, files[0])
        logger.info(f"series {image_id}: label from SEG {seg_uid} cached for training")

    def _label_names(self, seg: Dataset) -> dict[str, int]:
        """The models' labels under the SEG's own segment names (matched ignoring case, spaces, '_' and '-')."""

        def key(name: str) -> str:
            return "".join(c for c in name.lower() if c.isalnum())

        ours = {key(n): v for n, v in self.seg_labels.items()}
        names = {str(d.SegmentLabel) for d in seg.SegmentSequence}
        return {n: ours[key(n)] for n in names if key(n) in ours} | dict(self.seg_labels)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """Labels are read from the local cache (``datalist`` brings final ones from the PACS first)."""
        return LocalDatastore.get_label_uri(self, label_id, label_tag, image_id)

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        with self._mutex:
            self._download_labeled_data()
            return LocalDatastore.datalist(self, full_path)


def dicomweb_datastore(url: str, conf: AppConf, labels: Mapping[str, int], tolerance_mm: float) -> Any:
    """The DICOMweb datastore on ``url``, built offline with this app's search filter, timeout and credentials."""
    listing_s = conf.float("dicomweb_listing_s", 60.0)
    if not 0 <= listing_s <= 86400:
        raise ConfError(f"dicomweb_listing_s: expected seconds in [0, 86400], got {listing_s}")
    timeout = conf.float("dicomweb_timeout", 30.0)
    if not 1 <= timeout <= 3600:
        raise ConfError(f"dicomweb_timeout: expected seconds in [1, 3600], got {timeout}")
    session = PacsSession(timeout)
    credentials = pacs_credentials(conf)
    if credentials:
        session.auth = credentials
    client = DICOMwebClientX(
        url=url.rstrip("/"),
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    client.set_http_retry_params(retry=False)  # its default retries every failure 5 times: minutes for a down PACS
    modalities = modalities_from_conf(conf)
    cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
    logger.info(
        f"DICOMweb datastore: series of modalities {modalities}, timeout {timeout:g} s"
        f"{' (basic auth)' if credentials else ''}"
    )
    return SegDICOMWebDatastore(
        client=client,
        labels=labels,
        tolerance_mm=tolerance_mm,
        upload_modality=modalities.split(",")[0],
        listing_s=listing_s,
        search_filter={"Modality": modalities},
        cache_path=cache,
        fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
        convert_to_nifti=True,
    )

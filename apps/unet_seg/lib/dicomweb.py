"""The DICOMweb datastore (``--studies http://.../dicom-web``): offline start-up, the modalities the models serve.

MONAI Label's own set-up downloads dcmqi binaries at start-up (no internet in a hospital network:
the server does not start) and lists only CT series by default. Here the datastore is built
without any download, lists the series of the modalities in ``--conf dicomweb_modalities``
(default ``MR,CT``; QIDO-RS comma list), and authenticates towards the PACS with MONAI Label's
``MONAI_LABEL_DICOMWEB_USERNAME`` / ``MONAI_LABEL_DICOMWEB_PASSWORD`` environment settings
(never a command-line value, which other users of the machine can read).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from dicomweb_client.session_utils import create_session_from_user_pass
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from .conf import AppConf, ConfError
from .dicomseg import label_to_seg
from .dicomseries import series_to_volume
from .validation import InputError

logger = logging.getLogger(__name__)

MODALITIES = ("MR", "CT", "PT", "US", "XA", "CR", "DX", "MG", "OT")


def modalities_from_conf(conf: AppConf) -> str:
    """The QIDO-RS Modality filter (comma list) from ``dicomweb_modalities``; unknown codes are refused."""
    codes = [m.strip().upper() for m in conf.str("dicomweb_modalities", "MR,CT").split(",") if m.strip()]
    unknown = [m for m in codes if m not in MODALITIES]
    if not codes or unknown:
        raise ConfError(
            f"dicomweb_modalities: expected a comma list of {', '.join(MODALITIES)}, got {unknown or codes}"
        )
    return ",".join(codes)


class SegDICOMWebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore whose final labels go to the PACS as DICOM SEG written by highdicom."""

    def __init__(self, *args: Any, labels: Mapping[str, int], tolerance_mm: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seg_labels = dict(labels)
        self.tolerance_mm = tolerance_mm

    def _series(self, image_id: str) -> list[Any]:
        """The cached instances of a series (downloaded with the image)."""
        self.get_image_uri(image_id)
        folder = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        files = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if not f.endswith((".nii", ".nii.gz"))]
        return [pydicom.dcmread(f) for f in files]

    def seg_of(self, image_id: str, label_filename: str, *, manual: bool) -> Any:
        """A DICOM SEG of a label file over series ``image_id``, after checking the label lies on its grid."""
        source = self._series(image_id)
        _, affine = series_to_volume(source)
        img = nib.load(label_filename)
        offset = float(np.abs(np.asarray(img.affine) - affine).max())
        if offset > self.tolerance_mm:
            raise InputError(
                f"label: its grid lies {offset:.3g} mm from series {image_id}'s (tolerance {self.tolerance_mm} mm)"
            )
        label = np.rint(np.asanyarray(img.dataobj)).astype(np.int64)
        description = "unet_seg label" if manual else "unet_seg prediction"
        return label_to_seg(label, source, self.seg_labels, manual=manual, series_description=description)

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        """A final label is checked against the series' geometry, stored in the PACS as a SEG, then cached locally."""
        if label_tag != DefaultLabelTag.FINAL.value:
            return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)
        seg = self.seg_of(image_id, label_filename, manual=True)
        self._client.store_instances([seg])
        logger.info(f"stored SEG {seg.SeriesInstanceUID} for series {image_id} in the PACS")
        label_info = {
            **label_info,
            "SeriesInstanceUID": seg.SeriesInstanceUID,
            "Modality": "SEG",
            "StudyInstanceUID": seg.StudyInstanceUID,
        }
        type(self).get_labeled_images.cache_clear()  # MONAI Label caches the listing for hours
        return LocalDatastore.save_label(self, image_id, label_filename, label_tag, label_info)


def dicomweb_datastore(url: str, conf: AppConf, labels: Mapping[str, int], tolerance_mm: float) -> Any:
    """MONAI Label's DICOMweb datastore on ``url``, built offline with this app's search filter."""
    session = None
    if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
        session = create_session_from_user_pass(
            settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD
        )
    client = DICOMwebClientX(
        url=url.rstrip("/"),
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    modalities = modalities_from_conf(conf)
    cache = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
    logger.info(f"DICOMweb datastore: series of modalities {modalities}{' (basic auth)' if session else ''}")
    return SegDICOMWebDatastore(
        client=client,
        labels=labels,
        tolerance_mm=tolerance_mm,
        search_filter={"Modality": modalities},
        cache_path=cache,
        fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
        convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI,
    )

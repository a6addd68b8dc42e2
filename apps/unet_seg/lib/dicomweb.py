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
from typing import Any

from dicomweb_client.session_utils import create_session_from_user_pass
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore

from .conf import AppConf, ConfError

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


def dicomweb_datastore(url: str, conf: AppConf) -> Any:
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
    return DICOMWebDatastore(
        client=client,
        search_filter={"Modality": modalities},
        cache_path=cache,
        fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
        convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI,
    )

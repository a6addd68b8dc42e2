"""Shared fixtures: real data paths, small studies folders and a REAL MONAI Label server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "unet_seg"
DATA = (ROOT.parent / "shared" / "data").resolve()
HIPPO = DATA / "hippocampus"

sys.path.insert(0, str(APP_DIR))
os.environ.setdefault("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")

from lib.serverproc import LabelServer, free_port, running_server  # noqa: E402,F401  (re-exported for the tests)


def hippo_case(i: int) -> tuple[Path, Path]:
    """(image, label) of MSD hippocampus case ``i``."""
    name = f"hippocampus_{i:03d}.nii.gz"
    return HIPPO / "imagesTr" / name, HIPPO / "labelsTr" / name


HIPPO_IDS = [3, 4, 1, 6, 8]


@pytest.fixture(scope="session")
def require_data() -> None:
    if not HIPPO.exists():
        pytest.fail(f"real data missing: {HIPPO} (the tests need ../shared/data beside the checkout)")


def make_studies(folder: Path, labelled: list[int], unlabelled: list[int]) -> Path:
    """A MONAI Label studies folder with real hippocampus images; ``labelled`` get labels/final."""
    (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for i in labelled + unlabelled:
        img, lab = hippo_case(i)
        shutil.copy(img, folder / img.name)
        if i in labelled:
            shutil.copy(lab, folder / "labels" / "final" / lab.name)
    return folder


Server = LabelServer  # the fixtures' name for a real server process (lib/serverproc.py)


TINY_CONF = {"models": "unet3d", "preset": "tiny", "roi_size": "16", "tracking": "mlflow"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, require_data: None) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("server")
    studies = make_studies(base / "studies", labelled=HIPPO_IDS[:3], unlabelled=HIPPO_IDS[3:])
    conf = dict(TINY_CONF, model_dir=str(base / "model"))
    with running_server(studies, conf, base / "server.log") as srv:
        yield srv


def serving_meta(model_dir: Path | str, model: str) -> dict:
    """Meta of the version that serves ``model`` (as stored: CheckpointMeta.to_dict())."""
    from lib.modelstore import ModelStore

    store = ModelStore(str(model_dir), model)
    serving = store.serving()
    assert serving is not None, f"{model}: no version serves; versions: {store.describe()}"
    return store.meta(serving.id).to_dict()


from pacs_fixtures import loaded, pacs, pacs_server  # noqa: E402,F401  (module-scoped PACS fixtures for the tests)

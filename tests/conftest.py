"""Shared fixtures: real data paths, small studies folders and a REAL MONAI Label server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "apps" / "unet_seg"
DATA = (ROOT.parent / "shared" / "data").resolve()
HIPPO = DATA / "hippocampus"

sys.path.insert(0, str(APP_DIR))
os.environ.setdefault("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `monailabel start_server` process serving apps/unet_seg."""

    def __init__(self, studies: Path, conf: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.studies = studies
        self.log = log
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
               "--host", "127.0.0.1", "--port", str(self.port)]
        for k, v in conf.items():
            cmd += ["--conf", k, v]
        env = dict(os.environ, PYTHONUNBUFFERED="1", MONAI_LABEL_AUTO_UPDATE_SCORING="false")
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))

    def wait_ready(self, timeout: float = 180) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def wait_train_done(self, timeout: float = 600) -> dict:
        """Poll GET /train/ until the latest training task has finished; returns its status."""
        end = time.time() + timeout
        status: dict = {}
        while time.time() < end:
            r = requests.get(f"{self.url}/train/", timeout=10)
            if r.status_code == 200:
                status = r.json()
                if status.get("status") not in ("SUBMITTED", "RUNNING", "QUEUED", None):
                    return status
            time.sleep(2)
        raise TimeoutError(f"training still running after {timeout}s: {status}")


@contextlib.contextmanager
def running_server(studies: Path, conf: dict[str, str], log: Path) -> Iterator[Server]:
    """Start a real server, wait until /info answers, stop it afterwards."""
    srv = Server(studies, conf, log)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


TINY_CONF = {"models": "unet3d", "preset": "tiny", "roi_size": "16", "tracking": "mlflow"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, require_data: None) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("server")
    studies = make_studies(base / "studies", labelled=HIPPO_IDS[:3], unlabelled=HIPPO_IDS[3:])
    conf = dict(TINY_CONF, model_dir=str(base / "model"))
    with running_server(studies, conf, base / "server.log") as srv:
        yield srv

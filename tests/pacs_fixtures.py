"""Shared PACS fixtures (module scope; conftest.py imports them): a real Orthanc (scripts/orthanc.sh) on 127.0.0.1,
the sample volumes stored in it as MR series (scripts/load_pacs.py), and a real MONAI Label server on it, offline
(any download attempt would fail)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lib.serverproc import LabelServer, free_port, running_server, sample_conf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "orthanc.sh"), "start", str(folder), str(port)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield f"http://127.0.0.1:{port}/dicom-web"
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "orthanc.sh"), "stop", str(folder)], timeout=60)
    assert not (folder / "orthanc.pid").exists()


@pytest.fixture(scope="module")
def loaded(pacs: str) -> list[dict]:
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "load_pacs.py"),
            "--url",
            pacs,
            "--images",
            str(ROOT / "sample" / "studies"),
            "--modality",
            "MR",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost"}


@pytest.fixture(scope="module")
def pacs_server(pacs: str, loaded: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelServer]:
    base = tmp_path_factory.mktemp("pacs_server")
    conf = sample_conf(
        model_dir=str(base / "model"),
        dicomweb_timeout="5",
        dicomweb_listing_s="1",  # series stored by a test are listed a second later
    )
    t = time.perf_counter()
    env = {**OFFLINE, "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(base / "cache")}
    with running_server(pacs, conf, base / "server.log", env=env) as srv:  # any download attempt would fail
        print(f"server on DICOMweb ready in {time.perf_counter() - t:.1f} s")
        yield srv

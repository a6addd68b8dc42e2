"""A real ``monailabel start_server`` process on 127.0.0.1 serving this app (tests and benchmarks).

Starts the server on a free port with ``--conf`` pairs, waits until ``/info/`` answers, stops it,
and polls training to its end. Used by the test fixtures and ``benchmarks/clinician_loop.py``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import requests

APP_DIR = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = APP_DIR.parents[1] / "sample" / "models" / "unet3d_hippocampus_small.pt"


def sample_conf(**extra: str) -> dict[str, str]:
    """The conf that serves the embedded sample UNet3D as ``scripts/run_sample.sh`` does, without tracking or
    automatic retraining (tests, benchmarks); ``extra`` adds keys such as ``model_dir``."""
    return {
        "models": "unet3d",
        "preset": "small",
        "roi_size": "40,56,40",
        "tracking": "none",
        "auto_retrain_after": "0",
        "unet3d.pretrained": str(SAMPLE_MODEL),
        **extra,
    }


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(studies: Path | str, conf: Mapping[str, str], port: int) -> list[str]:
    """The ``monailabel start_server`` command line for apps/unet_seg on 127.0.0.1:``port`` with ``--conf`` pairs."""
    cmd = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(APP_DIR),
        "--studies",
        str(studies),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    for k, v in conf.items():
        cmd += ["--conf", k, str(v)]
    return cmd


class LabelServer:
    """A real `monailabel start_server` process serving apps/unet_seg (log written to ``log``)."""

    def __init__(
        self,
        studies: Path | str,
        conf: Mapping[str, str],
        log: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.studies: Any = studies if "://" in str(studies) else Path(studies)  # a folder or a DICOMweb URL
        self.log = Path(log)
        self.conf = dict(conf)
        cmd = server_command(studies, conf, self.port)
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", MONAI_LABEL_AUTO_UPDATE_SCORING="false", **(env or {}))
        with open(self.log, "w") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=str(cwd or APP_DIR.parents[1])
            )

    def wait_ready(self, timeout: float = 180) -> None:
        """Block until /info/ answers (200, or 401 with authentication on).

        RuntimeError with the log's tail if the server exits or stays silent.
        """
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code in (200, 401):  # 401: up, with auth on
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        """Terminate the server (kill after 20 s)."""
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def wait_train_done(self, timeout: float = 600, poll_s: float = 2.0) -> dict:
        """Poll GET /train/ until the latest training task has finished; returns its status."""
        end = time.time() + timeout
        status: dict = {}
        while time.time() < end:
            r = requests.get(f"{self.url}/train/", timeout=10)
            if r.status_code == 200:
                status = r.json()
                if status.get("status") not in ("SUBMITTED", "RUNNING", "QUEUED", None):
                    return status
            time.sleep(poll_s)
        raise TimeoutError(f"training still running after {timeout}s: {status}")


@contextlib.contextmanager
def running_server(
    studies: Path | str, conf: Mapping[str, str], log: Path, env: Mapping[str, str] | None = None
) -> Iterator[LabelServer]:
    """Start a real server (``env`` added to its environment), wait until /info answers, stop it afterwards."""
    srv = LabelServer(studies, conf, log, env=env)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()

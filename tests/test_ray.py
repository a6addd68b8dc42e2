"""Cohort inference on a real local Ray head (scripts/ray.sh: Ray from PyPI, 127.0.0.1 only, its own pid):
``main.py predict --ray`` writes every volume once, equal to a local prediction, survives a worker killed
mid-volume, resumes, and reports a corrupt volume without stopping the others."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT, free_port

CKPT = ROOT / "sample" / "models" / "unet3d_hippocampus_small.pt"
NAMES = ["hippocampus_003", "hippocampus_004", "hippocampus_011", "hippocampus_014"]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("ray")
    port = free_port()
    script = ["bash", str(ROOT / "scripts" / "ray.sh")]
    r = subprocess.run([*script, "start", str(folder), str(port), "2"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    pid = int((folder / "ray.pid").read_text())
    try:
        lines = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout.splitlines()
        local = [line.split()[3] for line in lines if line.strip()]
        assert local and all("127.0.0.1" in a for a in local), lines  # the GCS on loopback only
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([*script, "stop", str(folder)], timeout=120)
    assert not (folder / "ray.pid").exists()
    assert subprocess.run(["pgrep", "-g", str(pid)], capture_output=True).returncode == 1  # its processes are gone


def predict(data: Path, results: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "main.py"), "predict", "--config", "unet3d", "--data", str(data)]
    cmd += ["--ckpt", str(CKPT), "--results", str(results), *extra]
    import os

    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def sample_data(folder: Path, names: list[str]) -> Path:
    (folder / "images").mkdir(parents=True)
    for n in names:
        (folder / "images" / f"{n}.nii.gz").write_bytes((ROOT / "sample" / "studies" / f"{n}.nii.gz").read_bytes())
    return folder


def test_cohort_on_ray_survives_a_killed_worker_and_equals_local(ray_head: str, tmp_path: Path) -> None:
    data = sample_data(tmp_path / "data", NAMES)
    r = predict(
        data, tmp_path / "ray", "--ray", ray_head, "--ray_workers", "2", env={"UNET_SEG_RAY_FAILPOINT": NAMES[1]}
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "4 prediction(s) written, 0 already there, 0 failed, 1 retried after a worker died; 2 Ray worker(s)" in (
        r.stdout
    ), r.stdout[-1000:]
    assert f"the worker on {NAMES[1]} died" in r.stderr + r.stdout
    # the same torch thread count as a Ray worker (--ray_cpus 1): bf16 sums may round differently across counts
    local = predict(data, tmp_path / "local", env={"OMP_NUM_THREADS": "1"})
    assert local.returncode == 0, local.stderr[-2000:]
    out = tmp_path / "ray" / "predictions"
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(f"{n}.nii.gz" for n in NAMES)
    assert not list(out.glob("*.part*"))  # written atomically
    for n in NAMES:
        a = nib.load(out / f"{n}.nii.gz")
        b = nib.load(tmp_path / "local" / "predictions" / f"{n}.nii.gz")
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)) and np.allclose(a.affine, b.affine)
    # resumable: finished outputs are skipped, a missing one is made again
    (out / f"{NAMES[2]}.nii.gz").unlink()
    again = predict(data, tmp_path / "ray", "--ray", ray_head)
    assert again.returncode == 0 and "1 prediction(s) written, 3 already there" in again.stdout, again.stdout[-800:]
    done = predict(data, tmp_path / "ray", "--ray", ray_head)
    assert done.returncode == 0 and "0 prediction(s) written, 4 already there" in done.stdout


def test_a_corrupt_volume_is_reported_and_the_others_are_written(ray_head: str, tmp_path: Path) -> None:
    data = sample_data(tmp_path / "data", NAMES[:2])
    broken = (ROOT / "sample" / "studies" / f"{NAMES[2]}.nii.gz").read_bytes()[:3000]
    (data / "images" / "broken_case.nii.gz").write_bytes(broken)
    r = predict(data, tmp_path / "ray", "--ray", ray_head, "--ray_workers", "2")
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-2000:]
    assert "2 prediction(s) written, 0 already there, 1 failed" in r.stdout
    assert "failed: broken_case:" in r.stderr and "Traceback" not in r.stderr.split("failed: broken_case:")[1][:500]
    assert sorted(p.name for p in (tmp_path / "ray" / "predictions").glob("*.nii.gz")) == sorted(
        f"{n}.nii.gz" for n in NAMES[:2]
    )


def test_preannotation_hands_its_images_to_ray(ray_head: str, tmp_path: Path) -> None:
    """``--conf preannotation_ray ADDRESS``: POST /batch/infer runs on the Ray workers; the stored predictions
    are the server's own /infer labels; options the fast path cannot honour are refused up front."""
    import gzip
    import shutil
    import time

    import requests

    from conftest import running_server
    from lib.serverproc import sample_conf

    studies = tmp_path / "studies"
    shutil.copytree(ROOT / "sample" / "studies", studies)
    conf = sample_conf(model_dir=str(tmp_path / "model"), preannotation_ray=ray_head)
    with running_server(studies, conf, tmp_path / "server.log") as srv:
        bad = requests.post(f"{srv.url}/batch/infer/unet3d", json={"roi_size": [40, 56, 40]}, timeout=60)
        assert bad.status_code == 422 and "roi_size" in bad.json()["detail"], bad.text[:300]
        r = requests.post(f"{srv.url}/batch/infer/unet3d", params={"images": "unlabeled"}, json={"tta": True})
        assert r.status_code == 200 and r.json()["total"] == 2, r.text[:300]
        end = time.time() + 600
        while (status := requests.get(f"{srv.url}/batch/infer/", timeout=30).json())["status"] == "RUNNING":
            assert time.time() < end, status
            time.sleep(1)
        assert status["status"] == "DONE" and status["done"] == 2 and status["failed"] == 0, status
        for image in ("hippocampus_015", "hippocampus_020"):
            stored = requests.get(f"{srv.url}/datastore/label", params={"label": image, "tag": "prediction"})
            assert stored.status_code == 200
            ours = nib.Nifti1Image.from_bytes(gzip.decompress(stored.content))
            direct = requests.post(
                f"{srv.url}/infer/unet3d",
                params={"image": image, "output": "image"},
                data={"params": '{"tta": true}'},
                timeout=300,
            )
            assert direct.status_code == 200, direct.text[:300]
            theirs = nib.Nifti1Image.from_bytes(gzip.decompress(direct.content))
            a, b = np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj)
            assert a.shape == b.shape and np.allclose(ours.affine, theirs.affine, atol=1e-5)
            for v in (1, 2):  # one Ray worker thread against the server's two: bf16 sums may round apart
                dice = 2 * ((a == v) & (b == v)).sum() / max((a == v).sum() + (b == v).sum(), 1)
                assert dice > 0.99, (image, v, dice)
        again = requests.post(f"{srv.url}/batch/infer/unet3d", params={"images": "unlabeled"}, json={"tta": True})
        assert again.status_code == 200
        while (status := requests.get(f"{srv.url}/batch/infer/", timeout=30).json())["status"] == "RUNNING":
            time.sleep(1)
        assert status["skipped"] == 2 and status["done"] == 0, status  # made by the serving version already

"""Pre-annotation and downloads on a real server (the sample studies and the sample UNet3D):

* ``GET /datastore/image`` / ``GET /datastore/label`` send the stored file with its SHA-256 (``check_only``: only
  size and SHA-256); bad or unknown ids are 4xx;
* ``POST /batch/infer/unet3d`` pre-annotates the unlabelled studies in the background under the tag
  ``prediction`` with the serving version, reports progress, skips what the serving version already made, can be
  stopped, and leaves interactive ``/infer`` served;
* next study says which version made its stored prediction and carries no server path.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Iterator

import pytest
import requests

from conftest import ROOT, Server, running_server
from lib.serverproc import sample_conf

SAMPLE = ROOT / "sample" / "studies"


@pytest.fixture(scope="module")
def sample_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("preannotate")
    shutil.copytree(SAMPLE, base / "studies")
    conf = sample_conf(
        model_dir=str(base / "model"),
    )
    with running_server(base / "studies", conf, base / "server.log") as srv:
        yield srv


def wait_job(server: Server, timeout: float = 300) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        status = requests.get(f"{server.url}/batch/infer/", timeout=30).json()
        if status["status"] != "RUNNING":
            return status
        time.sleep(0.3)
    raise TimeoutError(f"pre-annotation still running: {status}")


def test_download_sends_the_stored_file_with_its_checksum(sample_server: Server) -> None:
    stored = SAMPLE / "hippocampus_015.nii.gz"
    digest = hashlib.sha256(stored.read_bytes()).hexdigest()
    check = requests.get(
        f"{sample_server.url}/datastore/image", params={"image": "hippocampus_015", "check_only": "true"}, timeout=30
    ).json()
    assert check == {
        "image": "hippocampus_015",
        "name": "hippocampus_015.nii.gz",
        "size": stored.stat().st_size,
        "sha256": digest,
    }
    r = requests.get(f"{sample_server.url}/datastore/image", params={"image": "hippocampus_015"}, timeout=30)
    assert r.status_code == 200 and r.headers["x-image-sha256"] == digest
    assert (
        hashlib.sha256(r.content).hexdigest() == digest and "hippocampus_015.nii.gz" in r.headers["content-disposition"]
    )
    label = requests.get(
        f"{sample_server.url}/datastore/label", params={"label": "hippocampus_003", "tag": "final"}, timeout=30
    )
    final = SAMPLE / "labels" / "final" / "hippocampus_003.nii.gz"
    assert label.status_code == 200 and label.content == final.read_bytes()
    for params, status in [
        ({"image": "nosuch"}, 404),
        ({"image": "../../etc/passwd"}, 422),
        ({"image": "a/b"}, 422),
        ({}, 422),
    ]:
        r = requests.get(f"{sample_server.url}/datastore/image", params=params, timeout=30)
        assert r.status_code == status, (params, r.status_code, r.text[:200])
        assert str(SAMPLE) not in r.text and "/tmp" not in r.text
    info = requests.get(f"{sample_server.url}/datastore/image/info", params={"image": "hippocampus_015"}, timeout=30)
    assert info.status_code == 200 and "path" not in info.json() and str(SAMPLE.parent) not in info.text
    r = requests.get(f"{sample_server.url}/datastore/label", params={"label": "hippocampus_015", "tag": "final"})
    assert r.status_code == 404 and "no label tagged 'final'" in r.json()["detail"]
    r = requests.get(f"{sample_server.url}/datastore/label", params={"label": "hippocampus_003", "tag": "../x"})
    assert r.status_code == 422


def test_preannotation_stores_predictions_of_the_serving_version(sample_server: Server) -> None:
    url = sample_server.url
    unlabelled = {"hippocampus_015", "hippocampus_020"}
    r = requests.post(f"{url}/batch/infer/unet3d", params={"images": "unlabeled"}, json={}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["total"] == len(unlabelled)
    again = requests.post(f"{url}/batch/infer/unet3d", json={}, timeout=60)
    assert again.status_code in (200, 409)  # 409 while the first runs (it may already have finished)
    status = wait_job(sample_server)
    if again.status_code == 200:
        status = wait_job(sample_server)
    print(f"pre-annotation: {status['done']} studies in {status['elapsed_s']} s = {status['per_minute']} per minute")
    assert status["status"] == "DONE" and status["failed"] == 0, status
    info = requests.get(f"{url}/info/", timeout=30).json()
    serving = [v["id"] for v in info["model_versions"]["unet3d"] if v["serving"]]
    assert serving == ["v1"] and info["preannotation"]["status"] == "DONE"
    for image in unlabelled:
        r = requests.get(f"{url}/datastore/label", params={"label": image, "tag": "prediction"}, timeout=30)
        assert r.status_code == 200 and r.headers["x-image-sha256"] == hashlib.sha256(r.content).hexdigest()
        stored = requests.get(
            f"{url}/datastore/label/info", params={"label": image, "tag": "prediction"}, timeout=30
        ).json()
        assert stored["model"] == "unet3d" and stored["model_version"] == "v1", stored
    before = info["inference_queue"]["completed"]
    nxt = requests.post(f"{url}/activelearning/first", json={}, timeout=60).json()
    assert nxt["id"] in unlabelled and "path" not in nxt
    assert nxt["prediction"]["model_version"] == "v1" and nxt["prediction"]["serving"] is True
    assert requests.get(f"{url}/info/", timeout=30).json()["inference_queue"]["completed"] == before  # no inference
    # a second run skips what the serving version already made
    requests.post(f"{url}/batch/infer/unet3d", json={}, timeout=60).raise_for_status()
    status = wait_job(sample_server)
    assert status["skipped"] == len(unlabelled) and status["done"] == 0, status


def test_preannotation_can_be_stopped_and_interactive_infer_is_served(sample_server: Server) -> None:
    url = sample_server.url
    r = requests.post(f"{url}/batch/infer/unet3d", params={"images": "labeled"}, json={"tta": True}, timeout=60)
    assert r.status_code == 200 and r.json()["total"] == 4
    t = time.perf_counter()
    inter = requests.post(f"{url}/infer/unet3d", params={"image": "hippocampus_015", "output": "json"}, timeout=120)
    print(f"interactive /infer during pre-annotation: {time.perf_counter() - t:.2f} s")
    assert inter.status_code == 200
    stopped = requests.delete(f"{url}/batch/infer/", timeout=30)
    assert stopped.status_code in (200, 404)  # 404: the 4 studies were already done
    status = wait_job(sample_server)
    if stopped.status_code == 200:
        assert status["status"] == "STOPPED" and status["done"] < status["total"], status
    assert requests.delete(f"{url}/batch/infer/", timeout=30).status_code == 404  # nothing runs now


@pytest.mark.parametrize(
    "params, body, status, words",
    [
        ({}, {"image_ids": "hippocampus_015"}, 422, "image_ids"),
        ({}, {"image_ids": []}, 422, "image_ids"),
        ({}, {"image_ids": ["../../etc/passwd"]}, 422, "invalid image id"),
        ({}, {"image_ids": ["nosuch"]}, 404, "nosuch"),
        ({}, {"tta": "maybe"}, 422, "tta"),
        ({"images": "some"}, {}, 422, "images"),
    ],
)
def test_bad_preannotation_requests_start_nothing(
    sample_server: Server, params: dict, body: dict, status: int, words: str
) -> None:
    r = requests.post(f"{sample_server.url}/batch/infer/unet3d", params=params, json=body, timeout=30)
    assert r.status_code == status and words in r.json()["detail"], r.text[:300]
    assert requests.get(f"{sample_server.url}/batch/infer/", timeout=30).json()["status"] != "RUNNING"


def test_image_ids_run_only_those_and_force_redoes(sample_server: Server) -> None:
    r = requests.post(
        f"{sample_server.url}/batch/infer/unet3d", json={"image_ids": ["hippocampus_003", "hippocampus_003"]}
    )
    assert r.status_code == 200 and r.json()["total"] == 1
    status = wait_job(sample_server)
    assert status["done"] + status["skipped"] == 1 and status["failed"] == 0, status
    r = requests.post(
        f"{sample_server.url}/batch/infer/unet3d", json={"image_ids": ["hippocampus_003"], "force": True}, timeout=30
    )
    assert r.status_code == 200
    status = wait_job(sample_server)
    assert status["done"] == 1 and status["skipped"] == 0, status  # force: made again though v1 made it

"""One server shared by many clients (REAL server, embedded sample model): inference off the event loop.

* status endpoints answer while inferences are running (order of events read from /info's
  ``inference_queue``, no timing thresholds) and every request of the burst is answered;
* a full queue answers 503 with ``Retry-After`` and a plain message;
* a queued request whose client has gone is dropped, never run;
* concurrent uploads keep the datastore consistent and its file watcher alive;
* re-uploading an existing id is 409 unless ``overwrite``; then labels are kept only if they fit.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import ROOT, Server, running_server

SAMPLE_MODEL = ROOT / "sample" / "models" / "unet3d_hippocampus_small.pt"
STUDY = "hippocampus_015"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("shared")
    studies = base / "studies"
    shutil.copytree(ROOT / "sample" / "studies", studies)
    conf = {
        "models": "unet3d",
        "preset": "small",
        "roi_size": "40,56,40",
        "unet3d.pretrained": str(SAMPLE_MODEL),
        "model_dir": str(base / "model"),
        "tracking": "none",
        "auto_retrain_after": "0",
        "infer_workers": "1",
        "infer_queue": "4",
    }
    (base / "model").mkdir()
    (base / "model" / ".publish_abc123.pt").write_bytes(b"half-written checkpoint of the old single-file layout")
    (base / "model" / "unet3d" / "versions").mkdir(parents=True)
    (base / "model" / "unet3d" / "versions" / ".tmp-999999999-abc.pt").write_bytes(
        b"half-written version of a killed writer"
    )
    with running_server(studies, conf, base / "server.log") as srv:
        yield srv


def queue_state(server: Server) -> dict:
    return requests.get(f"{server.url}/info/", timeout=30).json()["inference_queue"]


def fire(server: Server, n: int, params: dict, results: list, timeout: float = 600) -> list[threading.Thread]:
    def one() -> None:
        try:
            r = requests.post(
                f"{server.url}/infer/unet3d",
                params={"image": STUDY, "output": "image"},
                data={"params": json.dumps(params)},
                timeout=timeout,
            )
            results.append(r)
        except requests.RequestException as e:
            results.append(e)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def wait_for(condition, what: str, timeout: float = 120) -> dict:  # type: ignore[no-untyped-def]
    end = time.time() + timeout
    while time.time() < end:
        state = condition()
        if state:
            return state
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_status_endpoints_answer_while_inferences_run(shared: Server) -> None:
    results: list = []
    threads = fire(shared, 5, {"tta": True}, results)  # 1 running + 4 queued: all admitted
    wait_for(
        lambda: (s := queue_state(shared))["running"] == 1 and s["waiting"] >= 1 and s, "the burst to be in flight"
    )
    answered = {}
    for name, call in {
        "info": lambda: requests.get(f"{shared.url}/info/", timeout=30),
        "datastore": lambda: requests.get(f"{shared.url}/datastore/", params={"output": "stats"}, timeout=30),
        "activelearning": lambda: requests.post(f"{shared.url}/activelearning/first", json={}, timeout=30),
        "train": lambda: requests.get(f"{shared.url}/train/", timeout=30),
    }.items():
        r = call()
        assert r.status_code in (200, 404), (name, r.status_code, r.text)  # GET /train/ is 404 until a training ran
        answered[name] = r.status_code
    # order of events: every status call above was answered while inferences were still pending
    after = queue_state(shared)
    assert after["running"] + after["waiting"] >= 1, f"the burst finished before the status calls: {after}"
    for t in threads:
        t.join()
    assert len(results) == 5 and all(isinstance(r, requests.Response) and r.status_code == 200 for r in results), (
        results
    )
    image = nib.load(shared.studies / f"{STUDY}.nii.gz")
    out = shared.studies.parent / "burst.nii.gz"
    out.write_bytes(results[0].content)
    assert nib.load(out).shape == image.shape
    assert set(answered) == {"info", "datastore", "activelearning", "train"}


def test_full_queue_answers_503_with_retry_after(shared: Server) -> None:
    results: list = []
    threads = fire(shared, 10, {"tta": True}, results)  # limit: 1 running + 4 queued
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    busy = [r for r in results if r.status_code == 503]
    assert busy and all(c in (200, 503) for c in codes), codes
    assert codes.count(200) >= 5
    for r in busy:
        assert int(r.headers["Retry-After"]) >= 1
        assert "busy" in r.json()["detail"] and "retry" in r.json()["detail"]
    state = queue_state(shared)
    assert state["running"] == 0 and state["waiting"] == 0


def test_queued_request_of_a_gone_client_is_dropped(shared: Server) -> None:
    before = queue_state(shared)
    keep: list = []
    # a job that outlasts the quitters' 0.5 s by far (small windows, high overlap), so none of them reaches a worker
    long = fire(shared, 1, {"tta": True, "roi_size": [16, 16, 16], "overlap": 0.75}, keep)
    wait_for(lambda: queue_state(shared)["running"] == 1, "the first inference to run")
    gone: list = []
    quitters = fire(shared, 3, {"tta": True}, gone, timeout=0.5)  # these clients give up while queued
    for t in quitters + long:
        t.join()
    assert all(isinstance(e, requests.Timeout) for e in gone), gone
    assert keep[0].status_code == 200
    state = wait_for(
        lambda: (s := queue_state(shared))["running"] == 0 and s["waiting"] == 0 and s, "the queue to drain"
    )
    assert state["dropped"] - before["dropped"] == 3, (before, state)
    assert state["completed"] - before["completed"] == 1, (before, state)


def test_concurrent_uploads_keep_the_datastore_and_its_watcher(shared: Server) -> None:
    source = (shared.studies / f"{STUDY}.nii.gz").read_bytes()
    codes: list[int] = []

    def upload(i: int) -> None:
        r = requests.put(
            f"{shared.url}/datastore/image",
            params={"image": f"copy_{i:02d}"},
            files={"file": ("img.nii.gz", source)},
            timeout=120,
        )
        codes.append(r.status_code)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 12
    listing = requests.get(f"{shared.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    assert {f"copy_{i:02d}" for i in range(12)} <= set(listing)
    # the watcher still runs: a file dropped into the studies folder by hand appears by itself
    shutil.copy(shared.studies / f"{STUDY}.nii.gz", shared.studies / "dropped_in.nii.gz")
    wait_for(
        lambda: (
            "dropped_in"
            in requests.get(f"{shared.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
        ),
        "the watcher to pick up a new file",
        timeout=60,
    )
    assert "dictionary changed size" not in shared.log.read_text()


def test_reupload_is_409_unless_overwrite_and_labels_follow_the_geometry(shared: Server) -> None:
    image_path = shared.studies / "hippocampus_003.nii.gz"
    label_path = shared.studies / "labels" / "final" / "hippocampus_003.nii.gz"
    label_before = label_path.read_bytes()
    r = requests.put(
        f"{shared.url}/datastore/image",
        params={"image": "hippocampus_003"},
        files={"file": ("x.nii.gz", image_path.read_bytes())},
        timeout=60,
    )
    assert r.status_code == 409 and "hippocampus_003" in r.json()["detail"] and "overwrite" in r.json()["detail"]
    # same grid: replaced, label kept byte for byte
    r = requests.put(
        f"{shared.url}/datastore/image",
        params={"image": "hippocampus_003"},
        files={"file": ("x.nii.gz", image_path.read_bytes())},
        data={"params": json.dumps({"overwrite": True})},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["labels_kept"] == ["final"] and r.json()["labels_removed"] == []
    assert label_path.read_bytes() == label_before
    # another grid: replaced, the label no longer fits and is removed (said in the reply)
    img = nib.load(image_path)
    other = nib.Nifti1Image(np.asarray(img.dataobj)[:-2].astype(np.float32), img.affine)
    r = requests.put(
        f"{shared.url}/datastore/image",
        params={"image": "hippocampus_003"},
        files={"file": ("x.nii", other.to_bytes())},
        data={"params": json.dumps({"overwrite": True})},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["labels_removed"] == ["final"], r.text
    assert not label_path.exists()
    listing = requests.get(f"{shared.url}/datastore/", params={"output": "all"}, timeout=30).json()["objects"]
    assert "final" not in listing["hippocampus_003"]["labels"]


def test_startup_removed_the_interrupted_publish(shared: Server) -> None:
    model_dir = shared.studies.parent / "model"
    assert not list(model_dir.glob(".publish_*")), list(model_dir.iterdir())
    assert not list((model_dir / "unet3d" / "versions").glob(".tmp-*"))
    log = shared.log.read_text()
    assert "interrupted write of the old layout" in log and "temp file of an interrupted write" in log


@pytest.mark.parametrize("shape", [(1, 1, 64), (64, 1, 1), (5, 7, 3), (3, 1, 64)])
def test_small_and_thin_images_get_a_label_of_exactly_their_shape(
    shared: Server, shape: tuple[int, int, int], tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    affine = np.diag([0.9, 1.1, 1.3, 1.0])
    affine[:3, 3] = [10.0, -4.0, 2.5]
    payload = nib.Nifti1Image(rng.normal(100, 20, shape).astype(np.float32), affine).to_bytes()
    r = requests.post(
        f"{shared.url}/infer/unet3d",
        params={"output": "image"},
        files={"file": ("thin.nii", payload)},
        data={"params": json.dumps({"tta": True})},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    out = tmp_path / "seg.nii"  # the label comes back in the upload's format
    out.write_bytes(r.content)
    seg = nib.load(out)
    assert seg.shape == shape
    np.testing.assert_allclose(seg.affine, affine, atol=1e-4)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2}


def test_scoring_and_batch_requests_are_checked_before_any_task(shared: Server) -> None:
    r = requests.post(f"{shared.url}/scoring/nosuch", json={}, timeout=30)
    assert r.status_code == 404 and "uncertainty" in r.json()["detail"]
    r = requests.post(
        f"{shared.url}/scoring/uncertainty", data="[1, 2]", headers={"Content-Type": "application/json"}, timeout=30
    )
    assert r.status_code == 422 and "JSON object" in r.json()["detail"]
    r = requests.post(f"{shared.url}/batch/infer/unet3d", json={"overlap": 2}, timeout=30)
    assert r.status_code == 422 and "overlap" in r.json()["detail"]
    r = requests.post(f"{shared.url}/batch/infer/unet3d", params={"images": "some"}, json={}, timeout=30)
    assert r.status_code == 422 and "images" in r.json()["detail"]
    r = requests.post(f"{shared.url}/batch/infer/nosuch", json={}, timeout=30)
    assert r.status_code == 404
    assert requests.get(f"{shared.url}/batch/infer/", timeout=30).json()["status"] == "NONE"  # no job was started

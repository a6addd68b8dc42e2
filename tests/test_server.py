"""End-to-end tests against a REAL MONAI Label server (tiny UNet3D, real hippocampus MRI)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

from conftest import Server, hippo_case, serving_meta


def infer(server: Server, image_id: str, **params: object) -> requests.Response:
    return requests.post(
        f"{server.url}/infer/unet3d",
        params={"image": image_id, "output": "image"},
        data={"params": json.dumps(params)},
        timeout=300,
    )


def put_label(
    server: Server, image_id: str, payload: bytes, name: str = "label.nii.gz", **params: object
) -> requests.Response:
    return requests.put(
        f"{server.url}/datastore/label",
        params={"image": image_id, "tag": "final"},
        files={"label": (name, payload)},
        data={"params": json.dumps(params)},
        timeout=60,
    )


def nifti_bytes(arr: np.ndarray, affine: np.ndarray) -> bytes:
    img = nib.Nifti1Image(arr, affine)
    return gzip.compress(img.to_bytes())


def test_info_lists_unet3d_not_ready(server: Server) -> None:
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["trainers"]["unet3d"]["labels"] == ["anterior", "posterior"]
    assert "unet3d" not in info["models"]  # no weights yet: not served
    nr = info["models_not_ready"]["unet3d"]
    assert nr["ready"] is False and "no trained weights" in nr["not_ready_reason"]
    assert nr["labels"] == {"anterior": 1, "posterior": 2}


def test_infer_before_training_is_clear_409(server: Server) -> None:
    r = infer(server, "hippocampus_003")
    assert r.status_code == 409
    assert "no trained weights" in r.json()["detail"] and "POST /train/unet3d" in r.json()["detail"]


def test_unknown_model_gives_404_with_names(server: Server) -> None:
    r = requests.post(f"{server.url}/infer/nosuchnet", params={"image": "hippocampus_003"}, timeout=30)
    assert r.status_code == 404
    assert "nosuchnet" in r.json()["detail"] and "unet3d" in r.json()["detail"]
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200


def test_corrupt_label_rejected_and_stored_label_kept(server: Server) -> None:
    stored = server.studies / "labels" / "final" / "hippocampus_003.nii.gz"
    before = stored.read_bytes()
    good = hippo_case(3)[1].read_bytes()
    for payload in (b"this is not a nifti file", good[: len(good) // 2]):  # garbage, then a truncated real file
        r = put_label(server, "hippocampus_003", payload)
        assert r.status_code == 422, r.text
        assert "cannot be read" in r.json()["detail"]
    assert stored.read_bytes() == before
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200


def test_bad_labels_rejected_with_reason(server: Server) -> None:
    img = nib.load(hippo_case(6)[0])
    wrong_shape = nifti_bytes(np.ones((5, 5, 5), np.uint8), img.affine)
    r = put_label(server, "hippocampus_006", wrong_shape)
    assert r.status_code == 422 and "does not match" in r.json()["detail"]
    empty = nifti_bytes(np.zeros(img.shape, np.uint8), img.affine)
    r = put_label(server, "hippocampus_006", empty)
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    r = put_label(server, "..%2F..%2Fetc", hippo_case(6)[1].read_bytes())
    assert r.status_code in (404, 422)
    r = put_label(server, "no_such_image", hippo_case(6)[1].read_bytes())
    assert r.status_code == 404 and "no_such_image" in r.json()["detail"]
    assert not (server.studies / "labels" / "final" / "hippocampus_006.nii.gz").exists()


def test_label_upload_is_stored(server: Server) -> None:
    src = hippo_case(6)[1]
    r = put_label(server, "hippocampus_006", src.read_bytes(), name=src.name)
    assert r.status_code == 200, r.text
    stored = server.studies / "labels" / "final" / "hippocampus_006.nii.gz"
    assert np.array_equal(np.asanyarray(nib.load(stored).dataobj), np.asanyarray(nib.load(src).dataobj))
    ds = requests.get(f"{server.url}/datastore/", params={"output": "stats"}, timeout=30).json()
    assert ds["completed"] == 4


def test_train_publishes_model_and_stats(server: Server) -> None:
    r = requests.post(
        f"{server.url}/train/unet3d", json={"max_epochs": 2, "val_split": 0.25, "train_batch_size": 2}, timeout=60
    )
    assert r.status_code == 200, r.text
    status = server.wait_train_done()
    assert status["status"] == "DONE", status
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    # no server paths out of the API
    assert "model_dir" not in info and str(server.studies.parent) not in json.dumps(info)
    model_dir = server.studies.parent / "model"
    assert serving_meta(model_dir, "unet3d")["source"] == "trained"
    stats = json.loads((model_dir / "unet3d_train_stats.json").read_text())
    assert stats["epoch"] == 2 and stats["train_cases"] == 3 and stats["val_cases"] == 1
    assert set(stats["val_dice_per_class"]) == {"anterior", "posterior"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in stats["val_dice_per_class"].values())
    split = json.loads((model_dir / "unet3d_split.json").read_text())
    assert len(split["validation"]) == 1 and len(split["training"]) == 3
    assert (model_dir / "mlruns.db").exists()  # MLflow tracking worked offline
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["models"]["unet3d"]["ready"] is True
    assert info["models"]["unet3d"]["version"]["epoch"] in (1, 2)
    assert info["train_stats"]["unet3d"]["val_dice_per_class"].keys() == {"anterior", "posterior"}


def test_infer_after_training_keeps_geometry(server: Server, tmp_path: Path) -> None:
    src = nib.load(server.studies / "hippocampus_008.nii.gz")
    for tta in (False, True):
        r = infer(server, "hippocampus_008", tta=tta)
        assert r.status_code == 200, r.text
        out = tmp_path / f"out_{tta}.nii.gz"
        out.write_bytes(r.content)
        seg = nib.load(out)
        assert seg.shape == src.shape
        assert np.allclose(seg.affine, src.affine)
        values = set(np.unique(np.asanyarray(seg.dataobj)).tolist())
        assert values <= {0, 1, 2}


def test_infer_json_reports_tta_and_version(server: Server) -> None:
    r = requests.post(
        f"{server.url}/infer/unet3d",
        params={"image": "hippocampus_008", "output": "json"},
        data={"params": json.dumps({"tta": True})},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tta"] is True and body["label_names"] == {"anterior": 1, "posterior": 2}
    assert body["model_version"]


def test_wrong_channel_count_is_422_and_server_keeps_serving(server: Server, tmp_path: Path) -> None:
    img = nib.load(hippo_case(3)[0])
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    two_channel = np.stack([arr, arr], axis=-1)
    payload = nifti_bytes(two_channel, img.affine)
    r = requests.put(
        f"{server.url}/datastore/image",
        params={"image": "twochannel"},
        files={"file": ("twochannel.nii.gz", payload)},
        timeout=60,
    )
    assert r.status_code == 422, r.text  # no served model takes 2 channels: refused at the door
    assert "2 channel(s)" in r.json()["detail"] and "1 channel(s) 3D" in r.json()["detail"]
    r = requests.post(
        f"{server.url}/infer/unet3d",
        params={"output": "image"},
        files={"file": ("twochannel.nii.gz", payload)},
        timeout=60,
    )
    assert r.status_code == 422
    assert "expects 1 channel" in r.json()["detail"] and "got 2" in r.json()["detail"]
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200


def test_corrupt_image_upload_rejected(server: Server) -> None:
    r = requests.put(
        f"{server.url}/datastore/image",
        params={"image": "broken"},
        files={"file": ("broken.nii.gz", b"\x1f\x8b not really gzip")},
        timeout=60,
    )
    assert r.status_code == 422 and "cannot be read" in r.json()["detail"]
    r = requests.put(
        f"{server.url}/datastore/image",
        params={"image": "../escape"},
        files={"file": ("x.nii.gz", hippo_case(3)[0].read_bytes())},
        timeout=60,
    )
    assert r.status_code == 422 and "invalid image id" in r.json()["detail"]
    assert not (server.studies.parent / "escape.nii.gz").exists()

"""UNet2D end to end against a REAL MONAI Label server: ISBI 2012 EM PNGs, a multi-page TIFF stack, a NIfTI volume."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import tifffile
from PIL import Image

from conftest import DATA, Server, running_server

ISBI = DATA / "isbi2012" / "train"


def isbi(i: int, kind: str = "image") -> np.ndarray:
    return np.asarray(Image.open(ISBI / kind / f"{i}.png"))


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server2d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not ISBI.exists():
        pytest.fail(f"real data missing: {ISBI}")
    base = tmp_path_factory.mktemp("server2d")
    studies = base / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for i in (0, 1, 2):
        shutil.copy(ISBI / "image" / f"{i}.png", studies / f"isbi_{i}.png")
        shutil.copy(ISBI / "label" / f"{i}.png", studies / "labels" / "final" / f"isbi_{i}.png")
    shutil.copy(ISBI / "image" / "3.png", studies / "isbi_3.png")
    conf = {
        "models": "unet2d",
        "preset": "tiny",
        "roi_size": "64",
        "tracking": "none",
        "model_dir": str(base / "model"),
    }
    with running_server(studies, conf, base / "server.log") as srv:
        yield srv


def infer(server: Server, image_id: str, **params: object) -> requests.Response:
    return requests.post(
        f"{server.url}/infer/unet2d",
        params={"image": image_id, "output": "image"},
        data={"params": json.dumps(params)},
        timeout=300,
    )


def upload_image(server: Server, image_id: str, name: str, payload: bytes) -> None:
    r = requests.put(
        f"{server.url}/datastore/image", params={"image": image_id}, files={"file": (name, payload)}, timeout=60
    )
    assert r.status_code == 200, r.text


def test_info_lists_unet2d_not_ready(server2d: Server) -> None:
    info = requests.get(f"{server2d.url}/info/", timeout=30).json()
    assert "unet2d" not in info["models"]
    nr = info["models_not_ready"]["unet2d"]
    assert nr["labels"] == {"cell": 1} and nr["dimension"] == 2
    assert infer(server2d, "isbi_3").status_code == 409


def test_png_label_upload_255_is_accepted(server2d: Server) -> None:
    r = requests.put(
        f"{server2d.url}/datastore/label",
        params={"image": "isbi_3", "tag": "final"},
        files={"label": ("isbi_3.png", png_bytes(isbi(3, "label")))},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert (server2d.studies / "labels" / "final" / "isbi_3.png").exists()


def test_train_then_png_in_png_out(server2d: Server, tmp_path: Path) -> None:
    r = requests.post(
        f"{server2d.url}/train/unet2d",
        json={"max_epochs": 2, "val_split": 0.25, "train_batch_size": 2, "learning_rate": 1e-3},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    status = server2d.wait_train_done()
    assert status["status"] == "DONE", status
    info = requests.get(f"{server2d.url}/info/", timeout=30).json()
    assert info["models"]["unet2d"]["ready"] is True
    assert "cell" in info["train_stats"]["unet2d"]["val_dice_per_class"]
    # a non-square crop shows that rows and columns come back where they were
    crop = isbi(5)[:200, :120]
    upload_image(server2d, "crop5", "crop5.png", png_bytes(crop))
    for tta in (False, True):
        r = infer(server2d, "crop5", tta=tta)
        assert r.status_code == 200, r.text
        out = np.asarray(Image.open(io.BytesIO(r.content)))
        assert out.shape == crop.shape
        assert set(np.unique(out).tolist()) <= {0, 1}
    r = infer(server2d, "crop5", result_extension=".nii.gz")
    assert r.status_code == 200, r.text
    (tmp_path / "crop5.nii.gz").write_bytes(r.content)
    assert sorted(nib.load(tmp_path / "crop5.nii.gz").shape) == sorted(crop.shape)


def test_multipage_tiff_stack_slice_by_slice(server2d: Server, tmp_path: Path) -> None:
    stack = np.stack([isbi(i)[:96, :80] for i in (6, 7, 8, 9)])  # 4 pages of 96x80
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    upload_image(server2d, "stack", "stack.tif", path.read_bytes())
    r = infer(server2d, "stack", tta=True)
    assert r.status_code == 200, r.text
    out_path = tmp_path / "out.tif"
    out_path.write_bytes(r.content)
    out = tifffile.imread(out_path)
    assert out.shape == stack.shape
    assert set(np.unique(out).tolist()) <= {0, 1}


def test_volume_slice_by_slice_keeps_geometry(server2d: Server, tmp_path: Path) -> None:
    vol = np.stack([isbi(i)[:64, :48] for i in (10, 11, 12)], axis=-1).astype(np.float32)  # slices along axis 2
    affine = np.array([[0.0, -0.5, 0, 10], [0.8, 0, 0, -4], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    src = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), src)
    upload_image(server2d, "vol", "vol.nii.gz", src.read_bytes())
    r = infer(server2d, "vol")
    assert r.status_code == 200, r.text
    (tmp_path / "seg.nii.gz").write_bytes(r.content)
    seg = nib.load(tmp_path / "seg.nii.gz")
    assert seg.shape == vol.shape
    assert np.allclose(seg.affine, affine)
    assert set(np.unique(np.asanyarray(seg.dataobj)).tolist()) <= {0, 1}


def test_rgb_image_is_422_and_server_keeps_serving(server2d: Server) -> None:
    rgb = np.stack([isbi(13)[:64, :64]] * 3, axis=-1)
    r = requests.put(
        f"{server2d.url}/datastore/image",
        params={"image": "rgb"},
        files={"file": ("rgb.png", png_bytes(rgb))},
        timeout=60,
    )
    assert r.status_code == 422  # no served model takes 3 channels: refused at the door
    assert "3 channel(s)" in r.json()["detail"] and "1 channel(s) 2D" in r.json()["detail"]
    r = requests.post(
        f"{server2d.url}/infer/unet2d",
        params={"output": "image"},
        files={"file": ("rgb.png", png_bytes(rgb))},
        timeout=60,
    )
    assert r.status_code == 422
    assert "expects 1 channel" in r.json()["detail"] and "got 3" in r.json()["detail"]
    assert requests.get(f"{server2d.url}/info/", timeout=30).status_code == 200

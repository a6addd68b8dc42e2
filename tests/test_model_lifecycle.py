"""Model lifecycle: versions in the model store, the promotion gate, rollback and promotion (REST and CLI),
crash safety.

Real parts only: the app's trainer on real hippocampus cases, real MONAI Label servers on
127.0.0.1, the command line in its own process, and real kill -9s (the store's failpoints make
the writing process kill itself at an exact step).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch

from conftest import APP_DIR, HIPPO, ROOT, Server, hippo_case, make_studies, running_server, serving_meta

SAMPLE_MODEL = ROOT / "sample" / "models" / "unet3d_hippocampus_small.pt"
SMALL = {"models": "unet3d", "preset": "small", "roi_size": "40,56,40", "tracking": "none", "auto_retrain_after": "0"}


def make_app(tmp_path: Path, labelled: list[int], **conf: str):
    from main import UNetSegApp

    studies = make_studies(tmp_path / "studies", labelled, [])
    return UNetSegApp(
        str(APP_DIR),
        str(studies),
        {**SMALL, "model_dir": str(tmp_path / "model"), "unet3d.pretrained": str(SAMPLE_MODEL), **conf},
    )


def shift_label(path: Path, voxels: int = 10) -> None:
    """Corrupt a label: every structure moved by ``voxels`` along the first axis."""
    img = nib.load(path)
    data = np.roll(np.asanyarray(img.dataobj), voxels, axis=0)
    nib.save(nib.Nifti1Image(data.astype(np.uint8), img.affine), path)


def test_retrain_on_corrupted_labels_keeps_the_serving_version(tmp_path: Path, require_data: None) -> None:
    app = make_app(tmp_path, [3, 4, 1, 6])
    store = app.model_store("unet3d")
    assert store.serving().id == "v1"
    # the persisted split: hippocampus_003 was validated earlier with its reviewed label
    split = tmp_path / "model" / "unet3d_split.json"
    split.write_text(json.dumps({"validation": ["hippocampus_003.nii.gz"], "training": []}))
    for i in (4, 1, 6):  # the new labels are all shifted by 10 voxels
        shift_label(tmp_path / "studies" / "labels" / "final" / hippo_case(i)[1].name)
    stats = app.train({"model": "unet3d", "max_epochs": 3, "learning_rate": 3e-3, "train_batch_size": 2})
    gate = stats["gate"]
    print("gate:", json.dumps(gate))
    assert store.serving().id == "v1"  # unchanged
    cand = store.get("v2")
    assert cand.state == "candidate" and cand.parent == "v1" and cand.val_cases == 1
    assert gate["decision"] == "candidate" and gate["serving"] == "v1" and gate["candidate"] == "v2"
    assert gate["candidate_dice"] < gate["serving_dice"] - gate["margin"]
    assert "< serving v1" in cand.reason and f"{gate['serving_dice']:.4f}" in cand.reason
    # the candidate's meta records what it was validated on and where it came from
    meta = store.meta("v2")
    assert meta.validation.cases == ["hippocampus_003.nii.gz"] and meta.source == "trained" and meta.data_fingerprint
    res = app.infer({"model": "unet3d", "image": "hippocampus_003", "output": "json"})
    assert res["params"]["model_version"] == "v1"
    # an admin who knows better can still serve it
    store.promote("v2", "test")
    assert (
        app.infer({"model": "unet3d", "image": "hippocampus_003", "output": "json"})["params"]["model_version"] == "v2"
    )


def test_gate_modes_and_first_model(tmp_path: Path, require_data: None) -> None:
    from main import UNetSegApp

    studies = make_studies(tmp_path / "studies", [3, 4, 1], [])
    conf = {
        "models": "unet3d",
        "preset": "tiny",
        "roi_size": "16",
        "tracking": "none",
        "model_dir": str(tmp_path / "model"),
        "promotion": "never",
        "keep_versions": "2",
    }
    app = UNetSegApp(str(APP_DIR), str(studies), conf)
    store = app.model_store("unet3d")
    stats = app.train({"model": "unet3d", "max_epochs": 1, "val_split": 0.34})
    # even with promotion=never
    assert stats["gate"]["decision"] == "serving" and "first model" in stats["gate"]["reason"]
    stats = app.train({"model": "unet3d", "max_epochs": 1})
    assert stats["gate"]["decision"] == "candidate" and "promotion=never" in stats["gate"]["reason"]
    assert store.serving().id == "v1"
    store.pin("v2")
    for _ in range(3):
        app.train({"model": "unet3d", "max_epochs": 1})
    # keep_versions 2: v1 serves, v2 is pinned, v3 falls out, v4 and v5 are the newest
    assert [r["id"] for r in store.describe()] == ["v5", "v4", "v2", "v1"]
    assert sorted(p.name for p in (tmp_path / "model" / "unet3d" / "versions").iterdir()) == [
        "v1.pt",
        "v2.pt",
        "v4.pt",
        "v5.pt",
    ]
    with pytest.raises(ValueError, match="promotion: expected one of gate, always, never"):
        UNetSegApp(str(APP_DIR), str(studies), {**conf, "promotion": "sometimes"})


def test_legacy_single_file_models_are_imported_as_version_1(tmp_path: Path, require_data: None) -> None:
    from main import UNetSegApp

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(SAMPLE_MODEL, model_dir / "unet3d.pt")
    shutil.copy(SAMPLE_MODEL, model_dir / "unet3d_fold1.pt")
    (model_dir / ".publish_x1.pt").write_bytes(b"temp file of the old layout")
    studies = make_studies(tmp_path / "studies", [3], [4])
    app = UNetSegApp(str(APP_DIR), str(studies), {**SMALL, "model_dir": str(model_dir)})
    store = app.model_store("unet3d")
    v1, v2 = store.get("v1"), store.get("v2")
    assert (v1.state, v1.source, v1.fold) == ("serving", "imported", None)
    assert (v2.state, v2.fold) == ("fold", 1)
    assert sorted(p.name for p in model_dir.iterdir() if p.is_file()) == []  # moved into the store, leftovers gone
    meta = store.meta("v1")
    assert meta.schema_version == 2 and meta.validation.mean_dice == pytest.approx(0.855, abs=0.01)  # upgraded old meta
    res = app.infer({"model": "unet3d", "image": "hippocampus_004", "output": "json"})
    assert res["params"]["model_version"] == "v1"
    ens = app.infer({"model": "unet3d", "image": "hippocampus_004", "output": "json", "ensemble": True})
    assert ens["params"]["ensemble"] == 2
    # a second start imports nothing twice
    app2 = UNetSegApp(str(APP_DIR), str(studies), {**SMALL, "model_dir": str(model_dir)})
    assert [r["id"] for r in app2.model_store("unet3d").describe()] == ["v2", "v1"]


# ---- REST and CLI on a real server --------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("lifecycle")
    studies = base / "studies"
    shutil.copytree(ROOT / "sample" / "studies", studies)
    conf = {
        **SMALL,
        "unet3d.pretrained": str(SAMPLE_MODEL),
        "model_dir": str(base / "model"),
        "admin_without_auth": "true",
    }
    with running_server(studies, conf, base / "server.log") as srv:
        yield srv


def infer_version(server: Server) -> str:
    r = requests.post(f"{server.url}/infer/unet3d", params={"image": "hippocampus_015", "output": "json"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["model_version"]


def versions(server: Server) -> dict:
    r = requests.get(f"{server.url}/model/unet3d/versions", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_info_lists_versions(served: Server) -> None:
    info = requests.get(f"{served.url}/info/", timeout=30).json()
    rows = info["models"]["unet3d"]["versions"]
    assert [(r["id"], r["state"], r["source"]) for r in rows] == [("v1", "serving", "imported")]
    assert rows[0]["created"] and rows[0]["val_mean_dice"] == pytest.approx(0.855, abs=0.01)
    assert info["models"]["unet3d"]["version"]["version"] == "v1"


def test_upload_promote_and_rollback_over_rest(served: Server) -> None:
    assert infer_version(served) == "v1"
    with open(SAMPLE_MODEL, "rb") as f:
        r = requests.put(f"{served.url}/model/unet3d", files={"file": ("m.pt", f)}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "v2" and r.json()["serving"] == "v2"
    assert infer_version(served) == "v2"
    t = time.perf_counter()
    r = requests.post(f"{served.url}/model/unet3d/rollback", timeout=30)
    assert r.status_code == 200 and r.json()["serving"] == "v1", r.text
    assert infer_version(served) == "v1"  # the next /infer, no restart
    print(f"rollback + next /infer: {time.perf_counter() - t:.3f} s")
    rows = {row["id"]: row for row in versions(served)["versions"]}
    assert rows["v2"]["state"] == "candidate" and "rolled back" in rows["v2"]["reason"]
    t = time.perf_counter()
    r = requests.post(f"{served.url}/model/unet3d/promote/v2", timeout=30)
    assert r.status_code == 200 and r.json()["serving"] == "v2", r.text
    assert infer_version(served) == "v2"
    print(f"promote + next /infer: {time.perf_counter() - t:.3f} s")
    r = requests.get(f"{served.url}/model/unet3d", timeout=30)
    assert r.status_code == 200 and r.headers["X-Model-Version"] == "v2"
    assert torch.load(io.BytesIO(r.content), weights_only=True)["meta"]["version"] == "v2"


@pytest.mark.parametrize(
    "method, path, code, words",
    [
        ("POST", "/model/unet3d/promote/v99", 404, "has no version 'v99'"),
        ("POST", "/model/unet3d/promote/v0", 422, "invalid version id"),
        ("POST", "/model/unet3d/promote/latest", 422, "invalid version id"),
        ("PUT", "/model/unet3d/pin/v99", 404, "has no version"),
        ("GET", "/model/unet9d/versions", 404, "unknown model 'unet9d'"),
        ("DELETE", "/model/unet3d", 409, "not deleted by hand"),
    ],
)
def test_bad_version_requests(served: Server, method: str, path: str, code: int, words: str) -> None:
    r = requests.request(method, f"{served.url}{path}", timeout=30)
    assert r.status_code == code and words in r.text, r.text


def _model_file(tmp_path: Path, change: dict) -> Path:
    ckpt = torch.load(SAMPLE_MODEL, weights_only=True)
    for key, value in change.items():
        if key == "state":
            ckpt["model"] = value(ckpt["model"])
        else:
            ckpt["meta"][key] = value
    path = tmp_path / "bad.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    "change, words",
    [
        ({"labels": {"liver": 1}}, "labels"),
        ({"model": "nnunet"}, "cannot be uploaded as 'unet3d'"),
        ({"schema_version": 9}, "newer than this unet_seg"),
        ({"schema_version": 2, "surprise": 1}, "surprise"),
        ({"in_channels": 0}, "in_channels"),
        ({"state": lambda s: {k: v[..., :1] if v.ndim == 5 else v for k, v in s.items()}}, "do not fit the network"),
        ({"meta_missing": True}, ""),
    ],
)
def test_bad_model_uploads_are_refused_and_change_nothing(
    served: Server, tmp_path: Path, change: dict, words: str
) -> None:
    before = versions(served)
    if change.get("meta_missing"):
        path = tmp_path / "plain.pt"
        torch.save(torch.load(SAMPLE_MODEL, weights_only=True)["model"], path)
        words = "no meta block"
    else:
        path = _model_file(tmp_path, change)
    with open(path, "rb") as f:
        r = requests.put(f"{served.url}/model/unet3d", files={"file": ("m.pt", f)}, timeout=60)
    assert r.status_code == 422 and words in r.text, r.text
    assert versions(served) == before
    assert not list((served.studies.parent / "model" / "unet3d" / "versions").glob(".tmp-*"))


def test_garbage_and_pickled_code_uploads_are_refused(served: Server, tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # what an attacker would pickle: code run at load time
            return (os.system, ("touch /tmp/unet_seg_pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "meta": {}, "x": Evil()}, evil)
    for name, body in (("garbage.pt", b"not a model"), ("evil.pt", evil.read_bytes())):
        r = requests.put(f"{served.url}/model/unet3d", files={"file": (name, body)}, timeout=60)
        assert r.status_code == 422 and "not a model file unet_seg can read safely" in r.text, r.text
    assert not Path("/tmp/unet_seg_pwned").exists()


def test_cli_models_switch_the_running_server(served: Server) -> None:
    model_dir = served.studies.parent / "model"
    cli = [
        sys.executable,
        str(ROOT / "main.py"),
        "models",
        "--config",
        "unet3d",
        "--results",
        str(served.studies.parent / "cli"),
        "--model_dir",
        str(model_dir),
        "--conf",
        "preset=small",
        "--conf",
        "roi_size=40,56,40",
    ]
    r = subprocess.run([*cli[:3], "list", *cli[3:]], capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| v1 |" in r.stdout and "| v2 |" in r.stdout
    serving = versions(served)["serving"]
    other = "v1" if serving == "v2" else "v2"
    r = subprocess.run(
        [*cli[:3], "promote", other, *cli[3:]], capture_output=True, text=True, timeout=300, cwd=str(ROOT)
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert infer_version(served) == other  # the running server serves it from the next request
    r = subprocess.run([*cli[:3], "rollback", *cli[3:]], capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-2000:]
    assert infer_version(served) == serving
    r = subprocess.run(
        [*cli[:3], "promote", "v77", *cli[3:]], capture_output=True, text=True, timeout=300, cwd=str(ROOT)
    )
    assert r.returncode == 2 and "has no version 'v77'" in r.stderr


# ---- kill -9 -------------------------------------------------------------------------------------


def test_kill_9_during_training_leaves_a_serving_model_and_no_orphans(tmp_path: Path, require_data: None) -> None:
    """A real CLI training killed (-9) right after writing its candidate, before any switch; then a server restarts."""
    from lib.modelstore import FAILPOINT_ENV, ModelStore

    model_dir = tmp_path / "model"
    ModelStore(str(model_dir), "unet3d").import_file(str(SAMPLE_MODEL), serve=True)
    data = tmp_path / "msd"
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True)
    cases = ["003", "004", "001"]
    for i in cases:
        shutil.copy(HIPPO / "imagesTr" / f"hippocampus_{i}.nii.gz", data / "imagesTr")
        shutil.copy(HIPPO / "labelsTr" / f"hippocampus_{i}.nii.gz", data / "labelsTr")
    (data / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "anterior", "2": "posterior"},
                "training": [
                    {"image": f"./imagesTr/hippocampus_{i}.nii.gz", "label": f"./labelsTr/hippocampus_{i}.nii.gz"}
                    for i in cases
                ],
            }
        )
    )
    train = [
        sys.executable,
        str(ROOT / "main.py"),
        "train",
        "--config",
        "unet3d",
        "--data",
        str(data),
        "--results",
        str(tmp_path),
        "--conf",
        "preset=tiny",
        "--conf",
        "roi_size=16",
        "--epochs",
        "1",
        "--val_split",
        "0.34",
    ]
    for point in ("before-switch", "version-written"):
        r = subprocess.run(
            train,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=str(ROOT),
            env=dict(os.environ, **{FAILPOINT_ENV: point}),
        )
        assert r.returncode == -9, (point, r.returncode, r.stderr[-2000:])
    versions_dir = model_dir / "unet3d" / "versions"
    assert len(list(versions_dir.glob(".tmp-*"))) == 1  # the second run died with its temp file on disk
    reg = json.loads((model_dir / "unet3d" / "registry.json").read_text())
    # the first run's version was recorded and never switched to; the second run's start marked it interrupted
    assert reg["serving"] == "v1" and reg["versions"]["v2"]["state"] == "candidate" and "v3" not in reg["versions"]
    # restart: a real server on that model dir
    studies = make_studies(tmp_path / "studies", [], [8])
    conf = {**SMALL, "model_dir": str(model_dir)}
    with running_server(studies, conf, tmp_path / "server.log") as srv:
        r = requests.post(f"{srv.url}/infer/unet3d", params={"image": "hippocampus_008", "output": "json"}, timeout=120)
        assert r.status_code == 200 and r.json()["model_version"] == "v1", r.text
        rows = {
            row["id"]: row
            for row in requests.get(f"{srv.url}/info/", timeout=30).json()["models"]["unet3d"]["versions"]
        }
    assert rows["v2"]["state"] == "candidate" and "stopped before it finished" in rows["v2"]["reason"]
    assert "v3" not in rows  # its id was taken, its file never recorded
    assert sorted(p.name for p in versions_dir.iterdir()) == ["v1.pt", "v2.pt"]  # no orphan files
    assert serving_meta(model_dir, "unet3d")["version"] == "v1"

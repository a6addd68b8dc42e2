"""Training paths run in-process through the real app class: 2-process CPU DDP (gloo), AMP, retraining."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import APP_DIR, ROOT, free_port, make_studies, serving_meta
from lib.serverproc import server_command


def make_app(tmp_path: Path, labelled: list[int], unlabelled: list[int] | None = None, **conf: str):
    from main import UNetSegApp

    studies = make_studies(tmp_path / "studies", labelled, unlabelled or [])
    base = {
        "models": "unet3d",
        "preset": "tiny",
        "roi_size": "16",
        "tracking": "none",
        "model_dir": str(tmp_path / "model"),
    }
    base.update(conf)
    return UNetSegApp(str(APP_DIR), str(studies), base)


def published_meta(app) -> dict:
    return serving_meta(app.model_dir, "unet3d")


def test_two_process_cpu_training_gloo(tmp_path: Path, require_data: None) -> None:
    app = make_app(tmp_path, [3, 4, 1, 6])
    stats = app.train({"model": "unet3d", "max_epochs": 2, "world_size": 2, "val_split": 0.25, "train_batch_size": 1})
    assert stats["world_size"] == 2 and stats["epoch"] == 2
    meta = published_meta(app)
    assert meta["world_size"] == 2 and meta["labels"] == {"anterior": 1, "posterior": 2}
    # the published DDP model has plain (unwrapped) keys and serves
    state, _ = app.model_store("unet3d").load(meta["version"])
    assert not any(k.startswith("module.") for k in state)
    src = tmp_path / "studies" / "hippocampus_003.nii.gz"
    ras = nib.load(app.infer({"model": "unet3d", "image": "hippocampus_003"})["file"])
    assert ras.shape == nib.load(src).shape

    # the same image stored in LPS order: the label comes back in LPS order with the LPS affine,
    # and it is the same segmentation in world space
    lps_img = nib.load(src).as_reoriented(np.array([[0, -1], [1, -1], [2, 1]]))
    lps_path = tmp_path / "lps.nii.gz"
    nib.save(lps_img, lps_path)
    lps = nib.load(app.infer({"model": "unet3d", "image": str(lps_path)})["file"])
    assert np.allclose(lps.affine, lps_img.affine) and lps.shape == lps_img.shape
    assert np.array_equal(np.asanyarray(lps.dataobj), np.asanyarray(ras.dataobj)[::-1, ::-1, :])


def test_amp_bf16_path_runs_on_cpu(tmp_path: Path, require_data: None) -> None:
    app = make_app(tmp_path, [3, 4])
    stats = app.train(
        {"model": "unet3d", "max_epochs": 1, "amp": "bf16", "val_split": 0.5, "train_batch_size": 1, "num_samples": 1}
    )
    assert stats["amp"] == "bfloat16"
    assert stats["val_dice_per_class"].keys() == {"anterior", "posterior"}
    res = app.infer({"model": "unet3d", "image": "hippocampus_004", "amp": "bf16", "output": "json"})
    assert res["params"]["amp"] == "bfloat16"
    # amp=true on a CPU without native bf16 falls back to fp32 and says so in the stats
    stats = app.train({"model": "unet3d", "max_epochs": 1, "amp": True, "val_split": 0.5, "train_batch_size": 1})
    from lib.runtime import cpu_has_native_bf16

    assert stats["amp"] == ("bfloat16" if cpu_has_native_bf16() else "fp32")


def test_retrain_keeps_split_and_serves_newer_model(tmp_path: Path, require_data: None) -> None:
    app = make_app(tmp_path, [3, 4, 1, 6], [8], promotion="always")  # the gate has its own tests (test_model_lifecycle)
    app.train({"model": "unet3d", "max_epochs": 1, "val_split": 0.25})
    split1 = json.loads((Path(app.model_dir) / "unet3d_split.json").read_text())
    v1 = published_meta(app)["version"]
    # a new final label arrives (as PUT /datastore/label would store it)
    lab = Path(tmp_path / "studies" / "labels" / "final")
    from conftest import hippo_case

    app.datastore().save_label("hippocampus_008", str(hippo_case(8)[1]), "final", {})
    assert (lab / "hippocampus_008.nii.gz").exists()
    import time

    time.sleep(1.1)  # run ids have one-second resolution
    # what a writer killed mid-write leaves
    orphan = Path(app.model_dir) / "unet3d" / "versions" / ".tmp-999999999-abc.pt"
    orphan.write_bytes(b"half a checkpoint")
    stats = app.train({"model": "unet3d", "max_epochs": 1, "val_split": 0.25})
    assert not orphan.exists()  # removed when the next training starts
    split2 = json.loads((Path(app.model_dir) / "unet3d_split.json").read_text())
    assert split2["validation"] == split1["validation"]
    assert "hippocampus_008.nii.gz" in split2["training"] and stats["train_cases"] == 4
    v2 = published_meta(app)["version"]
    assert (v1, v2) == ("v1", "v2") and published_meta(app)["parent"] == "v1"  # fine-tuned from the serving version
    assert app.info()["models"]["unet3d"]["version"]["version"] == v2
    assert stats["gate"]["decision"] == "serving" and stats["gate"]["mode"] == "always"


def test_empty_datastore_training_fails_clearly(tmp_path: Path, require_data: None) -> None:
    app = make_app(tmp_path, [], [3])
    with pytest.raises(ValueError, match="no labelled studies"):
        app.train({"model": "unet3d", "max_epochs": 1})


def test_unknown_model_name_stops_server_start(tmp_path: Path, require_data: None) -> None:
    studies = make_studies(tmp_path / "studies", [3], [])
    cmd = server_command(studies, {"models": "unet3d,unet9d", "model_dir": str(tmp_path / "model")}, free_port())
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=str(ROOT))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "unet9d" in out and "valid names are: unet2d, unet3d, nnunet, nnunet2d" in out


def test_bad_label_in_datastore_fails_training_with_named_file(tmp_path: Path, require_data: None) -> None:
    app = make_app(tmp_path, [3, 4])
    lab = tmp_path / "studies" / "labels" / "final" / "hippocampus_004.nii.gz"
    img = nib.load(lab)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.uint8) * 3, img.affine), lab)  # values 3, 6
    from lib.transforms import InputError

    with pytest.raises(InputError, match=r"hippocampus_004.*values \[3, 6\]"):
        app.train({"model": "unet3d", "max_epochs": 1, "val_split": 0.5})


def test_unusable_checkpoints_are_reported_not_served(tmp_path: Path, require_data: None) -> None:
    from lib.infers.base import ModelNotReady

    app = make_app(
        tmp_path,
        [3],
        preset="small",
        roi_size="40,56,40",
        **{"unet3d.pretrained": str(ROOT / "sample" / "models" / "unet3d_hippocampus_small.pt")},
    )
    store = app.model_store("unet3d")
    assert store.serving().id == "v1" and store.get("v1").source == "imported"
    state, meta = store.load("v1")
    # a version for other labels can be recorded and promoted, but it is refused with the reason, never served
    meta.labels = {"liver": 1}
    other = store.add(state, meta, reason="test: other labels")
    store.promote(other.id)
    reason = app.info()["models_not_ready"]["unet3d"]["not_ready_reason"]
    assert "labels" in reason and "liver" in reason and other.id in reason
    assert "unet3d" not in app.info()["models"]
    with pytest.raises(ModelNotReady):
        app.infer_task("unet3d")({"image": str(tmp_path / "studies" / "hippocampus_003.nii.gz")})
    store.rollback()
    assert app.infer_task("unet3d").is_valid()
    # a serving file that became garbage: not ready, with the reason
    Path(store.path("v1")).write_bytes(b"garbage, not a checkpoint")
    reason = app.info()["models_not_ready"]["unet3d"]["not_ready_reason"]
    assert "cannot be read" in reason

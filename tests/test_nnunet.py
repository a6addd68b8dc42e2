"""nnU-Net configs: preprocessing round trip, deep supervision, plan lifecycle, folds/ensemble/postprocessing,
and end-to-end training and inference through a REAL server with a tiny plan (3D and 2D)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from conftest import APP_DIR, HIPPO_IDS, Server, hippo_case, make_studies, running_server, serving_meta

TINY_NN = {
    "base_filters": "4",
    "max_filters": "16",
    "max_patch_voxels": str(16**3),
    "max_epochs": "2",
    "iterations_per_epoch": "3",
    "tracking": "none",
}


def test_preprocess_inverse_round_trip_keeps_geometry(tmp_path: Path) -> None:
    from lib.transforms import load_chain, nnunet_preprocess

    src = nib.load(hippo_case(3)[0])
    arr = np.asanyarray(src.dataobj).astype(np.float32)
    padded = np.zeros((arr.shape[0] + 10, arr.shape[1], arr.shape[2] + 6), np.float32)  # zero border to crop away
    padded[4 : 4 + arr.shape[0], :, 2 : 2 + arr.shape[2]] = arr
    affine = np.array([[0, -1.2, 0, 30], [0.9, 0, 0, -12], [0, 0, 1.1, 5], [0, 0, 0, 1]], float)  # rotated, anisotropic
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(padded, affine), path)
    pre = [
        *load_chain(["image"], 1, 3, None, None),
        *nnunet_preprocess(["image"], [1.0, 1.0, 1.0], [{"scheme": "zscore"}]),
    ]
    d = Compose(pre)({"image": str(path)})
    assert d["image"].shape[1:] != padded.shape  # cropped and resampled
    assert abs(float(d["image"].mean())) < 1e-3 and abs(float(d["image"].std()) - 1) < 1e-2
    label = (d["image"] > 0.5).to(torch.uint8)
    d["pred"] = MetaTensor(label, meta=dict(d["image"].meta), applied_operations=list(d["image"].applied_operations))
    out = Invertd(keys="pred", transform=Compose(pre), orig_keys="image", nearest_interp=True)(d)["pred"]
    assert tuple(out.shape[1:]) == padded.shape
    assert np.allclose(np.asarray(out.affine), affine, atol=1e-5)
    inside = np.asarray(out[0])[4 : 4 + arr.shape[0], :, 2 : 2 + arr.shape[2]]
    assert inside.sum() > 0 and np.asarray(out[0]).sum() == inside.sum()  # nothing predicted in the cropped border


def test_ct_normalisation_from_plan() -> None:
    from lib.planning import normalisation_for
    from lib.transforms import NormalizeFromPland

    fp = {
        "foreground_intensity_properties_per_channel": [
            {"percentile_00_5": -100.0, "percentile_99_5": 300.0, "mean": 50.0, "std": 25.0}
        ]
    }
    schemes = normalisation_for(fp, ["CT"])
    img = torch.tensor([[[-1000.0, 0.0], [50.0, 2000.0]]])
    out = NormalizeFromPland(keys="image", schemes=schemes)({"image": img})["image"]
    assert torch.allclose(out, torch.tensor([[[-6.0, -2.0], [0.0, 10.0]]]))  # clipped to [-100, 300], (x-50)/25
    mri = NormalizeFromPland(keys="image", schemes=normalisation_for(fp, ["MRI"]))({"image": img})["image"]
    assert abs(float(mri.mean())) < 1e-5


def test_deep_supervision_weights() -> None:
    from lib.trainers.nnunet import DeepSupervisionLoss

    loss = DeepSupervisionLoss(torch.nn.MSELoss(), heads=3)
    assert loss.weights == pytest.approx([2 / 3, 1 / 3, 0.0])
    target = torch.zeros(2, 1, 4, 4)
    pred = torch.stack([torch.ones(2, 1, 4, 4), 2 * torch.ones(2, 1, 4, 4), 100 * torch.ones(2, 1, 4, 4)], dim=1)
    assert float(loss(pred, target)) == pytest.approx(2 / 3 * 1 + 1 / 3 * 4)


def make_nn_app(tmp_path: Path, models: str = "nnunet", labelled: list[int] | None = None, **conf: str):
    from main import UNetSegApp

    studies = make_studies(tmp_path / "studies", labelled or [3, 4, 1], [])
    return UNetSegApp(
        str(APP_DIR), str(studies), dict(TINY_NN, models=models, model_dir=str(tmp_path / "model"), **conf)
    )


def test_plan_made_once_and_replanned_on_request(tmp_path: Path, require_data: None) -> None:
    app = make_nn_app(tmp_path)
    plan_file = Path(app.model_dir) / "nnunet_plan.json"
    app.train({"model": "nnunet", "max_epochs": 1, "val_split": 0.34})
    plan = json.loads(plan_file.read_text())
    assert plan["patch_size"] == [16, 16, 16] and plan["filters"][-1] <= 16
    assert app.info()["trainers"]["nnunet"]["plan"]["patch_size"] == [16, 16, 16]
    stamp = plan_file.stat().st_mtime_ns
    app.train({"model": "nnunet", "max_epochs": 1})
    assert plan_file.stat().st_mtime_ns == stamp  # reused, not re-planned
    app.train({"model": "nnunet", "max_epochs": 1, "replan": True})
    assert plan_file.stat().st_mtime_ns != stamp
    meta = serving_meta(app.model_dir, "nnunet")
    assert meta["plan"]["target_spacing"] == plan["target_spacing"] and meta["spec"]["deep_supervision"] is True
    assert set(meta["postprocessing"]["largest_component"]) <= {"anterior", "posterior"}


def test_folds_ensemble_and_postprocessing(tmp_path: Path, require_data: None) -> None:
    app = make_nn_app(tmp_path, labelled=[3, 4, 1, 6])
    for fold in (0, 1):
        stats = app.train({"model": "nnunet", "fold": fold, "nfolds": 2})
        assert stats["val_cases"] == 2 and "postprocessing" in stats
    folds = json.loads((Path(app.model_dir) / "nnunet_folds.json").read_text())["assignment"]
    assert sorted(folds.values()) == [0, 0, 1, 1]
    assert sorted(app.model_store("nnunet").latest_per_fold()) == [0, 1]
    single = app.infer({"model": "nnunet", "image": str(hippo_case(8)[0]), "tta": False})
    both = app.infer({"model": "nnunet", "image": str(hippo_case(8)[0]), "tta": False, "ensemble": True})
    assert single["params"]["ensemble"] == 1 and both["params"]["ensemble"] == 2
    a, b = nib.load(single["file"]), nib.load(both["file"])
    assert a.shape == b.shape == nib.load(hippo_case(8)[0]).shape


def test_empty_label_and_wrong_channels_fail_clearly(tmp_path: Path, require_data: None) -> None:
    from lib.transforms import InputError

    app = make_nn_app(tmp_path)
    lab = tmp_path / "studies" / "labels" / "final" / "hippocampus_004.nii.gz"
    img = nib.load(lab)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), lab)
    with pytest.raises(Exception, match="hippocampus_004"):  # the planner or the loader names the empty file
        app.train({"model": "nnunet", "max_epochs": 1, "val_split": 0.34})
    app2 = make_nn_app(tmp_path / "two", modalities="2")
    with pytest.raises((InputError, ValueError), match="channel"):
        app2.train({"model": "nnunet", "max_epochs": 1})


@pytest.fixture(scope="module")
def nn_server(tmp_path_factory: pytest.TempPathFactory, require_data: None):
    base = tmp_path_factory.mktemp("nnserver")
    studies = make_studies(base / "studies", labelled=HIPPO_IDS[:3], unlabelled=HIPPO_IDS[3:])
    conf = dict(TINY_NN, models="nnunet,nnunet2d", model_dir=str(base / "model"), tracking="mlflow")
    with running_server(studies, conf, base / "server.log") as srv:
        yield srv


@pytest.mark.parametrize("model", ["nnunet", "nnunet2d"])
def test_server_train_and_infer(nn_server: Server, model: str, tmp_path: Path) -> None:
    info = requests.get(f"{nn_server.url}/info/", timeout=30).json()
    assert model in info["models_not_ready"]
    r = requests.post(f"{nn_server.url}/train/{model}", json={"val_split": 0.34}, timeout=60)
    assert r.status_code == 200, r.text
    status = nn_server.wait_train_done()
    assert status["status"] == "DONE", status
    info = requests.get(f"{nn_server.url}/info/", timeout=30).json()
    plan = info["trainers"][model]["plan"]
    assert plan["dims"] == (3 if model == "nnunet" else 2)
    assert info["models"][model]["ready"] is True
    r = requests.post(
        f"{nn_server.url}/infer/{model}",
        params={"image": "hippocampus_008", "output": "image"},
        data={"params": json.dumps({"tta": True})},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(r.content)
    seg, src = nib.load(out), nib.load(nn_server.studies / "hippocampus_008.nii.gz")
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)
    assert set(np.unique(np.asanyarray(seg.dataobj)).tolist()) <= {0, 1, 2}

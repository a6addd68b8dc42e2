"""Bring your own nnU-Net (``lib/nnunetv2.py``): a tiny model trained by nnU-Net v2 itself, served by a REAL server.

The session fixture works in nnU-Net's own virtualenv (``.venv-nnunet``, made by
``benchmarks/peer_inference.py --setup``): six MSD Hippocampus cases as nnU-Net raw data,
nnU-Net's fingerprint + ExperimentPlanner + preprocessing (features per stage halved, a custom
plan), then nnUNetTrainer for a few iterations on two folds (fold 0: 10 iterations and nnU-Net's
own validation; fold 1: 3 iterations). Both start from the embedded sample UNet3D's weights
written as a PlainConvUNet (same topology), so a few CPU iterations give a model that segments
both hippocampus parts (checked: otherwise the equality below would prove nothing). nnU-Net's
``nnUNetPredictor`` (step 0.5, Gaussian, mirroring) labels three held-out cases and a fourth that is
one of them relabelled to 0.7 x 1.0 x 1.6 mm (both tools resample it; it needs three windows) with
fold 0 and with folds 0+1, and ``nnUNetv2_export_model_to_zip`` exports fold 0.

The tests start our server with ``--conf nnunet.pretrained <results folder>`` (folds 0+1) and
``<export zip>`` (fold 0), call ``/infer`` over HTTP and require Dice >= 0.99 per class against
nnU-Net's labels, in the request image's geometry; the command line does the same from the zip.
Bad input (not a results folder, a missing fold, a plans/labels mismatch, an unsupported trainer,
a 3D model given to the 2D config) is a clear error while the server keeps serving the sample
UNet3D; our trainer fine-tunes the imported fold for one tiny epoch and refuses an ensemble.
"""

from __future__ import annotations

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

from conftest import APP_DIR, HIPPO, ROOT, Server, make_studies, running_server

sys.path.insert(0, str(ROOT / "slicer_module" / "UNetSeg"))

from UNetSegLib import parse_multipart  # noqa: E402  (the Slicer module's client reads the same replies)

PEER_VENV = ROOT / ".venv-nnunet"
PEER_SCRIPT = Path(__file__).with_name("nnunet_peer.py")
DATASET = "Dataset004_Hippocampus"
MODEL = f"{DATASET}/nnUNetTrainer__nnUNetPlans__3d_fullres"
SAMPLE_MODEL = ROOT / "sample" / "models" / "unet3d_hippocampus_small.pt"
LABELS = {"Anterior": 1, "Posterior": 2}
HELD_OUT = ["hippocampus_019", "hippocampus_026", "hippocampus_033"]
# hippocampus_026 relabelled to 0.7 x 1.0 x 1.6 mm: both tools resample it (and it needs three windows)
RESAMPLED = "aniso_026"
CASES = [*HELD_OUT, RESAMPLED]


def dice(ours: Path, theirs: Path) -> dict[str, float]:
    """Dice per class of two label files; they must share shape and affine (the original geometry)."""
    from lib.metrics import dice_per_class

    a, b = nib.load(str(ours)), nib.load(str(theirs))
    assert a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-4), (a.shape, b.shape)
    return dice_per_class(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj), LABELS)


def sample_as_plain_conv_unet(path: Path) -> None:
    """The sample UNet3D's weights by PlainConvUNet key, its kernels turned to nnU-Net's (z, y, x) axis order."""
    from lib.checkpoints import read_checkpoint
    from lib.nnunetv2 import NnUNetV2Spec, dynunet_to_nnunet

    state, meta = read_checkpoint(str(SAMPLE_MODEL))
    assert meta["spec"]["levels"] == 4 and meta["spec"]["base_filters"] == 16
    spec = NnUNetV2Spec(
        spatial_dims=3,
        in_channels=1,
        out_channels=3,
        kernels=[[3, 3, 3]] * 4,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * 3,
        filters=[16, 32, 64, 128],
        deep_supr_num=2,
    )
    weights = dynunet_to_nnunet(state, spec)
    torch.save({k: v.permute(0, 1, 4, 3, 2).contiguous() if v.ndim == 5 else v for k, v in weights.items()}, path)


@pytest.fixture(scope="session")
def nnunet_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """An nnU-Net v2 results folder, its export zip and nnU-Net's own predictions (see module docstring)."""
    if not HIPPO.exists():
        pytest.fail(f"real data missing: {HIPPO}")
    if not (PEER_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peer_inference.py"), "--setup"], check=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from peer_inference import write_raw

    base = tmp_path_factory.mktemp("nnunet_v2")
    raw, pre, res = base / "nnUNet_raw", base / "nnUNet_preprocessed", base / "nnUNet_results"
    env = {
        **os.environ,
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(pre),
        "nnUNet_results": str(res),
        "nnUNet_n_proc_DA": "0",  # augmentation in the training process: 2 cores
        "nnUNet_def_n_proc": "1",
    }
    names = write_raw(HIPPO, 6, raw, base / "unused")
    assert not set(names) & set(HELD_OUT)
    images, cases = base / "heldout", base / "cases"  # nnU-Net's file names (_0000), ours
    images.mkdir()
    cases.mkdir()
    for name in HELD_OUT:
        shutil.copy(HIPPO / "imagesTr" / f"{name}.nii.gz", cases / f"{name}.nii.gz")
    src = nib.load(HIPPO / "imagesTr" / "hippocampus_026.nii.gz")
    affine = src.affine @ np.diag([0.7, 1.0, 1.6, 1.0])
    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj), affine), cases / f"{RESAMPLED}.nii.gz")
    for name in CASES:
        shutil.copy(cases / f"{name}.nii.gz", images / f"{name}_0000.nii.gz")
    init = str(base / "init.pt")
    sample_as_plain_conv_unet(Path(init))
    model, model2d = res / MODEL, res / f"{DATASET}/nnUNetTrainer__nnUNetPlans__2d"
    job = {
        "dataset_id": 4,
        "configurations": ["3d_fullres", "2d"],
        "feature_divisor": 2,
        "splits": [{"train": names[:5], "val": names[5:]}, {"train": names[1:], "val": names[:1]}],
        "train": [
            {"configuration": "3d_fullres", "fold": 0, "epochs": 1, "iterations": 10, "validate": True, "init": init},
            {"configuration": "3d_fullres", "fold": 1, "epochs": 1, "iterations": 3, "validate": False, "init": init},
            {"configuration": "2d", "fold": 0, "epochs": 1, "iterations": 3, "validate": False},
        ],
        "images": str(images),
        "predict": [
            {"model": str(model), "folds": [0], "out": str(base / "pred_f0")},
            {"model": str(model), "folds": [0, 1], "out": str(base / "pred_f01")},
            {"model": str(model2d), "folds": [0], "out": str(base / "pred_2d"), "probabilities": True},
        ],
        "zip": str(base / "model.zip"),
        "export_configuration": "3d_fullres",
        "export_folds": ["0"],
    }
    (base / "job.json").write_text(json.dumps(job))
    t = time.perf_counter()
    r = subprocess.run(
        [str(PEER_VENV / "bin" / "python"), str(PEER_SCRIPT), str(base / "job.json")],
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.fail(f"nnU-Net failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    times = r.stdout.rsplit("TIMES ", 1)[-1].strip()
    for folder in ("pred_f0", "pred_f01"):  # a near-constant model would make the equality meaningless
        for name in CASES:
            values = set(np.unique(np.asanyarray(nib.load(base / folder / f"{name}.nii.gz").dataobj)).tolist())
            assert values == {0, 1, 2}, f"nnU-Net's tiny model predicts only {values} on {name} ({folder})"
    print(f"\nnnU-Net fixture: {time.perf_counter() - t:.1f} s; {times}")
    yield {
        "base": base,
        "cases": cases,
        "results": res,
        "dataset": res / DATASET,
        "model": model,
        "model2d": model2d,
        "zip": base / "model.zip",
    }


def studies_with(folder: Path, cases: Path) -> Path:
    """A studies folder holding the held-out images from ``cases`` (datastore ids = case names)."""
    folder.mkdir(parents=True)
    for name in CASES:
        shutil.copy(cases / f"{name}.nii.gz", folder / f"{name}.nii.gz")
    return folder


def conf_for(model_dir: Path, **extra: str) -> dict[str, str]:
    from lib.serverproc import sample_conf

    return sample_conf(**{"models": "unet3d,nnunet", "model_dir": str(model_dir), **extra})


def infer(server: Server, model: str, image: str, out: Path, **params: object) -> dict:
    """POST /infer/<model> for a datastore image; the label is written to ``out``, the JSON part returned."""
    r = requests.post(
        f"{server.url}/infer/{model}",
        params={"image": image, "output": "all"},
        data={"params": json.dumps(params)},
        timeout=600,
    )
    assert r.status_code == 200, r.text[:2000]
    parts = parse_multipart(r.headers["content-type"], r.content)
    files = [payload for filename, payload in parts.values() if filename]
    texts = [payload for filename, payload in parts.values() if not filename]
    assert len(files) == 1 and len(texts) == 1, list(parts)
    out.write_bytes(files[0])
    return json.loads(texts[0])


def check_server_equals_nnunet(server: Server, cases: Path, reference: Path, out: Path) -> dict[str, dict[str, float]]:
    """Every held-out case through /infer/nnunet, Dice per class against nnU-Net's label of the same case."""
    out.mkdir(exist_ok=True)
    scores = {}
    for name in CASES:
        t = time.perf_counter()
        body = infer(server, "nnunet", name, out / f"{name}.nii.gz")
        assert body["tta"] is True and body["label_names"] == LABELS
        seg = nib.load(out / f"{name}.nii.gz")
        src = nib.load(cases / f"{name}.nii.gz")
        assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)  # the original geometry
        scores[name] = dice(out / f"{name}.nii.gz", reference / f"{name}.nii.gz")
        print(f"{name}: Dice vs nnUNetPredictor {scores[name]} ({time.perf_counter() - t:.1f} s)")
    for name, per_class in scores.items():
        assert min(per_class.values()) >= 0.99, (name, per_class)
    return scores


def test_server_serves_results_folder_like_nnunet(nnunet_model: dict[str, Path], tmp_path: Path) -> None:
    """A dataset folder of nnUNet_results (default folds: every trained one, 0 and 1) vs nnUNetPredictor -f 0 1."""
    conf = conf_for(tmp_path / "model", **{"nnunet.pretrained": str(nnunet_model["dataset"])})
    with running_server(
        studies_with(tmp_path / "studies", nnunet_model["cases"]), conf, tmp_path / "server.log"
    ) as srv:
        info = requests.get(f"{srv.url}/info/", timeout=30).json()
        assert info["models"]["nnunet"]["ready"] is True, info.get("models_not_ready")
        versions = info["models"]["nnunet"]["versions"]
        assert versions[0]["source"] == "imported" and versions[0]["state"] == "serving"
        assert "folds 0,1" in versions[0]["reason"] and nnunet_model["model"].name in versions[0]["reason"]
        assert info["models"]["nnunet"]["labels"] == LABELS
        check_server_equals_nnunet(srv, nnunet_model["cases"], nnunet_model["base"] / "pred_f01", tmp_path / "ours")
        assert infer(srv, "unet3d", HELD_OUT[0], tmp_path / "unet3d.nii.gz")["label_names"]
    meta = torch.load(tmp_path / "model" / "nnunet" / "versions" / "v1.pt", weights_only=True)["meta"]
    assert meta["source"] == "imported" and meta["spec"]["kind"] == "nnunet_v2" and meta["spec"]["folds"] == 2
    block = meta["plan"]["nnunet_v2"]
    assert block["trainer"] == "nnUNetTrainer" and block["folds"] == ["0", "1"] and block["mirror_axes"] == [0, 1, 2]


def test_server_serves_export_zip_like_nnunet(nnunet_model: dict[str, Path], tmp_path: Path) -> None:
    """nnUNetv2_export_model_to_zip's archive (fold 0) vs nnUNetPredictor -f 0."""
    conf = conf_for(tmp_path / "model", **{"nnunet.pretrained": str(nnunet_model["zip"])})
    with running_server(
        studies_with(tmp_path / "studies", nnunet_model["cases"]), conf, tmp_path / "server.log"
    ) as srv:
        check_server_equals_nnunet(srv, nnunet_model["cases"], nnunet_model["base"] / "pred_f0", tmp_path / "ours")


def test_cli_predicts_from_zip_like_nnunet(nnunet_model: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "data" / "images"
    data.mkdir(parents=True)
    for name in CASES:
        shutil.copy(nnunet_model["cases"] / f"{name}.nii.gz", data / f"{name}.nii.gz")
    cmd = [sys.executable, str(ROOT / "main.py"), "predict", "--config", "nnunet", "--ckpt", str(nnunet_model["zip"])]
    cmd += ["--data", str(tmp_path / "data"), "--results", str(tmp_path / "res"), "--tta"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for name in CASES:
        scores = dice(
            tmp_path / "res" / "predictions" / f"{name}.nii.gz", nnunet_model["base"] / "pred_f0" / f"{name}.nii.gz"
        )
        print(f"CLI {name}: {scores}")
        assert min(scores.values()) >= 0.99, (name, scores)


def test_2d_model_probabilities_equal_nnunet(nnunet_model: dict[str, Path], tmp_path: Path) -> None:
    """nnunet2d serving the dataset folder's 2d model (slice by slice along nnU-Net's first axis): the softmax
    probabilities in the original geometry equal nnUNetPredictor's (saved as float16), resampled case included."""
    from main import UNetSegApp

    (tmp_path / "studies").mkdir()
    conf = {
        "models": "nnunet2d",
        "model_dir": str(tmp_path / "model"),
        "tracking": "none",
        "auto_update_scoring": "false",
        "nnunet2d.pretrained": str(nnunet_model["dataset"]),
    }
    task = UNetSegApp(str(APP_DIR), str(tmp_path / "studies"), conf).infer_task("nnunet2d")
    assert task.is_valid(), task.not_ready_reason()
    for name in (HELD_OUT[0], RESAMPLED):
        ours = task.save_probabilities(
            str(nnunet_model["cases"] / f"{name}.nii.gz"), str(tmp_path / f"{name}.nii.gz"), {"tta": True, "amp": False}
        )
        mine = np.asanyarray(nib.load(ours).dataobj)  # (i, j, k, classes)
        theirs = np.load(nnunet_model["base"] / "pred_2d" / f"{name}.npz")["probabilities"].astype(np.float32)
        theirs = theirs.transpose(3, 2, 1, 0)  # nnU-Net's (classes, z, y, x)
        assert mine.shape == theirs.shape, (mine.shape, theirs.shape)
        print(f"2d {name}: max |p - p_nnunet| = {np.abs(mine - theirs).max():.2e}")
        assert np.abs(mine - theirs).max() < 2e-3, name


# ---- bad input ---------------------------------------------------------------------------------


def copy_model(nnunet_model: dict[str, Path], dst: Path) -> Path:
    """A copy of the model folder (its parent named as nnUNet_results has it) to break."""
    target = dst / DATASET / nnunet_model["model"].name
    shutil.copytree(nnunet_model["model"], target, ignore=shutil.ignore_patterns("validation", "*.png", "*.txt"))
    return target


@pytest.mark.parametrize(
    "breakage, expected",
    [
        ("not_results", "is not an nnU-Net results folder or export zip: no plans.json"),
        (
            "missing_fold",
            "fold 3 missing (no fold_3/checkpoint_final.pth); available folds with checkpoint_final.pth: 0, 1",
        ),
        ("labels_mismatch", "plans/labels mismatch"),
        ("plans_mismatch", "(plans mismatch)"),
        ("trainer", "trainer class nnUNetTrainerBN is not supported"),
        ("architecture", "network dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet"),
        ("truncated", "checkpoint_final.pth is not a loadable nnU-Net checkpoint"),
        ("two_d", "is a 3D nnU-Net model (configuration '3d_fullres'); serve it with the nnunet config"),
    ],
)
def test_bad_nnunet_models_are_named(
    nnunet_model: dict[str, Path], tmp_path: Path, breakage: str, expected: str
) -> None:
    from lib.nnunetv2 import NnUNetImportError, convert, open_model

    folder = copy_model(nnunet_model, tmp_path)
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    kwargs: dict = {}
    dims = 3
    if breakage == "not_results":
        folder = HIPPO  # an MSD dataset, not a results folder
    elif breakage == "missing_fold":
        kwargs["folds"] = "0,3"
    elif breakage == "labels_mismatch":
        ds = json.loads((folder / "dataset.json").read_text())
        ds["labels"]["Tail"] = 3
        (folder / "dataset.json").write_text(json.dumps(ds))
    elif breakage == "plans_mismatch":
        plans = json.loads((folder / "plans.json").read_text())
        plans["configurations"]["3d_fullres"]["patch_size"] = [32, 48, 32]
        (folder / "plans.json").write_text(json.dumps(plans))
    elif breakage in ("trainer", "architecture"):
        data = torch.load(ckpt, weights_only=False)
        if breakage == "trainer":
            data["trainer_name"] = "nnUNetTrainerBN"
        else:
            plans = json.loads((folder / "plans.json").read_text())
            arch = plans["configurations"]["3d_fullres"]["architecture"]
            arch["network_class_name"] = "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet"
            (folder / "plans.json").write_text(json.dumps(plans))
        torch.save(data, ckpt)
    elif breakage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif breakage == "two_d":
        dims = 2
    with pytest.raises(NnUNetImportError) as err:
        convert(open_model(str(folder), dims, model_name="nnunet2d" if dims == 2 else "nnunet", **kwargs), "nnunet")
    assert expected in str(err.value)
    assert str(tmp_path) not in str(err.value) and str(HIPPO.parent) not in str(err.value)  # no server paths


def test_bad_pretrained_keeps_server_serving(nnunet_model: dict[str, Path], tmp_path: Path) -> None:
    """A missing fold (nnunet) and a 3D model given to nnunet2d: both not ready with the reason; unet3d serves."""
    conf = conf_for(
        tmp_path / "model",
        models="unet3d,nnunet,nnunet2d",
        **{
            "nnunet.pretrained": str(nnunet_model["zip"]),
            "nnunet.folds": "0,3",
            "nnunet2d.pretrained": str(nnunet_model["model"]),
        },
    )
    with running_server(
        studies_with(tmp_path / "studies", nnunet_model["cases"]), conf, tmp_path / "server.log"
    ) as srv:
        info = requests.get(f"{srv.url}/info/", timeout=30).json()
        reason = info["models_not_ready"]["nnunet"]["not_ready_reason"]
        assert "nnunet.pretrained model.zip" in reason and "fold 3 missing" in reason, reason
        reason2d = info["models_not_ready"]["nnunet2d"]["not_ready_reason"]
        assert "is a 3D nnU-Net model" in reason2d and "nnunet config" in reason2d, reason2d
        for model, text in (("nnunet", "fold 3 missing"), ("nnunet2d", "3D nnU-Net model")):
            r = requests.post(f"{srv.url}/infer/{model}", params={"image": HELD_OUT[0]}, timeout=60)
            assert r.status_code == 409 and text in r.json()["detail"], r.text
            assert str(tmp_path) not in r.text
        assert infer(srv, "unet3d", HELD_OUT[0], tmp_path / "unet3d.nii.gz")["label_names"]


def test_folder_given_to_unet3d_is_refused(tmp_path: Path) -> None:
    from lib.conf import ConfError
    from lib.configs import lifecycle

    with pytest.raises(ConfError, match="served by the nnunet and nnunet2d configs only"):
        lifecycle({}, "unet3d", str(tmp_path / "model"), str(tmp_path))


# ---- fine-tuning -------------------------------------------------------------------------------


def test_trainer_fine_tunes_imported_fold(nnunet_model: dict[str, Path], tmp_path: Path) -> None:
    """POST /train/nnunet on a server serving the imported fold 0: one tiny epoch of our trainer starts from its
    weights and keeps its plan, network and nnU-Net pre-processing; the result serves like the import did."""
    studies = make_studies(tmp_path / "studies", labelled=[1, 3, 4], unlabelled=[])
    conf = {
        "models": "nnunet",
        "model_dir": str(tmp_path / "model"),
        "tracking": "none",
        "auto_retrain_after": "0",
        "promotion": "always",
        "nnunet.pretrained": str(nnunet_model["model"]),
        "nnunet.folds": "0",
    }
    with running_server(studies, conf, tmp_path / "server.log") as srv:
        body = {"max_epochs": 1, "iterations_per_epoch": 2, "val_split": 0.34}
        r = requests.post(f"{srv.url}/train/nnunet", json=body, timeout=60)
        assert r.status_code == 200, r.text
        status = srv.wait_train_done(timeout=900)
        assert status["status"] == "DONE", status
        out = tmp_path / "tuned.nii.gz"
        assert infer(srv, "nnunet", "hippocampus_001", out)["model_version"] == "v2"
        assert set(np.unique(np.asanyarray(nib.load(out).dataobj)).tolist()) <= {0, 1, 2}
    from lib.modelstore import ModelStore

    store = ModelStore(str(tmp_path / "model"), "nnunet")
    records = {rec.id: rec for rec in store.records()}
    assert records["v1"].source == "imported" and records["v2"].source == "trained", store.describe()
    assert records["v2"].parent == "v1" and records["v2"].state == "serving"
    tuned, imported = store.meta("v2"), store.meta("v1")
    assert tuned.spec == {**imported.spec, "dropout": 0.0}  # the imported network, fine-tuned
    assert tuned.plan == imported.plan and tuned.plan["nnunet_v2"]["configuration"] == "3d_fullres"
    before, after = store.load("v1")[0], store.load("v2")[0]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


def test_trainer_refuses_fold_ensemble(nnunet_model: dict[str, Path], tmp_path: Path) -> None:
    from lib.modelstore import ModelStore
    from lib.nnunetv2 import NnUNetImportError, fine_tune_start, import_into_store, open_model

    store = ModelStore(str(tmp_path / "model"), "nnunet")
    import_into_store(store, open_model(str(nnunet_model["model"]), 3), "nnunet")
    with pytest.raises(NnUNetImportError, match=r"ensemble of 2 nnU-Net folds .*\(nnunet\.folds 0\)"):
        fine_tune_start(store, pretrained=True)
    assert fine_tune_start(store, pretrained=False) is None  # pretrained: false plans afresh instead

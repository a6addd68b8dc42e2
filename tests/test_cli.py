"""The standalone CLI (main.py), run as users run it: a subprocess per sub-command on tiny real data."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import HIPPO, ROOT, free_port, serving_meta

CASES = ["001", "003", "004", "006"]
TINY = ["--conf", "preset=tiny", "--conf", "roi_size=16"]


def cli(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
        env=dict(os.environ, **(env or {})),
    )


@pytest.fixture(scope="module")
def msd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MSD-style folder: 4 labelled hippocampus cases + 1 test image."""
    root = tmp_path_factory.mktemp("msd")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (root / sub).mkdir()
    for i in CASES:
        shutil.copy(HIPPO / "imagesTr" / f"hippocampus_{i}.nii.gz", root / "imagesTr")
        shutil.copy(HIPPO / "labelsTr" / f"hippocampus_{i}.nii.gz", root / "labelsTr")
    shutil.copy(HIPPO / "imagesTr" / "hippocampus_008.nii.gz", root / "imagesTs")
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
                "training": [
                    {"image": f"./imagesTr/hippocampus_{i}.nii.gz", "label": f"./labelsTr/hippocampus_{i}.nii.gz"}
                    for i in CASES
                ],
                "test": ["./imagesTs/hippocampus_008.nii.gz"],
            }
        )
    )
    return root


@pytest.fixture(scope="module")
def trained(msd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("results")
    r = cli(
        "train",
        "--config",
        "unet3d",
        "--data",
        str(msd),
        "--results",
        str(results),
        *TINY,
        "--epochs",
        "2",
        "--val_split",
        "0.25",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # ends cleanly: no request to a server that is not there
    assert "Traceback" not in r.stderr and "/scoring" not in r.stderr
    return results


def test_help_documents_every_flag() -> None:
    r = cli("--help")
    assert r.returncode == 0
    for flag in (
        "--exec_mode",
        "--config",
        "--data",
        "--results",
        "--fold",
        "--nfolds",
        "--amp",
        "--tta",
        "--batch_size",
        "--epochs",
        "--max_steps",
        "--learning_rate",
        "--seed",
        "--overlap",
        "--blend",
        "--ckpt",
        "--resume_training",
        "--save_preds",
        "--save_probs",
        "--num_workers",
        "--device",
        "--warmup_steps",
        "--bench_steps",
    ):
        assert flag in r.stdout, flag


def test_train_publishes_model_stats_and_curves(trained: Path) -> None:
    meta = serving_meta(trained / "model", "unet3d")
    assert meta["labels"] == {"anterior": 1, "posterior": 2}
    stats = json.loads((trained / "model" / "unet3d_train_stats.json").read_text())
    assert [h["epoch"] for h in stats["history"]] == [1, 2] and stats["history"][0]["train_loss"] > 0
    from lib.runtime import cpu_has_native_bf16

    # the server's AMP rule is the CLI's default
    assert stats["amp"] == ("bfloat16" if cpu_has_native_bf16() else "fp32")
    assert stats["gate"]["decision"] == "serving" and meta["version"] == "v1"
    assert (trained / "plots" / "unet3d_curves.png").stat().st_size > 1000
    split = json.loads((trained / "model" / "unet3d_split.json").read_text())
    assert len(split["validation"]) == 1 and len(split["training"]) == 3


def test_resume_training_continues_after_the_last_epoch(trained: Path, msd: Path) -> None:
    resume = torch.load(trained / "model" / "unet3d_resume.pt", weights_only=True)
    assert resume["epoch"] == 2 and "optimizer" in resume
    split = (trained / "model" / "unet3d_split.json").read_text()
    r = cli(
        "train",
        "--config",
        "unet3d",
        "--data",
        str(msd),
        "--results",
        str(trained),
        *TINY,
        "--epochs",
        "3",
        "--resume_training",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "continuing after epoch 2" in r.stderr
    stats = json.loads((trained / "model" / "unet3d_train_stats.json").read_text())
    assert [h["epoch"] for h in stats["history"]] == [3]
    assert torch.load(trained / "model" / "unet3d_resume.pt", weights_only=True)["epoch"] == 3
    assert (
        json.loads((trained / "model" / "unet3d_split.json").read_text())["validation"]
        == json.loads(split)["validation"]
    )
    r = cli(
        "train",
        "--config",
        "unet3d",
        "--data",
        str(msd),
        "--results",
        str(trained),
        *TINY,
        "--epochs",
        "3",
        "--resume_training",
    )
    assert r.returncode == 2 and "already finished epoch 3" in r.stderr


def test_evaluate_writes_json_and_csv(trained: Path, msd: Path) -> None:
    r = cli("evaluate", "--config", "unet3d", "--data", str(msd), "--results", str(trained), "--tta", "--save_preds")
    assert r.returncode == 0, r.stderr[-3000:]
    body = json.loads((trained / "eval.json").read_text())
    assert body["summary"]["cases"] == 1  # the persisted validation case
    case = body["cases"][0]
    for key in ("dice_anterior", "dice_posterior", "hd95_anterior", "hd95_posterior", "mean_dice"):
        assert key in case
    with open(trained / "eval.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["case"] == case["case"]
    assert "| dice_anterior |" in r.stdout
    pred = nib.load(next((trained / "predictions").glob("*.nii.gz")))
    src = nib.load(msd / "imagesTr" / f"{case['case']}.nii.gz")
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine)


def test_predict_test_images_with_probabilities(trained: Path, msd: Path) -> None:
    r = cli("predict", "--config", "unet3d", "--data", str(msd), "--results", str(trained), "--save_probs")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "predict: 100%" in r.stderr  # progress bar
    src = nib.load(msd / "imagesTs" / "hippocampus_008.nii.gz")
    seg = nib.load(trained / "predictions" / "hippocampus_008.nii.gz")
    probs = nib.load(trained / "predictions" / "hippocampus_008_probs.nii.gz")
    assert seg.shape == src.shape and probs.shape == (*src.shape, 3)
    p = np.asanyarray(probs.dataobj)
    assert np.allclose(p.sum(-1), 1.0, atol=1e-3)
    assert (trained / "plots" / "hippocampus_008_overlay.png").stat().st_size > 1000


def test_export_torchscript_and_onnx_match(trained: Path) -> None:
    r = cli("export", "--config", "unet3d", "--results", str(trained))
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((trained / "export" / "export.json").read_text())
    assert (
        info["ok"]
        and info["exports"]["onnx"]["max_abs_diff"] < 1e-3
        and info["exports"]["torchscript"]["max_abs_diff"] < 1e-3
    )
    net = torch.jit.load(str(trained / "export" / "unet3d.ts"))
    assert net(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_benchmark_table_and_json(trained: Path) -> None:
    r = cli(
        "benchmark",
        "--config",
        "unet3d",
        "--results",
        str(trained),
        "--batch_size",
        "1,2",
        "--warmup_steps",
        "1",
        "--bench_steps",
        "2",
        "--bench_mode",
        "train",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| Batch size | AMP |" in r.stdout
    body = json.loads((trained / "benchmark.json").read_text())
    fp32 = [row for row in body["rows"] if not row["amp"]]
    assert [row["batch_size"] for row in fp32] == [1, 2] and all(row["throughput_img_s"] > 0 for row in fp32)


def test_plan_writes_the_nnunet_plan(msd: Path, tmp_path: Path) -> None:
    r = cli("plan", "--config", "nnunet", "--data", str(msd), "--results", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads((tmp_path / "model" / "nnunet_plan.json").read_text())
    assert plan["target_spacing"] == [1.0, 1.0, 1.0] and len(plan["patch_size"]) == 3


def test_torchrun_two_cpu_processes(msd: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(ROOT / "main.py"),
            "train",
            "--config",
            "unet3d",
            "--data",
            str(msd),
            "--results",
            str(tmp_path),
            *TINY,
            "--epochs",
            "1",
            "--val_split",
            "0.25",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    meta = serving_meta(tmp_path / "model", "unet3d")
    assert meta["world_size"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--config", "unet9d"], "unknown --config 'unet9d'"),
        (["train", "--config", "unet3d", "--data", "/nonexistent"], "is not a folder"),
        (["evaluate", "--config", "unet3d"], "no version serves yet"),
    ],
)
def test_bad_input_exits_2_with_message(args: list[str], message: str, tmp_path: Path) -> None:
    r = cli(*args, "--results", str(tmp_path))
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]


def test_bad_dataset_json_fields(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"training": [{"image": "./a.nii.gz"}]}))
    r = cli("train", "--config", "unet3d", "--data", str(data), "--results", str(tmp_path / "out"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    img = nib.load(HIPPO / "imagesTr" / "hippocampus_001.nii.gz")
    nib.save(img, data / "a.nii.gz")
    r = cli("train", "--config", "unet3d", "--data", str(data), "--results", str(tmp_path / "out"))
    assert r.returncode == 2 and "training[0] has no 'label' field" in r.stderr
    assert not list((tmp_path / "out" / "model").glob("unet3d/versions/*.pt"))


def test_mismatched_label_shape_is_named(msd: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(msd, data)
    lab = nib.load(data / "labelsTr" / "hippocampus_001.nii.gz")
    nib.save(nib.Nifti1Image(np.asanyarray(lab.dataobj)[:-2], lab.affine), data / "labelsTr" / "hippocampus_001.nii.gz")
    r = cli(
        "train", "--config", "unet3d", "--data", str(data), "--results", str(tmp_path / "out"), *TINY, "--epochs", "1"
    )
    assert r.returncode == 2 and "hippocampus_001" in r.stderr and "differs from image shape" in r.stderr, r.stderr[
        -2000:
    ]


def test_evaluation_conventions_brats_regions_and_2d() -> None:
    from lib.evaluation import brats_regions, evaluate_case

    labels = {"necrosis": 1, "edema": 2, "enhancing": 3}
    assert brats_regions(labels) == {"WT": [1, 2, 3], "TC": [1, 3], "ET": [3]}
    assert brats_regions({"anterior": 1, "posterior": 2}) is None
    ref = np.zeros((8, 8, 8), dtype=int)
    ref[2:4, 2:4, 2:4] = 2  # edema only
    ref[4:6, 4:6, 4:6] = 3  # enhancing
    pred = ref.copy()
    pred[4:6, 4:6, 4:6] = 1  # enhancing called necrosis: TC right, ET wrong
    row = evaluate_case(pred, ref, labels, spacing=(1.0, 1.0, 1.0))
    assert row["dice_WT"] == 1.0 and row["dice_TC"] == 1.0 and row["dice_ET"] == 0.0
    assert np.isnan(row["hd95_enhancing"]) and row["hd95_one_sided"] == 2  # necrosis and enhancing one-sided
    assert row["dice_necrosis"] == 0.0 and row["dice_edema"] == 1.0
    two_d = np.zeros((10, 22), dtype=int)
    two_d[:, :10] = 1
    two_d[:, 12:] = 1
    row2 = evaluate_case(two_d, two_d, {"cell": 1})
    assert row2["v_rand"] == 1.0 and row2["v_info"] == 1.0 and row2["hd95_cell"] == 0.0

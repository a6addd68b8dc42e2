"""MONAI bundle export round trip: ``main.py export --format bundle``, then the bundle run by MONAI alone
(``python -m monai.bundle run``) and served by MONAI Label's own ``BundleInferTask``, each compared with our
inference (Dice per class >= 0.99) on a sample image and on a padded, rotated, anisotropic copy; the embedded
sample UNet3D and a tiny trained nnU-Net; and the export's refusals (no model, unknown format, existing folder,
UNet2D)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import APP_DIR, ROOT, make_studies

SAMPLE = ROOT / "sample"
SAMPLE_MODEL = SAMPLE / "models" / "unet3d_hippocampus_small.pt"
LABELS = {"anterior": 1, "posterior": 2}
# the keys the MONAI bundle specification makes mandatory (optional_packages_version is named
# required_packages_version since MONAI 1.2) and those of every tensor format
META_KEYS = (
    "schema",
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
TENSOR_KEYS = (
    "type",
    "format",
    "modality",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
)


def dice(a: str | Path, b: str | Path) -> dict[str, float]:
    """Dice per class of two label files that must share shape and affine."""
    from lib.metrics import dice_per_class

    ia, ib = nib.load(str(a)), nib.load(str(b))
    assert ia.shape == ib.shape and np.allclose(ia.affine, ib.affine, atol=1e-4), (ia.shape, ib.shape)
    return dice_per_class(np.asanyarray(ia.dataobj), np.asanyarray(ib.dataobj), LABELS)


def assert_agree(what: str, got: str | Path, ours: str | Path, image: Path) -> dict[str, float]:
    """The bundle's label has the input's grid and Dice >= 0.99 per class against ours (printed for the record)."""
    src, out = nib.load(str(image)), nib.load(str(got))
    assert out.shape == src.shape and np.allclose(out.affine, src.affine, atol=1e-4)
    d = dice(got, ours)
    print(f"BUNDLE_DICE {what} {image.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in d.items()))
    assert all(v >= 0.99 for v in d.values()), (what, image.name, d)  # NaN (class absent in both) fails too
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A sample study as it is, and another one zero-padded with a rotated, anisotropic affine."""
    folder = tmp_path_factory.mktemp("bundle_images") / "images"
    folder.mkdir()
    plain = folder / "hippocampus_011.nii.gz"
    shutil.copy(SAMPLE / "studies" / plain.name, plain)
    src = nib.load(SAMPLE / "studies" / "hippocampus_014.nii.gz")
    arr = np.asanyarray(src.dataobj).astype(np.float32)
    padded = np.zeros((arr.shape[0] + 10, arr.shape[1], arr.shape[2] + 6), np.float32)
    padded[4 : 4 + arr.shape[0], :, 2 : 2 + arr.shape[2]] = arr
    affine = np.array([[0, -1.2, 0, 30], [0.9, 0, 0, -12], [0, 0, 1.1, 5], [0, 0, 0, 1]], float)
    hard = folder / "rotated_014.nii.gz"
    nib.save(nib.Nifti1Image(padded, affine), hard)
    return [plain, hard]


def monai_bundle_run(bundle: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    """``python -m monai.bundle run`` in its own process, started away from the repository without PYTHONPATH, so
    nothing of unet_seg is importable there."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json")]
    cmd += ["--bundle_root", str(bundle), "--dataset_dir", str(data), "--output_dir", str(out), *extra]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen(
        cmd, cwd=str(out.parent), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(proc: subprocess.Popen) -> None:
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text[-3000:]


_OURS: dict[tuple, str] = {}


@pytest.fixture(scope="module", autouse=True)
def remove_our_labels() -> Iterator[None]:
    """Our inference writes temporary label files (the REST route removes them): remove them after the module."""
    yield
    for path in _OURS.values():
        Path(path).unlink(missing_ok=True)
    _OURS.clear()


def our_infer(app, model: str, image: Path, **params) -> str:  # noqa: ANN001
    """Our inference (the app's /infer path) in float32; computed once per app, image and parameters."""
    key = (id(app), model, str(image), json.dumps(params, sort_keys=True))
    if key not in _OURS:
        _OURS[key] = app.infer({"model": model, "image": str(image), "amp": False, **params})["file"]
    return _OURS[key]


def served_by_bundle_task(bundle: Path, image: Path, **params) -> tuple[str, dict]:  # noqa: ANN003
    """MONAI Label's own BundleInferTask loading the bundle folder and answering a request as its server does."""
    from monailabel.tasks.infer.bundle import BundleInferTask

    task = BundleInferTask(str(bundle), {})
    assert task.is_valid() and task.labels == LABELS and task.type == "segmentation"
    return task({"image": str(image), "device": "cpu", **params})


# ---- the embedded sample UNet3D, exported by main.py ------------------------------------------------


@pytest.fixture(scope="module")
def sample_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(results, bundle) of ``main.py export --config unet3d --ckpt <sample model> --format bundle``."""
    results = tmp_path_factory.mktemp("bundle_results")
    r = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "export", "--config", "unet3d", "--results", str(results)]
        + ["--ckpt", str(SAMPLE_MODEL), "--format", "bundle"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    bundle = results / "export" / "unet3d_bundle"
    info = json.loads((results / "export" / "export.json").read_text())["exports"]["bundle"]
    assert info["path"] == str(bundle) and info["max_abs_diff"] == 0.0
    return results, bundle


@pytest.fixture(scope="module")
def sample_app(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """Our app serving the sample model (as scripts/run_sample.sh does)."""
    from lib.serverproc import sample_conf
    from main import UNetSegApp

    base = tmp_path_factory.mktemp("bundle_app")
    (base / "studies").mkdir()
    return UNetSegApp(str(APP_DIR), str(base / "studies"), sample_conf(model_dir=str(base / "model")))


def test_bundle_layout_metadata_and_properties(sample_export: tuple[Path, Path]) -> None:
    from monai.bundle import ConfigWorkflow
    from monai.networks.nets import DynUNet

    _, bundle = sample_export
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (bundle / rel).is_file(), rel
    md = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert not [k for k in META_KEYS if k not in md]
    assert md["schema"].endswith(".json") and md["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    for tensor in (md["network_data_format"]["inputs"]["image"], md["network_data_format"]["outputs"]["pred"]):
        assert not [k for k in TENSOR_KEYS if k not in tensor]
    assert md["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background",
        "1": "anterior",
        "2": "posterior",
    }
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    assert cfg["network_def"]["_target_"] == "DynUNet" and cfg["displayable_configs"] == {"tta": False}
    assert "unet_seg" not in json.dumps(cfg) and "lib." not in json.dumps(cfg)  # MONAI components only
    # MONAI's own check of an inference bundle: every required property is there
    wf = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type="infer",
        bundle_root=str(bundle),
        logging_file=False,
    )
    wf.initialize()
    assert wf.check_properties() == []
    assert isinstance(wf.network_def, DynUNet)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    wf.network_def.load_state_dict(state, strict=True)


def test_monai_bundle_run_matches_our_inference(
    sample_export: tuple[Path, Path], sample_app, images: list[Path], tmp_path: Path
) -> None:
    _, bundle = sample_export
    proc = monai_bundle_run(bundle, images[0].parent, tmp_path / "out")
    ours = {img.name: our_infer(sample_app, "unet3d", img, tta=False) for img in images}
    finish(proc)
    for img in images:
        got = tmp_path / "out" / img.name.replace(".nii.gz", "_seg.nii.gz")
        assert_agree("unet3d monai.bundle.run", got, ours[img.name], img)
    # the same quality against the expert label as our inference (informational figure)
    ref = SAMPLE / "studies" / "labels" / "final" / images[0].name
    got = tmp_path / "out" / images[0].name.replace(".nii.gz", "_seg.nii.gz")
    print(f"BUNDLE_VS_EXPERT {dice(got, ref)} OURS_VS_EXPERT {dice(ours[images[0].name], ref)}")


def test_monai_label_bundle_infer_task_serves_it(
    sample_export: tuple[Path, Path], sample_app, images: list[Path]
) -> None:
    _, bundle = sample_export
    for img in images:
        label, result = served_by_bundle_task(bundle, img)
        assert result["label_names"] == LABELS
        assert_agree("unet3d BundleInferTask", label, our_infer(sample_app, "unet3d", img, tta=False), img)
        os.remove(label)


# ---- a tiny nnU-Net trained here: crop to non-zero, resampling, largest component --------------------


@pytest.fixture(scope="module")
def nn_export(tmp_path_factory: pytest.TempPathFactory, require_data: None):  # noqa: ANN201
    """(app, bundle): a tiny nnU-Net trained on three cases (one epoch), exported through the CLI."""
    from lib.cli import run
    from main import UNetSegApp

    base = tmp_path_factory.mktemp("bundle_nn")
    studies = make_studies(base / "studies", [3, 4, 1], [])
    conf = {
        "models": "nnunet",
        "model_dir": str(base / "model"),
        "base_filters": "4",
        "max_filters": "16",
        "max_patch_voxels": "150000",  # a 40x56x40 patch: one window covers most of a volume
        "max_epochs": "1",
        "iterations_per_epoch": "2",
        "tracking": "none",
    }
    app = UNetSegApp(str(APP_DIR), str(studies), conf)
    app.train({"model": "nnunet", "val_split": 0.34})
    argv = ["export", "--config", "nnunet", "--results", str(base / "results"), "--model_dir", str(base / "model")]
    assert run([*argv, "--format", "bundle"]) == 0
    return app, base / "results" / "export" / "nnunet_bundle"


def test_nnunet_bundle_round_trip(nn_export, images: list[Path], tmp_path: Path) -> None:  # noqa: ANN001
    app, bundle = nn_export
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    steps = [t["_target_"] for t in cfg["preprocessing"]["transforms"]]
    assert {"CropForegroundd", "Spacingd", "NormalizeIntensityd"} <= set(steps) and "Orientationd" not in steps
    assert cfg["displayable_configs"] == {"tta": True}  # nnU-Net's /infer default
    post = [t["_target_"] for t in cfg["postprocessing"]["transforms"]]
    kept = json.loads((bundle / "configs" / "metadata.json").read_text())["unet_seg"]["postprocessing"]
    assert ("KeepLargestConnectedComponentd" in post) == bool((kept or {}).get("largest_component"))
    hard = images[1]
    # flip TTA costs 8 passes per window: it is checked on a crop of the rotated image that one window covers
    crop = tmp_path / "in" / "rotated_crop.nii.gz"
    crop.parent.mkdir()
    src = nib.load(str(hard))
    affine = src.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.array([6, 4, 4])
    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj)[6:34, 4:40, 4:32], affine), crop)
    finish(monai_bundle_run(bundle, crop.parent, tmp_path / "out"))  # the bundle's default for nnunet: TTA on
    got = tmp_path / "out" / "rotated_crop_seg.nii.gz"
    assert_agree("nnunet monai.bundle.run tta", got, our_infer(app, "nnunet", crop, tta=True), crop)
    label, _ = served_by_bundle_task(bundle, hard, tta=False)  # the request switches the bundle's displayable tta
    assert_agree("nnunet BundleInferTask no tta", label, our_infer(app, "nnunet", hard, tta=False), hard)
    os.remove(label)


@pytest.mark.parametrize(
    "scheme",
    [
        {"scheme": "zscore", "use_nonzero_mask": True},
        {"scheme": "zscore", "use_nonzero_mask": False},
        {"scheme": "ct", "clip_min": -100.0, "clip_max": 300.0, "mean": 50.0, "std": 25.0},
    ],
)
def test_plan_normalisation_as_monai_transforms(scheme: dict) -> None:
    """Each plan scheme in MONAI's terms computes what ours does (population vs sample std: 1/(2N) apart)."""
    from monai.bundle import ConfigParser

    from lib.bundle import preprocessing_config
    from lib.transforms import NormalizeFromPland

    ours = NormalizeFromPland(keys="image", schemes=[scheme])
    (cfg,) = preprocessing_config([ours])
    theirs = ConfigParser({"t": cfg}).get_parsed_content("t")
    img = torch.randn(1, 20, 24, 16, generator=torch.Generator().manual_seed(0)) * 200 + 40
    img[:, :4] = 0  # a zero border: the non-zero mask matters
    a, b = ours({"image": img.clone()})["image"], theirs({"image": img.clone()})["image"]
    assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-4, atol=1e-4)


# ---- refusals --------------------------------------------------------------------------------------


def test_export_refusals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lib.checkpoints import CheckpointMeta, save_checkpoint
    from lib.cli import run
    from lib.networks import UNet2DSpec

    base = ["export", "--config", "unet3d", "--results", str(tmp_path / "r")]
    assert run([*base, "--format", "bundle"]) == 2  # nothing trained
    assert "no trained weights" in capsys.readouterr().err
    assert run([*base, "--ckpt", str(SAMPLE_MODEL), "--format", "zip"]) == 2
    assert "unknown ['zip']" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    args = [*base, "--ckpt", str(SAMPLE_MODEL), "--format", "bundle", "--bundle_dir", str(taken)]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and (taken / "keep.txt").exists()
    assert run([*args, "--overwrite"]) == 0
    assert not (taken / "keep.txt").exists() and (taken / "configs" / "inference.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".taken")]  # no temporary folder left
    # UNet2D is our own network class: no MONAI network_def can rebuild it
    spec = UNet2DSpec.from_preset("tiny", 1, 3)
    meta = CheckpointMeta(
        model="unet2d", labels=LABELS, in_channels=1, spatial_dims=2, spec=spec.to_dict(), roi_size=[64, 64]
    )
    ckpt = tmp_path / "unet2d.pt"
    save_checkpoint(str(ckpt), spec.build().state_dict(), meta)
    r2d = ["export", "--config", "unet2d", "--results", str(tmp_path / "r2d"), "--ckpt", str(ckpt)]
    assert run([*r2d, "--format", "bundle"]) == 2
    err = capsys.readouterr().err
    assert "UNet2D" in err and "--formats torchscript,onnx" in err
    assert not (tmp_path / "r2d" / "export" / "unet2d_bundle").exists()

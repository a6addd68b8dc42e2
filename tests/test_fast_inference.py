"""The fast inference engine: the lean DynUNet, our sliding window and largest-component filter against
MONAI's, and the command line's MONAI-free predict path against the app's inferer, voxel for voxel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.transforms import KeepLargestConnectedComponent

import lib.inference as inference_module
from conftest import HIPPO, ROOT
from lib.inference import flip_combinations, flip_groups, largest_component, predict_probabilities, sliding_window
from lib.leannet import LeanDynUNet
from lib.networks import DynUNetSpec, UNet3DSpec
from lib.runtime import AmpPolicy
from lib.serverproc import SAMPLE_MODEL

SPECS = [
    DynUNetSpec(3, 1, 3, [[3, 3, 3]] * 4, [[1, 1, 1]] + [[2, 2, 2]] * 3, [8, 16, 32, 64], True, 2),
    DynUNetSpec(3, 2, 4, [[1, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [8, 16, 32], True, 1),
    DynUNetSpec(2, 1, 3, [[3, 3]] * 3, [[1, 1], [2, 2], [2, 2]], [8, 16, 32], False, 1),
    UNet3DSpec.from_preset("tiny", 1, 3),
]


def _randomised(spec: object) -> torch.nn.Module:
    """MONAI's network of ``spec`` with non-trivial norm affines (fresh ones are 1 and 0)."""
    torch.manual_seed(0)
    net = spec.build().eval()  # type: ignore[attr-defined]
    for m in net.modules():
        if isinstance(m, (torch.nn.InstanceNorm3d, torch.nn.InstanceNorm2d)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


@pytest.mark.parametrize("spec", SPECS, ids=["nnunet3d", "anisotropic", "nnunet2d", "unet3d"])
def test_lean_network_equals_monai_dynunet(spec: object) -> None:
    net = _randomised(spec)
    lean = LeanDynUNet.from_spec(spec.to_dict(), net.state_dict())  # type: ignore[attr-defined]
    dims = spec.to_dict().get("spatial_dims", 3)  # type: ignore[attr-defined]
    x = torch.randn(2, spec.in_channels, *([16, 32, 24] if dims == 3 else [32, 24]))  # type: ignore[attr-defined]
    with torch.no_grad():
        ref, out = net(x), lean(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    # bf16: the same weights once cast, close to fp32 (what the engine runs on a CPU with bf16)
    with torch.no_grad():
        low = lean.in_dtype(torch.bfloat16)(x).float()
    assert lean.in_dtype(torch.bfloat16) is lean.in_dtype(torch.bfloat16)  # cast once, kept
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()
    assert lean.head.dtype == torch.float32  # the fp32 original is untouched


def test_lean_network_refuses_other_layouts() -> None:
    net = SPECS[0].build()
    state = {k: v for k, v in net.state_dict().items() if "bottleneck" not in k}
    with pytest.raises(KeyError, match="bottleneck"):
        LeanDynUNet.from_spec(SPECS[0].to_dict(), state)
    assert not LeanDynUNet.supports({"depth": 4, "base_filters": 64})  # UNet2D keeps its own network


@pytest.mark.parametrize(
    "shape,roi,overlap,blend,batch",
    [
        ((1, 2, 30, 40, 20), (16, 16, 16), 0.5, "gaussian", 1),  # many windows, one axis padded
        ((2, 2, 16, 16, 16), (16, 16, 16), 0.5, "gaussian", 1),  # exactly one window, batch of two
        ((1, 2, 10, 33, 17), (16, 16, 16), 0.25, "constant", 3),  # windows in groups of three
        ((1, 2, 41, 57, 39), (40, 56, 40), 0.5, "gaussian", 2),
        ((1, 1, 50, 70), (32, 32), 0.5, "gaussian", 4),  # 2D
    ],
)
def test_sliding_window_equals_monai(shape: tuple, roi: tuple, overlap: float, blend: str, batch: int) -> None:
    torch.manual_seed(1)
    conv = (torch.nn.Conv3d if len(roi) == 3 else torch.nn.Conv2d)(shape[1], 3, 3, padding=1)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = sliding_window_inference(x, roi, batch, conv, overlap=overlap, mode=blend, sigma_scale=0.125)
        out = sliding_window(conv, x, roi, overlap, blend, 0.125, batch)
    assert out.shape == ref.shape
    assert torch.allclose(out, torch.as_tensor(ref), atol=1e-6)


@pytest.mark.parametrize("shape,roi", [((1, 1, 30, 40, 20), (16, 16, 16)), ((1, 2, 50, 70), (32, 32))])
def test_batched_flips_equal_monai_flip_by_flip(shape: tuple, roi: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """TTA with the flips stacked into one batch is MONAI's window-by-window TTA, flip by flip, at any grouping."""
    torch.manual_seed(2)
    conv = (torch.nn.Conv3d if len(roi) == 3 else torch.nn.Conv2d)(shape[1], 3, 3, padding=1)
    x = torch.randn(*shape)
    flips = flip_combinations(len(roi))
    with torch.no_grad():
        ref = sum(
            torch.flip(torch.softmax(sliding_window_inference(torch.flip(x, f), roi, 1, conv, 0.5, "gaussian"), 1), f)
            for f in flips
        ) / len(flips)
        batched = predict_probabilities(conv, x, roi, tta=True)
        monkeypatch.setattr(inference_module, "FLIP_BATCH_VOXELS", 2 * int(np.prod(roi)))  # pairs of flips
        pairs = predict_probabilities(conv, x, roi, tta=True)
        monkeypatch.setattr(inference_module, "FLIP_BATCH_VOXELS", 0)  # one flip at a time
        single = predict_probabilities(conv, x, roi, tta=True)
    for out in (batched, pairs, single):
        assert torch.allclose(out, torch.as_tensor(ref), atol=1e-5)


def test_flip_groups_fit_the_budgets() -> None:
    assert flip_groups(8, 40 * 56 * 40, 4 * 35 * 50 * 35) == 8  # a hippocampus window: all flips in one batch
    assert flip_groups(8, 40 * 56 * 40, 4 * 35 * 50 * 35, sw_batch_size=4) == 2
    assert flip_groups(8, 128**3, 8 * 240 * 240 * 155) == 1  # a BraTS window: one flip at a time
    assert flip_groups(4, 256 * 256, 3 * 512 * 512) == 4  # 2D
    assert flip_groups(8, 64**3, 300_000_000) == 1  # eight copies of a huge volume would not fit the memory budget
    assert flip_groups(1, 16, 16) == 1


def test_largest_component_equals_monai() -> None:
    lab = torch.zeros(20, 20, 20, dtype=torch.uint8)
    lab[2:5, 2:5, 2:5] = 1
    lab[10:15, 10:15, 10:15] = 1
    lab[7, 7, 7] = 1  # a lone voxel: removed
    lab[6, 6, 6] = 2
    lab[0:2, 18:20, 0:3] = 2
    lab[15, 15, 15] = 1  # touches the big block by a corner only: kept (full connectivity)
    keep = KeepLargestConnectedComponent(applied_labels=[1, 2], is_onehot=False, independent=True)
    for label in (lab, (torch.rand(24, 24, 24, generator=torch.Generator().manual_seed(0)) * 3).to(torch.uint8)):
        ref = torch.as_tensor(keep(label.clone()[None]))[0].to(torch.uint8)
        out = largest_component(label.clone(), [1, 2])
        assert torch.equal(out, ref)
    out = largest_component(lab.clone(), [1, 2])
    assert out[7, 7, 7] == 0 and out[15, 15, 15] == 1 and out[6, 6, 6] == 0
    assert int((out != lab).sum()) == 27 + 1 + 1  # the smaller block of 1, the lone 1, the lone 2


def test_engine_casts_a_lean_network_once_for_bf16() -> None:
    net = _randomised(SPECS[3])
    lean = LeanDynUNet.from_spec(SPECS[3].to_dict(), net.state_dict())
    x = torch.randn(1, 1, 20, 24, 20)
    policy = AmpPolicy("cpu", torch.bfloat16, False)
    fast = predict_probabilities(lean, x, (16, 16, 16), tta=True, amp=policy)
    ref = predict_probabilities(net, x, (16, 16, 16), tta=True, amp=None)
    assert torch.bfloat16 in lean.__dict__["_copies"]
    assert (fast - ref).abs().max() < 0.05
    assert torch.allclose(fast.sum(1), torch.ones(1), atol=1e-4)


# ---- the command line's fast path against the app's inferer ----------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args], capture_output=True, text=True, timeout=900, cwd=str(ROOT)
    )


def _reoriented(src: Path, dst: Path) -> None:
    """The same volume stored LPS-ish: axes 0 and 1 swapped and axis 2 flipped, the affine following."""
    img = nib.load(src)
    data = np.asanyarray(img.dataobj)
    ornt = np.array([[1, 1], [0, 1], [2, -1]])
    out = nib.orientations.apply_orientation(data, ornt)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    nib.save(nib.Nifti1Image(out, affine), dst)


def _resampled_header(src: Path, dst: Path) -> None:
    """The same voxels with 1.5 mm spacing: the nnunet plan's 1 mm needs resampling, so the app path serves it."""
    img = nib.load(src)
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), np.diag([1.5, 1.5, 1.5, 1.0])), dst)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sample images as a test list, with a reoriented one, a zero-padded one and one of another spacing."""
    root = tmp_path_factory.mktemp("fastdata")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    train = ["001", "003", "004"]
    for i in train:
        shutil.copy(HIPPO / "imagesTr" / f"hippocampus_{i}.nii.gz", root / "imagesTr")
        shutil.copy(HIPPO / "labelsTr" / f"hippocampus_{i}.nii.gz", root / "labelsTr")
    test = ["hippocampus_006.nii.gz", "hippocampus_008.nii.gz"]
    for name in test:
        shutil.copy(HIPPO / "imagesTr" / name, root / "imagesTs")
    _reoriented(HIPPO / "imagesTr" / "hippocampus_011.nii.gz", root / "imagesTs" / "reoriented.nii.gz")
    img = nib.load(HIPPO / "imagesTr" / "hippocampus_014.nii.gz")
    padded = np.pad(np.asanyarray(img.dataobj), ((3, 5), (0, 4), (2, 0)))  # a zero border: nnunet crops it
    nib.save(nib.Nifti1Image(padded, img.affine), root / "imagesTs" / "padded.nii")
    _resampled_header(HIPPO / "imagesTr" / "hippocampus_015.nii.gz", root / "imagesTs" / "spacing15.nii.gz")
    test += ["reoriented.nii.gz", "padded.nii", "spacing15.nii.gz"]
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
                "training": [
                    {"image": f"./imagesTr/hippocampus_{i}.nii.gz", "label": f"./labelsTr/hippocampus_{i}.nii.gz"}
                    for i in train
                ],
                "test": [f"./imagesTs/{n}" for n in test],
            }
        )
    )
    return root


def _same_predictions(fast: Path, app: Path) -> list[str]:
    names = sorted(p.name for p in (app / "predictions").glob("*.nii*"))
    assert names == sorted(p.name for p in (fast / "predictions").glob("*.nii*")) and len(names) == 5
    for name in names:
        a, b = nib.load(fast / "predictions" / name), nib.load(app / "predictions" / name)
        assert a.shape == b.shape, name
        assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj)), name
        assert np.allclose(a.affine, b.affine, atol=1e-6), name
        assert a.get_data_dtype() == b.get_data_dtype() == np.uint8
    assert not list((fast / "predictions").glob("*.part*"))
    return names


def test_cli_fast_path_equals_the_app_unet3d(data: Path, tmp_path: Path) -> None:
    """The sample unet3d model: RAS reorientation there and back; the fast path never imports MONAI."""
    out = {}
    for engine in ("auto", "app"):
        results = tmp_path / engine
        cmd = ["predict", "--config", "unet3d", "--data", str(data), "--results", str(results)]
        r = _cli(*cmd, "--ckpt", str(SAMPLE_MODEL), "--tta", "--engine", engine)
        assert r.returncode == 0, r.stderr[-3000:]
        out[engine] = r.stdout + r.stderr
    names = _same_predictions(tmp_path / "auto", tmp_path / "app")
    assert "reoriented.nii.gz" in names and (tmp_path / "auto" / "plots").exists()
    label = np.asanyarray(nib.load(tmp_path / "auto" / "predictions" / "reoriented.nii.gz").dataobj)
    assert set(np.unique(label)) == {0, 1, 2}
    probe = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'apps' / 'unet_seg')!r}); from lib.cli import run; "
        "code = run(sys.argv[1:]); "
        "print('MONAI_IMPORTED', any(m == 'monai' or m.startswith('monai.') for m in sys.modules), code)"
    )
    cmd = [sys.executable, "-c", probe, "predict", "--config", "unet3d", "--data", str(data)]
    r = subprocess.run(
        [*cmd, "--results", str(tmp_path / "probe"), "--ckpt", str(SAMPLE_MODEL)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(ROOT),
    )
    # the spacing-1.5 volume is fine for unet3d (no resampling), so every case is on the fast path
    assert "MONAI_IMPORTED False 0" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


def test_cli_fast_path_equals_the_app_nnunet(data: Path, tmp_path: Path) -> None:
    """A tiny nnunet model: crop to non-zero and back; a volume needing resampling goes through the app."""
    results = tmp_path / "train"
    r = _cli(
        "train",
        "--config",
        "nnunet",
        "--data",
        str(data),
        "--results",
        str(results),
        "--epochs",
        "1",
        "--iterations_per_epoch",
        "2",
        "--val_split",
        "0.34",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for engine in ("auto", "app"):
        out = tmp_path / engine
        shutil.copytree(results / "model", out / "model")
        r = _cli("predict", "--config", "nnunet", "--data", str(data), "--results", str(out), "--engine", engine)
        assert r.returncode == 0, r.stderr[-3000:]
        if engine == "auto":
            assert "spacing15" in r.stderr and "through the app's inferer" in r.stderr, r.stderr[-3000:]
    _same_predictions(tmp_path / "auto", tmp_path / "app")


def test_predict_files_overlaps_io_and_keeps_order(tmp_path: Path) -> None:
    """The pipelined file loop writes what predict_file writes, in job order, and hands back files it cannot take."""
    from lib.conf import parse_labels
    from lib.fastpredict import Unsupported, load_fast_model, predict_file, predict_files
    from lib.recipes import RECIPES

    model = load_fast_model("unet3d", str(SAMPLE_MODEL), parse_labels(RECIPES["unet3d"].labels), torch.device("cpu"))
    images = [str(HIPPO / "imagesTr" / f"hippocampus_{i}.nii.gz") for i in ("001", "003")]
    (tmp_path / "notes.txt").write_text("not an image")
    jobs = [
        (images[0], str(tmp_path / "a.nii.gz")),
        (str(tmp_path / "notes.txt"), str(tmp_path / "b.nii.gz")),
        (images[1], str(tmp_path / "c.nii.gz")),
    ]
    request = {"tta": True, "amp": False}
    out = list(predict_files(model, jobs, request))
    assert [i for i, _ in out] == [0, 1, 2]
    assert out[0][1] == jobs[0][1] and out[2][1] == jobs[2][1]
    assert isinstance(out[1][1], Unsupported) and "NIfTI" in str(out[1][1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "c.nii.gz", "notes.txt"]  # no .part left
    for image, (_, path) in zip(images, (jobs[0], jobs[2]), strict=True):
        ref = predict_file(model, image, str(tmp_path / "ref.nii.gz"), request)
        assert np.array_equal(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(ref).dataobj))

"""Unit tests of the shared library: conf parsing, stable split, inference engine, AMP policy, loading checks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from conftest import hippo_case
from lib.conf import AppConf, ConfError, parse_bool, parse_labels, parse_modalities, parse_names, parse_size
from lib.inference import flip_combinations, predict_probabilities
from lib.metrics import dice_per_class
from lib.networks import UNet3DSpec, build_unet3d
from lib.runtime import cpu_has_native_bf16, resolve_amp
from lib.trainers.splits import stable_split
from lib.transforms import InputError, load_chain, zscore_nonzero


def test_conf_parsing() -> None:
    assert parse_labels("anterior, posterior") == {"anterior": 1, "posterior": 2}
    assert parse_labels('{"background": 0, "liver": 6, "spleen": 1}') == {"spleen": 1, "liver": 2}
    assert parse_size("96", 3) == (96, 96, 96) and parse_size("40,56,40", 3) == (40, 56, 40)
    assert parse_bool("On") is True and parse_bool("0") is False
    with pytest.raises(ConfError, match="expected 1 or 3 sizes"):
        parse_size("1,2", 3)
    with pytest.raises(ConfError, match="valid names are: unet3d"):
        parse_names("unet3d,bogus", ["unet3d"])
    assert parse_names("all", ["unet3d", "nnunet"]) == ["unet3d", "nnunet"]
    assert parse_modalities("4") == ["channel0", "channel1", "channel2", "channel3"]
    assert parse_modalities("flair, t1") == ["flair", "t1"]
    c = AppConf({"roi_size": "64", "unet3d.roi_size": "32,32,16"})
    assert c.size("roi_size", "128", 3, model="unet3d") == (32, 32, 16)
    assert c.size("roi_size", "128", 3, model="other") == (64, 64, 64)


def test_stable_split_keeps_validation_and_sends_new_cases_to_training(tmp_path: Path) -> None:
    path = str(tmp_path / "split.json")
    data = [{"image": f"/s/case{i}.nii.gz", "label": f"/s/l/case{i}.nii.gz"} for i in range(10)]
    train1, val1 = stable_split(data, path, 0.2, seed=1)
    assert len(val1) == 2 and len(train1) == 8
    more = data + [{"image": f"/s/new{i}.nii.gz", "label": "x"} for i in range(5)]
    train2, val2 = stable_split(more, path, 0.2, seed=99)  # another seed must not reshuffle
    assert [d["image"] for d in val2] == [d["image"] for d in val1]
    assert {f"/s/new{i}.nii.gz" for i in range(5)} <= {d["image"] for d in train2}
    train3, val3 = stable_split(more, path, 0.2, seed=99, resplit=True)
    assert len(val3) == 3
    assert json.loads(Path(path).read_text())["validation"] == sorted(d["image"].rsplit("/", 1)[1] for d in val3)
    one_case = stable_split(data[:1], str(tmp_path / "s1.json"), 0.2)
    assert len(one_case[0]) == 1 and one_case[1] == []


def test_flip_tta_is_average_over_all_flips() -> None:
    assert len(flip_combinations(3)) == 8 and len(flip_combinations(2)) == 4
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)  # not flip-equivariant: TTA must differ from a single pass
    x = torch.randn(1, 1, 12, 10, 8)
    plain = predict_probabilities(net, x, (12, 10, 8), tta=False)
    tta = predict_probabilities(net, x, (12, 10, 8), tta=True)
    manual = torch.zeros_like(plain)
    for axes in flip_combinations(3):
        xf = torch.flip(x, axes) if axes else x
        p = torch.softmax(net(xf), 1)
        manual += torch.flip(p, axes) if axes else p
    manual /= 8
    assert torch.allclose(tta, manual, atol=1e-5)
    assert not torch.allclose(tta, plain, atol=1e-3)
    assert torch.allclose(tta.sum(1), torch.ones(1, 12, 10, 8), atol=1e-5)


def test_sliding_window_gaussian_covers_large_input() -> None:
    net = build_unet3d(UNet3DSpec.from_preset("tiny", 1, 3))
    x = torch.randn(1, 1, 37, 29, 21)  # larger than the window in two axes, smaller in one
    for blend in ("gaussian", "constant"):
        p = predict_probabilities(net, x, (16, 16, 16), overlap=0.5, blend=blend)
        assert p.shape == (1, 3, 37, 29, 21)
        assert torch.allclose(p.sum(1), torch.ones(1, 37, 29, 21), atol=1e-4)
    with pytest.raises(ValueError, match="blend"):
        predict_probabilities(net, x, (16, 16, 16), blend="bogus")


def test_amp_policy_on_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_amp("false", cpu).dtype is None
    auto = resolve_amp("true", cpu)
    assert auto.dtype == (torch.bfloat16 if cpu_has_native_bf16() else None)  # never a silent slow bf16
    assert resolve_amp("bf16", cpu).dtype == torch.bfloat16  # explicit request is honoured
    with pytest.raises(ConfError, match="only available on CUDA"):
        resolve_amp("fp16", cpu)
    with pytest.raises(ConfError, match="amp"):
        resolve_amp("maybe", cpu)


def test_unet3d_spec_filters() -> None:
    full = UNet3DSpec.from_preset("full", 4, 4)
    assert full.filters == [32, 64, 128, 256, 320] and full.divisor == 16
    net = build_unet3d(full)
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in net.modules())
    assert any(isinstance(m, torch.nn.ConvTranspose3d) for m in net.modules())
    assert not any(isinstance(m, torch.nn.MaxPool3d) for m in net.modules())  # strided conv down-sampling
    with pytest.raises(ValueError, match="valid"):
        UNet3DSpec.from_preset("huge", 1, 3)


def input_error(fn, *args) -> str:
    """Run fn and return the message of the InputError it raised (MONAI's Compose wraps it)."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - we inspect the chain below
        err: BaseException | None = e
        while err is not None and not isinstance(err, InputError):
            err = err.__cause__
        assert err is not None, f"expected an InputError, got {e!r}"
        return str(err)
    raise AssertionError("no error raised")


def _four_modalities(tmp_path: Path) -> tuple[list[str], str, np.ndarray]:
    img = nib.load(hippo_case(3)[0])
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    files = []
    for i in range(4):
        f = tmp_path / f"mod{i}.nii.gz"
        nib.save(nib.Nifti1Image(arr * (i + 1), img.affine), f)
        files.append(str(f))
    four_d = tmp_path / "all.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([arr * (i + 1) for i in range(4)], -1), img.affine), four_d)
    return files, str(four_d), arr


def test_multimodal_loading_from_separate_files_and_4d(tmp_path: Path) -> None:
    files, four_d, arr = _four_modalities(tmp_path)
    chain = Compose([*load_chain(["image"], 4, 3, None, "RAS"), *zscore_nonzero("image")])
    a = chain({"image": files})["image"]
    b = chain({"image": four_d})["image"]
    assert a.shape == b.shape == (4, *arr.shape)
    assert torch.allclose(a, b, atol=1e-5)
    nz = arr != 0
    for c in range(4):  # per-channel z-score over non-zero voxels
        assert abs(float(a[c][torch.as_tensor(nz)].mean())) < 1e-3
        assert abs(float(a[c][torch.as_tensor(nz)].std()) - 1) < 1e-2
    msg = input_error(Compose(load_chain(["image"], 2, 3, None)), {"image": four_d})
    assert "expects 2 channel" in msg and "got 4" in msg and "all.nii.gz" in msg


def test_label_checks_name_the_problem(tmp_path: Path) -> None:
    img_path, lab_path = hippo_case(3)
    chain = Compose(load_chain(["image", "label"], 1, 3, [1, 2]))
    out = chain({"image": str(img_path), "label": str(lab_path)})
    assert set(np.unique(out["label"].numpy()).tolist()) == {0, 1, 2}
    img = nib.load(img_path)
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.full(img.shape, 7, np.uint8), img.affine), bad)
    assert "values [7]" in input_error(chain, {"image": str(img_path), "label": str(bad)})
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(img_path.read_bytes()[:500])
    msg = input_error(chain, {"image": str(trunc), "label": str(lab_path)})
    assert "cannot be read" in msg and "trunc.nii.gz" in msg


def test_dice_per_class_conventions() -> None:
    ref = np.array([0, 1, 1, 2, 0])
    pred = np.array([0, 1, 0, 2, 2])
    d = dice_per_class(pred, ref, {"a": 1, "b": 2, "c": 3})
    assert d["a"] == pytest.approx(2 / 3) and d["b"] == pytest.approx(2 / 3)
    assert np.isnan(d["c"])  # absent in both: undefined, left out of means


@pytest.mark.parametrize("family", ["unet3d", "unet2d", "dynunet"])
def test_mc_dropout_reuses_weights_and_samples_only_when_asked(family: str) -> None:
    """Dropout layers hold no weights: a dropout-0 checkpoint loads strictly into a dropout net
    (test-time MC dropout)."""
    from dataclasses import replace

    from lib.networks import DynUNetSpec, UNet2DSpec, build_dynunet, build_unet2d

    torch.manual_seed(0)
    if family == "unet3d":
        spec, build, x, roi = (
            UNet3DSpec.from_preset("tiny", 1, 3),
            build_unet3d,
            torch.randn(1, 1, 16, 16, 16),
            (16, 16, 16),
        )
    elif family == "unet2d":
        spec, build, x, roi = UNet2DSpec.from_preset("tiny", 1, 2), build_unet2d, torch.randn(1, 1, 32, 32), (32, 32)
    else:
        spec = DynUNetSpec(
            spatial_dims=3,
            in_channels=1,
            out_channels=3,
            kernels=[[3, 3, 3]] * 3,
            strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
            filters=[4, 8, 16],
            deep_supervision=False,
        )
        build, x, roi = build_dynunet, torch.randn(1, 1, 16, 16, 16), (16, 16, 16)
    plain = build(spec).eval()
    dropped = build(replace(spec, dropout=0.5)).eval()  # as the inferer serves it
    dropped.load_state_dict(plain.state_dict(), strict=True)
    assert any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in dropped.modules())
    reference = predict_probabilities(plain, x, roi)
    assert torch.allclose(predict_probabilities(dropped, x, roi), reference, atol=1e-6)  # eval: dropout off
    a = predict_probabilities(dropped, x, roi, mc_dropout=True)
    b = predict_probabilities(dropped, x, roi, mc_dropout=True)
    assert not torch.allclose(a, b) and not torch.allclose(a, reference)
    assert not dropped.training and not any(m.training for m in dropped.modules())  # restored afterwards


def test_mutual_information_score() -> None:
    from lib.activelearning import mutual_information_score

    agree = torch.tensor([[0.2, 0.2], [0.8, 0.8]])  # (K=2, voxels=2): every sample said the same
    entropy = -(agree * agree.log()).sum(0)
    assert mutual_information_score(agree, entropy) == pytest.approx(0.0, abs=1e-6)
    # samples split between two confident answers: mean 0.5/0.5, each sample's entropy ~0 -> MI = log 2 -> 1 normalised
    assert mutual_information_score(torch.tensor([[0.5], [0.5]]), torch.zeros(1)) == pytest.approx(1.0, abs=1e-4)
    assert mutual_information_score(torch.tensor([[1.0], [0.0]]), torch.zeros(1)) == 0.0  # clear background only


def test_dropout_rate_does_not_block_fine_tuning() -> None:
    from lib.networks import same_weights_layout

    a = UNet3DSpec.from_preset("small", 1, 3).to_dict()
    assert same_weights_layout(a, {**a, "dropout": 0.1})
    assert not same_weights_layout(a, {**a, "base_filters": 8})
    assert not same_weights_layout(a, None)

"""Tests of lib.planning: nnU-Net v2 fingerprint -> plan rules on real MSD hippocampus and synthetic datasets,
and the typed, versioned Plan (JSON round trip, old files, newer versions refused)."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import HIPPO
from lib.planning import (
    PLAN_VERSION,
    Plan,
    PlanningError,
    cases_from_dataset_json,
    estimate_feature_map_voxels,
    fingerprint_from_cases,
    load_json,
    load_plan,
    plan_from_fingerprint,
    pooling_topology,
    save_json,
    save_plan,
    target_spacing,
)

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def write_nifti(path: Path, data: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> str:
    nib.save(nib.Nifti1Image(np.asarray(data), np.diag([*spacing, 1.0])), str(path))
    return str(path)


def synthetic_fp(spacings: list[list[float]], shapes: list[list[int]], labels: tuple[int, ...] = (0, 1)) -> dict:
    """A fingerprint dict built directly (no files), as plan_from_fingerprint consumes it."""
    return {
        "spacings": spacings,
        "shapes_after_crop": shapes,
        "num_cases": len(spacings),
        "labels": list(labels),
        "num_channels": 1,
        "modality": ["MRI"],
        "median_relative_size_after_cropping": 1.0,
    }


def uniform_fp(spacing: list[float], shape: list[int], n: int = 50, labels: tuple[int, ...] = (0, 1)) -> dict:
    return synthetic_fp([list(spacing)] * n, [list(shape)] * n, labels)


def assert_consistent_topology(plan: Plan) -> None:
    """Structural invariants every plan must satisfy."""
    dims = plan.dims
    n = plan.num_stages
    assert len(plan.strides) == len(plan.kernel_sizes) == len(plan.filters) == n
    assert plan.strides[0] == [1] * dims
    pools = [sum(1 for s in plan.strides if s[a] == 2) for a in range(dims)]
    assert pools == plan.num_pool_per_axis
    assert plan.divisible_by == [2**p for p in pools]
    assert all(p % d == 0 for p, d in zip(plan.patch_size, plan.divisible_by, strict=True))
    # bottleneck feature map edge is never below featuremap_min_edge_length (4) on a pooled axis
    assert all(p // d >= 4 for p, d, k in zip(plan.patch_size, plan.divisible_by, pools, strict=True) if k > 0)
    cap = 320 if dims == 3 else 512
    assert plan.filters == [min(cap, 32 * 2**i) for i in range(n)]
    assert max(plan.filters) <= cap
    assert plan.kernel_sizes[-1] == [3] * dims
    assert plan.batch_size >= 2
    mem = plan.memory
    ref_bs = 2 if dims == 3 else 12
    assert mem["estimated_feature_map_voxels"] / ref_bs * 2 <= mem["reference_feature_map_voxels"]
    assert isinstance(plan, Plan) and plan.version == PLAN_VERSION
    json.dumps(plan.to_dict(), allow_nan=False)  # strict JSON


# --------------------------------------------------------------------------------------------------
# real data: MSD Task04 hippocampus
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hippo_fp(require_data: None) -> dict:
    cases, modalities = cases_from_dataset_json(HIPPO)
    assert len(cases) >= 60
    start = time.perf_counter()
    fp = fingerprint_from_cases(cases, modalities)
    fp["_seconds"] = time.perf_counter() - start
    return fp


def test_hippocampus_fingerprint(hippo_fp: dict) -> None:
    fp = hippo_fp
    n = len(load_json(HIPPO / "dataset.json")["training"])
    assert fp["num_cases"] == n == len(fp["spacings"]) == len(fp["shapes_after_crop"]) == len(fp["cases"])
    assert fp["num_channels"] == 1 and fp["modality"] == ["MRI"]
    assert fp["labels"] == [0, 1, 2]
    assert np.allclose(fp["spacings"], 1.0)
    before, after = np.array(fp["shapes_before_crop"]), np.array(fp["shapes_after_crop"])
    assert np.all(after <= before) and np.all(after >= 1)
    # the crops are 31..43 x 40..59 x 24..47 voxels (SOURCE.txt)
    assert np.all(before.min(0) >= [31, 40, 24]) and np.all(before.max(0) <= [43, 59, 47])
    stats = fp["foreground_intensity_properties_per_channel"]
    assert len(stats) == 1
    s = stats[0]
    assert s["min"] <= s["percentile_00_5"] <= s["median"] <= s["percentile_99_5"] <= s["max"]
    assert s["std"] > 0
    assert all(r["foreground_voxels"] > 0 for r in fp["cases"])
    json.dumps({k: v for k, v in fp.items() if k != "_seconds"}, allow_nan=False)
    assert fp["_seconds"] < 30


def test_hippocampus_3d_plan_matches_nnunet(hippo_fp: dict) -> None:
    plan = plan_from_fingerprint(hippo_fp, dims=3)
    assert_consistent_topology(plan)
    assert plan.target_spacing == [1.0, 1.0, 1.0]
    assert plan.patch_size == [40, 56, 40]  # nnU-Net's published 3d_fullres patch
    assert plan.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert plan.kernel_sizes == [[3, 3, 3]] * 4
    assert plan.filters == [32, 64, 128, 256]
    assert plan.num_classes == 3 and plan.labels == [0, 1, 2]
    assert plan.normalization == [{"channel": 0, "modality": "MRI", "scheme": "zscore", "use_nonzero_mask": False}]
    # the batch is limited by the 5 % rule, not by memory
    mem = plan.memory
    assert mem["batch_size_from_memory"] > mem["batch_size_cap_5_percent"] == plan.batch_size
    expected_cap = round(np.prod(plan.median_shape_3d) * hippo_fp["num_cases"] * 0.05 / np.prod(plan.patch_size))
    assert plan.batch_size == max(2, expected_cap)
    # with the 260 training cases nnU-Net planned on, the same rule gives its published batch size 9
    assert plan_from_fingerprint(dict(hippo_fp, num_cases=260), dims=3).batch_size == 9


def test_hippocampus_2d_plan_matches_nnunet(hippo_fp: dict) -> None:
    plan = plan_from_fingerprint(hippo_fp, dims=2)
    assert_consistent_topology(plan)
    assert plan.slice_axis == 0 and plan.axes == [1, 2]
    assert plan.patch_size == [56, 40]  # nnU-Net's published 2d patch
    assert plan.strides == [[1, 1], [2, 2], [2, 2], [2, 2]]
    assert plan.filters == [32, 64, 128, 256]
    assert plan.spacing == [1.0, 1.0]
    # nnU-Net's published 2d batch (366) with its 260 cases
    assert plan_from_fingerprint(dict(hippo_fp, num_cases=260), dims=2).batch_size == 366
    # slicing through the last nibabel axis (nnU-Net's physical z) swaps the in-plane order
    assert plan_from_fingerprint(hippo_fp, dims=2, slice_axis=2).patch_size == [40, 56]


# --------------------------------------------------------------------------------------------------
# synthetic fingerprints: topology rules
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[64, 64, 64], [97, 113, 71], [138, 169, 138], [300, 512, 512], [512, 512, 512]])
@pytest.mark.parametrize("dims", [3, 2])
def test_isotropic_plans_are_consistent(shape: list[int], dims: int) -> None:
    plan = plan_from_fingerprint(uniform_fp([1.0, 1.0, 1.0], shape), dims=dims)
    assert_consistent_topology(plan)
    assert all(k == [3] * dims for k in plan.kernel_sizes)  # isotropic: never a 1-kernel


def test_filters_cap_and_memory_shrink_for_large_volumes() -> None:
    fp = uniform_fp([1.0, 1.0, 1.0], [512, 512, 512])
    p3 = plan_from_fingerprint(fp, dims=3)
    assert p3.patch_size == [128, 128, 128] and p3.batch_size == 2  # nnU-Net's 8 GB result
    assert p3.filters == [32, 64, 128, 256, 320, 320]
    p2 = plan_from_fingerprint(fp, dims=2)
    assert p2.filters[-1] == 512 and p2.patch_size == [512, 512]
    small = plan_from_fingerprint(fp, dims=3, gpu_memory_gb=4)
    big = plan_from_fingerprint(fp, dims=3, gpu_memory_gb=40)
    assert np.prod(small.patch_size) < np.prod(p3.patch_size) < np.prod(big.patch_size)
    assert all(p <= 512 for p in big.patch_size)
    for p in (small, big):
        assert_consistent_topology(p)


def test_known_nnunet_topologies() -> None:
    """Spot checks against nnU-Net v2 plans of MSD datasets (median spacing/shape given directly)."""
    heart = plan_from_fingerprint(uniform_fp([1.37, 1.25, 1.25], [115, 320, 232], n=20), dims=3)
    assert heart.patch_size == [80, 192, 160] and heart.batch_size == 2
    assert heart.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    brats2d = plan_from_fingerprint(uniform_fp([1.0, 1.0, 1.0], [138, 169, 138], n=484, labels=(0, 1, 2, 3)), dims=2)
    assert brats2d.patch_size == [192, 160] and brats2d.batch_size == 105


def test_feature_map_estimate_by_hand() -> None:
    # 2 stages, patch 8x8 -> 4x4: encoder 2*(32*64 + 64*16), decoder (transp + 2 convs)*32*64, seg 3*64
    est = estimate_feature_map_voxels([8, 8], [[1, 1], [2, 2]], [32, 64], num_classes=3)
    assert est == 2 * (32 * 64 + 64 * 16) + 3 * 32 * 64 + 3 * 64


# --------------------------------------------------------------------------------------------------
# anisotropic data
# --------------------------------------------------------------------------------------------------


def anisotropic_fp() -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(0)
    z = rng.uniform(3.0, 6.5, 40).round(2)
    z[:20] = 5.0
    return synthetic_fp([[float(a), 0.8, 0.8] for a in z], [[20, 256, 256]] * 40), z


def test_anisotropic_target_spacing_and_topology() -> None:
    fp, z = anisotropic_fp()
    assert np.median(z) == 5.0
    expected = float(np.percentile(z, 10))
    assert 0.8 < expected < 5.0
    assert target_spacing(fp["spacings"], fp["shapes_after_crop"]) == pytest.approx([expected, 0.8, 0.8])
    plan = plan_from_fingerprint(fp, dims=3)
    assert_consistent_topology(plan)
    assert plan.target_spacing == pytest.approx([expected, 0.8, 0.8])
    k = plan.kernel_sizes
    assert k[0] == [1, 3, 3] and k[1] == [1, 3, 3]  # coarse axis: in-plane conv only at first
    assert all(kk[0] == 3 for kk in k[2:])  # once the in-plane axes caught up, 3 for good
    assert plan.strides[1] == [1, 2, 2]  # the coarse axis waits while the others pool
    pools = plan.num_pool_per_axis
    assert pools[0] < pools[1] == pools[2]
    p2 = plan_from_fingerprint(fp, dims=2)
    assert p2.slice_axis == 0 and p2.axes == [1, 2] and p2.spacing == [0.8, 0.8]
    assert_consistent_topology(p2)


def test_target_spacing_rules() -> None:
    # 10th percentile below the in-plane spacing -> clamp to the coarsest other axis + 1e-5
    z = [1.0] * 10 + [5.0] * 40
    sp = [[a, 1.5, 1.5] for a in z]
    assert target_spacing(sp, [[20, 256, 256]] * 50) == pytest.approx([1.5 + 1e-5, 1.5, 1.5], abs=1e-9)
    # anisotropic spacing but NOT few voxels on the coarse axis -> plain median
    sp = [[a, 0.8, 0.8] for a in [3.0, 4.0, 5.0, 5.0, 6.0]]
    assert target_spacing(sp, [[200, 256, 256]] * 5) == [5.0, 0.8, 0.8]
    # not anisotropic enough (5 <= 3 * 2) -> median
    sp = [[a, 2.0, 2.0] for a in [3.0, 4.0, 5.0, 5.0, 6.0]]
    assert target_spacing(sp, [[20, 256, 256]] * 5) == [5.0, 2.0, 2.0]
    # the coarse axis may be any axis (here the last one, as in a nibabel x,y,z array)
    sp = [[0.7, 0.7, a] for a in [2.5, 3.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]]
    out = target_spacing(sp, [[512, 512, 40]] * 10)
    assert out[:2] == [0.7, 0.7] and out[2] == pytest.approx(np.percentile([s[2] for s in sp], 10))


def test_pooling_topology_respects_spacing_ratio() -> None:
    topo = pooling_topology([3.0, 0.75, 0.75], [32, 256, 256])
    # axis 0 is 4x coarser: the others pool twice before it joins, kernel 1 until then
    assert topo["strides"][1:3] == [[1, 2, 2], [1, 2, 2]]
    assert topo["kernel_sizes"][0][0] == 1 and topo["kernel_sizes"][1][0] == 1 and topo["kernel_sizes"][2][0] == 3
    assert topo["patch_size"] == [32, 256, 256]


# --------------------------------------------------------------------------------------------------
# fingerprint from generated NIfTI files
# --------------------------------------------------------------------------------------------------


def make_case(
    folder: Path,
    name: str,
    channels: int = 1,
    four_d: bool = True,
    spacing=(2.0, 1.0, 0.5),
    shape=(20, 30, 40),
    values=(100.0, 200.0),
) -> dict:
    """Image non-zero only in [2:12, 5:25, :]; foreground (label 1/2) a box inside with known values."""
    img = np.zeros((*shape, channels), dtype=np.float32)
    img[2:12, 5:25, :, :] = 1.0
    lab = np.zeros(shape, dtype=np.uint8)
    lab[4:8, 10:20, 5:15] = 1
    lab[8:10, 10:20, 5:15] = 2
    for c in range(channels):
        img[lab > 0, c] = values[c]
    label = write_nifti(folder / f"{name}_label.nii.gz", lab, spacing)
    if four_d:
        image = write_nifti(folder / f"{name}.nii.gz", img if channels > 1 else img[..., 0], spacing)
        return {"image": image, "label": label}
    files = [write_nifti(folder / f"{name}_{c:04d}.nii.gz", img[..., c], spacing) for c in range(channels)]
    return {"image": files, "label": label}


def test_fingerprint_from_generated_volumes(tmp_path: Path) -> None:
    cases = [make_case(tmp_path, f"c{i}", channels=2) for i in range(3)]
    fp = fingerprint_from_cases(cases, modality=["CT", "MRI"], foreground_samples_per_case=500)
    assert fp["num_cases"] == 3 and fp["num_channels"] == 2 and fp["modality"] == ["CT", "MRI"]
    assert fp["spacings"] == [[2.0, 1.0, 0.5]] * 3  # from the affine, array axis order
    assert fp["shapes_before_crop"] == [[20, 30, 40]] * 3
    assert fp["shapes_after_crop"] == [[10, 20, 40]] * 3
    assert fp["cases"][0]["bbox"] == [[2, 12], [5, 25], [0, 40]]
    assert fp["cases"][0]["foreground_voxels"] == 6 * 10 * 10
    assert fp["labels"] == [0, 1, 2]
    assert fp["median_relative_size_after_cropping"] == pytest.approx(10 * 20 / (20 * 30))
    ch0, ch1 = fp["foreground_intensity_properties_per_channel"]
    assert ch0["mean"] == ch0["median"] == ch0["min"] == ch0["max"] == 100.0 and ch0["std"] == 0.0
    assert ch1["percentile_00_5"] == ch1["percentile_99_5"] == 200.0
    # a list of 3D files per channel gives the same fingerprint as a channels-last 4D file
    split = [make_case(tmp_path, f"s{i}", channels=2, four_d=False) for i in range(3)]
    fp_split = fingerprint_from_cases(split, modality=["CT", "MRI"], foreground_samples_per_case=500)
    for key in ("spacings", "shapes_after_crop", "labels", "foreground_intensity_properties_per_channel"):
        assert fp_split[key] == fp[key]
    assert save_json(fp, tmp_path / "fp.json") and load_json(tmp_path / "fp.json") == fp


def test_intensity_sampling_is_seeded(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cases = []
    for i in range(2):
        img = rng.normal(50, 10, (12, 12, 12)).astype(np.float32)
        lab = (rng.random((12, 12, 12)) > 0.5).astype(np.uint8)
        cases.append(
            {"image": write_nifti(tmp_path / f"i{i}.nii.gz", img), "label": write_nifti(tmp_path / f"l{i}.nii.gz", lab)}
        )
    a = fingerprint_from_cases(cases, foreground_samples_per_case=300, seed=3)
    b = fingerprint_from_cases(cases, foreground_samples_per_case=300, seed=3)
    c = fingerprint_from_cases(cases, foreground_samples_per_case=300, seed=4)
    assert a == b
    assert a["foreground_intensity_properties_per_channel"] != c["foreground_intensity_properties_per_channel"]
    assert a["foreground_intensity_properties_per_channel"][0]["mean"] == pytest.approx(50, abs=3)


# --------------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------------


def test_ct_and_mri_normalisation(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    cases = []
    for i in range(3):
        img = rng.normal(40, 100, (16, 16, 16)).astype(np.float32)
        lab = np.zeros((16, 16, 16), dtype=np.uint8)
        lab[4:12, 4:12, 4:12] = 1
        cases.append(
            {
                "image": write_nifti(tmp_path / f"ct{i}.nii.gz", img),
                "label": write_nifti(tmp_path / f"ctl{i}.nii.gz", lab),
            }
        )
    fp = fingerprint_from_cases(cases, modality="CT")
    props = fp["foreground_intensity_properties_per_channel"][0]
    (ct,) = plan_from_fingerprint(fp, dims=3).normalization
    assert ct["scheme"] == "ct"
    assert ct["clip_min"] == props["percentile_00_5"] and ct["clip_max"] == props["percentile_99_5"]
    assert ct["mean"] == props["mean"] and ct["std"] == props["std"]
    assert ct["clip_min"] < ct["mean"] < ct["clip_max"]
    (mri,) = plan_from_fingerprint(fp, dims=3, modality="MRI").normalization
    assert mri == {"channel": 0, "modality": "MRI", "scheme": "zscore", "use_nonzero_mask": False}
    # heavy cropping (< 75 % of the image is kept) switches z-score to the non-zero mask, as in nnU-Net
    mixed = make_case(tmp_path, "mixed", channels=2)
    fp2 = fingerprint_from_cases([mixed], modality=["ct", "T2"])
    n0, n1 = plan_from_fingerprint(fp2, dims=2).normalization
    assert n0["scheme"] == "ct" and n0["clip_min"] == n0["clip_max"] == 100.0
    assert n1 == {"channel": 1, "modality": "T2", "scheme": "zscore", "use_nonzero_mask": True}


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no cases"):
        fingerprint_from_cases([])
    one = make_case(tmp_path, "one", channels=1)
    two = make_case(tmp_path, "two", channels=2)
    with pytest.raises(ValueError, match=r"cases\[1\].*2 channel\(s\), but cases\[0\] has 1"):
        fingerprint_from_cases([one, two])
    bad_label = write_nifti(tmp_path / "wrong_shape_label.nii.gz", np.zeros((5, 5, 5), dtype=np.uint8))
    message = r"wrong_shape_label\.nii\.gz: label shape \(5, 5, 5\) does not match image shape \(20, 30, 40\)"
    with pytest.raises(ValueError, match=message):
        fingerprint_from_cases([{"image": one["image"], "label": bad_label}])
    with pytest.raises(ValueError, match="file not found: .*missing.nii.gz"):
        fingerprint_from_cases([{"image": str(tmp_path / "missing.nii.gz"), "label": one["label"]}])
    with pytest.raises(ValueError, match=r"cases\[0\]: expected a dict with 'image' and 'label'"):
        fingerprint_from_cases([{"image": one["image"]}])
    with pytest.raises(ValueError, match="modality: 3 names given"):
        fingerprint_from_cases([two], modality=["CT", "MRI", "PET"])
    empty = write_nifti(tmp_path / "empty_label.nii.gz", np.zeros((20, 30, 40), dtype=np.uint8))
    with pytest.raises(ValueError, match="no foreground voxels"):
        fingerprint_from_cases([{"image": one["image"], "label": empty}])
    frac = write_nifti(tmp_path / "frac_label.nii.gz", np.full((20, 30, 40), 0.5, dtype=np.float32))
    with pytest.raises(ValueError, match="frac_label.nii.gz: label values must be integers"):
        fingerprint_from_cases([{"image": one["image"], "label": frac}])
    other_shape = write_nifti(tmp_path / "other_shape_0001.nii.gz", np.ones((4, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="other_shape_0001.nii.gz: channel shape"):
        fingerprint_from_cases([{"image": [one["image"], other_shape], "label": one["label"]}])

    good = uniform_fp([1.0, 1.0, 1.0], [64, 64, 64])
    with pytest.raises(ValueError, match="dims: must be 2 or 3"):
        plan_from_fingerprint(good, dims=4)
    with pytest.raises(ValueError, match="gpu_memory_gb: must be > 0"):
        plan_from_fingerprint(good, gpu_memory_gb=0)
    with pytest.raises(ValueError, match="missing field 'shapes_after_crop'"):
        plan_from_fingerprint({"spacings": [[1, 1, 1]]})
    with pytest.raises(ValueError, match="'shapes_after_crop'.*must match 'spacings'"):
        plan_from_fingerprint({"spacings": [[1, 1, 1]] * 2, "shapes_after_crop": [[9, 9, 9]]})
    with pytest.raises(ValueError, match="'spacings' must be a non-empty list of 3-vectors"):
        plan_from_fingerprint({"spacings": [], "shapes_after_crop": []})
    with pytest.raises(ValueError, match="CT channel 0 needs 'foreground_intensity_properties_per_channel'"):
        plan_from_fingerprint(good, modality="CT")
    with pytest.raises(ValueError, match="slice_axis: must be 0, 1 or 2"):
        plan_from_fingerprint(good, dims=2, slice_axis=3)
    with pytest.raises(ValueError, match="gpu_memory_gb: budget too small"):
        plan_from_fingerprint(good, gpu_memory_gb=1e-9)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_json(broken)
    assert issubclass(PlanningError, ValueError)


# --------------------------------------------------------------------------------------------------
# JSON in / out
# --------------------------------------------------------------------------------------------------


def test_save_json_is_atomic_and_plain(tmp_path: Path) -> None:
    target = tmp_path / "model" / "plan.json"
    plan = plan_from_fingerprint(uniform_fp([1.0, 1.0, 1.0], [64, 64, 64]), dims=3)
    save_plan(plan, target)
    assert load_plan(target) == plan and load_json(target) == plan.to_dict()
    save_json({"a": np.int64(3), "b": np.float32(0.5), "c": np.arange(3), "d": (1, 2)}, target)  # overwrite
    assert load_json(target) == {"a": 3, "b": 0.5, "c": [0, 1, 2], "d": [1, 2]}
    assert sorted(p.name for p in target.parent.iterdir()) == ["plan.json"]  # no temp files left
    with pytest.raises(ValueError):
        save_json({"x": float("nan")}, target)  # strict JSON, and the old file survives
    assert load_json(target)["a"] == 3
    assert sorted(p.name for p in target.parent.iterdir()) == ["plan.json"]


# --------------------------------------------------------------------------------------------------
# the typed, versioned plan
# --------------------------------------------------------------------------------------------------


def test_plan_round_trip_pickles_and_trims_the_summary() -> None:
    plan = plan_from_fingerprint(uniform_fp([1.0, 1.0, 1.0], [64, 64, 64]), dims=2)
    data = plan.to_dict()
    assert next(iter(data)) == "version" and data["version"] == PLAN_VERSION
    assert Plan.from_dict(data) == plan
    assert pickle.loads(pickle.dumps(plan)) == plan  # requests carrying it are pickled to training processes
    trimmed = plan.to_dict(fingerprint_summary=False)  # what checkpoints store
    assert "fingerprint_summary" not in trimmed and "fingerprint_summary" in data
    again = Plan.from_dict(trimmed)
    assert again.fingerprint_summary is None and again.to_dict() == trimmed
    assert (again.dims, again.slice_axis, again.patch_size) == (2, plan.slice_axis, plan.patch_size)


def test_plan_saved_before_the_version_field_still_loads(tmp_path: Path) -> None:
    plan = plan_from_fingerprint(uniform_fp([1.0, 1.0, 1.0], [64, 64, 64]), dims=3)
    old = {k: v for k, v in plan.to_dict().items() if k != "version"}  # today's files on disk
    (tmp_path / "old_plan.json").write_text(json.dumps(old))
    loaded = load_plan(tmp_path / "old_plan.json")
    assert loaded == plan and loaded.version == PLAN_VERSION
    assert Plan.from_dict(dict(old, some_future_note="x")) == plan  # unknown keys are ignored


def test_plan_refuses_newer_versions_and_missing_keys(tmp_path: Path) -> None:
    data = plan_from_fingerprint(uniform_fp([1.0, 1.0, 1.0], [64, 64, 64]), dims=3).to_dict()
    with pytest.raises(ValueError, match=f"version {PLAN_VERSION + 1} is newer than this code understands"):
        Plan.from_dict(dict(data, version=PLAN_VERSION + 1))
    with pytest.raises(ValueError, match="'version' must be a positive integer"):
        Plan.from_dict(dict(data, version="1"))
    with pytest.raises(ValueError, match="missing required key.*patch_size.*normalization"):
        Plan.from_dict({k: v for k, v in data.items() if k not in ("patch_size", "normalization")})
    with pytest.raises(ValueError, match="expected a JSON object"):
        Plan.from_dict([1, 2])
    with pytest.raises(ValueError, match="one of each per stage"):
        Plan.from_dict(dict(data, filters=data["filters"][:-1]))
    with pytest.raises(ValueError, match="2D plan needs slice_axis"):
        Plan.from_dict(dict(data, dims=2, patch_size=data["patch_size"][:2], slice_axis=None))
    (tmp_path / "new_plan.json").write_text(json.dumps(dict(data, version=PLAN_VERSION + 1)))
    with pytest.raises(PlanningError, match=r"new_plan\.json: plan: version"):
        load_plan(tmp_path / "new_plan.json")

"""The Slicer module's scene code on Slicer's REAL MRML classes (slicer-core in .venv-slicer, set up by
scripts/test.sh).

Label map -> segmentation -> label map through a colour table built from the server's label
names: non-contiguous FreeSurfer codes (voxelmorph scan) survive import AND export with the
geometry intact; a deleted segment is gone from the export; unknown segment names and unnamed
values are refused in words. Then the Slicer path against a real server: infer -> import into
a scene -> export -> submit with label_info -> the stored label equals what was exported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import DATA, ROOT, running_server

SAMPLE_STUDIES = ROOT / "sample" / "studies"
SLICER_PY = ROOT / ".venv-slicer" / "bin" / "python"
ROUNDTRIP = ROOT / "slicer_module" / "UNetSeg" / "Testing" / "Python" / "scene_roundtrip.py"
sys.path.insert(0, str(ROOT / "slicer_module" / "UNetSeg"))


@pytest.fixture(scope="module")
def slicer_python() -> Path:
    if not SLICER_PY.exists():
        pytest.fail(f"{SLICER_PY} is missing: run `bash scripts/setup_slicer.sh` (scripts/test.sh does it)")
    return SLICER_PY


def roundtrip(
    py: Path, volume: Path, label: Path, names: dict[str, int], outdir: Path, delete: str | None = None
) -> dict:
    cmd = [
        str(py),
        str(ROUNDTRIP),
        "--volume",
        str(volume),
        "--label",
        str(label),
        "--names",
        json.dumps(names),
        "--outdir",
        str(outdir),
    ] + (["--delete", delete] if delete else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Array and affine in RAS+ index order, so files that store the same voxels in another axis order compare equal."""
    img = nib.as_closest_canonical(nib.load(path))
    return np.asanyarray(img.dataobj), img.affine


def test_noncontiguous_labels_survive_import_and_export(tmp_path: Path, slicer_python: Path) -> None:
    from UNetSegLib import label_info

    npz = np.load(DATA / "multilabel" / "voxelmorph_test_scan" / "test_scan.npz")
    seg = npz["seg"].astype(np.int16)
    codes = sorted(int(c) for c in np.unique(seg) if c != 0)
    assert codes != list(range(1, len(codes) + 1)) and max(codes) > 200  # FreeSurfer codes: 2, 3, 4, 41, ... 255
    # left-handed (LAS-like), permuted, anisotropic
    affine = np.array([[-1.0, 0, 0, 79.5], [0, 0, 1.2, -110.0], [0, -0.9, 0, 95.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(npz["vol"].astype(np.float32), affine), tmp_path / "t1.nii.gz")
    nib.save(nib.Nifti1Image(seg, affine), tmp_path / "aseg.nii.gz")
    seg, affine = load(tmp_path / "aseg.nii.gz")  # compared in world (RAS+) order: Slicer may write another index order
    names = {f"structure_{c}": c for c in codes}

    report = roundtrip(
        slicer_python, tmp_path / "t1.nii.gz", tmp_path / "aseg.nii.gz", names, tmp_path / "out", delete="structure_41"
    )

    assert report["segments"] == names  # one segment per code, named by the server's names, carrying the code
    assert {e["name"]: e["idx"] for e in label_info(names)} == report["segments"]  # what a submission would send
    exported, exported_affine = load(tmp_path / "out" / "exported.nii.gz")
    assert exported.shape == seg.shape and np.array_equal(exported, seg)
    assert np.allclose(exported_affine, affine, atol=1e-4)
    positional, _ = load(tmp_path / "out" / "positional.nii.gz")  # Slicer without our colour table renumbers 1..N
    assert sorted(int(v) for v in np.unique(positional) if v) == list(range(1, len(codes) + 1))
    edited, _ = load(tmp_path / "out" / "edited.nii.gz")
    expected = seg.copy()
    expected[expected == 41] = 0
    assert np.array_equal(edited, expected) and "structure_41" not in report["segments_after_delete"]
    assert "['not_a_label'] are not labels of this model" in report["unknown_segment_error"]
    assert (
        f"label values [{codes[0]}]" in report["unnamed_value_error"]
        and "have no name" in report["unnamed_value_error"]
    )
    print(f"voxelmorph {len(codes)} labels: import {report['import_s']} s, export {report['export_s']} s")


def test_server_segmentation_through_a_slicer_scene_and_back(tmp_path: Path, slicer_python: Path) -> None:
    """What the module does in Slicer: infer, import into a segmentation, export, submit with label_info."""
    import shutil

    from UNetSegLib import UNetSegClient, label_info

    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(SAMPLE_STUDIES / "hippocampus_015.nii.gz", studies / "case.nii.gz")
    conf = {
        "models": "unet3d",
        "preset": "small",
        "roi_size": "40,56,40",
        "tracking": "none",
        "auto_retrain_after": "0",
        "model_dir": str(tmp_path / "model"),
        "unet3d.pretrained": str(ROOT / "sample" / "models" / "unet3d_hippocampus_small.pt"),
    }
    with running_server(studies, conf, tmp_path / "server.log") as srv:
        client = UNetSegClient(srv.url)
        label_path, meta = client.infer("unet3d", "case", str(tmp_path / "seg"), tta=True)
        names = meta["label_names"]
        served, _ = load(Path(label_path))
        assert set(np.unique(served).tolist()) == {0, *names.values()}

        report = roundtrip(slicer_python, studies / "case.nii.gz", Path(label_path), names, tmp_path / "out")
        assert report["segments"] == names
        exported, affine = load(tmp_path / "out" / "exported.nii.gz")
        assert np.array_equal(exported, served)

        reply = client.submit_label("case", str(tmp_path / "out" / "exported.nii.gz"), label_info=label_info(names))
        assert reply["image"] == "case"
        stored, stored_affine = load(studies / "labels" / "final" / "case.nii.gz")
        assert np.array_equal(stored, served) and np.allclose(
            stored_affine, nib.load(studies / "case.nii.gz").affine, atol=1e-4
        )
        info = json.loads((studies / "datastore_v2.json").read_text())["objects"]["case"]["labels"]["final"]["info"]
        assert info.get("label_info") == label_info(names)

        # a label that stores the same voxels in another index order (x flipped, y/z swapped)
        # is stored in the image's order
        raw = nib.load(studies / "labels" / "final" / "case.nii.gz")
        img = nib.load(studies / "case.nii.gz")
        flipped = nib.as_closest_canonical(raw).as_reoriented(np.array([[1, -1], [2, 1], [0, 1]]))
        nib.save(flipped, tmp_path / "flipped.nii.gz")
        assert not np.allclose(flipped.affine, img.affine)
        client.submit_label("case", str(tmp_path / "flipped.nii.gz"), label_info=label_info(names))
        again = nib.load(studies / "labels" / "final" / "case.nii.gz")
        assert np.allclose(again.affine, img.affine, atol=1e-4)
        assert np.array_equal(np.asanyarray(again.dataobj), np.asanyarray(raw.dataobj))

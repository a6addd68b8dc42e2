"""A real PACS: Orthanc (Debian packages) started by scripts/orthanc.sh on 127.0.0.1; sample volumes stored as MR
series through STOW-RS and read back through QIDO-RS / WADO-RS with exact geometry and voxels.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import ROOT, Server, free_port, running_server
from lib.dicomseries import retrieve_series, series_to_volume, store, volume_to_series
from lib.validation import InputError

SAMPLES = sorted((ROOT / "sample" / "studies").glob("*.nii.gz"))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "orthanc.sh"), "start", str(folder), str(port)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        yield f"http://127.0.0.1:{port}/dicom-web"
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "orthanc.sh"), "stop", str(folder)], timeout=60)
    assert not (folder / "orthanc.pid").exists()


@pytest.fixture(scope="module")
def loaded(pacs: str) -> list[dict]:
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "load_pacs.py"),
            "--url",
            pacs,
            "--images",
            str(ROOT / "sample" / "studies"),
            "--modality",
            "MR",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_orthanc_listens_on_loopback_only_with_its_own_storage(
    pacs: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = json.loads(next(tmp_path_factory.getbasetemp().glob("orthanc*/orthanc.json")).read_text())
    assert config["HttpBindAddress"] == "127.0.0.1" and config["RemoteAccessAllowed"] is False
    assert config["DicomServerEnabled"] is False and Path(config["StorageDirectory"]).is_dir()


def test_sample_volumes_round_trip_through_the_pacs(pacs: str, loaded: list[dict]) -> None:
    assert [d["file"] for d in loaded] == [p.name for p in SAMPLES]
    studies = requests.get(f"{pacs}/studies", params={"ModalitiesInStudy": "MR"}, timeout=30).json()
    assert len(studies) == len(SAMPLES)
    for entry, path in zip(loaded, SAMPLES, strict=True):
        img = nib.load(path)
        volume, affine = series_to_volume(retrieve_series(pacs, entry["study"], entry["series"]))
        assert volume.shape == img.shape and entry["slices"] == img.shape[2]
        assert np.abs(affine - img.affine).max() < 1e-4, (affine, img.affine)  # position, orientation, spacing
        data = np.asanyarray(img.dataobj).astype(np.float64)  # float32 MRI: stored as 16 bits with a rescale slope
        assert np.abs(volume - data).max() <= (data.max() - data.min()) / 65535 / 2 + 1e-3


def test_oblique_anisotropic_float_volume_keeps_its_geometry(pacs: str) -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(100, 30, size=(12, 9, 7)).astype(np.float32)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    rot *= np.sign(np.linalg.det(rot))
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 1.3, 2.5])
    affine[:3, 3] = [-12.5, 40.25, 7.125]
    series = volume_to_series(data, affine, modality="CT", patient_id="oblique")
    store(pacs, series)
    volume, back = series_to_volume(retrieve_series(pacs, series[0].StudyInstanceUID, series[0].SeriesInstanceUID))
    assert np.abs(back - affine).max() < 1e-4
    assert np.abs(volume - data).max() <= (data.max() - data.min()) / 65535 + 1e-3  # rescaled to 16 bits


@pytest.mark.parametrize(
    "defect, words",
    [
        ("one_slice", "1 slice(s)"),
        ("missing_slice", "unevenly spaced"),
        ("mixed_orientation", "mixes 2 slice orientations"),
        ("duplicate", "same position"),
    ],
)
def test_series_that_are_not_volumes_are_refused(defect: str, words: str) -> None:
    img = nib.load(SAMPLES[0])
    series = volume_to_series(np.asanyarray(img.dataobj), img.affine)
    if defect == "one_slice":
        series = series[:1]
    elif defect == "missing_slice":
        del series[5]
    elif defect == "mixed_orientation":
        series[3].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    else:
        series[4].ImagePositionPatient = series[5].ImagePositionPatient
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        series_to_volume(series)


def test_sheared_or_nan_volumes_cannot_become_series() -> None:
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(InputError, match="sheared"):
        volume_to_series(np.zeros((4, 4, 4)), sheared)
    with pytest.raises(InputError, match="NaN or Inf"):
        volume_to_series(np.full((4, 4, 4), np.nan), np.eye(4))


# ---- the server on the PACS ------------------------------------------------------------------------

OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost"}


@pytest.fixture(scope="module")
def pacs_server(pacs: str, loaded: list[dict], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("pacs_server")
    conf = {
        "models": "unet3d",
        "preset": "small",
        "roi_size": "40,56,40",
        "tracking": "none",
        "auto_retrain_after": "0",
        "unet3d.pretrained": str(ROOT / "sample" / "models" / "unet3d_hippocampus_small.pt"),
        "model_dir": str(base / "model"),
    }
    t = time.perf_counter()
    with running_server(pacs, conf, base / "server.log", env=OFFLINE) as srv:  # any download attempt would fail
        print(f"server on DICOMweb ready in {time.perf_counter() - t:.1f} s")
        yield srv


def pacs_url(server: Server) -> str:
    return str(server.studies)


def test_server_starts_offline_and_lists_the_mr_series(pacs_server: Server, loaded: list[dict]) -> None:
    stats = requests.get(f"{pacs_server.url}/datastore/", params={"output": "stats"}, timeout=60).json()
    served = requests.get(f"{pacs_url(pacs_server)}/series", params={"Modality": "MR,CT"}, timeout=30).json()
    mr = [s for s in served if s["00080060"]["Value"][0] == "MR"]
    assert len(mr) == len(loaded) and stats["total"] == len(served)  # MONAI Label's default filter shows CT only
    assert "dcmqi" not in pacs_server.log.read_text().lower()


def test_infer_on_a_series_equals_infer_on_its_nifti_conversion(
    pacs_server: Server, pacs: str, loaded: list[dict], tmp_path: Path
) -> None:
    entry = loaded[4]
    t = time.perf_counter()
    r = requests.post(
        f"{pacs_server.url}/infer/unet3d", params={"image": entry["series"], "output": "image"}, timeout=300
    )
    print(f"/infer on a DICOM series: {time.perf_counter() - t:.2f} s")
    assert r.status_code == 200, r.text[:500]
    (tmp_path / "series_label.nii.gz").write_bytes(r.content)
    label = nib.load(tmp_path / "series_label.nii.gz")
    volume, affine = series_to_volume(retrieve_series(pacs, entry["study"], entry["series"]))
    assert label.shape == volume.shape and np.abs(label.affine - affine).max() < 1e-4  # the series' geometry
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "converted.nii.gz")
    with open(tmp_path / "converted.nii.gz", "rb") as f:
        r2 = requests.post(
            f"{pacs_server.url}/infer/unet3d",
            params={"output": "image"},
            files={"file": ("converted.nii.gz", f)},
            timeout=300,
        )
    assert r2.status_code == 200, r2.text[:500]
    (tmp_path / "nifti_label.nii.gz").write_bytes(r2.content)
    same = np.asanyarray(nib.load(tmp_path / "nifti_label.nii.gz").dataobj)
    assert np.array_equal(np.asanyarray(label.dataobj), same) and set(np.unique(same)) <= {0, 1, 2}


def test_unknown_series_and_bad_modality_conf(pacs_server: Server) -> None:
    from lib.conf import AppConf, ConfError
    from lib.dicomweb import modalities_from_conf

    r = requests.post(f"{pacs_server.url}/infer/unet3d", params={"image": "1.2.3.4.5"}, timeout=60)
    assert r.status_code == 404 and "not found" in r.text
    assert modalities_from_conf(AppConf({})) == "MR,CT"
    with pytest.raises(ConfError, match="dicomweb_modalities"):
        modalities_from_conf(AppConf({"dicomweb_modalities": "MR,XYZ"}))


# ---- DICOM SEG ---------------------------------------------------------------------------------------


def test_label_as_dicom_seg_round_trips_through_the_pacs(pacs: str, loaded: list[dict]) -> None:
    """A label becomes a SEG (segments named and coloured, referencing the series), is stored by STOW-RS in the
    series' study, and reads back voxel-identical."""
    import pydicom

    from lib.dicomseg import label_to_seg, seg_to_label

    labels = {"anterior": 1, "posterior": 2}
    entry = loaded[0]
    source = retrieve_series(pacs, entry["study"], entry["series"])
    label = np.asanyarray(nib.load(ROOT / "sample" / "studies" / "labels" / "final" / entry["file"]).dataobj).astype(
        np.uint8
    )
    t = time.perf_counter()
    seg = label_to_seg(label, source, labels)
    store(pacs, [seg])
    t_write = time.perf_counter() - t
    found = requests.get(f"{pacs}/studies/{entry['study']}/series", params={"Modality": "SEG"}, timeout=30).json()
    assert [s["0020000E"]["Value"][0] for s in found] == [seg.SeriesInstanceUID]
    t = time.perf_counter()
    (back_ds,) = retrieve_series(pacs, entry["study"], seg.SeriesInstanceUID)
    back = seg_to_label(back_ds, source, labels)
    print(f"SEG write+STOW {t_write:.2f} s, WADO+read {time.perf_counter() - t:.2f} s")
    assert np.array_equal(back, label)
    names = {d.SegmentLabel: list(d.RecommendedDisplayCIELabValue) for d in back_ds.SegmentSequence}
    assert set(names) == {"anterior", "posterior"} and names["anterior"] != names["posterior"]
    referenced = {i.ReferencedSOPInstanceUID for i in back_ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in source}
    assert isinstance(back_ds, pydicom.Dataset) and back_ds.Modality == "SEG"


def test_bad_labels_do_not_become_segs(pacs: str, loaded: list[dict]) -> None:
    from lib.dicomseg import label_to_seg, seg_to_label

    entry = loaded[1]
    source = retrieve_series(pacs, entry["study"], entry["series"])
    shape = (int(source[0].Columns), int(source[0].Rows), len(source))
    with pytest.raises(InputError, match="does not match the series"):
        label_to_seg(np.zeros((3, 3, 3), np.uint8), source, {"a": 1})
    with pytest.raises(InputError, match=r"values \[7\]"):
        label_to_seg(np.full(shape, 7, np.uint8), source, {"a": 1})
    with pytest.raises(InputError, match="empty"):
        label_to_seg(np.zeros(shape, np.uint8), source, {"a": 1})
    seg = label_to_seg(np.ones(shape, np.uint8), source, {"liver": 1})
    with pytest.raises(InputError, match="liver"):
        seg_to_label(seg, source, {"anterior": 1})


def test_infer_output_dicom_seg_is_a_seg_highdicom_reads(
    pacs_server: Server, pacs: str, loaded: list[dict], tmp_path: Path
) -> None:
    """``/infer?output=dicom_seg`` on a series: an AUTOMATIC SEG over that series, one segment per model label,
    voxel-identical to the label of ``output=image``; refused for uploads and on a file datastore (badinputs)."""
    import io

    import highdicom as hd
    import pydicom

    from lib.dicomseg import seg_to_label

    entry = loaded[3]
    t = time.perf_counter()
    r = requests.post(
        f"{pacs_server.url}/infer/unet3d", params={"image": entry["series"], "output": "dicom_seg"}, timeout=300
    )
    print(f"/infer?output=dicom_seg: {time.perf_counter() - t:.2f} s")
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"] == "application/dicom"
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(r.content)))
    assert seg.SeriesDescription == "unet_seg prediction"
    described = [seg.get_segment_description(n) for n in seg.segment_numbers]
    assert [d.SegmentLabel for d in described] == ["anterior", "posterior"]
    assert {d.SegmentAlgorithmType for d in described} == {"AUTOMATIC"}
    source = retrieve_series(pacs, entry["study"], entry["series"])
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in source
    }
    image = requests.post(
        f"{pacs_server.url}/infer/unet3d", params={"image": entry["series"], "output": "image"}, timeout=300
    )
    (tmp_path / "label.nii.gz").write_bytes(image.content)
    label = np.asanyarray(nib.load(tmp_path / "label.nii.gz").dataobj)
    assert np.array_equal(seg_to_label(seg, source, {"anterior": 1, "posterior": 2}), label)
    with open(ROOT / "sample" / "studies" / entry["file"], "rb") as f:
        up = requests.post(
            f"{pacs_server.url}/infer/unet3d",
            params={"image": entry["series"], "output": "dicom_seg"},
            files={"file": (entry["file"], f)},
            timeout=60,
        )
    assert up.status_code == 422 and "not an upload" in up.text
    nothing = requests.post(f"{pacs_server.url}/infer/unet3d", params={"output": "dicom_seg"}, timeout=60)
    assert nothing.status_code == 422 and "SeriesInstanceUID" in nothing.text


def test_submitted_label_is_stored_in_the_pacs_as_seg(
    pacs_server: Server, pacs: str, loaded: list[dict], tmp_path: Path
) -> None:
    from lib.dicomseg import seg_to_label

    entry = loaded[2]
    r = requests.post(
        f"{pacs_server.url}/infer/unet3d", params={"image": entry["series"], "output": "image"}, timeout=300
    )
    assert r.status_code == 200, r.text[:300]
    (tmp_path / "label.nii.gz").write_bytes(r.content)  # the clinician's corrected label, in the series' geometry
    label = np.asanyarray(nib.load(tmp_path / "label.nii.gz").dataobj)
    t = time.perf_counter()
    with open(tmp_path / "label.nii.gz", "rb") as f:
        put = requests.put(
            f"{pacs_server.url}/datastore/label",
            params={"image": entry["series"], "tag": "final"},
            files={"label": ("label.nii.gz", f)},
            timeout=120,
        )
    print(f"submit as SEG: {time.perf_counter() - t:.2f} s")
    assert put.status_code == 200, put.text[:500]
    segs = requests.get(f"{pacs}/studies/{entry['study']}/series", params={"Modality": "SEG"}, timeout=30).json()
    seg_uids = [s["0020000E"]["Value"][0] for s in segs]
    assert seg_uids, "no SEG stored in the study"
    source = retrieve_series(pacs, entry["study"], entry["series"])
    (seg,) = retrieve_series(pacs, entry["study"], seg_uids[-1])
    assert np.array_equal(seg_to_label(seg, source, {"anterior": 1, "posterior": 2}), label)
    stats = requests.get(f"{pacs_server.url}/datastore/", params={"output": "stats"}, timeout=60).json()
    assert stats["completed"] >= 1  # listed as a labelled study
    # a label of other values is refused and nothing more is stored
    bad = nib.load(tmp_path / "label.nii.gz")
    nib.save(
        nib.Nifti1Image((np.asanyarray(bad.dataobj) > 0).astype(np.uint8) * 7, bad.affine), tmp_path / "bad.nii.gz"
    )
    with open(tmp_path / "bad.nii.gz", "rb") as f:
        r = requests.put(
            f"{pacs_server.url}/datastore/label",
            params={"image": entry["series"], "tag": "final"},
            files={"label": ("bad.nii.gz", f)},
            timeout=120,
        )
    assert r.status_code == 422 and "7" in r.text, r.text[:300]
    after = requests.get(f"{pacs}/studies/{entry['study']}/series", params={"Modality": "SEG"}, timeout=30).json()
    assert len(after) == len(segs)

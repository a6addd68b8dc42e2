"""A real PACS: Orthanc (Debian packages) started by scripts/orthanc.sh on 127.0.0.1; sample volumes stored as MR
series through STOW-RS and read back through QIDO-RS / WADO-RS with exact geometry and voxels.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import ROOT, Server, free_port
from lib.dicomseries import retrieve_series, series_to_volume, store, volume_to_series
from lib.validation import InputError

SAMPLES = sorted((ROOT / "sample" / "studies").glob("*.nii.gz"))


def test_orthanc_listens_on_loopback_only_with_its_own_storage(
    pacs: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder, _ = _orthanc(pacs, tmp_path_factory)
    config = json.loads((folder / "orthanc.json").read_text())
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


def submit_final(server: Server, image: str, path: Path) -> requests.Response:
    """``PUT /datastore/label`` of ``path`` as series ``image``'s final label."""
    with open(path, "rb") as f:
        return requests.put(
            f"{server.url}/datastore/label",
            params={"image": image, "tag": "final"},
            files={"label": (path.name, f)},
            timeout=120,
        )


def pacs_url(server: Server) -> str:
    return str(server.studies)


def test_server_starts_offline_and_lists_the_mr_series(pacs_server: Server, loaded: list[dict]) -> None:
    stats = requests.get(f"{pacs_server.url}/datastore/", params={"output": "stats"}, timeout=60).json()
    served = requests.get(f"{pacs_url(pacs_server)}/series", params={"Modality": "MR,CT"}, timeout=30).json()
    mr = [s for s in served if s["00080060"]["Value"][0] == "MR"]
    assert len(mr) == len(loaded) and stats["total"] == len(served)  # MONAI Label's default filter shows CT only
    assert "dcmqi" not in pacs_server.log.read_text().lower()


def test_next_sample_offers_unlabelled_series(pacs_server: Server, pacs: str, loaded: list[dict]) -> None:
    """Active learning on the PACS: next study is an unlabelled series of the PACS, with no server path."""
    listed = requests.get(f"{pacs}/series", params={"Modality": "MR,CT"}, timeout=30).json()
    series = {s["0020000E"]["Value"][0] for s in listed}
    assert {entry["series"] for entry in loaded} <= series
    seen = set()
    for strategy in ("first", "random", "uncertainty"):
        r = requests.post(f"{pacs_server.url}/activelearning/{strategy}", json={}, timeout=300)
        assert r.status_code == 200, (strategy, r.text[:300])
        body = r.json()
        assert body["id"] in series, body
        assert "/tmp" not in r.text and "cache" not in r.text, body  # no server paths out of the API
        seen.add(body["id"])
    labelled = requests.get(f"{pacs_server.url}/datastore/", params={"output": "stats"}, timeout=60).json()
    assert labelled["total"] - labelled["completed"] >= len(seen) >= 1


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
    # a remote viewer (the Slicer module) downloads the series as the volume the server segments
    got = requests.get(f"{pacs_server.url}/datastore/image", params={"image": entry["series"]}, timeout=60)
    assert got.status_code == 200, got.text[:300]
    assert got.headers["x-image-sha256"] == hashlib.sha256(got.content).hexdigest()
    (tmp_path / "downloaded.nii.gz").write_bytes(got.content)
    downloaded = nib.load(tmp_path / "downloaded.nii.gz")
    assert np.abs(downloaded.affine - affine).max() < 1e-4 and downloaded.shape == volume.shape


@pytest.mark.parametrize("defect, words", [("missing_slice", "unevenly spaced"), ("one_slice", "1 slice(s)")])
def test_a_series_that_is_not_a_volume_is_422_through_the_server(
    pacs_server: Server, pacs: str, defect: str, words: str
) -> None:
    img = nib.load(SAMPLES[1])
    series = volume_to_series(np.asanyarray(img.dataobj), img.affine, patient_id=f"defect_{defect}")
    series = series[:1] if defect == "one_slice" else series[:5] + series[6:]
    store(pacs, series)
    time.sleep(1.5)  # dicomweb_listing_s
    r = requests.post(f"{pacs_server.url}/infer/unet3d", params={"image": series[0].SeriesInstanceUID}, timeout=120)
    assert r.status_code == 422 and words in r.json()["detail"], r.text[:300]
    assert requests.get(f"{pacs_server.url}/info/", timeout=30).status_code == 200


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
    put = submit_final(pacs_server, entry["series"], tmp_path / "label.nii.gz")
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
    r = submit_final(pacs_server, entry["series"], tmp_path / "bad.nii.gz")
    assert r.status_code == 422 and "7" in r.text, r.text[:300]
    after = requests.get(f"{pacs}/studies/{entry['study']}/series", params={"Modality": "SEG"}, timeout=30).json()
    assert len(after) == len(segs)


# ---- training on labels stored in the PACS, uploads, faults, credentials ------------------------------


def test_training_uses_the_segs_in_the_pacs_whoever_wrote_them(
    pacs_server: Server, pacs: str, loaded: list[dict]
) -> None:
    """Labelled series = series with a SEG in the PACS: the server's own (submitted), one stored straight by another
    tool with its own segment naming, and one whose segments are not this model's labels (skipped, logged)."""
    from lib.dicomseg import label_to_seg

    elsewhere, foreign = loaded[1], loaded[4]
    source = retrieve_series(pacs, elsewhere["study"], elsewhere["series"])
    label = np.asanyarray(nib.load(ROOT / "sample" / "studies" / "labels" / "final" / elsewhere["file"]).dataobj)
    store(pacs, [label_to_seg(label.astype(np.uint8), source, {"Anterior": 1, "POSTERIOR": 2})])
    source = retrieve_series(pacs, foreign["study"], foreign["series"])
    shape = (int(source[0].Columns), int(source[0].Rows), len(source))
    store(pacs, [label_to_seg(np.ones(shape, np.uint8), source, {"liver": 1})])
    r = requests.post(
        f"{pacs_server.url}/train/unet3d",
        json={"max_epochs": 1, "val_split": 0.34, "train_batch_size": 1},
        timeout=60,
    )
    assert r.status_code == 200, r.text[:300]
    status = pacs_server.wait_train_done(timeout=900)
    assert status["status"] == "DONE", status
    model_dir = Path(pacs_server.conf["model_dir"])
    split = json.loads((model_dir / "unet3d_split.json").read_text())
    used = {Path(c).name.split(".nii")[0] for c in split["training"] + split["validation"]}
    assert used == {loaded[i]["series"] for i in (0, 1, 2)}, split
    stats = json.loads((model_dir / "unet3d_train_stats.json").read_text())
    assert stats["train_cases"] + stats["val_cases"] == 3
    log = pacs_server.log.read_text()
    assert f"of series {foreign['series']} not used for training" in log and "liver" in log
    listed = requests.get(f"{pacs_server.url}/datastore/", params={"output": "stats"}, timeout=60).json()
    assert listed["completed"] == 4  # the foreign SEG still marks its series as labelled in the PACS


def test_uploaded_image_becomes_a_series_in_the_pacs(pacs_server: Server, pacs: str, tmp_path: Path) -> None:
    """PUT /datastore/image: checked like the file datastore, stored by STOW-RS as a new series, then segmentable."""
    path = SAMPLES[5]
    with open(path, "rb") as f:
        r = requests.put(
            f"{pacs_server.url}/datastore/image",
            params={"image": "uploaded_case"},
            files={"file": (path.name, f)},
            timeout=120,
        )
    assert r.status_code == 200, r.text[:300]
    series = r.json()["image"]
    found = requests.get(f"{pacs}/series", params={"SeriesInstanceUID": series}, timeout=30).json()
    assert len(found) == 1 and found[0]["00100020"]["Value"] == ["uploaded_case"]
    inferred = requests.post(
        f"{pacs_server.url}/infer/unet3d", params={"image": series, "output": "image"}, timeout=300
    )
    assert inferred.status_code == 200, inferred.text[:300]
    (tmp_path / "label.nii.gz").write_bytes(inferred.content)
    assert np.abs(nib.load(tmp_path / "label.nii.gz").affine - nib.load(path).affine).max() < 1e-4
    before = len(requests.get(f"{pacs}/series", timeout=30).json())
    nan = tmp_path / "nan.nii.gz"
    data = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, nib.load(path).affine), nan)
    for name, content, words in [
        ("nan.nii.gz", nan.read_bytes(), "NaN"),
        ("broken.nii.gz", path.read_bytes()[:2000], "truncated"),
        ("flat.nii.gz", b"not an image", "cannot be read"),
    ]:
        bad = requests.put(
            f"{pacs_server.url}/datastore/image", files={"file": (name, content)}, params={"image": "bad"}, timeout=60
        )
        assert bad.status_code == 422 and words.lower() in bad.text.lower(), (name, bad.status_code, bad.text[:300])
    assert len(requests.get(f"{pacs}/series", timeout=30).json()) == before  # nothing stored


def test_bad_requests_on_the_pacs_datastore_are_4xx_and_store_nothing(
    pacs_server: Server, pacs: str, loaded: list[dict], tmp_path: Path
) -> None:
    entry = loaded[3]
    img = nib.load(SAMPLES[3])
    good = (np.asanyarray(img.dataobj) > 60).astype(np.uint8)
    cases = {
        "nan.nii.gz": (nib.Nifti1Image(np.where(good > 0, np.nan, 0).astype(np.float32), img.affine), 422, "NaN"),
        "float.nii.gz": (nib.Nifti1Image(good.astype(np.float32) * 0.5, img.affine), 422, "integer"),
        "shape.nii.gz": (nib.Nifti1Image(good[:-2], img.affine), 422, "shape"),
    }
    shifted = img.affine.copy()
    shifted[:3, 3] += 5.0
    cases["shifted.nii.gz"] = (nib.Nifti1Image(good, shifted), 422, "mm from series")
    before = requests.get(f"{pacs}/series", params={"Modality": "SEG"}, timeout=30).json()
    for name, (label, status, words) in cases.items():
        nib.save(label, tmp_path / name)
        r = submit_final(pacs_server, entry["series"], tmp_path / name)
        assert r.status_code == status and words in r.text, (name, r.status_code, r.text[:300])
    nib.save(nib.Nifti1Image(good, img.affine), tmp_path / "good.nii.gz")
    for image, status in [("1.2.3.4.5.6", 404), ("../../etc/passwd", 422), ("a/b", 422)]:
        r = submit_final(pacs_server, image, tmp_path / "good.nii.gz")
        assert r.status_code == status, (image, r.status_code, r.text[:300])
        r = requests.post(f"{pacs_server.url}/infer/unet3d", params={"image": image}, timeout=60)
        assert r.status_code == status, (image, r.status_code, r.text[:300])
    assert requests.get(f"{pacs}/series", params={"Modality": "SEG"}, timeout=30).json() == before
    assert not list(Path("/tmp").glob("unet_seg-req-*/*.nii.gz"))  # no request's temp file left behind


def _orthanc(pacs: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The folder and port of the Orthanc behind ``pacs`` (other modules start their own)."""
    port = int(pacs.split(":")[2].split("/")[0])
    for config in tmp_path_factory.getbasetemp().glob("orthanc*/orthanc.json"):
        if json.loads(config.read_text())["HttpPort"] == port:
            return config.parent, port
    raise AssertionError(f"no Orthanc folder for {pacs}")


def test_pacs_down_or_slow_is_503_or_504_and_the_server_keeps_serving(
    pacs_server: Server, pacs: str, loaded: list[dict], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    import os
    import signal

    folder, port = _orthanc(pacs, tmp_path_factory)
    img = nib.load(SAMPLES[5])
    fresh = volume_to_series(np.asanyarray(img.dataobj), img.affine, patient_id="never_fetched")
    store(pacs, fresh)  # a series the server never fetched: the PACS must answer
    entry = {"series": str(fresh[0].SeriesInstanceUID)}
    time.sleep(1.5)  # dicomweb_listing_s
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image((np.asanyarray(img.dataobj) > 60).astype(np.uint8), img.affine), label)
    segs_before = requests.get(f"{pacs}/series", params={"Modality": "SEG"}, timeout=30).json()

    pid = int((folder / "orthanc.pid").read_text())
    os.kill(pid, signal.SIGSTOP)  # slow: connections are accepted, nothing answers
    try:
        t = time.perf_counter()
        r = requests.post(f"{pacs_server.url}/infer/unet3d", params={"image": entry["series"]}, timeout=120)
        print(f"slow PACS: {r.status_code} after {time.perf_counter() - t:.1f} s")
        assert r.status_code == 504 and "did not answer in time" in r.json()["detail"], r.text[:300]
        t = time.perf_counter()
        assert requests.get(f"{pacs_server.url}/info/", timeout=30).status_code == 200
        with open(SAMPLES[0], "rb") as f:  # an upload needs no PACS: served as usual
            up = requests.post(f"{pacs_server.url}/infer/unet3d", files={"file": (SAMPLES[0].name, f)}, timeout=120)
        assert up.status_code == 200, up.text[:300]
        print(f"/info + /infer of an upload while the PACS hangs: {time.perf_counter() - t:.1f} s")
    finally:
        os.kill(pid, signal.SIGCONT)
    subprocess.run(["bash", str(ROOT / "scripts" / "orthanc.sh"), "stop", str(folder)], check=True, timeout=60)
    try:
        r = requests.post(f"{pacs_server.url}/infer/unet3d", params={"image": entry["series"]}, timeout=120)
        assert r.status_code == 503 and "unreachable" in r.json()["detail"], r.text[:300]
        assert r.headers.get("retry-after") == "30"
        assert submit_final(pacs_server, entry["series"], label).status_code == 503
        stats = requests.get(f"{pacs_server.url}/datastore/", params={"output": "stats"}, timeout=60)
        assert stats.status_code == 200 and stats.json()["pacs"].startswith("the PACS"), stats.text[:300]  # last counts
        info = requests.get(f"{pacs_server.url}/info/", timeout=30)
        assert info.status_code == 200 and info.json()["datastore"]["total"] > 0
        assert str(port) not in r.text and "127.0.0.1" not in r.text  # no PACS address out of the API
    finally:
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "orthanc.sh"), "start", str(folder), str(port)], check=True, timeout=120
        )
    segs_after = requests.get(f"{pacs}/series", params={"Modality": "SEG"}, timeout=30).json()
    assert len(segs_after) == len(segs_before)  # nothing half-written
    cache = [p for p in Path(pacs_server.log.parent).rglob(f"{entry['series']}*")]
    assert not [p for p in cache if p.name.startswith(".partial-")]
    r = requests.post(f"{pacs_server.url}/infer/unet3d", params={"image": entry["series"]}, timeout=300)
    assert r.status_code == 200, r.text[:300]
    assert submit_final(pacs_server, entry["series"], label).status_code == 200


def test_basic_auth_towards_the_pacs_from_a_password_file(
    loaded: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orthanc with basic auth: the datastore lists its series with dicomweb_user + dicomweb_password_file; wrong
    credentials are a 502 naming the confs; a password on the command line is refused."""
    import os

    from lib.conf import AppConf, ConfError
    from lib.dicomweb import dicomweb_datastore, pacs_fault

    folder, port = tmp_path / "orthanc", free_port()
    env = {**os.environ, "ORTHANC_USER": "unetseg", "ORTHANC_PASSWORD": "s3cret-pw"}
    orthanc = ["bash", str(ROOT / "scripts" / "orthanc.sh")]
    subprocess.run([*orthanc, "start", str(folder), str(port)], check=True, env=env, timeout=120)
    try:
        url = f"http://127.0.0.1:{port}/dicom-web"
        img = nib.load(SAMPLES[0])
        store(url, volume_to_series(np.asanyarray(img.dataobj), img.affine), username="unetseg", password="s3cret-pw")
        (tmp_path / "pw").write_text("s3cret-pw\n")
        (tmp_path / "wrong").write_text("guess\n")
        labels = {"anterior": 1, "posterior": 2}
        conf = {"dicomweb_user": "unetseg", "dicomweb_password_file": str(tmp_path / "pw")}
        from monailabel.config import settings

        monkeypatch.setattr(settings, "MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp_path / "cache"))
        ok = dicomweb_datastore(url, AppConf(conf), labels, 0.5)
        assert len(ok.list_images()) == 1
        bad = dicomweb_datastore(url, AppConf({**conf, "dicomweb_password_file": str(tmp_path / "wrong")}), labels, 0.5)
        with pytest.raises(requests.HTTPError) as err:
            bad.list_images()
        status, detail = pacs_fault(err.value) or (0, "")
        assert status == 502 and "credentials" in detail and "guess" not in detail
        with pytest.raises(ConfError, match="dicomweb_password_file"):
            dicomweb_datastore(url, AppConf({"dicomweb_user": "u", "dicomweb_password": "x"}), labels, 0.5)
        with pytest.raises(ConfError, match="go together"):
            dicomweb_datastore(url, AppConf({"dicomweb_user": "u"}), labels, 0.5)
    finally:
        subprocess.run([*orthanc, "stop", str(folder)], timeout=60)

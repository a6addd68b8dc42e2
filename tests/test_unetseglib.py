"""UNetSegLib (the Slicer module's REST client) against a REAL server: info, next study, checked and cached
downloads, infer, submit, train start/status/stop, batch status; and its pure parts (multipart, JWT expiry,
NIfTI split/stack checked against nibabel, the versions overview).

The same Logic and client also run in a separate mount namespace that cannot see the server's files
(tests/test_slicer_remote.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import HIPPO_IDS, ROOT, make_studies, running_server

sys.path.insert(0, str(ROOT / "slicer_module" / "UNetSeg"))

from UNetSegLib import (  # noqa: E402
    ServerError,
    UNetSegClient,
    model_versions,
    nifti,
    parse_multipart,
    sha256_of,
    token_expiry,
)


def test_parse_multipart_without_cgi() -> None:
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="params"\r\nContent-Type: application/json\r\n\r\n{"a": 1}\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="seg.nii.gz"\r\n'
        b"Content-Type: application/gzip\r\n\r\n\x1f\x8b\x00\r\n\x01\r\n--XyZ--\r\n"
    )
    parts = parse_multipart("multipart/form-data; boundary=XyZ", body)
    assert parts["params"] == (None, b'{"a": 1}')
    assert parts["image"] == ("seg.nii.gz", b"\x1f\x8b\x00\r\n\x01")
    with pytest.raises(ValueError, match="not a multipart"):
        parse_multipart("application/json", b"{}")


def test_client_unreachable_server_is_plain_words() -> None:
    with pytest.raises(ServerError, match="cannot reach the server"):
        UNetSegClient("http://127.0.0.1:9", timeout=2).info()


def test_client_against_real_server(tmp_path: Path, require_data: None) -> None:
    studies = make_studies(tmp_path / "studies", labelled=HIPPO_IDS[:3], unlabelled=HIPPO_IDS[3:])
    conf = {
        "models": "unet3d",
        "preset": "tiny",
        "roi_size": "16",
        "tracking": "none",
        "model_dir": str(tmp_path / "model"),
        "auto_retrain_after": "0",
    }
    with running_server(studies, conf, tmp_path / "server.log") as srv:
        client = UNetSegClient(srv.url)
        models = client.models()
        assert models["unet3d"]["ready"] is False
        with pytest.raises(ServerError) as err:
            client.infer("unet3d", "hippocampus_006", str(tmp_path / "x"))
        assert err.value.status == 409 and "no trained weights" in str(err.value)
        client.train_start("unet3d", max_epochs=20, val_split=0.34)
        time.sleep(3)
        assert client.train_status()["status"] in ("SUBMITTED", "RUNNING")
        client.train_stop()
        srv.wait_train_done()
        assert client.train_status()["status"] in ("STOPPED", "DONE", "ERROR")
        client.train_start("unet3d", max_epochs=1, val_split=0.34)
        assert srv.wait_train_done()["status"] == "DONE"
        assert client.models()["unet3d"]["ready"] is True
        nxt = client.next_sample("first")
        assert nxt["id"] == "hippocampus_006" and "path" not in nxt
        server_file = studies / "hippocampus_006.nii.gz"
        check = client.image_check(nxt["id"])
        assert check == {
            "image": "hippocampus_006",
            "name": "hippocampus_006.nii.gz",
            "size": server_file.stat().st_size,
            "sha256": sha256_of(str(server_file)),
        }
        cache = tmp_path / "cache"
        (local,) = client.download_image(nxt["id"], str(cache))
        assert Path(local).read_bytes() == server_file.read_bytes() and client.last_download["cached"] is False
        assert client.download_image(nxt["id"], str(cache)) == [local] and client.last_download["cached"] is True
        Path(local).write_bytes(b"\0" * server_file.stat().st_size)  # a damaged cache copy is downloaded again
        assert client.download_image(nxt["id"], str(cache)) == [local] and client.last_download["cached"] is False
        assert Path(local).read_bytes() == server_file.read_bytes()
        assert not [p for p in Path(local).parent.iterdir() if p.name.endswith(".part")]
        with pytest.raises(ServerError) as err:
            client.download_image("no_such_study", str(cache))
        assert err.value.status == 404 and "no_such_study" in str(err.value)
        with pytest.raises(ValueError, match="invalid image id"):
            client.download_image("../etc/passwd", str(cache))
        assert client.batch_status()["status"] == "NONE"
        out, meta = client.infer("unet3d", nxt["id"], str(tmp_path / "seg"), tta=True)
        assert (
            out.endswith(".nii.gz") and meta["tta"] is True and meta["label_names"] == {"anterior": 1, "posterior": 2}
        )
        seg, src = nib.load(out), nib.load(studies / "hippocampus_006.nii.gz")
        assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)
        arr = np.asanyarray(seg.dataobj).astype(np.uint8)
        arr[10:12, 10:12, 10:12] = 1
        nib.save(nib.Nifti1Image(arr, seg.affine), tmp_path / "corrected.nii.gz")
        reply = client.submit_label(
            nxt["id"],
            str(tmp_path / "corrected.nii.gz"),
            label_info=[{"name": "anterior", "idx": 1}, {"name": "posterior", "idx": 2}],
        )
        assert reply["image"] == "hippocampus_006"
        label = client.download_label("hippocampus_006", str(cache))
        assert Path(label).read_bytes() == (studies / "labels" / "final" / "hippocampus_006.nii.gz").read_bytes()
        with pytest.raises(ServerError) as err:
            client.download_label("hippocampus_008", str(cache))
        assert err.value.status == 404
        assert client.next_sample("first")["id"] == "hippocampus_008"


def test_non_contiguous_labels_survive_import_and_export() -> None:
    """FreeSurfer codes (2, 3, 4, 41, ...) -> contiguous Slicer segment values -> back, by name, unchanged."""
    from UNetSegLib import colour_table, label_info, remap

    from conftest import DATA

    npz = next((DATA / "multilabel" / "voxelmorph_test_scan").glob("*.npz"))
    seg = np.load(npz)["seg"]
    codes = sorted(set(np.unique(seg).tolist()) - {0})
    assert codes != list(range(1, len(codes) + 1))  # really non-contiguous
    server = {f"structure_{c}": int(c) for c in codes}
    table = colour_table(server)
    assert [e["value"] for e in table] == codes and len({tuple(e["rgb"]) for e in table}) == len(codes)
    slicer_side = {name: i + 1 for i, name in enumerate(server)}  # what a positional import would use
    imported = remap(seg, server, slicer_side)
    assert set(np.unique(imported).tolist()) == set(range(len(codes) + 1))
    exported = remap(imported, slicer_side, server)
    assert np.array_equal(exported, seg)
    assert label_info(server)[0] == {"name": f"structure_{codes[0]}", "idx": codes[0], "color": table[0]["rgb"]}
    with pytest.raises(ValueError, match="have no name"):
        remap(seg, {"structure_2": 2}, server)


def test_module_file_imports_without_slicer_and_logic_runs_the_loop(tmp_path: Path, require_data: None) -> None:
    """UNetSeg.py imports with Qt/Slicer absent; its Logic connects, picks, segments, submits in the background."""
    import UNetSeg

    assert UNetSeg.HAVE_SLICER is False
    UNetSeg.UNetSegTest().runTest()  # unreachable server -> plain words, no hang
    studies = make_studies(tmp_path / "studies", labelled=HIPPO_IDS[:3], unlabelled=HIPPO_IDS[3:])
    conf = {
        "models": "unet3d",
        "preset": "tiny",
        "roi_size": "16",
        "tracking": "none",
        "model_dir": str(tmp_path / "model"),
        "auto_retrain_after": "1",
    }
    with running_server(studies, conf, tmp_path / "server.log") as srv:
        logic = UNetSeg.UNetSegLogic(srv.url, cache_dir=str(tmp_path / "cache"))
        got: dict = {}
        errors: list[str] = []
        logic.connect(lambda r: got.update(connect=r), errors.append)
        logic.wait()
        assert got["connect"]["models"]["unet3d"]["ready"] is False and "uncertainty" in got["connect"]["strategies"]
        logic.next_study("first", None, lambda r: got.update(next=r), errors.append)
        logic.wait()
        nxt = got["next"]
        assert "path" not in nxt and "path" not in logic.current and nxt["label"] is None
        assert nxt["images"][0].startswith(logic.cache_dir) and nxt["modalities"] == ["image"]
        assert Path(nxt["images"][0]).read_bytes() == (studies / f"{nxt['id']}.nii.gz").read_bytes()
        assert logic.clear_cache() == 1 and not Path(logic.cache_dir).exists()
        logic.segment("unet3d", True, lambda r: got.update(seg=r), errors.append)
        logic.wait()
        assert errors and errors[-1].startswith("409") and "no trained weights" in errors[-1]
        logic.train("unet3d", lambda r: got.update(train=r), errors.append, max_epochs=1, val_split=0.34)
        logic.wait()
        srv.wait_train_done()
        logic.training_progress("unet3d", lambda r: got.update(progress=r), errors.append)
        logic.segment("unet3d", True, lambda r: got.update(seg=r), errors.append)
        logic.wait()
        assert got["progress"]["status"] == "DONE" and got["progress"]["epoch"] == 1
        assert got["seg"]["label_names"] == {"anterior": 1, "posterior": 2}
        seg = nib.load(got["seg"]["label"])
        arr = np.asanyarray(seg.dataobj).astype(np.uint8)
        # the correction: whatever a 1-epoch model predicted, the label has background and both structures
        arr[0:3, 0:3, 0:3], arr[5:8, 5:8, 5:8], arr[9:12, 9:12, 9:12] = 0, 2, 1
        nib.save(nib.Nifti1Image(arr, seg.affine), tmp_path / "fixed.nii.gz")
        logic.submit_label(
            str(tmp_path / "fixed.nii.gz"), got["seg"]["label_names"], lambda r: got.update(submit=r), errors.append
        )
        logic.wait()
        assert "submit" in got, errors
        assert got["submit"]["image"] == got["next"]["id"] and got["submit"]["retrain"]["model"] == "unet3d"
        assert srv.wait_train_done()["status"] == "DONE"


def test_token_expiry_is_read_without_verification() -> None:
    import base64
    import json

    def jwt(claims: dict) -> str:
        part = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"eyJhbGciOiJSUzI1NiJ9.{part}.c2lnbmF0dXJl"

    assert token_expiry(jwt({"exp": 1_900_000_000, "sub": "x"})) == 1_900_000_000
    assert token_expiry(jwt({"sub": "no exp"})) is None
    assert token_expiry("not a token") is None and token_expiry("a.%%%.c") is None


def _oblique(arr: np.ndarray, path: Path, qform_only: bool = False, shift: float = 0.0) -> nib.Nifti1Image:
    th = 0.4
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, -1]]) @ np.diag(
        [1.2, 0.8, 1.5]
    )
    affine[:3, 3] = [12.5 + shift, -30.0, 7.25]
    img = nib.Nifti1Image(arr, affine)
    if qform_only:
        img.set_sform(None, code=0)
        img.set_qform(affine, code=1)
    nib.save(img, path)
    return nib.load(path)


def test_nifti_affine_split_and_stack_match_nibabel(tmp_path: Path) -> None:
    """The module's own NIfTI-1 code (Slicer has no nibabel): affines, channels split and modalities stacked."""
    src = np.asanyarray(nib.load(ROOT / "sample" / "studies" / "hippocampus_015.nii.gz").dataobj)
    for qform_only in (False, True):  # an oblique, left-handed affine from the sform, or from the qform alone
        ref = _oblique(src.astype(np.float32), tmp_path / f"q{qform_only}.nii.gz", qform_only)
        assert np.allclose(
            nifti.affine(nifti.read_header(str(tmp_path / f"q{qform_only}.nii.gz"))), ref.affine, atol=1e-5
        )
    a = _oblique(src.astype(np.int16), tmp_path / "a.nii.gz")
    b = _oblique((src * 3).astype(np.int16), tmp_path / "b.nii")
    stacked = nifti.stack_volumes([str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii")], str(tmp_path / "ab.nii.gz"))
    got = nib.load(stacked)
    assert got.shape == (*src.shape, 2) and got.get_data_dtype() == np.int16
    assert np.allclose(got.affine, a.affine, atol=1e-5)
    assert np.array_equal(np.asanyarray(got.dataobj)[..., 1], np.asanyarray(b.dataobj))
    outs = nifti.split_channels(stacked, [str(tmp_path / "c0.nii"), str(tmp_path / "c1.nii")])
    for out, ref in zip(outs, (a, b), strict=True):
        one = nib.load(out)
        assert one.shape == src.shape and np.allclose(one.affine, ref.affine, atol=1e-5)
        assert np.array_equal(np.asanyarray(one.dataobj), np.asanyarray(ref.dataobj))
    assert nifti.channel_count(nifti.read_header(stacked)) == 2
    # different types or scalings: stacked as float32 values
    _oblique((src / 7).astype(np.float32), tmp_path / "f.nii.gz")
    mixed = nib.load(
        nifti.stack_volumes([str(tmp_path / "a.nii.gz"), str(tmp_path / "f.nii.gz")], str(tmp_path / "m.nii.gz"))
    )
    assert mixed.get_data_dtype() == np.float32
    assert np.allclose(np.asanyarray(mixed.dataobj)[..., 1], src / 7, atol=1e-4)
    # refused in words: another grid, another shape, a 4D input, too few names
    _oblique(src.astype(np.int16), tmp_path / "moved.nii.gz", shift=0.5)
    with pytest.raises(ValueError, match="lies elsewhere in space"):
        nifti.stack_volumes([str(tmp_path / "a.nii.gz"), str(tmp_path / "moved.nii.gz")], str(tmp_path / "x.nii.gz"))
    _oblique(src[:-1].astype(np.int16), tmp_path / "small.nii.gz")
    with pytest.raises(ValueError, match="same grid"):
        nifti.stack_volumes([str(tmp_path / "a.nii.gz"), str(tmp_path / "small.nii.gz")], str(tmp_path / "x.nii.gz"))
    with pytest.raises(ValueError, match="one 3D volume per modality"):
        nifti.stack_volumes([stacked, str(tmp_path / "a.nii.gz")], str(tmp_path / "x.nii.gz"))
    with pytest.raises(ValueError, match="2 channels, 1 names"):
        nifti.split_channels(stacked, [str(tmp_path / "only.nii")])
    assert not list(tmp_path.glob("x.nii.gz*"))


def test_versions_overview_from_info() -> None:
    """/info -> version rows (from model_versions, or from an older server's per-model versions) and plot data."""
    import UNetSeg

    history = [
        {"epoch": 1, "train_loss": 0.9, "val_mean_dice": 0.5, "val_dice_per_class": {"a": 0.4, "b": 0.6}},
        {"epoch": 2, "train_loss": 0.7, "val_mean_dice": None, "val_dice_per_class": {}},
    ]
    old = {
        "models": {
            "unet3d": {
                "version": {"version": "v2", "val_dice_per_class": {"a": 0.8, "b": 0.9}},
                "versions": [
                    {"id": "v1", "state": "retired", "val_mean_dice": 0.7, "created": "t1"},
                    {"id": "v2", "state": "serving", "val_mean_dice": 0.85, "created": "t2"},
                    {"id": "v3", "state": "candidate", "val_mean_dice": None, "created": "t3"},
                ],
            }
        },
        "train_stats": {"unet3d": {"history": history, "val_dice_per_class": {"a": 0.4, "b": 0.6}, "version": "v3"}},
    }
    rows = model_versions(old)["unet3d"]
    assert [(r["id"], r["serving"], r["mean_dice"]) for r in rows] == [
        ("v1", False, 0.7),
        ("v2", True, 0.85),
        ("v3", False, None),
    ]
    new = dict(old, model_versions={"unet3d": [dict(r, per_class=r["per_class"]) for r in rows]})
    assert model_versions(new) == model_versions(old)
    ov = UNetSeg.overview(new)["unet3d"]
    assert ov["serving"] == "v2" and ov["per_class"] == {"a": 0.8, "b": 0.9} and ov["per_class_version"] == "v2"
    assert ov["curve"] == {"epoch": [1, 2], "train_loss": [0.9, 0.7], "val_mean_dice": [0.5, None]}
    assert ov["versions"][1]["text"] == "v2  serving  Dice 0.850" and ov["versions"][2]["text"].endswith("Dice -")
    untrained = UNetSeg.overview({"models_not_ready": {"m": {"versions": []}}, "train_stats": {"m": {}}})["m"]
    assert untrained["serving"] is None and untrained["curve"]["epoch"] == [] and untrained["per_class"] == {}


def test_logic_helpers_in_words() -> None:
    import UNetSeg

    assert UNetSeg.image_id_for("T1 axial (post) #2") == "T1_axial_post_2"
    assert UNetSeg.image_id_for("../..") == "volume"
    assert UNetSeg.image_id_for("_x") == "x"
    assert UNetSeg.server_key("https://seg.hospital.org:8443/unet") == "seg.hospital.org_8443_unet"
    used = UNetSeg.describe_prediction({"model": "unet3d", "model_version": "v2", "serving": True}, used=True)
    assert used.startswith("prediction made by unet3d v2") and "no new inference" in used
    stale = UNetSeg.describe_prediction({"model": "unet3d", "model_version": "v1", "serving": False}, used=False)
    assert "v1" in stale and "Segment" in stale
    assert UNetSeg.describe_prediction(None, used=False) == ""
    from UNetSegLib import declared_modalities, model_modalities

    assert declared_modalities({"modalities": ["flair", "t1"]}) == ["flair", "t1"]
    assert declared_modalities({"channels": 2}) == ["channel0", "channel1"]
    assert declared_modalities({"in_channels": 1}) == ["image"]
    assert declared_modalities({"labels": {}}) is None and model_modalities({}) == ["image"]

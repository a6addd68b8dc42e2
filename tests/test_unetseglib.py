"""UNetSegLib (the Slicer module's REST client) against a REAL server: info, next study, infer, submit,
train start/status/stop."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import HIPPO_IDS, ROOT, make_studies, running_server

sys.path.insert(0, str(ROOT / "slicer_module" / "UNetSeg"))

from UNetSegLib import ServerError, UNetSegClient, parse_multipart  # noqa: E402


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
        assert nxt["id"] == "hippocampus_006"
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
        logic = UNetSeg.UNetSegLogic(srv.url)
        got: dict = {}
        errors: list[str] = []
        logic.connect(lambda r: got.update(connect=r), errors.append)
        logic.wait()
        assert got["connect"]["models"]["unet3d"]["ready"] is False and "uncertainty" in got["connect"]["strategies"]
        logic.next_study("first", None, lambda r: got.update(next=r), errors.append)
        logic.wait()
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

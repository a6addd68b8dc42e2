"""Active learning with the embedded sample model: uncertainty scoring, ranking, leases; and over REST."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import APP_DIR, ROOT, running_server

SAMPLE = ROOT / "sample"


def studies_with_ambiguous_case(folder: Path) -> Path:
    """Two unlabelled studies: a clean hippocampus MRI and the same one drowned in noise (ambiguous),
    plus one labelled."""
    (folder / "labels" / "final").mkdir(parents=True)
    shutil.copy(SAMPLE / "studies" / "hippocampus_015.nii.gz", folder / "clean.nii.gz")
    img = nib.load(SAMPLE / "studies" / "hippocampus_015.nii.gz")
    arr = np.asanyarray(img.dataobj).astype(np.float32)
    rng = np.random.default_rng(0)
    noisy = arr + rng.normal(0, 1.0 * arr[arr > 0].std(), arr.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(noisy, img.affine), folder / "ambiguous.nii.gz")
    shutil.copy(SAMPLE / "studies" / "hippocampus_003.nii.gz", folder / "labelled.nii.gz")
    shutil.copy(
        SAMPLE / "studies" / "labels" / "final" / "hippocampus_003.nii.gz",
        folder / "labels" / "final" / "labelled.nii.gz",
    )
    return folder


CONF = {
    "models": "unet3d",
    "preset": "small",
    "roi_size": "40,56,40",
    "tracking": "none",
    "unet3d.pretrained": str(SAMPLE / "models" / "unet3d_hippocampus_small.pt"),
}


def test_uncertainty_ranks_ambiguous_above_clean_and_leases(tmp_path: Path) -> None:
    from main import UNetSegApp

    studies = studies_with_ambiguous_case(tmp_path / "studies")
    app = UNetSegApp(str(APP_DIR), str(studies), dict(CONF, model_dir=str(tmp_path / "model")))
    scores = app.scoring({"method": "uncertainty"})["scores"]["unet3d"]
    assert set(scores) == {"clean", "ambiguous"}  # labelled studies are not scored
    assert scores["ambiguous"] > scores["clean"] > 0
    assert app.datastore().get_image_info("ambiguous")["uncertainty_unet3d"] == pytest.approx(scores["ambiguous"])
    first = app.next_sample({"strategy": "uncertainty"})
    assert first["id"] == "ambiguous" and first["score"] == pytest.approx(scores["ambiguous"])
    second = app.next_sample({"strategy": "uncertainty"})  # another annotator: not the same study
    assert second["id"] == "clean"
    assert app.next_sample({"strategy": "first"}) == {}  # both are leased now
    assert app.next_sample({"strategy": "first", "lease_s": 0}) == {}  # still leased (leases are not shortened)


def test_epistemic_mc_dropout_ranks_ambiguous_first_and_refuses_without_dropout(tmp_path: Path) -> None:
    from fastapi import HTTPException

    from lib.infers.base import ModelNotReady
    from main import UNetSegApp

    studies = studies_with_ambiguous_case(tmp_path / "studies")
    app = UNetSegApp(str(APP_DIR), str(studies), dict(CONF, model_dir=str(tmp_path / "model")))
    # the sample model was trained without dropout: MC dropout has nothing to sample, and says so
    out = app.scoring({"method": "epistemic"})
    assert out["scores"] == {} and "trained without dropout" in out["skipped"]["unet3d"]
    with pytest.raises(ModelNotReady, match="trained without dropout"):
        app.scoring({"method": "epistemic", "model": "unet3d"})
    with pytest.raises(HTTPException) as err:
        app.next_sample({"strategy": "epistemic"})
    assert err.value.status_code == 409 and "dropout" in err.value.detail
    with pytest.raises(HTTPException) as err:
        app.next_sample({"strategy": "epistemic", "dropout": 1.5})
    assert err.value.status_code == 422
    # test-time dropout on these weights (asked for explicitly)
    request = {"method": "epistemic", "dropout": 0.2, "samples": 4}
    scores = app.scoring(request)["scores"]["unet3d"]
    assert scores["ambiguous"] > scores["clean"] > 0
    assert app.scoring({**request, "force": True})["scores"]["unet3d"] == scores  # seeded: recomputed, same score
    app.datastore().update_image_info("clean", {"epistemic_unet3d": -1.0})  # a marker: reused unless forced or stale
    assert app.scoring(request)["scores"]["unet3d"]["clean"] == -1.0
    assert app.scoring({**request, "samples": 3})["scores"]["unet3d"]["clean"] > 0  # other params: recomputed
    assert app.scoring({**request, "force": True})["scores"]["unet3d"]["clean"] == pytest.approx(scores["clean"])
    info = app.datastore().get_image_info("clean")
    assert info["epistemic_unet3d"] == pytest.approx(scores["clean"])
    assert info["epistemic_unet3d_signature"]["dropout"] == 0.2
    first = app.next_sample({"strategy": "epistemic", "dropout": 0.2, "samples": 4})
    assert (
        first["id"] == "ambiguous"
        and first["score_kind"] == "epistemic"
        and first["score"] == pytest.approx(scores["ambiguous"])
    )
    # leased: not twice
    assert app.next_sample({"strategy": "epistemic", "dropout": 0.2, "samples": 4})["id"] == "clean"
    with pytest.raises(HTTPException) as err:
        app.next_sample({"strategy": "bald"})
    assert err.value.status_code == 404 and "epistemic" in err.value.detail
    with pytest.raises(HTTPException) as err:
        app.next_sample({"strategy": "uncertainty", "model": "nosuch"})
    assert err.value.status_code == 404 and "unet3d" in err.value.detail


def test_strategies_over_rest(tmp_path: Path) -> None:
    studies = studies_with_ambiguous_case(tmp_path / "studies")
    with running_server(studies, dict(CONF, model_dir=str(tmp_path / "model")), tmp_path / "server.log") as srv:
        info = requests.get(f"{srv.url}/info/", timeout=30).json()
        assert {"first", "random", "uncertainty", "epistemic"} <= set(info["strategies"])
        assert {"uncertainty", "epistemic"} <= set(info["scoring"])
        r = requests.post(f"{srv.url}/activelearning/epistemic", json={}, timeout=60)
        assert r.status_code == 409 and "trained without dropout" in r.json()["detail"], r.text
        r = requests.post(f"{srv.url}/activelearning/uncertainty", json={}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "ambiguous"
        r = requests.post(f"{srv.url}/activelearning/first", json={}, timeout=60)
        assert r.status_code == 200 and r.json()["id"] == "clean"
        assert json.dumps(r.json())  # plain JSON body


def test_submitting_labels_triggers_retraining_and_a_newer_model(tmp_path: Path) -> None:
    """The clinician loop over REST: next study -> infer -> submit -> automatic retraining -> newer model served."""
    import time

    studies = studies_with_ambiguous_case(tmp_path / "studies")
    conf = dict(
        CONF,
        model_dir=str(tmp_path / "model"),
        auto_retrain_after="2",
        max_epochs="1",
        roi_size="16",
        preset="tiny",
        dropout="0.2",
        promotion="always",  # the loop itself is tested here; the promotion gate in test_model_lifecycle
    )
    conf.pop("unet3d.pretrained")
    shutil.copy(SAMPLE / "studies" / "hippocampus_004.nii.gz", studies / "labelled2.nii.gz")
    shutil.copy(
        SAMPLE / "studies" / "labels" / "final" / "hippocampus_004.nii.gz",
        studies / "labels" / "final" / "labelled2.nii.gz",
    )
    shutil.copy(SAMPLE / "studies" / "hippocampus_020.nii.gz", studies / "extra.nii.gz")  # stays unlabelled
    with running_server(studies, conf, tmp_path / "server.log") as srv:
        r = requests.post(f"{srv.url}/train/unet3d", json={"val_split": 0.5}, timeout=60)
        assert r.status_code == 200, r.text
        assert srv.wait_train_done()["status"] == "DONE"
        v1 = requests.get(f"{srv.url}/info/", timeout=30).json()["models"]["unet3d"]["version"]["version"]
        timings = {}
        for image_id in ("ambiguous", "clean"):
            nxt = requests.post(f"{srv.url}/activelearning/first", json={}, timeout=60).json()
            assert nxt["id"] == image_id
            t0 = time.time()
            seg = requests.post(
                f"{srv.url}/infer/unet3d",
                params={"image": image_id, "output": "image"},
                data={"params": json.dumps({"tta": True})},
                timeout=300,
            )
            assert seg.status_code == 200, seg.text
            timings[f"infer_{image_id}_s"] = round(time.time() - t0, 2)
            # the annotator corrects the server's segmentation (here: paints both structures near the centre)
            (tmp_path / "seg.nii.gz").write_bytes(seg.content)
            result = nib.load(tmp_path / "seg.nii.gz")
            arr = np.asanyarray(result.dataobj).astype(np.uint8)
            c = [s // 2 for s in arr.shape]
            arr[c[0] - 3 : c[0], c[1] - 3 : c[1] + 3, c[2] - 3 : c[2] + 3] = 1
            arr[c[0] : c[0] + 3, c[1] - 3 : c[1] + 3, c[2] - 3 : c[2] + 3] = 2
            nib.save(nib.Nifti1Image(arr, result.affine), tmp_path / "corrected.nii.gz")
            r = requests.put(
                f"{srv.url}/datastore/label",
                params={"image": image_id, "tag": "final"},
                files={"label": ("corrected.nii.gz", (tmp_path / "corrected.nii.gz").read_bytes())},
                timeout=60,
            )
            assert r.status_code == 200, r.text
        body = r.json()
        assert body["retrain"]["model"] == "unet3d" and body["retrain"]["task"], body
        t0 = time.time()
        assert srv.wait_train_done()["status"] == "DONE"
        v2 = requests.get(f"{srv.url}/info/", timeout=30).json()["models"]["unet3d"]["version"]
        assert v2["version"] != v1 and v2["val_mean_dice"] is not None
        # the model was trained with dropout 0.2: MC dropout samples it with no extra parameter
        r = requests.post(f"{srv.url}/activelearning/epistemic", json={"samples": 3}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "extra" and r.json()["score_kind"] == "epistemic" and r.json()["score"] > 0
        print(f"loop timings: {timings}, submit->retrained {time.time() - t0:.1f}s")

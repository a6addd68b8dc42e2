"""The Slicer module in REMOTE mode: its Logic on a workstation that shares no files with the server.

The client (``slicer_module/UNetSeg/Testing/Python/remote_session.py``: the module's Logic,
``UNetSegLib`` and ``UNetSegScene`` on slicer-core's MRML scene, in .venv-slicer) runs in its
own mount namespace (``unshare --mount``) where the server's whole folder (studies, model
store, its TMPDIR) is covered by an empty tmpfs: any read of a server path fails there, and each
run first proves it (the folder looks empty, a known study file is unreadable, while this test
process still sees it). Everything travels over HTTP to a REAL server on 127.0.0.1.

Covered: next study -> segment -> submit -> train with no shared files; a Slicer volume with an
oblique affine uploaded and segmented in its own geometry, submitted as final; per-modality volumes
stacked and a multi-channel study coming back as one volume per modality; login with signed
tokens from the stand-in realm, renewal before expiry and after a 401, 401/403 in words; a
pre-annotated study opened without a second inference; and 'Next study' on a 256x256x128 study
(time printed with -s; at most 2 s).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import HIPPO_IDS, ROOT, Server, hippo_case, running_server
from lib.serverproc import sample_conf
from realm import CLIENT_ID, ROLES, StandInRealm, new_key

sys.path.insert(0, str(ROOT / "slicer_module" / "UNetSeg"))
from UNetSegLib import UNetSegClient, sha256_of  # noqa: E402

SLICER_PY = ROOT / ".venv-slicer" / "bin" / "python"
SESSION = ROOT / "slicer_module" / "UNetSeg" / "Testing" / "Python" / "remote_session.py"
SAMPLE = ROOT / "sample"
SAMPLE_CONF = sample_conf()
NEXT_STUDY_LIMIT_S = 2.0


@pytest.fixture(scope="module")
def slicer_python() -> Path:
    if not SLICER_PY.exists():
        pytest.fail(f"{SLICER_PY} is missing: run `bash scripts/setup_slicer.sh` (scripts/test.sh does it)")
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.fail("`unshare --mount` is not permitted here: the remote tests need a private mount namespace (root)")
    return SLICER_PY


class Remote:
    """A real server whose files all live under ``root`` (hidden from the client), and a client folder."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "server"
        self.studies = self.root / "studies"
        self.model_dir = self.root / "model"
        self.tmp = self.root / "tmp"
        self.client_dir = base / "client"
        for d in (self.studies / "labels" / "final", self.model_dir, self.tmp, self.client_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.server: Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    def serve(self, conf: dict[str, str], env: dict[str, str] | None = None) -> Any:
        return running_server(
            self.studies,
            dict(conf, model_dir=str(self.model_dir)),
            self.base / "server.log",
            env={"TMPDIR": str(self.tmp), **(env or {})},
        )

    def run_client(self, scenario: str, args: dict | None = None, probe: str = "") -> dict:
        """The scripted session in a mount namespace where ``root`` is an empty tmpfs; its JSON report."""
        probe_path = self.studies / probe if probe else next(self.studies.glob("*.nii*"))
        assert probe_path.is_file()  # this process sees the server's file; the client must not
        out = self.client_dir / scenario
        cmd = [
            str(SLICER_PY),
            str(SESSION),
            "--scenario",
            scenario,
            "--url",
            self.url,
            "--cache",
            str(self.client_dir / "cache"),
            "--out",
            str(out),
            "--hidden",
            str(self.root),
            "--probe",
            str(probe_path),
            "--args",
            json.dumps(args or {}),
        ]
        (self.client_dir / "tmp").mkdir(exist_ok=True)
        shell = (
            f"mount -t tmpfs -o size=1m,mode=0755 unet_seg_hidden {shlex.quote(str(self.root))} && "
            f"export TMPDIR={shlex.quote(str(self.client_dir / 'tmp'))} && exec {shlex.join(cmd)}"
        )
        t0 = time.time()
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell],
            capture_output=True,
            text=True,
            timeout=1500,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        report["client_s"] = round(time.time() - t0, 1)
        assert report["visibility"] == {"hidden_empty": {str(self.root): True}, "probe_readable": False}, report
        assert "failed" not in report, (report.get("failed"), report.get("errors"), proc.stderr[-3000:])
        for sample in report["raw_samples"]:  # what the server sent, observed in the client: never a path
            assert "path" not in sample, sample
        return report["result"]


def load_canonical(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asanyarray(img.dataobj), img.affine


def oblique_volume(path: Path) -> Path:
    """A real hippocampus image re-written with an oblique, anisotropic affine (as a scanner might store it)."""
    src = nib.load(SAMPLE / "studies" / "hippocampus_015.nii.gz")
    th = np.deg2rad(17.0)
    rot = np.array([[np.cos(th), 0, np.sin(th)], [0, 1, 0], [-np.sin(th), 0, np.cos(th)]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.1, 0.95, 1.4])
    affine[:3, 3] = [-21.5, 13.25, 40.0]
    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj).astype(np.float32), affine), path)
    return path


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory, slicer_python: Path) -> Iterator[Remote]:
    """The sample server (pretrained UNet3D, six studies, four labelled), auth off."""
    r = Remote(tmp_path_factory.mktemp("remote"))
    shutil.copytree(SAMPLE / "studies", r.studies, dirs_exist_ok=True)
    with r.serve(SAMPLE_CONF) as srv:
        r.server = srv
        yield r


def test_next_segment_submit_train_with_no_shared_files(remote: Remote) -> None:
    rep = remote.run_client("loop", {"train": {"max_epochs": 1, "val_split": 0.2}})
    nxt = rep["next"]
    image = nxt["id"]
    server_file = remote.studies / f"{image}.nii.gz"
    assert nxt["images"] == [str(remote.client_dir / "cache" / server_key(remote) / "images" / server_file.name)]
    assert rep["image_sha256"] == sha256_of(str(server_file)) and nxt["download"]["cached"] is False
    assert nxt["download"]["verified"] == "sha256" and "path" not in nxt and "path" not in rep["current_keys"]
    seg = rep["segment"]
    assert seg["label_names"] == {"anterior": 1, "posterior": 2} and seg["segments"] == ["anterior", "posterior"]
    assert seg["submit"]["image"] == image
    stored = remote.studies / "labels" / "final" / f"{image}.nii.gz"
    exported, _ = load_canonical(seg["exported"])
    served, served_affine = load_canonical(seg["label"])
    kept, kept_affine = load_canonical(stored)
    assert np.array_equal(exported, served) and np.array_equal(kept, served)
    assert np.allclose(kept_affine, served_affine, atol=1e-4)
    assert rep["progress"]["status"] == "DONE" and rep["progress"]["epoch"] == 1, rep["progress"]
    ov = rep["overview"]
    assert ov["serving"] and any(v["serving"] and v["id"] == ov["serving"] for v in ov["versions"])
    assert len(ov["versions"]) == 2 and ov["curve"]["epoch"] == [1]  # the imported v1 and this training's version
    assert rep["plot"]["curve_series"] == 2 and rep["plot"]["curve_rows"] == 1
    assert rep["plot"]["class_labels"] == ["anterior", "posterior"]
    print(f"\nremote loop (next, segment, submit, 1-epoch training) in the client namespace: {rep_time(rep)}")


def rep_time(rep: dict) -> str:
    return f"next study {rep['next']['seconds']:.2f} s (download {rep['next']['download']['seconds']:.2f} s)"


def server_key(remote: Remote) -> str:
    import UNetSeg

    return UNetSeg.server_key(remote.url)


def test_uploaded_volume_is_segmented_in_its_own_geometry(remote: Remote) -> None:
    volume = oblique_volume(remote.client_dir / "oblique.nii.gz")
    src = nib.load(volume)
    rep = remote.run_client("upload", {"volume": str(volume)})

    # a file as Slicer has it open: the label has exactly its shape and affine, and so does the stored final label
    label = nib.load(rep["file"]["label"])
    assert label.shape == src.shape and np.allclose(label.affine, src.affine, atol=1e-5)
    stored = nib.load(remote.studies / "labels" / "final" / "oblique_file.nii.gz")
    assert stored.shape == src.shape and np.allclose(stored.affine, src.affine, atol=1e-5)
    assert sha256_of(str(remote.studies / "oblique_file.nii.gz")) == sha256_of(str(volume))  # uploaded as is
    assert set(np.unique(np.asanyarray(label.dataobj)).tolist()) == {0, 1, 2}

    # a volume NODE (written by Slicer's storage node): the label is on that node's grid; import/export keeps it
    node = rep["node"]
    uploaded = nib.load(node["uploaded"])
    node_label = nib.load(node["label"])
    assert node_label.shape == uploaded.shape and np.allclose(node_label.affine, uploaded.affine, atol=1e-5)
    up_arr, up_affine = load_canonical(node["uploaded"])
    src_arr, src_affine = load_canonical(volume)
    assert np.allclose(up_affine, src_affine, atol=1e-4) and np.allclose(up_arr, src_arr)  # the same volume in space
    exported, exp_affine = load_canonical(node["exported"])
    served, served_affine = load_canonical(node["label"])
    assert np.array_equal(exported, served) and np.allclose(exp_affine, served_affine, atol=1e-4)
    stored_node, stored_affine = load_canonical(remote.studies / "labels" / "final" / "oblique_node.nii.gz")
    assert np.array_equal(stored_node, served) and np.allclose(stored_affine, src_affine, atol=1e-4)
    # both uploads segment the same voxels the same way (same data, same model)
    assert np.array_equal(served, load_canonical(rep["file"]["label"])[0])
    assert rep["duplicate_error"].startswith("409") and "already exists" in rep["duplicate_error"]


def test_preannotated_study_opens_without_a_second_inference(remote: Remote) -> None:
    admin = UNetSegClient(remote.url)
    job = admin.batch_infer("unet3d", "unlabeled")
    assert job["total"] >= 1
    end = time.time() + 600
    while (status := admin.batch_status())["status"] == "RUNNING" and time.time() < end:
        time.sleep(1)
    assert status["status"] == "DONE" and status["failed"] == 0, status
    info = admin.info()
    serving = next(v["id"] for v in info["model_versions"]["unet3d"] if v["serving"])
    before = info["inference_queue"]["completed"]

    rep = remote.run_client("preannotated")

    after = admin.info()["inference_queue"]
    assert after["completed"] == before and after["running"] == 0, (before, after)  # no inference for Next study
    nxt = rep["next"]
    assert nxt["prediction"]["serving"] is True and nxt["prediction"]["model_version"] == serving
    assert f"prediction made by unet3d {serving}" in nxt["message"] and "no new inference" in nxt["message"]
    stored = remote.studies / "labels" / "prediction" / f"{nxt['id']}.nii.gz"
    assert nxt["label"] and sha256_of(nxt["label"]) == sha256_of(str(stored))
    assert rep["segments"] >= 1
    print(f"\npre-annotated study {nxt['id']} ({serving}) opened in {nxt['seconds']:.2f} s; inferences stayed {before}")


# ---- multi-modal uploads and studies ------------------------------------------------------------
@pytest.fixture(scope="module")
def multimodal(tmp_path_factory: pytest.TempPathFactory, slicer_python: Path) -> Iterator[Remote]:
    """A server whose UNet3D takes two modalities (tiny, untrained: uploads and downloads need no weights)."""
    r = Remote(tmp_path_factory.mktemp("multimodal"))
    img, _ = hippo_case(HIPPO_IDS[0])
    shutil.copy(img, r.studies / img.name)  # something to probe
    conf = {"models": "unet3d", "preset": "tiny", "roi_size": "16", "unet3d.modalities": "t1,t2", "tracking": "none"}
    with r.serve(conf) as srv:
        r.server = srv
        yield r


def test_modalities_are_stacked_on_upload_and_split_on_download(multimodal: Remote) -> None:
    src = nib.load(SAMPLE / "studies" / "hippocampus_004.nii.gz")
    t1 = np.asanyarray(src.dataobj).astype(np.float32)
    t2 = (t1 * 0.5 + 7.0).astype(np.float32)
    paths = [multimodal.client_dir / "t1.nii.gz", multimodal.client_dir / "t2.nii"]
    nib.save(nib.Nifti1Image(t1, src.affine), paths[0])
    nib.save(nib.Nifti1Image(t2, src.affine), paths[1])
    shifted = src.affine.copy()
    shifted[0, 3] += 2.0
    nib.save(nib.Nifti1Image(t2, shifted), multimodal.client_dir / "t2_shifted.nii.gz")
    rep = multimodal.run_client(
        "multimodal",
        {
            "modalities": [str(p) for p in paths],
            "misaligned": [str(paths[0]), str(multimodal.client_dir / "t2_shifted.nii.gz")],
        },
    )
    assert rep["wrong_count"] and ("2 modalities" in rep["wrong_count"] or rep["wrong_count"].startswith("422"))
    assert "lies elsewhere in space" in rep["misaligned"] and "resample" in rep["misaligned"]
    stored = nib.load(multimodal.studies / "mm_case.nii.gz")
    assert stored.shape == (*t1.shape, 2) and np.allclose(stored.affine, src.affine, atol=1e-5)
    opened = rep["open"]
    names = rep["modalities"] if rep["modalities"] != ["image"] else ["channel0", "channel1"]
    assert [Path(p).name for p in opened["images"]] == [f"mm_case_{n}.nii" for n in names]
    assert opened["modalities"] == names and rep["nodes"] == names
    for path, ref in zip(opened["images"], (t1, t2), strict=True):
        got = nib.load(path)
        assert got.shape == t1.shape and np.allclose(got.affine, src.affine, atol=1e-5)
        assert np.array_equal(np.asanyarray(got.dataobj), ref)


# ---- 'Next study' on a large study --------------------------------------------------------------
@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory, slicer_python: Path) -> Iterator[Remote]:
    """A server with one 256x256x128 float32 study (a real case tiled, with a smooth ramp)."""
    r = Remote(tmp_path_factory.mktemp("large"))
    src = nib.load(SAMPLE / "studies" / "hippocampus_011.nii.gz")
    arr = np.asanyarray(src.dataobj).astype(np.float32)
    reps = [int(np.ceil(n / s)) for n, s in zip((256, 256, 128), arr.shape, strict=True)]
    big = np.tile(arr, reps)[:256, :256, :128]
    big += np.linspace(0.0, 50.0, 256, dtype=np.float32)[:, None, None]
    nib.save(nib.Nifti1Image(big, src.affine), r.studies / "large_256.nii.gz")
    conf = {"models": "unet3d", "preset": "tiny", "roi_size": "16", "tracking": "none"}
    with r.serve(conf) as srv:
        r.server = srv
        yield r


def test_next_study_on_a_256x256x128_study_is_fast(large: Remote) -> None:
    rep = large.run_client("timing")
    first, second = rep["runs"]
    server_file = large.studies / "large_256.nii.gz"
    assert first["id"] == second["id"] == "large_256"
    assert first["download"]["cached"] is False and second["download"]["cached"] is True
    assert first["download"]["bytes"] == server_file.stat().st_size
    assert sha256_of(first["images"][0]) == sha256_of(str(server_file))
    assert nib.load(first["images"][0]).shape == (256, 256, 128)
    mib = server_file.stat().st_size / 2**20
    print(
        f"\nNext study on 256x256x128 float32 ({mib:.1f} MiB .nii.gz) over loopback: "
        f"first {first['seconds']:.3f} s (download+SHA-256+cache {first['download']['seconds']:.3f} s), "
        f"cached {second['seconds']:.3f} s (check {second['download']['seconds']:.3f} s); "
        f"limit {NEXT_STUDY_LIMIT_S} s; then reading it into an MRML scene {rep['scene_load_s']:.3f} s"
    )
    assert first["seconds"] <= NEXT_STUDY_LIMIT_S and second["seconds"] <= first["seconds"]


# ---- login against a realm ----------------------------------------------------------------------
class ShortTokenRealm(StandInRealm):
    """The stand-in realm, issuing tokens of ``lifetime`` seconds and counting password grants."""

    lifetime = 300.0
    grants = 0

    def mint(self, username: str, roles: list[str], *, expires_in: float | None = None, **kw: Any) -> str:
        if expires_in is None and "key" not in kw:  # the token endpoint's call
            self.grants += 1
            expires_in = self.lifetime
        return super().mint(username, roles, expires_in=300 if expires_in is None else expires_in, **kw)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, slicer_python: Path) -> Iterator[tuple[Remote, ShortTokenRealm]]:
    users = {"annotator1": ("pw-annotator", [ROLES["annotator"]])}
    with ShortTokenRealm(users) as realm:
        r = Remote(tmp_path_factory.mktemp("secured"))
        shutil.copytree(SAMPLE / "studies", r.studies, dirs_exist_ok=True)
        env = {
            "MONAI_LABEL_AUTH_ENABLE": "true",
            "MONAI_LABEL_AUTH_REALM_URI": realm.uri,
            "MONAI_LABEL_AUTH_CLIENT_ID": CLIENT_ID,
        }
        with r.serve(SAMPLE_CONF, env=env) as srv:
            r.server = srv
            yield r, realm


def test_login_with_signed_tokens_renewal_and_plain_words(secured: tuple[Remote, ShortTokenRealm]) -> None:
    remote, realm = secured
    realm.lifetime = 45.0  # renewed 30 s before expiry: after ~15 s
    bad = realm.mint("annotator1", [ROLES["annotator"]], key=new_key())  # valid for 300 s, wrong signature
    refused = requests.get(f"{remote.url}/info/", headers={"Authorization": f"Bearer {bad}"}, timeout=30)
    assert refused.status_code == 401
    grants = realm.grants
    rep = remote.run_client("auth", {"user": "annotator1", "password": "pw-annotator", "bad_token": bad})
    assert rep["not_logged_in"].startswith("401") and "log in" in rep["not_logged_in"]
    assert rep["wrong_password"] == "401: the user name or password is wrong"
    assert rep["login"]["username"] == "annotator1" and 30 < rep["login"]["expires_in"] <= 45
    assert rep["logins_after_login"] == 1
    assert rep["segment"]["submit"]["image"] == rep["next"]
    assert (remote.studies / "labels" / "final" / f"{rep['next']}.nii.gz").exists()
    assert rep["train_forbidden"].startswith("403") and "may not" in rep["train_forbidden"]
    assert rep["renewed_before_expiry"] == {"logins": 1, "token_changed": True}
    assert rep["renewed_after_401"] == {"logins": 1, "token_changed": True}
    assert rep["after_logout"].startswith("401")
    assert realm.grants - grants == 3  # login, renewal before expiry, renewal after the 401

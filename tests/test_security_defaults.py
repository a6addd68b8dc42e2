"""Safe defaults of a real server with authentication off (MONAI Label's default): no admin surface,
no server paths through the API, predictions never stored as final labels, a CORS allow-list."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
from collections.abc import Iterator

import pytest
import requests

from conftest import APP_DIR, ROOT, Server, running_server

SAMPLE_MODEL = ROOT / "sample" / "models" / "unet3d_hippocampus_small.pt"
VIEWER = "http://viewer.hospital.example:3000"


def sample_server(tmp_path_factory: pytest.TempPathFactory, name: str, **extra: str) -> Iterator[Server]:
    base = tmp_path_factory.mktemp(name)
    studies = base / "studies"
    shutil.copytree(ROOT / "sample" / "studies", studies)
    conf = {
        "models": "unet3d",
        "preset": "small",
        "roi_size": "40,56,40",
        "unet3d.pretrained": str(SAMPLE_MODEL),
        "model_dir": str(base / "model"),
        "tracking": "none",
        "auto_retrain_after": "0",
        **extra,
    }
    with running_server(studies, conf, base / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from sample_server(tmp_path_factory, "locked", cors_origins=VIEWER)


@pytest.fixture(scope="module")
def trusted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from sample_server(tmp_path_factory, "trusted", admin_without_auth="true")


ADMIN_CALLS = [
    ("GET", "/model/unet3d", {}),
    ("PUT", "/model/unet3d", {"files": {"file": ("m.pt", b"not a model")}}),
    ("DELETE", "/model/unet3d", {}),
    ("GET", "/logs/", {}),
    ("DELETE", "/datastore/image", {"params": {"id": "hippocampus_003"}}),
    ("DELETE", "/datastore/label", {"params": {"id": "hippocampus_003", "tag": "final"}}),
    ("PUT", "/session/", {"files": {"files": ("x.tar", b"tar")}, "params": {"uncompress": "true"}}),
]


@pytest.mark.parametrize("method,path,kwargs", ADMIN_CALLS, ids=[f"{m} {p}" for m, p, _ in ADMIN_CALLS])
def test_admin_surface_is_refused_while_auth_is_off(locked: Server, method: str, path: str, kwargs: dict) -> None:
    label = locked.studies / "labels" / "final" / "hippocampus_003.nii.gz"
    before = label.read_bytes()
    r = requests.request(method, f"{locked.url}{path}", timeout=30, **kwargs)
    assert r.status_code == 403, r.text
    assert "admin endpoint" in r.json()["detail"] and "admin_without_auth" in r.json()["detail"]
    assert label.read_bytes() == before and (locked.studies / "hippocampus_003.nii.gz").exists()
    assert requests.get(f"{locked.url}/info/", timeout=30).json()["models"]["unet3d"]["ready"] is True


def test_admin_surface_can_be_opened_explicitly(trusted: Server) -> None:
    assert requests.get(f"{trusted.url}/logs/", timeout=30).status_code == 200


def test_no_server_paths_and_no_predictions_as_final_labels(locked: Server) -> None:
    url = f"{locked.url}/infer/unet3d"
    final = locked.studies / "labels" / "final" / "hippocampus_003.nii.gz"
    before = final.read_bytes()
    cases = [
        ({"image": str(locked.studies / "hippocampus_003.nii.gz")}, {}, "invalid image id"),
        ({"image": "hippocampus_003"}, {"image": "/etc/passwd"}, "unknown parameter"),
        ({"image": "hippocampus_003"}, {"save_label": True, "label_tag": "final"}, "unknown parameter"),
        ({"image": "hippocampus_003"}, {"result_extension": "/../../x.nii.gz"}, "result_extension"),
    ]
    for query, params, words in cases:
        r = requests.post(url, params={**query, "output": "json"}, data={"params": json.dumps(params)}, timeout=60)
        assert r.status_code == 422, (query, params, r.text)
        assert words in r.json()["detail"]
        assert str(locked.studies) not in r.text
    r = requests.post(f"{locked.url}/infer/wsi/unet3d", params={"image": "/etc/passwd"}, timeout=30)
    assert r.status_code == 404 and "WSI" in r.json()["detail"]
    assert final.read_bytes() == before


def test_cors_answers_only_listed_origins(locked: Server) -> None:
    r = requests.get(f"{locked.url}/info/", headers={"Origin": "http://evil.example"}, timeout=30)
    assert r.status_code == 200
    assert not any(k.lower().startswith("access-control-") for k in r.headers)
    pre = {"Origin": "http://evil.example", "Access-Control-Request-Method": "PUT"}
    r = requests.options(f"{locked.url}/datastore/label", headers=pre, timeout=30)
    assert r.status_code == 403 and "not allowed" in r.json()["detail"]
    r = requests.get(f"{locked.url}/info/", headers={"Origin": VIEWER}, timeout=30)
    assert r.headers["access-control-allow-origin"] == VIEWER
    assert r.headers["access-control-allow-credentials"] == "true"
    r = requests.options(f"{locked.url}/datastore/label", headers={**pre, "Origin": VIEWER}, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == VIEWER


def test_loud_warning_when_listening_beyond_loopback_without_auth(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("unet_seg_app_main", APP_DIR / "main.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    from lib.serving.security import SecurityConf

    off = SecurityConf(auth_enabled=False, admin_without_auth=False, cors_origins=frozenset())
    monkeypatch.setattr(sys, "argv", ["monailabel", "start_server", "--host", "0.0.0.0"])
    with caplog.at_level(logging.WARNING):
        module.warn_if_exposed(off)
    assert "AUTHENTICATION OFF" in caplog.text and "0.0.0.0" in caplog.text
    caplog.clear()
    monkeypatch.setattr(sys, "argv", ["monailabel", "start_server", "--host", "127.0.0.1"])
    with caplog.at_level(logging.WARNING):
        module.warn_if_exposed(off)
    assert "AUTHENTICATION OFF" not in caplog.text


def tar_bytes(members: list[tuple[str, bytes | None, str | None]]) -> bytes:
    """A tar archive of (name, data or None for a symlink, link target)."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data, target in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.linkname = tarfile.SYMTYPE, target or "/etc/passwd"
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_session_archives_extract_only_regular_files_inside(
    trusted: Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    image = (ROOT / "sample" / "studies" / "hippocampus_015.nii.gz").read_bytes()
    url = f"{trusted.url}/session/"
    cases = {
        "dotdot": ([("../../escaped.nii.gz", image, None)], "outside"),
        "absolute": ([("/tmp/escaped_abs.nii.gz", image, None)], "outside"),
        "symlink": ([("link.nii.gz", None, "/etc/passwd")], "not a regular file"),
    }
    for name, (members, words) in cases.items():
        r = requests.put(
            url, params={"uncompress": "true"}, files={"files": (f"{name}.tar", tar_bytes(members))}, timeout=60
        )
        assert r.status_code == 422, (name, r.text)
        assert words in r.json()["detail"], (name, r.text)
    r = requests.put(url, params={"uncompress": "true"}, files={"files": ("x.tar", b"not an archive")}, timeout=60)
    assert r.status_code == 422 and "not a zip or tar" in r.json()["detail"]
    r = requests.put(
        url,
        params={"uncompress": "true"},
        files={"files": ("ok.tar", tar_bytes([("case.nii.gz", image, None)]))},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    session = r.json()
    assert "path" not in session["session_info"] and "image" not in session["session_info"]
    r = requests.post(
        f"{trusted.url}/infer/unet3d", params={"session_id": session["session_id"], "output": "json"}, timeout=120
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("tag", ["../final", "a/b", "final/../../x", "t" * 300, "fin\tal", ".hidden"])
def test_label_tags_are_names_not_paths(locked: Server, tag: str) -> None:
    label = locked.studies / "labels" / "final" / "hippocampus_003.nii.gz"
    before = label.read_bytes()
    r = requests.put(
        f"{locked.url}/datastore/label",
        params={"image": "hippocampus_003", "tag": tag},
        files={"label": ("l.nii.gz", before)},
        timeout=60,
    )
    assert r.status_code == 422, r.text
    assert "invalid label tag" in r.json()["detail"]
    assert label.read_bytes() == before
    assert sorted(p.name for p in (locked.studies / "labels").iterdir()) == ["final", "original"]


@pytest.mark.parametrize("image_id", ["a\x00b", "x" * 201, "-leading-dash", "a b"])
def test_image_ids_are_bounded_plain_names(locked: Server, image_id: str) -> None:
    r = requests.put(
        f"{locked.url}/datastore/image",
        params={"image": image_id},
        files={"file": ("x.nii.gz", (locked.studies / "hippocampus_015.nii.gz").read_bytes())},
        timeout=60,
    )
    assert r.status_code == 422 and "invalid image id" in r.json()["detail"], r.text

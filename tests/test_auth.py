"""Authentication and the role matrix on a REAL server against a stand-in OIDC realm on 127.0.0.1.

Tokens are RS256 JWTs signed by the realm (tests/realm.py); MONAI Label 0.8.5's own check refuses
every such token with current PyJWT, so these tests also prove the app's replacement works.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from collections.abc import Iterator

import nibabel as nib
import numpy as np
import pytest
import requests

from conftest import ROOT, Server, running_server
from realm import CLIENT_ID, ROLES, StandInRealm, new_key

sys.path.insert(0, str(ROOT / "slicer_module" / "UNetSeg"))
from UNetSegLib.client import ServerError, UNetSegClient  # noqa: E402

SAMPLE_MODEL = ROOT / "sample" / "models" / "unet3d_hippocampus_small.pt"
LEVELS = ["user", "annotator", "reviewer", "admin"]
USERS = {f"{level}1": ("pw-" + level, [ROLES[level]]) for level in LEVELS}


@pytest.fixture(scope="module")
def realm() -> Iterator[StandInRealm]:
    with StandInRealm(USERS) as r:
        yield r


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, realm: StandInRealm) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("auth")
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
    }
    env = {
        "MONAI_LABEL_AUTH_ENABLE": "true",
        "MONAI_LABEL_AUTH_REALM_URI": realm.uri,
        "MONAI_LABEL_AUTH_CLIENT_ID": CLIENT_ID,
    }
    with running_server(studies, conf, base / "server.log", env=env) as srv:
        yield srv


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def label_bytes(server: Server, image_id: str) -> bytes:
    img = nib.load(server.studies / f"{image_id}.nii.gz")
    lab = np.zeros(img.shape, np.uint8)
    lab[10:14, 10:14, 10:14] = 1
    return gzip.compress(nib.Nifti1Image(lab, img.affine).to_bytes())


def test_public_endpoints_and_the_server_starts_with_auth_on(secured: Server) -> None:
    assert requests.get(f"{secured.url}/auth/", timeout=30).json()["enabled"] is True


@pytest.mark.parametrize("why", ["none", "garbage", "expired", "wrong_key", "wrong_issuer", "wrong_audience", "no_exp"])
def test_bad_tokens_are_401(secured: Server, realm: StandInRealm, why: str) -> None:
    admin = [ROLES["admin"]]
    tokens = {
        "none": None,
        "garbage": "not.a.token",
        "expired": realm.mint("admin1", admin, expires_in=-120),  # beyond the 30 s clock-skew allowance
        "wrong_key": realm.mint("admin1", admin, key=new_key()),
        "wrong_issuer": realm.mint("admin1", admin, issuer="http://127.0.0.1:1/realms/other"),
        "wrong_audience": realm.mint("admin1", admin, audience="another-app"),
        "no_exp": realm.mint("admin1", admin, exp=None),
    }
    token = tokens[why]
    r = requests.get(f"{secured.url}/info/", headers=bearer(token) if token else {}, timeout=30)
    assert r.status_code == 401, r.text
    assert "WWW-Authenticate" in r.headers
    assert "token" in r.json()["detail"]


def test_small_clock_skew_is_accepted(secured: Server, realm: StandInRealm) -> None:
    token = realm.mint("user1", [ROLES["user"]], expires_in=-10)
    assert requests.get(f"{secured.url}/info/", headers=bearer(token), timeout=30).status_code == 200


# (method, path, request kwargs, role the default matrix requires)
MATRIX = [
    ("GET", "/info/", {}, "user"),
    ("GET", "/datastore/", {"params": {"output": "stats"}}, "user"),
    ("GET", "/datastore/image", {"params": {"image": "hippocampus_015"}}, "user"),
    (
        "POST",
        "/infer/unet3d",
        {"params": {"image": "hippocampus_015", "output": "json"}, "data": {"params": "{}"}},
        "user",
    ),
    ("POST", "/activelearning/first", {"json": {}}, "user"),
    ("GET", "/train/", {}, "user"),
    ("PUT", "/datastore/image", {"params": {"image": "auth_upload"}, "files": "IMAGE"}, "annotator"),
    (
        "PUT",
        "/datastore/label",
        {"params": {"image": "hippocampus_020", "tag": "final"}, "files": "LABEL"},
        "annotator",
    ),
    ("POST", "/scoring/nosuch", {"json": {}}, "annotator"),
    ("POST", "/train/nosuch", {"json": {}}, "reviewer"),
    ("DELETE", "/train/", {}, "reviewer"),
    ("GET", "/logs/", {}, "admin"),
    ("GET", "/model/unet3d", {}, "admin"),
    ("PUT", "/session/", {"files": {"files": ("x.nii.gz", b"x")}}, "admin"),
    ("DELETE", "/datastore/image", {"params": {"id": "auth_upload"}}, "admin"),
]


@pytest.mark.parametrize("method,path,kwargs,role", MATRIX, ids=[f"{m} {p} {r}" for m, p, _, r in MATRIX])
def test_role_matrix(secured: Server, realm: StandInRealm, method: str, path: str, kwargs: dict, role: str) -> None:
    def send(token: str | None) -> requests.Response:
        kw = dict(kwargs)
        if kw.get("files") == "IMAGE":
            kw["files"] = {"file": ("a.nii.gz", (secured.studies / "hippocampus_015.nii.gz").read_bytes())}
        elif kw.get("files") == "LABEL":
            kw["files"] = {"label": ("l.nii.gz", label_bytes(secured, "hippocampus_020"))}
        return requests.request(
            method, f"{secured.url}{path}", headers=bearer(token) if token else {}, timeout=120, **kw
        )

    assert send(None).status_code == 401
    level = LEVELS.index(role)
    no_roles = send(realm.mint("nobody", []))
    assert no_roles.status_code == 403, no_roles.text
    if level > 0:
        below = send(realm.mint(f"{LEVELS[level - 1]}1", [ROLES[LEVELS[level - 1]]]))
        assert below.status_code == 403, below.text
        assert ROLES[role] in below.json()["detail"]
    allowed = send(realm.mint(f"{role}1", [ROLES[role]]))
    assert allowed.status_code not in (401, 403), allowed.text
    assert allowed.status_code < 500, allowed.text


def test_replacing_a_final_label_needs_a_reviewer(secured: Server, realm: StandInRealm) -> None:
    stored = secured.studies / "labels" / "final" / "hippocampus_003.nii.gz"
    before = stored.read_bytes()
    files = {"label": ("l.nii.gz", label_bytes(secured, "hippocampus_003"))}
    r = requests.put(
        f"{secured.url}/datastore/label",
        params={"image": "hippocampus_003", "tag": "final"},
        files=files,
        headers=bearer(realm.mint("annotator1", [ROLES["annotator"]])),
        timeout=60,
    )
    assert r.status_code == 403 and "replacing the final label" in r.json()["detail"]
    assert stored.read_bytes() == before
    r = requests.put(
        f"{secured.url}/datastore/label",
        params={"image": "hippocampus_003", "tag": "final"},
        files=files,
        headers=bearer(realm.mint("reviewer1", [ROLES["reviewer"]])),
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert stored.read_bytes() != before


def test_login_through_the_server_and_the_client(secured: Server) -> None:
    r = requests.post(f"{secured.url}/auth/token", data={"username": "annotator1", "password": "wrong"}, timeout=30)
    assert r.status_code == 401 and "invalid user name or password" in r.json()["detail"]
    client = UNetSegClient(secured.url)
    with pytest.raises(ServerError) as e:
        client.info()
    assert e.value.status == 401 and "log in" in str(e.value)
    with pytest.raises(ServerError) as e:
        client.login("annotator1", "wrong")
    assert e.value.status == 401
    client.login("annotator1", "pw-annotator")
    assert "unet3d" in client.info()["models"]
    with pytest.raises(ServerError) as e:
        client.train_start("unet3d", max_epochs=1)
    assert e.value.status == 403 and "may not" in str(e.value)
    token = requests.post(
        f"{secured.url}/auth/token", data={"username": "user1", "password": "pw-user"}, timeout=30
    ).json()
    assert requests.get(f"{secured.url}/info/", headers=bearer(token["access_token"]), timeout=30).status_code == 200
    assert json.dumps(token).count(".") >= 2  # a JWT came back

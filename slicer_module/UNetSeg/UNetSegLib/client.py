"""REST client for a unet_seg (MONAI Label) server, used by the Slicer module and scripts.

Remote by design: the client never reads a server path. Studies and labels come over HTTP
(``GET /datastore/image`` / ``/datastore/label``), checked against the server's size and SHA-256
(``check_only=true`` first, so a cached copy whose checksum matches is reused), written to a
temporary file and renamed into the cache only once verified. A multi-channel study (one 4D NIfTI,
channels last) arrives as one 3D volume per channel.

Every call has a timeout; HTTP errors become ``ServerError`` carrying the server's own message
(``detail``) in plain words. Logging in keeps the user name, password and token in memory only;
the token is renewed when it is within ``REFRESH_MARGIN_S`` of its expiry (read from the JWT's
``exp`` without verifying it: the server verifies) and once more after a 401. Multipart replies of
``/infer`` are parsed with the standard library's email parser (``cgi`` is gone from Python 3.13).
"""

from __future__ import annotations

import base64
import email.message
import email.parser
import email.policy
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from typing import Any

import requests

from . import nifti

REFRESH_MARGIN_S = 30.0
CHUNK = 1 << 20
IDENTITY = {"Accept-Encoding": "identity"}  # byte counts and checksums are of the file as stored
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
FILE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd", ".png", ".tif", ".tiff", ".dcm")


class ServerError(RuntimeError):
    """The server answered with an error (``status`` is the HTTP code, the message is its detail)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Parts of a multipart/form-data reply: ``{field name: (file name or None, payload bytes)}``."""
    if not content_type.lower().startswith("multipart/"):
        raise ValueError(f"not a multipart reply: {content_type!r}")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    parts: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        parts[str(name)] = (filename, part.get_payload(decode=True) or b"")
    return parts


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim (epoch seconds) of a JWT, read WITHOUT verifying it; None if it has none."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if exp is not None else None
    except (IndexError, ValueError, TypeError, AttributeError):
        return None


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def file_extension(name: str) -> str:
    """``.nii.gz`` for ``x.nii.gz``; the last suffix otherwise."""
    low = name.lower()
    for ext in (".nii.gz", ".seg.nrrd"):
        if low.endswith(ext):
            return name[-len(ext) :]
    return os.path.splitext(name)[1]


def model_versions(info: dict) -> dict[str, list[dict]]:
    """``{model: [{id, state, serving, mean_dice, per_class, created}, ...]}`` from /info.

    Uses /info's ``model_versions`` when the server sends it; otherwise the per-model ``versions``
    list (with the serving version's per-class Dice from ``version``).
    """
    if isinstance(info.get("model_versions"), dict):
        out = {}
        for model, rows in info["model_versions"].items():
            out[model] = [
                {
                    "id": r.get("id"),
                    "state": r.get("state"),
                    "serving": bool(r.get("serving", r.get("state") == "serving")),
                    "mean_dice": r.get("mean_dice", r.get("val_mean_dice")),
                    "per_class": dict(r.get("per_class") or r.get("val_dice_per_class") or {}),
                    "created": r.get("created"),
                }
                for r in rows
            ]
        return out
    out = {}
    for model, m in {**info.get("models", {}), **info.get("models_not_ready", {})}.items():
        serving = m.get("version") or {}
        out[model] = [
            {
                "id": r.get("id"),
                "state": r.get("state"),
                "serving": r.get("state") == "serving",
                "mean_dice": r.get("val_mean_dice"),
                "per_class": dict(serving.get("val_dice_per_class") or {})
                if r.get("id") == serving.get("version")
                else {},
                "created": r.get("created"),
            }
            for r in m.get("versions", [])
        ]
    return out


def declared_modalities(model_info: dict) -> list[str] | None:
    """The input channels a model's /info entry declares, by name: ``modalities`` (names) or
    ``channels`` / ``in_channels`` (a count, named ``channel0..``); None when it declares neither."""
    names = model_info.get("modalities")
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    count = model_info.get("channels", model_info.get("in_channels"))
    if isinstance(count, int) and count >= 1:
        return [f"channel{i}" for i in range(count)] if count > 1 else ["image"]
    return None


def model_modalities(model_info: dict) -> list[str]:
    """The input channels a model takes, by name (``["image"]`` for one channel or when /info does not say)."""
    return declared_modalities(model_info) or ["image"]


class UNetSegClient:
    """Thin, timeout-bounded wrapper over the MONAI Label REST API of a unet_seg server."""

    def __init__(self, url: str, timeout: float = 30.0, infer_timeout: float = 600.0, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.infer_timeout = infer_timeout
        self.token = token  # kept in memory only
        self.token_expires_at: float | None = token_expiry(token) if token else None
        self._credentials: tuple[str, str] | None = None  # in memory only, to renew the token
        self._login_lock = threading.Lock()
        self.logins = 0  # how many tokens were obtained (first login and renewals)
        self.last_download: dict[str, Any] = {}
        self.session = requests.Session()  # keep-alive: one connection for the many small calls

    # ---- login ------------------------------------------------------------------------------
    def login(self, username: str, password: str) -> dict:
        """Get an access token through the server's ``/auth/token`` (the realm checks the password).

        The credentials stay in this object's memory (never on disk) so the token can be renewed.
        Returns ``{"username", "expires_in"}``.
        """
        with self._login_lock:
            self._credentials = None
            self.token = self.token_expires_at = None
            self._fetch_token(username, password)
            self._credentials = (username, password)
        left = self.token_expires_at - time.time() if self.token_expires_at else None
        return {"username": username, "expires_in": left}

    def logout(self) -> None:
        with self._login_lock:
            self._credentials = None
            self.token = self.token_expires_at = None

    @property
    def logged_in(self) -> bool:
        return self._credentials is not None

    def _fetch_token(self, username: str, password: str) -> None:
        try:
            r = self._send("POST", "/auth/token", data={"username": username, "password": password})
        except ServerError as e:
            if e.status == 401:
                raise ServerError(401, "401: the user name or password is wrong") from e
            raise
        body = r.json()
        if not body.get("access_token"):
            raise ServerError(0, "the server has authentication switched off; no login needed")
        self.token = str(body["access_token"])
        self.token_expires_at = token_expiry(self.token)
        if self.token_expires_at is None and body.get("expires_in"):
            self.token_expires_at = time.time() + float(body["expires_in"])
        self.logins += 1

    def _renew(self, stale: str | None) -> bool:
        """Log in again with the remembered credentials (unless another thread already did)."""
        with self._login_lock:
            if self._credentials is None:
                return False
            if self.token != stale:
                return True
            self._fetch_token(*self._credentials)
            return True

    def _token_for_request(self) -> str | None:
        token, exp = self.token, self.token_expires_at
        if token and self._credentials and exp is not None and exp - time.time() < REFRESH_MARGIN_S:
            self._renew(token)
            token = self.token
        return token

    # ---- HTTP -------------------------------------------------------------------------------
    def _send(self, method: str, path: str, timeout: float | None = None, **kwargs: Any) -> requests.Response:
        """One request with the current token (if any); ``ServerError`` in plain words for errors."""
        try:
            r = self.session.request(method, f"{self.url}{path}", timeout=timeout or self.timeout, **kwargs)
        except requests.Timeout as e:
            raise ServerError(
                0, f"the server at {self.url} did not answer within {timeout or self.timeout:.0f} s"
            ) from e
        except requests.ConnectionError as e:
            raise ServerError(0, f"cannot reach the server at {self.url}: is it running?") from e
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            finally:
                r.close()
            if r.status_code == 401:
                detail = f"not logged in or the login expired ({detail}); log in again"
            elif r.status_code == 403:
                detail = f"your account may not do this ({detail})"
            raise ServerError(r.status_code, f"{r.status_code}: {detail}")
        return r

    def _call(self, method: str, path: str, timeout: float | None = None, **kwargs: Any) -> requests.Response:
        """``_send`` with the token; after a 401 the token is renewed once and the request repeated."""
        base = dict(kwargs.pop("headers", None) or {})
        for attempt in (0, 1):
            token = self._token_for_request()
            headers = dict(base, **({"Authorization": f"Bearer {token}"} if token else {}))
            try:
                return self._send(method, path, timeout, headers=headers, **kwargs)
            except ServerError as e:
                if e.status != 401 or attempt or not self._renew(token):
                    raise
                for value in (kwargs.get("files") or {}).values():  # the retry sends the files again
                    f = value[1] if isinstance(value, tuple) else value
                    if hasattr(f, "seek"):
                        f.seek(0)
        raise AssertionError("unreachable")

    # ---- server state -----------------------------------------------------------------------
    def info(self) -> dict:
        """/info: models (ready ones), models_not_ready, labels, strategies, train stats."""
        return self._call("GET", "/info/").json()

    def models(self, info: dict | None = None) -> dict[str, dict]:
        """Every model the server knows, ready or not, with its ``ready`` flag and label map.

        From ``info`` if given.
        """
        info = info if info is not None else self.info()
        out = {name: dict(m, ready=True) for name, m in info.get("models", {}).items()}
        out.update({name: dict(m, ready=False) for name, m in info.get("models_not_ready", {}).items()})
        return out

    def model_versions(self, info: dict | None = None) -> dict[str, list[dict]]:
        return model_versions(info if info is not None else self.info())

    # ---- annotation loop --------------------------------------------------------------------
    def next_sample(self, strategy: str = "uncertainty", **params: Any) -> dict:
        """The next study to annotate (``{}`` when none is left); a server path, if any is sent, is dropped."""
        res = self._call("POST", f"/activelearning/{strategy}", json=params, timeout=self.infer_timeout).json()
        if isinstance(res, dict):
            res.pop("path", None)
        return res

    def infer(self, model: str, image_id: str, out_path: str, **params: Any) -> tuple[str, dict]:
        """Segment a stored study; writes the label file to ``out_path`` and returns it with the result JSON."""
        r = self._call(
            "POST",
            f"/infer/{model}",
            params={"image": image_id, "output": "all"},
            data={"params": json.dumps(params)},
            timeout=self.infer_timeout,
        )
        parts = parse_multipart(r.headers.get("content-type", ""), r.content)
        meta = json.loads(parts["params"][1] or b"{}")
        filename, payload = parts["image"]
        if filename and not os.path.splitext(out_path)[1]:
            out_path += file_extension(filename)
        with open(out_path, "wb") as f:
            f.write(payload)
        return out_path, meta

    def upload_image(self, image_id: str, path: str, **params: Any) -> dict:
        """Store a new image (``params`` e.g. ``overwrite=True``); 409 when the id exists."""
        check_id(image_id)
        with open(path, "rb") as f:
            return self._call(
                "PUT",
                "/datastore/image",
                params={"image": image_id},
                files={"file": (os.path.basename(path), f)},
                data={"params": json.dumps(params)},
                timeout=self.infer_timeout,
            ).json()

    def submit_label(self, image_id: str, path: str, label_info: list[dict] | None = None, tag: str = "final") -> dict:
        """Store a (corrected) label; the reply says whether automatic retraining started."""
        params = {"label_info": label_info} if label_info else {}
        with open(path, "rb") as f:
            return self._call(
                "PUT",
                "/datastore/label",
                params={"image": image_id, "tag": tag},
                files={"label": (os.path.basename(path), f)},
                data={"params": json.dumps(params)},
                timeout=self.infer_timeout,
            ).json()

    # ---- downloads (checked, cached) ----------------------------------------------------------
    def image_check(self, image_id: str) -> dict | None:
        """``{image, name, size, sha256}`` of a stored image (``check_only``); None if the server lacks it."""
        return self._check("/datastore/image", {"image": check_id(image_id)})

    def label_check(self, image_id: str, tag: str = "final") -> dict | None:
        return self._check("/datastore/label", {"label": check_id(image_id), "tag": check_id(tag, "label tag")})

    def _check(self, path: str, params: dict) -> dict | None:
        r = self._call("GET", path, params={**params, "check_only": "true"}, stream=True, headers=IDENTITY)
        try:
            if not r.headers.get("content-type", "").startswith("application/json"):
                return None  # a server without check_only sent the file itself
            return r.json()
        finally:
            r.close()

    def download_image(self, image_id: str, cache_dir: str, channel_names: list[str] | None = None) -> list[str]:
        """The stored image ``image_id`` as local file(s): ``[path]``, or one 3D NIfTI per channel.

        ``check_only`` first: a cached copy whose SHA-256 matches is reused; otherwise the file is
        downloaded to a temporary name, its size and SHA-256 checked, then renamed into place. A
        channels-last 4D NIfTI is split into ``<id>_<channel name>.nii`` files (names from
        ``channel_names`` when their count matches, else ``channel0..``) with the same affine.
        ``self.last_download`` says what happened (``cached``, ``bytes``, ``seconds``).
        """
        path = self._fetch("/datastore/image", {"image": check_id(image_id)}, os.path.join(cache_dir, "images"))
        if not nifti.is_nifti(path):
            return [path]
        channels = nifti.channel_count(nifti.read_header(path))
        if channels == 1:
            return [path]
        names = channel_names if channel_names and len(channel_names) == channels else None
        names = [safe_part(n) for n in (names or [f"channel{i}" for i in range(channels)])]
        return self._split(path, image_id, names)

    def download_label(self, image_id: str, cache_dir: str, tag: str = "final") -> str:
        """The stored label (``tag``) of ``image_id`` as a local file, checked and cached like images."""
        return self._fetch(
            "/datastore/label",
            {"label": check_id(image_id), "tag": check_id(tag, "label tag")},
            os.path.join(cache_dir, "labels", tag),
        )

    def _fetch(self, path: str, params: dict, folder: str) -> str:
        t0 = time.perf_counter()
        os.makedirs(folder, exist_ok=True)
        key = next(iter(params.values()))
        check = self._check(path, params)
        if check is not None:
            name = safe_name(str(check.get("name") or ""), key)
            target = os.path.join(folder, name)
            if (
                os.path.exists(target)
                and os.path.getsize(target) == int(check["size"])
                and sha256_of(target) == check["sha256"]
            ):
                self.last_download = {
                    "cached": True,
                    "bytes": 0,
                    "seconds": time.perf_counter() - t0,
                    "sha256": check["sha256"],
                    "path": target,
                }
                return target
        r = self._call("GET", path, params=params, stream=True, timeout=self.infer_timeout, headers=IDENTITY)
        try:
            name = safe_name(disposition_name(r.headers.get("content-disposition", "")), key)
            if check is not None and name != safe_name(str(check.get("name") or ""), key):
                raise ServerError(0, f"{key}: the server sent {name!r}, its check named {check.get('name')!r}")
            target = os.path.join(folder, name)
            expected_sha = r.headers.get("x-image-sha256") or (check or {}).get("sha256")
            expected_size = r.headers.get("content-length") or (check or {}).get("size")
            h, size = hashlib.sha256(), 0
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out:
                    for block in r.iter_content(CHUNK):
                        h.update(block)
                        size += len(block)
                        out.write(block)
                if expected_size is not None and size != int(expected_size):
                    raise ServerError(0, f"{key}: download incomplete ({size} of {expected_size} bytes); try again")
                if expected_sha and h.hexdigest() != expected_sha.lower():
                    raise ServerError(0, f"{key}: the download does not match the server's checksum; try again")
                if check is not None and check.get("sha256") and h.hexdigest() != check["sha256"]:
                    raise ServerError(0, f"{key}: the file changed on the server while downloading; try again")
                os.replace(tmp, target)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
        finally:
            r.close()
        self.last_download = {
            "cached": False,
            "bytes": size,
            "seconds": time.perf_counter() - t0,
            "sha256": h.hexdigest(),
            "verified": "sha256" if expected_sha else "size",
            "path": target,
        }
        return target

    def _split(self, path: str, image_id: str, names: list[str]) -> list[str]:
        """Per-channel volumes of a cached 4D study, re-split only when the study's checksum changed."""
        folder = f"{path}.channels"
        manifest = os.path.join(folder, "manifest.json")
        sha = self.last_download.get("sha256") or sha256_of(path)
        outs = [os.path.join(folder, f"{image_id}_{n}.nii") for n in names]
        try:
            with open(manifest) as f:
                if json.load(f) == {"sha256": sha, "files": outs} and all(os.path.exists(o) for o in outs):
                    return outs
        except (OSError, ValueError):
            pass
        os.makedirs(folder, exist_ok=True)
        nifti.split_channels(path, outs)
        with open(f"{manifest}.part", "w") as f:
            json.dump({"sha256": sha, "files": outs}, f)
        os.replace(f"{manifest}.part", manifest)
        return outs

    # ---- training ---------------------------------------------------------------------------
    def train_start(self, model: str, **params: Any) -> dict:
        return self._call("POST", f"/train/{model}", json=params).json()

    def train_status(self) -> dict:
        """Status of the running or last training (``{}`` when none ever ran)."""
        r = self._call("GET", "/train/")
        return r.json() if r.content else {}

    def train_stop(self) -> dict:
        return self._call("DELETE", "/train/").json()

    # ---- batch pre-annotation -----------------------------------------------------------------
    def batch_infer(
        self, model: str, images: str = "unlabeled", image_ids: list[str] | None = None, **params: Any
    ) -> dict:
        """Start pre-annotating ``images`` (unlabeled | all | labeled, or the listed ids): ``{job, total}``."""
        body = dict(params, **({"image_ids": [check_id(i) for i in image_ids]} if image_ids else {}))
        return self._call("POST", f"/batch/infer/{model}", params={"images": images}, json=body).json()

    def batch_status(self) -> dict:
        """``{status, model, total, done, failed, skipped, elapsed_s, per_minute, errors}`` (``{}`` if none ran)."""
        r = self._call("GET", "/batch/infer/")
        return r.json() if r.content else {}

    def batch_stop(self) -> dict:
        """Stop the running pre-annotation after the image in progress."""
        r = self._call("DELETE", "/batch/infer/")
        return r.json() if r.content else {}


def check_id(value: str, what: str = "image id") -> str:
    """A datastore id usable as a file name (letters, digits, ``._-``); ``ValueError`` otherwise."""
    if not isinstance(value, str) or not SAFE_ID.match(value) or ".." in value:
        raise ValueError(f"invalid {what} {value!r}: use letters, digits, '.', '_' and '-' only")
    return value


def safe_part(text: str) -> str:
    """``text`` reduced to file-name characters (for channel names)."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._")
    return out[:60] or "channel"


def safe_name(name: str, key: str) -> str:
    """The cache file name for ``key``: the server's name if it is ``<key><known extension>``, else ``<key>.bin``."""
    base = os.path.basename(name or "")
    ext = file_extension(base)
    if base == f"{key}{ext}" and ext.lower() in FILE_EXTENSIONS:
        return base
    ext = ext if ext.lower() in FILE_EXTENSIONS else ".bin"
    return f"{key}{ext}"


def disposition_name(header: str) -> str:
    """The ``filename`` of a ``Content-Disposition`` header ('' if none)."""
    if not header:
        return ""
    msg = email.message.EmailMessage()
    msg["content-disposition"] = header
    return msg.get_filename() or ""

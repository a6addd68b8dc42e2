"""REST client for a unet_seg (MONAI Label) server, used by the Slicer module and scripts.

Every call has a timeout; HTTP errors become ``ServerError`` carrying the server's own message
(``detail``), so the module can show it in plain words. Multipart replies of ``/infer`` are parsed
with the standard library's email parser (``cgi`` is gone from Python 3.13).
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import os
from typing import Any

import requests


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


class UNetSegClient:
    """Thin, timeout-bounded wrapper over the MONAI Label REST API of a unet_seg server."""

    def __init__(self, url: str, timeout: float = 30.0, infer_timeout: float = 600.0, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.infer_timeout = infer_timeout
        self.token = token  # kept in memory only

    def login(self, username: str, password: str) -> None:
        """Get an access token through the server's ``/auth/token`` (the realm checks the password)."""
        self.token = None
        body = self._call("POST", "/auth/token", data={"username": username, "password": password}).json()
        if not body.get("access_token"):
            raise ServerError(0, "the server has authentication switched off; no login needed")
        self.token = str(body["access_token"])

    def _call(self, method: str, path: str, timeout: float | None = None, **kwargs: Any) -> requests.Response:
        if self.token:
            kwargs["headers"] = {**kwargs.get("headers", {}), "Authorization": f"Bearer {self.token}"}
        try:
            r = requests.request(method, f"{self.url}{path}", timeout=timeout or self.timeout, **kwargs)
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
            if r.status_code == 401:
                detail = f"not logged in or the login expired ({detail}); log in again"
            elif r.status_code == 403:
                detail = f"your account may not do this ({detail})"
            raise ServerError(r.status_code, f"{r.status_code}: {detail}")
        return r

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

    # ---- annotation loop --------------------------------------------------------------------
    def next_sample(self, strategy: str = "uncertainty", **params: Any) -> dict:
        """The next study to annotate (``{}`` when none is left)."""
        return self._call("POST", f"/activelearning/{strategy}", json=params, timeout=self.infer_timeout).json()

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
            out_path += "".join(s for s in (".nii.gz",) if filename.endswith(s)) or os.path.splitext(filename)[1]
        with open(out_path, "wb") as f:
            f.write(payload)
        return out_path, meta

    def upload_image(self, image_id: str, path: str) -> dict:
        with open(path, "rb") as f:
            return self._call(
                "PUT", "/datastore/image", params={"image": image_id}, files={"file": (os.path.basename(path), f)}
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
            ).json()

    # ---- training ---------------------------------------------------------------------------
    def train_start(self, model: str, **params: Any) -> dict:
        return self._call("POST", f"/train/{model}", json=params).json()

    def train_status(self) -> dict:
        """Status of the running or last training (``{}`` when none ever ran)."""
        r = self._call("GET", "/train/")
        return r.json() if r.content else {}

    def train_stop(self) -> dict:
        return self._call("DELETE", "/train/").json()

"""Server limits (``--conf`` keys with safe defaults) and the ASGI guard that enforces body sizes.

* ``max_upload_mb``  (1024) largest request body for uploads and /infer, enforced while the body
                     streams in: a declared ``Content-Length`` over it is refused before reading
* ``max_voxels``     (400,000,000) largest image or label, channels included, judged from the
                     file's header before any voxel is decoded
* ``train_body_kb``  (64) largest JSON body for ``/train``, ``/activelearning``, ``/scoring``, ``/batch``
* ``infer_workers``  (1 on CPU, one per GPU) inference jobs run at once
* ``infer_queue``    (32) more inference requests allowed to wait; beyond that 503 + Retry-After
* ``label_tolerance_mm`` (0.5) how far a label's grid may sit from its image's

``BodyGuard`` wraps the whole ASGI app once: 413 for oversized bodies (declared or streamed), and
error and JSON replies (``/info`` shows trainer configs) scrubbed of the server's folder paths
(logged in full, replied with names only).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..conf import AppConf
from .executor import default_workers

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

SMALL_BODY_PREFIXES = ("/train", "/activelearning", "/scoring", "/batch")


@dataclass(frozen=True)
class Limits:
    """The server's limits (see module docstring)."""

    max_upload_bytes: int
    max_voxels: int
    train_body_bytes: int
    infer_workers: int
    infer_queue: int
    label_tolerance_mm: float

    @classmethod
    def from_conf(cls, conf: AppConf) -> Limits:
        return cls(
            max_upload_bytes=int(conf.float("max_upload_mb", 1024.0) * 1024 * 1024),
            max_voxels=conf.int("max_voxels", 400_000_000, minimum=1),
            train_body_bytes=int(conf.float("train_body_kb", 64.0) * 1024),
            infer_workers=conf.int("infer_workers", default_workers(), minimum=1),
            infer_queue=conf.int("infer_queue", 32, minimum=0),
            label_tolerance_mm=conf.float("label_tolerance_mm", 0.5),
        )

    def body_limit(self, path: str) -> int:
        return self.train_body_bytes if path.startswith(SMALL_BODY_PREFIXES) else self.max_upload_bytes


async def reply(
    send: Callable[[Message], Awaitable[None]],
    status: int,
    detail: str,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send a whole JSON ``{"detail": ...}`` reply from ASGI middleware (before the app answered)."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(extra_headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


CLOSE = [(b"connection", b"close")]  # the rest of an over-limit body is not read


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a streamed body passes its limit."""


def scrub_paths(text: str, folders: Iterable[str]) -> str:
    """Replace every absolute server folder in ``text`` by a placeholder (file names stay)."""
    for folder in sorted({os.path.abspath(f) for f in folders if f}, key=len, reverse=True):
        text = text.replace(folder + os.sep, "").replace(folder, "<server>")
    return text


class BodyGuard:
    """ASGI wrapper: body-size limits with an early 413, and server paths scrubbed from error replies."""

    def __init__(self, app: ASGIApp, limits: Limits, folders: Callable[[], Iterable[str]]) -> None:
        self.app = app
        self.limits = limits
        self.folders = folders

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit = self.limits.body_limit(path)
        too_large = (
            f"request body too large: over {limit:,} bytes allowed for {path.split('?')[0][:60]} "
            f"(conf {'train_body_kb' if limit == self.limits.train_body_bytes else 'max_upload_mb'})"
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await reply(send, 400, "invalid Content-Length header", CLOSE)
                return
            if size > limit:
                await reply(send, 413, too_large, CLOSE)
                return
        state: dict[str, Any] = {"received": 0, "over": False, "started": False, "error": None, "error_body": b""}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    state["over"] = True
                    raise BodyTooLarge(too_large)
            return message

        async def guarded_send(message: Message) -> None:
            if state["over"]:
                return  # the app's own reply to the aborted body is replaced by our 413
            if message["type"] == "http.response.start":
                status = int(message["status"])
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                if status >= 400 or content_type.startswith(b"application/json"):
                    state["error"] = (
                        message  # hold it: the body is scrubbed first (errors and JSON replies such as /info)
                    )
                    return
                state["started"] = True
            elif message["type"] == "http.response.body" and state["error"] is not None:
                state["error_body"] += message.get("body", b"")
                if message.get("more_body"):
                    return  # error replies are small: collect the whole body, then scrub it
                start = state["error"]
                body = scrub_paths(state["error_body"].decode("utf-8", errors="replace"), self.folders()).encode()
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                state["error"], state["started"] = None, True
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            logger.warning(f"{path}: {too_large}")
            if not state["started"]:
                await reply(send, 413, too_large, CLOSE)

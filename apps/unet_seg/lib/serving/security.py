"""Safe defaults for a server on a hospital network: admin endpoints locked while auth is off, a CORS allow-list.

``SecurityGate`` wraps the whole ASGI app (outside MONAI Label's CORS middleware):

* While MONAI Label's authentication is off (its default), the admin surface is refused with 403
  and a message saying how to enable it: model download/upload/delete (``/model``), ``/logs``,
  deleting images or labels (``DELETE /datastore/...``) and sessions (``/session``, whose
  archive extraction is not confined). ``--conf admin_without_auth true`` allows them on a
  trusted, loopback-only set-up. With authentication on, MONAI Label's roles decide.
* CORS: only origins in ``--conf cors_origins`` (comma list; none by default) get CORS headers;
  a preflight from any other origin is 403 and other replies to it carry no ``Access-Control-*``
  headers, so browsers on foreign pages cannot read them. An allowed origin is echoed exactly,
  never ``*``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..conf import AppConf

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

# (method or "*", path prefix) of the admin surface
ADMIN_ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("*", "/model"),
    ("*", "/logs"),
    ("DELETE", "/datastore"),
    ("*", "/session"),
)


def is_admin_endpoint(method: str, path: str) -> bool:
    return any((m == "*" or m == method) and (path == prefix or path.startswith(prefix + "/"))
               for m, prefix in ADMIN_ENDPOINTS)


@dataclass(frozen=True)
class SecurityConf:
    """``auth_enabled`` (MONAI Label's setting), ``admin_without_auth`` and ``cors_origins`` (--conf)."""

    auth_enabled: bool
    admin_without_auth: bool
    cors_origins: frozenset[str]

    @classmethod
    def from_conf(cls, conf: AppConf, auth_enabled: bool) -> "SecurityConf":
        origins = [o.strip().rstrip("/") for o in conf.str("cors_origins", "").split(",") if o.strip()]
        if "*" in origins:
            raise ValueError("cors_origins: '*' is not allowed (credentials are sent); list the viewer origins")
        return cls(auth_enabled=auth_enabled, admin_without_auth=conf.bool("admin_without_auth", False),
                   cors_origins=frozenset(origins))


async def reply(send: Callable[[Message], Awaitable[None]], status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class SecurityGate:
    """ASGI wrapper enforcing the defaults in the module docstring."""

    def __init__(self, app: ASGIApp, conf: SecurityConf) -> None:
        self.app = app
        self.conf = conf

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET").upper()
        path = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin", b"").decode("latin-1").rstrip("/")
        foreign = bool(origin) and origin not in self.conf.cors_origins
        if foreign and method == "OPTIONS" and b"access-control-request-method" in headers:
            await reply(send, 403, f"origin {origin[:100]!r} is not allowed (conf cors_origins)")
            return
        if not self.conf.auth_enabled and not self.conf.admin_without_auth and is_admin_endpoint(method, path):
            await reply(send, 403, f"{method} {path.split('?')[0][:80]} is an admin endpoint and authentication is off: "
                                   f"enable it (MONAI_LABEL_AUTH_ENABLE=true with a realm) or, on a trusted loopback-only "
                                   f"set-up, start with --conf admin_without_auth true")
            return

        async def filtered_send(message: Message) -> None:
            if message["type"] == "http.response.start" and origin:
                kept = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
                if not foreign:
                    kept += [(b"access-control-allow-origin", origin.encode("latin-1")),
                             (b"access-control-allow-credentials", b"true"), (b"vary", b"Origin")]
                    kept += [(k, v) for k, v in message.get("headers", [])
                             if k.lower().startswith(b"access-control-") and k.lower() not in
                             (b"access-control-allow-origin", b"access-control-allow-credentials")]
                message = {**message, "headers": kept}
            await send(message)

        await self.app(scope, receive, filtered_send)

"""Security at the door: tokens from an OIDC realm, a role matrix per endpoint, safe defaults, a CORS allow-list.

``SecurityGate`` wraps the whole ASGI app (outside MONAI Label's CORS middleware):

* With MONAI Label's authentication on (``MONAI_LABEL_AUTH_ENABLE``), every request except the
  public ones (``/``, docs, static files, ``/auth/``) needs ``Authorization: Bearer <token>``: an
  RS256 JWT verified against the realm's public key (``MONAI_LABEL_AUTH_REALM_URI`` serves
  ``{"public_key": ...}`` as Keycloak does), with expiry, issuer (the realm URI unless
  ``auth_issuer``) and audience (``auth_audience``, default the client id) checked and
  ``auth_leeway_s`` (30) of clock skew. Failures are 401 with ``WWW-Authenticate``. The user's
  roles (``MONAI_LABEL_AUTH_TOKEN_ROLES``, Keycloak's ``realm_access#roles``) must reach the
  level the ``ROLE_MATRIX`` gives the endpoint (user < annotator < reviewer < admin; first
  matching row wins, unlisted endpoints need admin; ``--conf role_matrix`` JSON
  ``{"METHOD /path": "role"}`` rows go first), else 403 naming the role. MONAI Label's own
  token check (which current PyJWT rejects) is replaced through FastAPI dependency overrides
  by the user the gate verified.

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
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jwt
import requests
from fastapi import Request
from monailabel.endpoints.user.auth import User

from ..conf import AppConf, ConfError
from .limits import ASGIApp, Message, Scope, reply

logger = logging.getLogger(__name__)


# (method or "*", path prefix) of the admin surface
ADMIN_ENDPOINTS: tuple[tuple[str, str], ...] = (
    ("*", "/model"),
    ("*", "/logs"),
    ("DELETE", "/datastore"),
    ("*", "/session"),
)


def is_admin_endpoint(method: str, path: str) -> bool:
    return any(
        (m == "*" or m == method) and (path == prefix or path.startswith(prefix + "/")) for m, prefix in ADMIN_ENDPOINTS
    )


LEVELS = ("user", "annotator", "reviewer", "admin")

# (method or "*", path prefix, role); the first matching row wins, unlisted endpoints need admin.
ROLE_MATRIX: tuple[tuple[str, str, str], ...] = (
    ("GET", "/", "public"),
    ("GET", "/docs", "public"),
    ("GET", "/openapi.json", "public"),
    ("GET", "/favicon.ico", "public"),
    ("GET", "/static", "public"),
    ("*", "/auth", "public"),
    ("GET", "/ohif", "public"),
    ("*", "/model", "admin"),
    ("*", "/logs", "admin"),
    ("*", "/session", "admin"),
    ("DELETE", "/datastore", "admin"),
    ("GET", "/datastore/dataset", "admin"),
    ("GET", "/info", "user"),
    ("GET", "/datastore", "user"),
    ("HEAD", "/datastore", "user"),
    ("POST", "/infer", "user"),
    ("POST", "/activelearning", "user"),
    ("GET", "/train", "user"),
    ("GET", "/scoring", "user"),
    ("GET", "/batch", "user"),
    ("*", "/proxy", "user"),
    ("PUT", "/datastore", "annotator"),
    ("POST", "/scoring", "annotator"),
    ("POST", "/train", "reviewer"),
    ("DELETE", "/train", "reviewer"),
    ("*", "/batch", "reviewer"),
    ("DELETE", "/scoring", "reviewer"),
)


def matches(method: str, path: str, row_method: str, prefix: str) -> bool:
    if row_method not in ("*", method):
        return False
    if prefix == "/":
        return path == "/"
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


@dataclass(frozen=True)
class SecurityConf:
    """What the gate enforces (see module docstring); built from ``--conf`` and MONAI Label's settings."""

    auth_enabled: bool
    admin_without_auth: bool
    cors_origins: frozenset[str]
    realm_uri: str = ""
    issuer: str = ""
    audience: str = ""
    leeway_s: float = 30.0
    roles_claim: str = "realm_access#roles"
    username_claim: str = "preferred_username"
    role_names: tuple[str, str, str, str] = (
        "monailabel-user",
        "monailabel-annotator",
        "monailabel-reviewer",
        "monailabel-admin",
    )
    matrix: tuple[tuple[str, str, str], ...] = ROLE_MATRIX

    @classmethod
    def from_conf(cls, conf: AppConf, auth_enabled: bool, settings: Any = None) -> SecurityConf:
        origins = [o.strip().rstrip("/") for o in conf.str("cors_origins", "").split(",") if o.strip()]
        if "*" in origins:
            raise ConfError("cors_origins: '*' is not allowed (credentials are sent); list the viewer origins")
        extra: list[tuple[str, str, str]] = []
        text = conf.str("role_matrix", "")
        if text:
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfError(f"role_matrix: invalid JSON ({e.msg})") from None
            for key, role in dict(rows).items():
                method, _, prefix = str(key).partition(" ")
                if role not in (*LEVELS, "public") or not prefix.startswith("/"):
                    raise ConfError(
                        f"role_matrix: {key!r}: expected 'METHOD /path' -> one of {', '.join((*LEVELS, 'public'))}"
                    )
                extra.append((method.upper(), prefix, role))
        realm = str(getattr(settings, "MONAI_LABEL_AUTH_REALM_URI", "") or "").rstrip("/")
        names = tuple(
            str(getattr(settings, f"MONAI_LABEL_AUTH_ROLE_{lvl.upper()}", f"monailabel-{lvl}")) for lvl in LEVELS
        )
        return cls(
            auth_enabled=auth_enabled,
            admin_without_auth=conf.bool("admin_without_auth", False),
            cors_origins=frozenset(origins),
            realm_uri=realm,
            issuer=conf.str("auth_issuer", realm),
            audience=conf.str("auth_audience", str(getattr(settings, "MONAI_LABEL_AUTH_CLIENT_ID", "") or "")),
            leeway_s=conf.float("auth_leeway_s", 30.0),
            roles_claim=str(getattr(settings, "MONAI_LABEL_AUTH_TOKEN_ROLES", "realm_access#roles")),
            username_claim=str(getattr(settings, "MONAI_LABEL_AUTH_TOKEN_USERNAME", "preferred_username")),
            role_names=names,  # type: ignore[arg-type]
            matrix=(*extra, *ROLE_MATRIX),
        )

    def required(self, method: str, path: str) -> str:
        """The role an endpoint needs ('public' for none)."""
        for row_method, prefix, role in self.matrix:
            if matches(method, path, row_method, prefix):
                return role
        return "admin"

    def level(self, roles: list[str]) -> int:
        """Highest level (index in LEVELS) among the user's role names, -1 for none."""
        return max((i for i, name in enumerate(self.role_names) if name in roles), default=-1)


class AuthError(Exception):
    """A token that cannot be accepted (the message says why, for the log; the reply stays generic)."""


class TokenVerifier:
    """Verifies RS256 access tokens against the realm's public key (fetched once, refetched on rotation)."""

    def __init__(self, conf: SecurityConf) -> None:
        self.conf = conf
        self._key: str | None = None
        self._fetched = 0.0
        self._lock = threading.Lock()

    def _public_key(self, refresh: bool = False) -> str:
        with self._lock:
            if self._key is None or (refresh and time.time() - self._fetched > 30):
                r = requests.get(self.conf.realm_uri, timeout=10)
                r.raise_for_status()
                key = str(r.json()["public_key"]).strip()
                self._key = (
                    key
                    if key.startswith("-----BEGIN")
                    else f"-----BEGIN PUBLIC KEY-----\n{key}\n-----END PUBLIC KEY-----"
                )
                self._fetched = time.time()
            return self._key

    def verify(self, token: str) -> dict[str, Any]:
        """The user (username, roles, ...) of a valid token; AuthError otherwise."""
        options = {"require": ["exp", "iss"], "verify_aud": bool(self.conf.audience)}
        try:
            key = self._public_key()
        except (requests.RequestException, KeyError, ValueError) as e:
            raise AuthError(f"cannot fetch the realm's public key: {type(e).__name__}") from e
        for attempt in (0, 1):
            try:
                payload = jwt.decode(
                    token,
                    key,
                    algorithms=["RS256"],
                    audience=self.conf.audience or None,
                    issuer=self.conf.issuer,
                    leeway=self.conf.leeway_s,
                    options=options,
                )
                break
            except jwt.InvalidSignatureError as e:
                if attempt == 0:
                    key = self._public_key(refresh=True)  # the realm may have rotated its key
                    continue
                raise AuthError(f"invalid token: {e}") from e
            except jwt.InvalidTokenError as e:
                raise AuthError(f"invalid token: {type(e).__name__}: {e}") from e
        roles: Any = payload
        for part in self.conf.roles_claim.split("#"):
            roles = roles.get(part) if isinstance(roles, dict) else None
        return {
            "username": str(payload.get(self.conf.username_claim) or payload.get("sub") or ""),
            "email": payload.get("email"),
            "name": payload.get("name"),
            "roles": [str(r) for r in roles] if isinstance(roles, list) else [],
        }


class SecurityGate:
    """ASGI wrapper enforcing the module docstring; the verified user is put in ``scope["state"]["user"]``."""

    def __init__(self, app: ASGIApp, conf: SecurityConf) -> None:
        self.app = app
        self.conf = conf
        self.verifier = TokenVerifier(conf)

    async def _authorise(
        self,
        scope: Scope,
        method: str,
        path: str,
        headers: dict[bytes, bytes],
        send: Callable[[Message], Awaitable[None]],
    ) -> bool:
        """True when the request may go on (user in scope state); otherwise the 401/403 has been sent."""
        need = self.conf.required(method, path)
        if need == "public":
            return True
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if not auth.lower().startswith("bearer "):
            await reply(
                send,
                401,
                "authentication required: send Authorization: Bearer <token> (POST /auth/token gives one)",
                [(b"www-authenticate", b"Bearer")],
            )
            return False
        from starlette.concurrency import run_in_threadpool

        try:
            user = await run_in_threadpool(self.verifier.verify, auth[7:].strip())
        except AuthError as e:
            logger.warning(f"{method} {path}: {e}")
            await reply(
                send,
                401,
                "invalid or expired token; log in again",
                [(b"www-authenticate", b'Bearer error="invalid_token"')],
            )
            return False
        if self.conf.level(user["roles"]) < LEVELS.index(need):
            await reply(
                send,
                403,
                f"{method} {path[:80]} needs the role {self.conf.role_names[LEVELS.index(need)]!r} "
                f"(or higher); user {user['username']!r} has {user['roles'] or 'no roles'}",
            )
            return False
        scope.setdefault("state", {})["user"] = user
        return True

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
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
        if (
            self.conf.auth_enabled
            and method != "OPTIONS"
            and not await self._authorise(scope, method, path, headers, send)
        ):
            return
        if not self.conf.auth_enabled and not self.conf.admin_without_auth and is_admin_endpoint(method, path):
            await reply(
                send,
                403,
                f"{method} {path.split('?')[0][:80]} is an admin endpoint and authentication is off: "
                f"enable it (MONAI_LABEL_AUTH_ENABLE=true with a realm) or, on a trusted loopback-only "
                f"set-up, start with --conf admin_without_auth true",
            )
            return

        async def filtered_send(message: Message) -> None:
            if message["type"] == "http.response.start" and origin:
                kept = [(k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")]
                if not foreign:
                    kept += [
                        (b"access-control-allow-origin", origin.encode("latin-1")),
                        (b"access-control-allow-credentials", b"true"),
                        (b"vary", b"Origin"),
                    ]
                    kept += [
                        (k, v)
                        for k, v in message.get("headers", [])
                        if k.lower().startswith(b"access-control-")
                        and k.lower() not in (b"access-control-allow-origin", b"access-control-allow-credentials")
                    ]
                message = {**message, "headers": kept}
            await send(message)

        await self.app(scope, receive, filtered_send)


def install_user_overrides(fastapi_app: Any) -> None:
    """Replace MONAI Label's token check and role checks by the user the gate verified (FastAPI dependency overrides).

    With auth off every request is MONAI Label's default user (as before); the gate has already
    applied the admin lock-out and, with auth on, the role matrix.
    """
    from monailabel.endpoints.user.auth import DEFAULT_USER, RBAC, get_current_user

    async def current_user(request: Request) -> User:  # annotations resolve in module globals (FastAPI)
        user = (request.scope.get("state") or {}).get("user")
        return User(**user) if user else DEFAULT_USER

    fastapi_app.dependency_overrides[get_current_user] = current_user

    def walk(dependant: Any) -> None:
        for dep in dependant.dependencies:
            if isinstance(dep.call, RBAC):
                fastapi_app.dependency_overrides[dep.call] = current_user
            walk(dep)

    def routes_of(routes: Any) -> Any:
        for route in routes:
            inner = getattr(route, "original_router", None)  # FastAPI >= 0.16x keeps included routers lazily
            if inner is not None:
                yield from routes_of(inner.routes)
            else:
                yield route

    for route in routes_of(fastapi_app.routes):
        if getattr(route, "dependant", None) is not None:
            walk(route.dependant)


def token_from_realm(realm_uri: str, client_id: str, username: str, password: str) -> tuple[int, dict[str, Any]]:
    """Password grant at the realm's token endpoint: (status, JSON) — 200 with the token, 401 for bad credentials."""
    config = requests.get(f"{realm_uri}/.well-known/openid-configuration", timeout=10)
    config.raise_for_status()
    r = requests.post(
        config.json()["token_endpoint"],
        timeout=30,
        data={"grant_type": "password", "client_id": client_id, "username": username, "password": password},
    )
    if r.status_code in (400, 401, 403):
        return 401, {"detail": "invalid user name or password"}
    r.raise_for_status()
    return 200, r.json()

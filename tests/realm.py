"""A thin stand-in for a Keycloak realm on 127.0.0.1 (Keycloak itself is not packaged here).

It speaks the parts of the protocol the server and clients use, over real HTTP:
``GET <realm>`` -> ``{"realm", "public_key"}`` (base64 DER, as Keycloak serves it),
``GET <realm>/.well-known/openid-configuration`` -> issuer and token endpoint,
``POST <realm>/protocol/openid-connect/token`` (password grant) -> an RS256 access token whose
``realm_access.roles`` are the user's. ``mint`` makes tokens directly, good or deliberately bad.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

CLIENT_ID = "monailabel-app"
ROLES = {
    "user": "monailabel-user",
    "annotator": "monailabel-annotator",
    "reviewer": "monailabel-reviewer",
    "admin": "monailabel-admin",
}


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class StandInRealm:
    """Serves one realm with users ``{name: (password, [role names])}``."""

    def __init__(self, users: dict[str, tuple[str, list[str]]], name: str = "unet_seg") -> None:
        self.key = new_key()
        self.users = users
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}/realms/{name}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StandInRealm:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def public_key_b64(self) -> str:
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()

    def mint(
        self,
        username: str,
        roles: list[str],
        *,
        expires_in: float = 300,
        issuer: str | None = None,
        audience: str | list[str] = CLIENT_ID,
        key: rsa.RSAPrivateKey | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload = {
            "sub": f"id-{username}",
            "preferred_username": username,
            "iss": issuer or self.uri,
            "aud": audience,
            "azp": CLIENT_ID,
            "iat": now,
            "exp": now + int(expires_in),
            "realm_access": {"roles": roles},
            **claims,
        }
        payload = {k: v for k, v in payload.items() if v is not None}  # exp=None: a token without expiry
        return jwt.encode(payload, key or self.key, algorithm="RS256")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        realm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                path = urllib.parse.urlparse(realm.uri).path
                if self.path == path:
                    self._json(200, {"realm": path.rsplit("/", 1)[-1], "public_key": realm.public_key_b64()})
                elif self.path == f"{path}/.well-known/openid-configuration":
                    self._json(
                        200, {"issuer": realm.uri, "token_endpoint": f"{realm.uri}/protocol/openid-connect/token"}
                    )
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                path = urllib.parse.urlparse(realm.uri).path
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
                if self.path != f"{path}/protocol/openid-connect/token" or form.get("grant_type") != ["password"]:
                    self._json(400, {"error": "unsupported_grant_type"})
                    return
                user = form.get("username", [""])[0]
                password, roles = realm.users.get(user, (None, []))
                if password is None or form.get("password", [""])[0] != password:
                    self._json(401, {"error": "invalid_grant", "error_description": "Invalid user credentials"})
                    return
                self._json(200, {"access_token": realm.mint(user, roles), "token_type": "Bearer", "expires_in": 300})

        return Handler

"""A local OIDC issuer for the tests: signing keys, discovery and a JWKS over HTTP.

The server is a few lines of HTTP/1.1 on an anyio TCP listener (one request
per connection), enough for httpx. The issuer can rotate its keys, go down
(answering 503) and counts the JWKS fetches it served.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import jwt
from anyio.abc import SocketAttribute, SocketStream
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

AUDIENCE = "kdcube-web"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Key:
    kid: str
    private: PrivateKey
    alg: str

    @classmethod
    def rsa(cls) -> Key:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(f"rsa-{uuid.uuid4().hex[:8]}", private, "RS256")

    @classmethod
    def ec(cls) -> Key:
        private = ec.generate_private_key(ec.SECP256R1())
        return cls(f"ec-{uuid.uuid4().hex[:8]}", private, "ES256")

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            data = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            data = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**data, "kid": self.kid, "use": "sig", "alg": self.alg}


@dataclass
class Issuer:
    url: str
    keys: list[Key] = field(default_factory=list)
    available: bool = True
    jwks_fetches: int = 0

    def sign(
        self,
        key: Key,
        *,
        sub: str = "alice",
        age_s: float = 0,
        lifetime_s: float = 300,
        header: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """A token issued ``age_s`` seconds ago; ``claims`` override or add."""
        now = time.time() - age_s
        payload = {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": sub,
            "iat": int(now),
            "exp": int(now + lifetime_s),
            **claims,
        }
        return jwt.encode(
            payload,
            key.private,
            algorithm=key.alg,
            headers={"kid": key.kid, **(header or {})},
        )

    def document(self, path: str) -> dict[str, Any] | None:
        if path == "/.well-known/openid-configuration":
            return {"issuer": self.url, "jwks_uri": f"{self.url}/jwks.json"}
        if path == "/jwks.json":
            self.jwks_fetches += 1
            return {"keys": [key.jwk() for key in self.keys]}
        return None

    async def answer(self, stream: SocketStream) -> None:
        async with stream:
            try:
                await stream.send(self._respond(await _read_head(stream)))
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return  # the client went away; nothing to answer

    def _respond(self, head: bytes) -> bytes:
        if not self.available:
            return _response(503, b"{}")

        parts = head.split(b" ", 2)
        document = self.document(parts[1].decode()) if len(parts) == 3 else None
        if document is None:
            return _response(404, b"{}")
        return _response(200, json.dumps(document).encode())


@asynccontextmanager
async def open_issuer(*keys: Key) -> AsyncIterator[Issuer]:
    """An issuer listening on 127.0.0.1, port 0, publishing ``keys``."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(SocketAttribute.local_port)
    issuer = Issuer(f"http://127.0.0.1:{port}", list(keys))
    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, issuer.answer)
        yield issuer
        tasks.cancel_scope.cancel()


async def _read_head(stream: SocketStream) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65_536:
        head += await stream.receive()
    return head


def _response(status: int, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body

"""The one rule for every HTTP listener amygdala starts (the daemon and `amygdala train server`).

- Loopback by default; any other address only with a bearer token (refused before the model is
  loaded, so a misconfiguration costs a second, not a minute).
- With a token, every request must carry `Authorization: Bearer <token>`, compared in constant
  time; a 401 says which flag or variable to set.
- Request bodies over the limit get 413 before the app sees them, chunked ones included: the body
  is buffered up to the limit (requests here are small JSON), so the answer is a clean 413 rather
  than whatever the app's error middleware makes of an exception in the middle of reading.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any

from .schemas import MAX_BODY_BYTES

TOKEN_ENV = "AMYGDALA_TOKEN"


class InsecureBind(ValueError):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    if not is_loopback(host) and not token:
        raise InsecureBind(f"refusing to listen on {host} without a bearer token: anyone who can reach it could read, "
                           f"steer and train the model. Pass --token (or set {TOKEN_ENV}), or bind 127.0.0.1.")


def auth_headers(token: str | None) -> dict[str, str]:
    """Headers a client sends to a listener started with `token`."""
    return {"Authorization": f"Bearer {token}"} if token else {}


async def send_json(send: Any, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class BearerAuth:
    """Pure-ASGI middleware: every HTTP request needs the token (streaming responses stay untouched)."""

    def __init__(self, app: Any, token: str):
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                why = "no Authorization header" if not got else "wrong bearer token"
                await send_json(send, 401, {"error": f"{why}: this server requires 'Authorization: Bearer <token>'; "
                                                     f"pass --token (or set {TOKEN_ENV}) to the amygdala client command, "
                                                     "or add the header to your MCP client's config"},
                                [(b"www-authenticate", b'Bearer realm="amygdala"')])
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413: by Content-Length up front, chunked ones by buffering."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    def _too_large(self, size: str) -> dict:
        return {"error": f"request body of {size} is over the limit of {self.limit} bytes; send less per request"}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                await send_json(send, 413, self._too_large(f"{int(length)} bytes"))
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length: chunked (or no body). Read it all, up to the limit, before the app runs.
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # client went away
                return
            body = msg.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                await send_json(send, 413, self._too_large(f"more than {self.limit} bytes (chunked)"))
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

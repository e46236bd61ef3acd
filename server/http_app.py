"""The HTTP daemon: MCP at /mcp, the training API (/train, /train/status, /checkpoint), /health.

Security by default: loopback-only unless a bearer token is set; with a token, every request
(MCP and training API alike) must carry `Authorization: Bearer <token>`, compared in constant
time. Request bodies over the limit are refused with 413 before they are read.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from contextlib import asynccontextmanager
from typing import Any

from mcp.server import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from .services import Services


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
                           "steer and train the model. Pass --token (or set AMYGDALA_TOKEN), or bind 127.0.0.1.")


async def _send_json(send: Any, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(headers or [])]})
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
                await _send_json(send, 401, {"error": "missing or wrong bearer token: send 'Authorization: Bearer <token>'"},
                                 [(b"www-authenticate", b'Bearer realm="amygdala"')])
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse bodies over `limit` bytes: by Content-Length up front, and by counting chunked bodies."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_json(send, 413, {"error": f"request body of {int(length)} bytes is over the limit of {self.limit} bytes"})
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _send_json(send, 413, {"error": f"request body over the limit of {self.limit} bytes"})


class _TooLarge(Exception):
    pass


class LifecycleTraining:
    """The training API's view of the worker: a rollback also moves the undone jobs' corrections along."""

    def __init__(self, services: Services):
        assert services.trainer is not None
        self._trainer = services.trainer
        self._corrections = services.corrections

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)

    def rollback(self, job_id: str) -> Any:
        return self._corrections.rollback(job_id)


def create_http_app(mcp: MCPServer, services: Services, host: str = "127.0.0.1", token: str | None = None) -> Any:
    """The ASGI app for `amygdala serve --transport http`."""
    check_bind(host, token)
    mcp_app = mcp.streamable_http_app(streamable_http_path="/mcp", max_request_body_size=services.limits.max_body_bytes,
                                      host=host)
    routes: list[Any] = []
    if services.trainer is not None:
        from amygdala.training.api import build_train_routes

        def on_checkpoint() -> Any:
            if services.sync is None:
                raise RuntimeError("checkpoint sync is disabled: the model has no directory on disk")
            return services.sync.sync_now()

        routes.extend(build_train_routes(LifecycleTraining(services), on_checkpoint=on_checkpoint))

    async def health(_: Request) -> JSONResponse:
        st = services.trainer.status() if services.trainer is not None else None
        concepts = len(services.readout.concepts) if services.readout_ready else None
        return JSONResponse({"status": "ok", "model": services.lm.name, "readout_ready": services.readout_ready,
                             "concepts": concepts,
                             "training": None if st is None else {"worker_alive": st.worker_alive, "queue": len(st.queue)}})

    routes.append(Route("/health", health, methods=["GET"]))
    routes.append(Mount("/", app=mcp_app))

    @asynccontextmanager
    async def lifespan(_: Starlette):
        async with mcp.session_manager.run():
            yield

    app: Any = Starlette(routes=routes, lifespan=lifespan)
    app = BodyLimit(app, services.limits.max_body_bytes)
    if token:
        app = BearerAuth(app, token)
    return app

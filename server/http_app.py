"""The HTTP daemon: MCP at /mcp, the training API (/train, /train/status, /checkpoint), the dream API
(/dream/*, /invariants, /certify: server/dream_api.py), /health.

Security by default: loopback-only unless a bearer token is set; with a token, every request
(MCP and training API alike) must carry `Authorization: Bearer <token>`, compared in constant
time. Request bodies over the limit are refused with 413 before they are read.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from mcp.server import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from amygdala.training.http_security import BearerAuth, BodyLimit, InsecureBind, check_bind, is_loopback

from .review_app import PrefixRouter, ReviewBackend, create_review_app
from .services import Services

__all__ = ["InsecureBind", "check_bind", "create_http_app", "is_loopback"]


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


def create_http_app(mcp: MCPServer, services: Services, host: str = "127.0.0.1", token: str | None = None,
                    operator_token: str | None = None) -> Any:
    """The ASGI app for `amygdala serve --transport http`; /review (operator pages) needs `operator_token`."""
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

    from .dream_api import build_dream_routes

    routes.extend(build_dream_routes(services))  # /dream/*, /invariants, /certify/{name}: what the CLI talks to
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
    return PrefixRouter(BodyLimit(_review_app(services, operator_token, token), services.limits.max_body_bytes), app)


def _review_app(services: Services, operator_token: str | None, agent_token: str | None) -> Any:
    """The operator's review pages: their own auth (operator token), not the agent's bearer token."""
    from amygdala.dream.certificates import served_state

    def served() -> Any:
        return served_state(services.config, services.lm, services.readout_manager)

    return create_review_app(ReviewBackend(graph=services.graph, config=services.config, served=served),
                             operator_token=operator_token, agent_token=agent_token)

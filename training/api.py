"""HTTP API of the training worker: POST /train, GET /train/status, POST /checkpoint (+ job result, rollback).

Routes are built around a client object passed in (`build_train_routes(client, on_checkpoint)`) so
the server can mount them next to its MCP endpoint; `create_app` wraps them in a standalone
Starlette routes for `amygdala serve` and `amygdala train server`. Handlers never wait for training: anything that may
block (submitting when the worker must be restarted, a rollback, a checkpoint sync) runs in the
thread pool, so the event loop keeps answering status requests while a job runs.

Token ids are raw; bad ones (out of the vocabulary, empty, too long) are refused with 422 and a
message naming the field and how to fix it.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .schemas import (MAX_BODY_BYTES, JobRejected, JobResult, RollbackResult, TrainJob, TrainRequest, TrainStatus,
                      WorkerUnavailable)

log = logging.getLogger(__name__)



class TrainingService(Protocol):
    """What the routes need from the client (TrainingClient implements it)."""

    def check(self, job: TrainRequest) -> TrainJob: ...
    def submit(self, job: TrainJob) -> str: ...
    def status(self) -> TrainStatus: ...
    def job(self, job_id: str) -> JobResult: ...
    def rollback(self, job_id: str) -> RollbackResult: ...


CheckpointFn = Callable[[], Any]


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _validation_message(exc: ValidationError) -> tuple[str, list[str]]:
    details = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        details.append(f"{loc}: {msg}")
    return "; ".join(details), details


async def _json_body(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise _HTTPError(413, f"request body of {length} bytes is over the {MAX_BODY_BYTES} byte limit")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise _HTTPError(413, f"request body is over the {MAX_BODY_BYTES} byte limit")
    try:
        return json.loads(raw or b"null")
    except ValueError as exc:
        raise _HTTPError(400, f"request body is not valid JSON ({exc}); send a JSON object") from None


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if value is None:
        return {"ok": True}
    return value


def build_train_routes(client: TrainingService, on_checkpoint: CheckpointFn | None = None) -> list[Route]:
    """The routes, bound to `client` (a TrainingService) and an optional checkpoint-sync callable."""

    async def train(request: Request) -> JSONResponse:
        try:
            body = await _json_body(request)
            if not isinstance(body, dict):
                return _error(400, "send a JSON object: {\"context_ids\": [...], \"continuation_ids\": [...], "
                                   "\"rejected_ids\": [...]?, \"loss\": \"sft\"|\"orpo\", \"lr\"?, \"dry_run\"?}")
            req = TrainRequest.model_validate(body)
            job = client.check(req)
        except _HTTPError as exc:
            return _error(exc.status, exc.message)
        except ValidationError as exc:
            message, details = _validation_message(exc)
            return _error(422, message, details=details)
        except JobRejected as exc:
            return _error(422, str(exc))
        try:
            job_id = await run_in_threadpool(client.submit, job)
        except JobRejected as exc:
            return _error(422, str(exc))
        except WorkerUnavailable as exc:
            return _error(503, str(exc))
        return JSONResponse({"job_id": job_id, "state": "queued", "dry_run": job.dry_run,
                             "status_url": "/train/status", "result_url": f"/train/jobs/{job_id}"}, status_code=202)

    async def status(request: Request) -> JSONResponse:
        return JSONResponse(client.status().model_dump(mode="json"))

    async def job(request: Request) -> JSONResponse:
        job_id = request.path_params["job_id"]
        try:
            return JSONResponse(client.job(job_id).model_dump(mode="json"))
        except KeyError as exc:
            return _error(404, exc.args[0] if exc.args else f"unknown job {job_id}")

    async def rollback(request: Request) -> JSONResponse:
        try:
            body = await _json_body(request)
        except _HTTPError as exc:
            return _error(exc.status, exc.message)
        job_id = body.get("job_id") if isinstance(body, dict) else None
        if not isinstance(job_id, str) or not job_id:
            return _error(422, "send {\"job_id\": \"job-...\"}: the job to undo (it and every later job are rolled back)")
        try:
            result = await run_in_threadpool(client.rollback, job_id)
        except JobRejected as exc:
            return _error(409, str(exc))
        except TimeoutError as exc:
            return _error(504, str(exc))
        except WorkerUnavailable as exc:
            return _error(503, str(exc))
        return JSONResponse(result.model_dump(mode="json"))

    async def checkpoint(request: Request) -> JSONResponse:
        if on_checkpoint is None:
            return _error(503, "checkpoint sync is not configured in this server: it writes the trained weights back "
                               "into the model directory and is wired up by the full `amygdala` server")
        try:
            if inspect.iscoroutinefunction(on_checkpoint):
                result = await on_checkpoint()
            else:
                result = await run_in_threadpool(on_checkpoint)
        except Exception as exc:  # noqa: BLE001: reported to the caller
            log.exception("checkpoint sync failed")
            return _error(500, f"checkpoint sync failed: {type(exc).__name__}: {exc}")
        return JSONResponse(_dump(result))

    return [
        Route("/train", train, methods=["POST"]),
        Route("/train/status", status, methods=["GET"]),
        Route("/train/jobs/{job_id}", job, methods=["GET"]),
        Route("/train/rollback", rollback, methods=["POST"]),
        Route("/checkpoint", checkpoint, methods=["POST"]),
    ]


def create_app(client: TrainingService, on_checkpoint: CheckpointFn | None = None, lifespan: Any = None) -> Starlette:
    """Standalone app serving only the training routes."""
    return Starlette(routes=build_train_routes(client, on_checkpoint), lifespan=lifespan)

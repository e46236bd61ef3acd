"""The dream on the daemon: one service layer for the MCP tools and the HTTP API the CLI talks to.

`DreamService` answers dream_status, starts and cancels cycles, lists and adds invariants, lists,
reads and verifies certificates, and certifies on request; the MCP tools (`server/tools/dream.py`)
and the HTTP routes below both call it, so an agent and the operator's CLI see the same answers and
the same refusals. Routes (behind the daemon's bearer token, like everything it serves):

    GET  /dream/status            what dream_status returns
    POST /dream/run               {"dry_run", "budget_steps", "budget_minutes"} -> 202 {cycle_id}; 409 while one runs
    POST /dream/cancel            ask the running cycle to stop
    GET  /dream/cycles/{id}       a cycle's summary (and this daemon's full report of it, when it ran it)
    GET  /invariants              the active invariants
    POST /invariants              {"spec": {...}, "replace": false} -> the stored invariant; 422 names the field
    DELETE /invariants/{name}     retire an invariant
    POST /certify/{name}          {"n", "sequential", "seed"} -> the certificate (blocks while it judges)

Adding with `replace` (which can weaken an existing rule) is an operator action: the CLI may, the
agent's add_invariant tool may not. Reviews (approve/reject) are the review page's and the CLI's,
never the agent's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

from amygdala.dream.certificates import CertificateRecord, CertificateSummary
from amygdala.dream.errors import DreamError, InvalidInvariant
from amygdala.dream.runner import (
    Activity,
    CycleSummary,
    DreamBusy,
    DreamRequest,
    RecertifySummary,
)
from amygdala.dream.verify import VerifyReport
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .services import Services

log = logging.getLogger(__name__)

MAX_BUDGET_STEPS = 10_000
MAX_BUDGET_MINUTES = 24 * 60.0
MAX_SPEC_BYTES = 2 * 1024 * 1024


# -- results (tool outputs and HTTP bodies) -------------------------------------------------------
class CycleInfo(BaseModel):
    cycle_id: str
    trigger: str = Field(description="'nightly', 'now' (run_dream_now / POST /dream/run), 'cli', or 'unknown'.")
    outcome: str = Field(description="kept, rolled_back, no_failures, dry_run, interrupted or failed.")
    reason: str = Field(description="Why it ended so, in one sentence.")
    dry_run: bool
    temperature: float | None = Field(description="Sampling temperature the cycle used.")
    failure_rate: float | None = Field(description="Share of its on-policy samples that failed their invariant.")
    steps: int = Field(description="Training steps applied.")
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, s: CycleSummary) -> CycleInfo:
        return cls(cycle_id=s.cycle_id, trigger=s.trigger, outcome=s.outcome, reason=s.reason, dry_run=s.dry_run,
                   temperature=s.temperature, failure_rate=s.failure_rate, steps=s.steps, started_at=s.started_at,
                   finished_at=s.finished_at)


class ActivityInfo(BaseModel):
    kind: Literal["cycle", "recertify", "certify"]
    cycle_id: str | None
    subject: str | None = Field(None, description="certify: the invariant being certified.")
    phase: str = Field(description="The cycle's phase: sample, respond, judge, baseline, train, evaluate, rollback, sync, "
                                   "record; 'certify' while certifying.")
    done: int
    total: int
    message: str
    started_at: datetime
    started_by: str | None
    cancel_requested: bool
    summary: str

    @classmethod
    def of(cls, a: Activity) -> ActivityInfo:
        return cls(kind=a.kind, cycle_id=a.cycle_id, subject=a.subject, phase=a.phase, done=a.done, total=a.total,
                   message=a.message, started_at=a.started_at,
                   started_by=a.request.describe() if a.request is not None else None,
                   cancel_requested=a.cancel_requested, summary=a.describe())


class RecertifyInfo(BaseModel):
    after_cycle: str | None
    stale: int = Field(description="Stale certificates found.")
    certified: int = Field(description="Invariants certified again on the new weights.")
    not_certified: list[str] = Field(description="'name: verdict or error' for the others.")
    certificate_ids: list[str]
    finished_at: datetime | None

    @classmethod
    def of(cls, r: RecertifySummary) -> RecertifyInfo:
        return cls(after_cycle=r.after_cycle, stale=r.attempted, certified=r.certified, not_certified=list(r.failed),
                   certificate_ids=list(r.certificate_ids), finished_at=r.finished_at)


class DreamStatusResult(BaseModel):
    enabled: bool = Field(description="Whether this server runs dream cycles (it needs the training worker).")
    message: str = Field(description="One line: what is happening and what comes next.")
    running: ActivityInfo | None = Field(description="The cycle (or certification) running now, with phase and progress.")
    last: CycleInfo | None = Field(description="The last finished cycle: outcome and why.")
    nightly: bool = Field(description="Whether the nightly dream is scheduled.")
    dream_at: str | None = Field(description="Local time of the nightly dream (HH:MM).")
    next_run: datetime | None = Field(description="When the nightly dream runs next.")
    timezone: str | None
    temperature: float | None = Field(description="Sampling temperature of the running cycle, else the one the next "
                                                  "cycle will use (the controller's state).")
    failure_rate: float | None = Field(description="Failure rate the last cycle measured (the controller's input).")
    last_recertify: RecertifyInfo | None
    pending_recertify: datetime | None = Field(description="When queued re-certification of stale certificates runs.")
    notes: list[str] = Field(description="Recent events: skipped or missed nightly runs, failed jobs (newest last).")


class RunDreamResult(BaseModel):
    started: bool
    cycle_id: str
    dry_run: bool
    budget_steps: int | None
    budget_minutes: float | None
    message: str


class CancelResult(BaseModel):
    cancelled: bool
    message: str
    running: ActivityInfo | None = None


class CycleDetail(BaseModel):
    cycle: CycleInfo
    running: bool
    report: dict[str, Any] | None = Field(None, description="The loop's full report, when this daemon ran the cycle.")


class InvariantInfo(BaseModel):
    name: str
    id: str
    description: str
    judge: str
    threshold: float
    confidence: float
    cases: int
    held_out: int
    templates: int
    sha256: str | None
    added: datetime


class ListInvariantsResult(BaseModel):
    count: int
    invariants: list[InvariantInfo]


class AddInvariantResult(BaseModel):
    outcome: Literal["stored", "unchanged", "replaced"]
    invariant: InvariantInfo
    replaced: str | None = Field(None, description="Id of the retired version, when replaced.")
    message: str


class ListCertificatesResult(BaseModel):
    count: int
    certificates: list[CertificateSummary]


class CertifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int | None = Field(None, ge=1)
    sequential: bool = False
    seed: int = Field(0, ge=0)


class RunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = False
    budget_steps: int | None = Field(None, ge=1, le=MAX_BUDGET_STEPS)
    budget_minutes: float | None = Field(None, gt=0, le=MAX_BUDGET_MINUTES)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)


class AddInvariantRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any]
    replace: bool = False


# -- the service ----------------------------------------------------------------------------------
class DreamService:
    """The dream operations of one daemon, shared by the MCP tools and the HTTP API."""

    def __init__(self, services: Services):
        self.svc = services

    # -- cycles ---------------------------------------------------------------------------------
    def status(self) -> DreamStatusResult:
        from amygdala.dream.daemon import last_recorded_cycle, next_temperature

        svc = self.svc
        runner, sched = svc.dream, svc.dream_scheduler
        rs = runner.status() if runner is not None else None
        last = rs.last if rs is not None else last_recorded_cycle(svc.graph)
        info = sched.info() if sched is not None and sched.scheduler.running else None
        running = ActivityInfo.of(rs.current) if rs is not None and rs.current is not None else None
        temperature = None
        if running is not None and running.cycle_id is not None:  # the temperature the running cycle samples at
            temperature = getattr(self._cycle_node(running.cycle_id), "temperature", None)
        if temperature is None:
            temperature = next_temperature(svc.graph)
        if temperature is None and last is not None:
            temperature = last.next_temperature or last.temperature
        if temperature is None:  # no cycle yet: where the controller starts
            from amygdala.dream.loop import DreamSettings

            temperature = DreamSettings().temperature.initial
        nightly = bool(info and info.enabled and info.next_run is not None)
        if runner is None:
            message = ("dreaming is off in this server: it runs without the training worker (--no-train); restart "
                       "`amygdala serve` with training on to dream")
        elif running is not None:
            message = running.summary
        else:
            when = f"next nightly dream {info.next_run.isoformat(timespec='minutes')}" if nightly and info else (
                "no nightly dream scheduled (--no-dream); run_dream_now starts one")
            message = f"idle; {when}"
            if last is not None:
                message += f"; last cycle {last.cycle_id}: {last.outcome}"
        return DreamStatusResult(
            enabled=runner is not None, message=message, running=running,
            last=CycleInfo.of(last) if last is not None else None, nightly=nightly,
            dream_at=info.dream_at if info else None, next_run=info.next_run if info else None,
            timezone=info.timezone if info else None, temperature=temperature,
            failure_rate=last.failure_rate if last is not None else None,
            last_recertify=RecertifyInfo.of(rs.last_recertify) if rs is not None and rs.last_recertify else None,
            pending_recertify=info.pending_recertify if info else None, notes=rs.notes if rs is not None else [])

    def run_now(self, req: RunRequest, *, trigger: Literal["now", "cli"] = "now", requested_by: str = "agent") -> RunDreamResult:
        from amygdala.dream.loop import DreamSettings

        runner = self._runner()
        if not req.dry_run and self.svc.trainer is None:
            raise DreamError("this server has no training worker: only dry runs are possible (dry_run=true)")
        try:  # the loop's own limits, checked now rather than in the cycle's thread
            DreamSettings.model_validate({k: v for k, v in {"budget_steps": req.budget_steps,
                                                             "budget_minutes": req.budget_minutes}.items() if v is not None})
        except ValidationError as exc:
            raise DreamError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
        activity = runner.start(DreamRequest(trigger=trigger, dry_run=req.dry_run, budget_steps=req.budget_steps,
                                             budget_minutes=req.budget_minutes, requested_by=requested_by,
                                             seed=req.seed))
        assert activity.cycle_id is not None
        return RunDreamResult(started=True, cycle_id=activity.cycle_id, dry_run=req.dry_run,
                              budget_steps=req.budget_steps, budget_minutes=req.budget_minutes,
                              message=f"dream cycle {activity.cycle_id} started"
                                      + (" (dry run: nothing is trained)" if req.dry_run else "")
                                      + "; dream_status shows its phase and progress, and its outcome when done")

    def cancel(self) -> CancelResult:
        runner = self._runner()
        act = runner.cancel()
        if act is None:
            return CancelResult(cancelled=False, message="nothing is running")
        return CancelResult(cancelled=True, running=ActivityInfo.of(act),
                            message=f"asked {act.describe()} to stop; a cycle rolls back what it trained")

    def cycle(self, cycle_id: str) -> CycleDetail:
        from amygdala.dream.daemon import summary_from_node
        from amygdala.memory_graph import DreamCycle

        runner = self.svc.dream
        if runner is not None:
            st = runner.status()
            if st.current is not None and st.current.cycle_id == cycle_id:
                node = self._cycle_node(cycle_id)
                info = CycleInfo.of(summary_from_node(node)) if node is not None else CycleInfo(
                    cycle_id=cycle_id, trigger=st.current.request.trigger if st.current.request else "now",
                    outcome="running", reason="", dry_run=bool(st.current.request and st.current.request.dry_run),
                    temperature=None, failure_rate=None, steps=0, started_at=st.current.started_at, finished_at=None)
                return CycleDetail(cycle=info, running=True)
            if st.last is not None and st.last.cycle_id == cycle_id:
                return CycleDetail(cycle=CycleInfo.of(st.last), running=False, report=st.last.details or None)
        node = self._cycle_node(cycle_id)
        if not isinstance(node, DreamCycle):
            raise DreamError(f"no dream cycle {cycle_id!r}; dream_status names the last one")
        return CycleDetail(cycle=CycleInfo.of(summary_from_node(node)), running=node.finished is None)

    def _cycle_node(self, cycle_id: str) -> Any:
        try:
            node = self.svc.graph.get(cycle_id)
        except KeyError:
            return None
        return node if getattr(node, "kind", None) == "cycle" else None

    def _runner(self):
        if self.svc.dream is None:
            raise DreamError("dreaming is off in this server: it runs without the training worker (--no-train); "
                             "restart `amygdala serve` with training on")
        return self.svc.dream

    # -- invariants -----------------------------------------------------------------------------
    def list_invariants(self) -> ListInvariantsResult:
        from amygdala.memory_graph import Invariant

        nodes = [n for n in self.svc.graph.nodes("invariant") if isinstance(n, Invariant) and not n.retired]
        rows = [_invariant_info(n) for n in sorted(nodes, key=lambda n: (n.time, n.id))]
        return ListInvariantsResult(count=len(rows), invariants=rows)

    def add_invariant(self, spec: dict[str, Any], *, replace: bool = False, by: Literal["agent", "operator"] = "agent"
                      ) -> AddInvariantResult:
        """Validate as `amygdala invariants add` does, then store; a bad spec stores nothing."""
        from amygdala.dream.invariants import (
            active_node,
            parse_spec,
            spec_sha256,
            store,
        )

        if replace and by == "agent":
            raise DreamError("replace: an agent may add new invariants but not replace one (that can weaken a rule it "
                             "is held to); choose another name, or ask the operator to run `amygdala invariants add "
                             "FILE --replace`")
        parsed = parse_spec(spec, concepts=self._concepts())
        graph = self.svc.graph
        before = active_node(graph, parsed.name)
        if before is not None and not replace and before.spec is not None and _spec_sha(before) != spec_sha256(parsed):
            how = ("choose another name, or ask the operator to replace it (`amygdala invariants add FILE --replace`)"
                   if by == "agent" else "pass --replace to retire it and store this one, or choose another name")
            raise InvalidInvariant(f"name: an invariant named {parsed.name!r} already exists ({before.id}) with different "
                                   f"content; {how}; nothing was stored")
        node = store(graph, parsed, replace=replace)
        outcome: Literal["stored", "unchanged", "replaced"] = (
            "unchanged" if before is not None and before.id == node.id else "replaced" if before is not None else "stored")
        info = _invariant_info(node)
        message = {"stored": f"stored invariant {info.name} ({info.id}): {info.cases} cases, {info.held_out} held out; "
                             "the next dream cycle tests and trains it",
                   "unchanged": f"invariant {info.name} is already stored with exactly this content ({info.id})",
                   "replaced": f"replaced invariant {info.name}: {before.id if before else '?'} retired, {info.id} "
                               "stored"}[outcome]
        return AddInvariantResult(outcome=outcome, invariant=info, replaced=before.id if outcome == "replaced" and before
                                  else None, message=message)

    def remove_invariant(self, name: str) -> dict[str, str]:
        from amygdala.dream.invariants import active_node, remove

        node = active_node(self.svc.graph, name)
        remove(self.svc.graph, name)
        return {"retired": name, "id": node.id if node is not None else "", "message": f"retired invariant {name}"}

    def _concepts(self) -> list[str] | None:
        if self.svc.readout_ready:
            return list(self.svc.readout.concepts)
        from amygdala.dream.cli import known_concepts

        return known_concepts(self.svc.config)

    # -- certificates -----------------------------------------------------------------------------
    def served(self):
        from amygdala.dream.certificates import served_state

        return served_state(self.svc.config, self.svc.lm, self.svc.readout_manager)

    def list_certificates(self, invariant: str | None = None, status: str | None = None) -> ListCertificatesResult:
        from amygdala.dream.certificates import list_certificates

        rows = list_certificates(self.svc.graph, self.svc.config, invariant=invariant, status=status, served=self.served())
        return ListCertificatesResult(count=len(rows), certificates=rows)

    def get_certificate(self, certificate_id: str) -> CertificateRecord:
        from amygdala.dream.certificates import certificate_node, get_certificate

        certificate_node(self.svc.graph, certificate_id)  # unknown ids: the graph's "not found" with the fix
        return get_certificate(self.svc.config, certificate_id)

    def verify_certificate(self, certificate_id: str, sample: int = 5) -> VerifyReport:
        from amygdala.dream.verify import verify_certificate

        return verify_certificate(self.svc.graph, self.svc.config, certificate_id, served=self.served(), lm=self.svc.lm,
                                  readout=self.svc.readout_manager, sample=sample)

    def certificate_html(self, certificate_id: str) -> str:
        """The certificate's report page as one self-contained file (no review form: that is the operator's)."""
        from .review_pages import certificate_html

        return certificate_html(self.svc.graph, self.svc.config, certificate_id, served=self.served(), standalone=True)

    def certify(self, name: str, req: CertifyRequest) -> CertificateSummary:
        """Certify on request (operator CLI): takes the runner's slot, so never beside a training cycle."""
        from amygdala.dream.certificates import certificate_node, summarize
        from amygdala.dream.certify import CertifySettings, certify

        try:
            settings = CertifySettings(n=req.n, sequential=req.sequential, seed=req.seed)
        except ValidationError as exc:
            raise DreamError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from None
        svc = self.svc

        def work(progress=None) -> Any:
            report = (lambda d, t, m: progress("certify", d, t, m)) if progress is not None else None
            return certify(svc.graph, svc.config, svc.lm, name, readout=svc.readout_manager, settings=settings,
                           progress=report)

        record = svc.dream.exclusive("certify", work, subject=name) if svc.dream is not None else work()
        node = certificate_node(svc.graph, record.id)
        return summarize(svc.graph, node, self.served())


def _spec_sha(node: Any) -> str | None:
    from amygdala.dream.invariants import spec_of, spec_sha256

    try:
        return spec_sha256(spec_of(node))
    except InvalidInvariant:
        return None


def _invariant_info(node: Any) -> InvariantInfo:
    from amygdala.dream.cases import split
    from amygdala.dream.invariants import spec_of, spec_sha256

    try:
        spec = spec_of(node)
    except InvalidInvariant:
        spec = None
    held = len(split(spec)[1]) if spec is not None else 0
    return InvariantInfo(name=node.name, id=node.id, description=node.description, judge=node.judge.kind,
                         threshold=node.threshold, confidence=node.confidence,
                         cases=len(spec.cases) if spec is not None else 0, held_out=held,
                         templates=len(spec.templates) if spec is not None else len(node.templates),
                         sha256=spec_sha256(spec) if spec is not None else None, added=node.time)


# -- HTTP ------------------------------------------------------------------------------------------
def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request, model: type[BaseModel]) -> BaseModel:
    raw = await request.body()
    if len(raw) > MAX_SPEC_BYTES:
        raise _Refused(413, f"request body is over the {MAX_SPEC_BYTES} byte limit")
    try:
        data = json.loads(raw or b"{}")
    except ValueError as exc:
        raise _Refused(400, f"request body is not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(data, dict):
        raise _Refused(400, "send a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _Refused(422, "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())) from None


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _status_for(exc: Exception) -> int:
    if isinstance(exc, DreamBusy):
        return 409
    if isinstance(exc, KeyError) and not isinstance(exc, InvalidInvariant):
        return 404
    from amygdala.dream.certificates import CertificateNotFound

    if isinstance(exc, CertificateNotFound):
        return 404
    return 422


def build_dream_routes(services: Services) -> list[Route]:
    """The daemon's dream routes; the app wraps them in its bearer auth and body limit."""
    from amygdala.memory_graph.errors import MemoryGraphError

    ops = DreamService(services)

    def handler(fn: Callable[[Request], Any], ok: int = 200):
        async def endpoint(request: Request) -> JSONResponse:
            try:
                result = await fn(request)
            except _Refused as exc:
                return _error(exc.status, exc.message)
            except (DreamError, MemoryGraphError) as exc:
                return _error(_status_for(exc), str(exc))
            except Exception as exc:
                log.exception("dream API error")
                return _error(500, f"internal error ({type(exc).__name__}); the daemon logged the traceback")
            body = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
            return JSONResponse(body, status_code=ok)

        return endpoint

    async def status(request: Request) -> Any:
        return await run_in_threadpool(ops.status)

    async def run(request: Request) -> Any:
        req = await _body(request, RunRequest)
        return await run_in_threadpool(lambda: ops.run_now(req, trigger="cli", requested_by="operator CLI"))

    async def cancel(request: Request) -> Any:
        return await run_in_threadpool(ops.cancel)

    async def cycle(request: Request) -> Any:
        return await run_in_threadpool(ops.cycle, request.path_params["cycle_id"])

    async def list_invariants(request: Request) -> Any:
        return await run_in_threadpool(ops.list_invariants)

    async def add_invariant(request: Request) -> Any:
        req = await _body(request, AddInvariantRequest)
        return await run_in_threadpool(lambda: ops.add_invariant(req.spec, replace=req.replace, by="operator"))

    async def remove_invariant(request: Request) -> Any:
        return await run_in_threadpool(ops.remove_invariant, request.path_params["name"])

    async def certify(request: Request) -> Any:
        req = await _body(request, CertifyRequest)
        return await run_in_threadpool(ops.certify, request.path_params["name"], req)

    return [
        Route("/dream/status", handler(status), methods=["GET"]),
        Route("/dream/run", handler(run, ok=202), methods=["POST"]),
        Route("/dream/cancel", handler(cancel), methods=["POST"]),
        Route("/dream/cycles/{cycle_id}", handler(cycle), methods=["GET"]),
        Route("/invariants", handler(list_invariants), methods=["GET"]),
        Route("/invariants", handler(add_invariant, ok=201), methods=["POST"]),
        Route("/invariants/{name}", handler(remove_invariant), methods=["DELETE"]),
        Route("/certify/{name}", handler(certify, ok=201), methods=["POST"]),
    ]

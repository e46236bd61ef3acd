"""DreamRunner: the daemon's one runner of dream cycles, one at a time, and its memory of how they went.

Why a runner of its own rather than "the scheduler runs the loop": a cycle can be started by the
nightly schedule, by an agent (`run_dream_now`) and by the operator's CLI (`amygdala dream --once`
talking to the daemon); all three must meet one gate, so a second start is refused naming the cycle
that runs instead of queueing a second cycle behind it or training twice on the same corrections.
The runner owns a thread per cycle, so a start returns at once with the cycle's id and the caller
(an MCP tool, an HTTP request, a scheduler job) never blocks for the half hour a cycle may take.

The runner knows nothing of how a cycle works: it is handed a `CycleFn` (the dream loop, adapted in
`dream/scheduler.py`) and a `RecertifyFn` (the certificates' re-certification of stale certificates).
It keeps what `dream_status` reports: the activity in progress (phase, done/total), the last cycle's
outcome and why, its temperature and failure rate, and notes such as "the nightly run was skipped".
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Literal, TypeVar

from .errors import DreamError

log = logging.getLogger(__name__)

Trigger = Literal["nightly", "now", "cli"]
ActivityKind = Literal["cycle", "recertify", "certify"]
MAX_NOTES = 20
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_cycle_id(now: datetime | None = None) -> str:
    """A sortable, unique cycle id (`cycle-20260314T030000Z-1a2b3c`), minted before the cycle starts.

    Minted by the runner (not the loop) so that a start can answer with the id at once and a refusal
    can name the running cycle even before the loop has written anything.
    """
    now = now or utcnow()
    return f"cycle-{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class DreamRequest:
    """What a start asks for; budgets None mean the loop's defaults."""

    trigger: Trigger = "now"
    dry_run: bool = False
    budget_steps: int | None = None
    budget_minutes: float | None = None
    requested_by: str = ""  # free text for the record: "agent", "operator CLI", "nightly schedule"
    seed: int | None = None  # None: the loop draws a fresh one (and records it)

    def describe(self) -> str:
        who = {"nightly": "the nightly schedule", "now": "run-now", "cli": "the CLI"}[self.trigger]
        if self.requested_by:
            who += f" ({self.requested_by})"
        return who + (", dry run" if self.dry_run else "")


@dataclass(frozen=True)
class CycleSummary:
    """How one cycle ended, in the terms dream_status reports (the full record is in the graph)."""

    cycle_id: str
    outcome: str  # the loop's word: e.g. "kept", "rolled_back", "nothing_to_train", "dry_run", "cancelled", "failed"
    reason: str  # one sentence: why this outcome
    weights_changed: bool  # trained weights were kept: certificates on the old weights are stale now
    trigger: str = "now"  # a Trigger, or "unknown" for a recorded cycle that did not say
    dry_run: bool = False
    temperature: float | None = None  # the controller's temperature the cycle sampled at
    next_temperature: float | None = None  # what the controller set for the next cycle
    failure_rate: float | None = None  # measured on-policy failure rate
    steps: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    details: dict = field(default_factory=dict)  # the loop's own report (JSON-able), for `--json` and the API


@dataclass(frozen=True)
class RecertifySummary:
    """What a re-certification pass did: how many stale certificates, which certified again."""

    after_cycle: str | None
    attempted: int
    certified: int
    failed: list[str] = field(default_factory=list)  # "name: why" for those that did not certify or errored
    certificate_ids: list[str] = field(default_factory=list)
    finished_at: datetime | None = None


@dataclass(frozen=True)
class Activity:
    """What the runner is doing now (a snapshot; the live one changes under the runner's lock)."""

    kind: ActivityKind
    cycle_id: str | None
    request: DreamRequest | None
    started_at: datetime
    phase: str = "starting"
    done: int = 0
    total: int = 0
    message: str = ""
    cancel_requested: bool = False
    subject: str | None = None  # certify: the invariant being certified

    def describe(self) -> str:
        if self.kind == "certify":
            what = f"certification of invariant {self.subject!r}"
        elif self.kind == "recertify":
            what = f"re-certification of stale certificates after {self.cycle_id or 'a weight change'}"
        else:
            what = f"dream cycle {self.cycle_id}" + (f" (started by {self.request.describe()})" if self.request else "")
        where = f"phase {self.phase}" + (f", {self.done}/{self.total}" if self.total else "")
        return f"{what}, {where}, running since {self.started_at.strftime('%Y-%m-%d %H:%M:%S UTC')}"


@dataclass(frozen=True)
class RunnerStatus:
    current: Activity | None
    last: CycleSummary | None
    last_recertify: RecertifySummary | None
    notes: list[str]  # newest last: skipped or missed runs, errors outside a cycle
    cycles_run: int  # by this process


class DreamBusy(DreamError):
    """A start while a cycle (or re-certification) runs: the message names it and what to do."""

    def __init__(self, activity: Activity):
        self.activity = activity
        super().__init__(f"refused: {activity.describe()}. One cycle runs at a time: wait for it to finish "
                         "(the dream_status tool, or GET /dream/status on the daemon, shows its progress) and start "
                         "again, or cancel it first (POST /dream/cancel)")


class Progress:
    """Handed to a running cycle: report phase and counts, learn the loop's cycle id, check for cancel."""

    def __init__(self, runner: DreamRunner, token: object):
        self._runner = runner
        self._token = token

    def __call__(self, phase: str, done: int = 0, total: int = 0, message: str = "") -> None:
        self._runner._update(self._token, phase=phase, done=int(done), total=int(total), message=message)

    def begin(self, cycle_id: str) -> None:
        """The loop names its cycle (when it mints its own id instead of using the runner's)."""
        self._runner._update(self._token, cycle_id=cycle_id)

    @property
    def cancelled(self) -> bool:
        return self._runner._cancel_event(self._token).is_set()

    @property
    def cancel_event(self) -> threading.Event:
        return self._runner._cancel_event(self._token)


CycleFn = Callable[[str, DreamRequest, Progress], CycleSummary]  # (cycle_id, request, progress) -> summary
RecertifyFn = Callable[[str | None, Progress], RecertifySummary]  # (after_cycle, progress) -> summary


class DreamRunner:
    """Runs dream cycles one at a time on a thread of their own; refuses a second start clearly.

    `on_cycle_done` hooks get every finished cycle's summary (the scheduler uses one to queue the
    re-certification after a cycle that kept trained weights). `history` returns the last cycle
    recorded before this process started (from the graph), so a fresh daemon still reports it.
    """

    def __init__(self, cycle: CycleFn, *, recertify: RecertifyFn | None = None,
                 history: Callable[[], CycleSummary | None] | None = None):
        self._cycle = cycle
        self._recertify = recertify
        self._history = history
        self._lock = threading.Lock()
        self._current: Activity | None = None
        self._token: object | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._last: CycleSummary | None = None
        self._last_recertify: RecertifySummary | None = None
        self._notes: list[str] = []
        self._cycles_run = 0
        self._pending_recertify: tuple[bool, str | None] = (False, None)
        self._closed = False
        self.on_cycle_done: list[Callable[[CycleSummary], None]] = []
        self.on_recertify_done: list[Callable[[RecertifySummary], None]] = []  # after a pass that did not raise

    # -- starting -----------------------------------------------------------------------------
    def start(self, request: DreamRequest) -> Activity:
        """Start a cycle on the runner's thread and return at once; DreamBusy when one runs."""
        with self._lock:
            self._refuse_if_busy()
            cycle_id = new_cycle_id()
            activity = Activity(kind="cycle", cycle_id=cycle_id, request=request, started_at=utcnow())
            self._begin(activity, lambda token: self._run_cycle(token, cycle_id, request))
            return activity

    def recertify(self, after_cycle: str | None = None) -> Activity | None:
        """Re-certify stale certificates on the runner's thread (queued behind a running activity).

        Returns the started activity, or None when it was queued behind the current one or there is
        nothing to re-certify with (no certificates module wired).
        """
        if self._recertify is None:
            return None
        with self._lock:
            if self._closed:
                return None
            if self._current is not None:
                self._pending_recertify = (True, after_cycle)
                return None
            activity = Activity(kind="recertify", cycle_id=after_cycle, request=None, started_at=utcnow())
            self._begin(activity, lambda token: self._run_recertify(token, after_cycle))
            return activity

    def exclusive(self, kind: ActivityKind, fn: Callable[[Progress], T], *, subject: str | None = None) -> T:
        """Run `fn` on the calling thread as the runner's one activity (certifying on request, say).

        Model-heavy work that must not overlap a cycle (a certificate judged while training moves
        the weights would be void) takes the same slot; DreamBusy when something else holds it.
        """
        with self._lock:
            self._refuse_if_busy()
            token = object()
            self._current = Activity(kind=kind, cycle_id=None, request=None, started_at=utcnow(), subject=subject)
            self._token = token
            self._cancel = threading.Event()
            self._idle.clear()
        try:
            return fn(Progress(self, token))
        finally:
            self._finish(token)

    def _refuse_if_busy(self) -> None:
        if self._closed:
            raise DreamError("the daemon is shutting down: no new dream cycle starts now; start it again after restart")
        if self._current is not None:
            raise DreamBusy(self._current)

    def _begin(self, activity: Activity, body: Callable[[object], None]) -> None:
        token = object()
        self._current, self._token = activity, token
        self._cancel = threading.Event()
        self._idle.clear()
        thread = threading.Thread(target=self._guard, args=(token, body), name=f"amygdala-dream-{activity.kind}",
                                  daemon=True)
        self._thread = thread
        thread.start()

    def _guard(self, token: object, body: Callable[[object], None]) -> None:
        try:
            body(token)
        finally:
            self._finish(token)

    def _finish(self, token: object) -> None:
        with self._lock:  # hand over under the lock: no start can slip in between
            if self._token is token:
                self._current, self._token = None, None
            queued, after = self._pending_recertify
            self._pending_recertify = (False, None)
            if queued and not self._closed and self._current is None and self._recertify is not None:
                activity = Activity(kind="recertify", cycle_id=after, request=None, started_at=utcnow())
                self._begin(activity, lambda tok: self._run_recertify(tok, after))
            elif self._current is None:
                self._idle.set()

    # -- running ------------------------------------------------------------------------------
    def _run_cycle(self, token: object, cycle_id: str, request: DreamRequest) -> None:
        started = utcnow()
        progress = Progress(self, token)
        try:
            summary = self._cycle(cycle_id, request, progress)
        except Exception as exc:  # recorded, reported by dream_status; the next cycle starts clean
            log.exception("dream cycle %s failed", cycle_id)
            live = self._current
            summary = CycleSummary(cycle_id=(live.cycle_id if live and live.cycle_id else cycle_id), outcome="failed",
                                   reason=f"{type(exc).__name__}: {exc}", weights_changed=False,
                                   trigger=request.trigger, dry_run=request.dry_run)
        summary = replace(summary, trigger=request.trigger, dry_run=request.dry_run,
                          started_at=summary.started_at or started, finished_at=summary.finished_at or utcnow())
        with self._lock:
            self._last = summary
            self._cycles_run += 1
        log.info("dream cycle %s: %s (%s)", summary.cycle_id, summary.outcome, summary.reason)
        for hook in list(self.on_cycle_done):
            try:
                hook(summary)
            except Exception:
                log.exception("a cycle-done hook failed after cycle %s", summary.cycle_id)

    def _run_recertify(self, token: object, after_cycle: str | None) -> None:
        assert self._recertify is not None
        try:
            summary = self._recertify(after_cycle, Progress(self, token))
        except Exception as exc:
            log.exception("re-certification after %s failed", after_cycle)
            self.note(f"re-certification after {after_cycle or 'a weight change'} failed: {type(exc).__name__}: {exc}")
            return
        summary = replace(summary, finished_at=summary.finished_at or utcnow())
        with self._lock:
            self._last_recertify = summary
        for hook in list(self.on_recertify_done):
            try:
                hook(summary)
            except Exception:
                log.exception("a re-certification hook failed")

    # -- called by Progress -------------------------------------------------------------------
    def _update(self, token: object, **changes: object) -> None:
        with self._lock:
            if self._token is token and self._current is not None:
                self._current = replace(self._current, **changes)  # type: ignore[arg-type]

    def _cancel_event(self, token: object) -> threading.Event:
        with self._lock:
            return self._cancel if self._token is token else _SET

    # -- control and status -------------------------------------------------------------------
    def cancel(self) -> Activity | None:
        """Ask the running cycle to stop at its next check (it rolls back or keeps a complete step)."""
        with self._lock:
            if self._current is None:
                return None
            self._cancel.set()
            self._current = replace(self._current, cancel_requested=True)
            return self._current

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing runs (True) or the timeout passes (False)."""
        return self._idle.wait(timeout)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._current is not None

    def note(self, text: str) -> None:
        """Record something dream_status should say (a skipped or missed nightly run, say)."""
        stamped = f"{utcnow().strftime('%Y-%m-%d %H:%M:%S UTC')}: {text}"
        log.warning("%s", text)
        with self._lock:
            self._notes = [*self._notes, stamped][-MAX_NOTES:]

    def status(self) -> RunnerStatus:
        with self._lock:
            last, current = self._last, self._current
            out = RunnerStatus(current=current, last=last, last_recertify=self._last_recertify,
                               notes=list(self._notes), cycles_run=self._cycles_run)
        if last is None and self._history is not None:
            try:
                out = replace(out, last=self._history())
            except Exception:
                log.exception("reading the last recorded dream cycle failed")
        return out

    def close(self, timeout: float | None = 60.0) -> bool:
        """Refuse new starts, cancel what runs and wait for it; False when it did not stop in time."""
        with self._lock:
            self._closed = True
            self._pending_recertify = (False, None)
            if self._current is not None:
                self._cancel.set()
        return self._idle.wait(timeout)


_SET = threading.Event()
_SET.set()  # what a stale Progress sees: its cycle is over, stop

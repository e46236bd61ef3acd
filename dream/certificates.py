"""Behavioural certificates on disk and in the graph, what is served now, and which are stale.

A certificate is evidence an operator reviews before trusting weights the model trained overnight,
so it must be checkable later without trusting whoever wrote it. The JSON file
(`$AMYGDALA_HOME/certificates/<id>.json`, `CertificateRecord`) holds everything needed for that:
every judged case with its prompt, response, verdict, score and reason; the seeds and judge
configuration to judge them again; the bound, method, threshold and confidence to recompute the
decision; and what it is about: the invariant's spec hash, the served weights' hash, the readout's
hash and the package version. The graph gets a `Certificate` node linked to its invariant
(`certifies`), carrying the counts, the bounds, the file's sha256 and the per-case outcomes, so a
file edited afterwards is caught (dream/verify.py names the field) and the operator's decisions
(dream/review.py) have an append-only home.

Which weights a certificate is about: `weights_sha256` is the full sha256 over the served model's
parameter names and bytes (`LoadedModel.weights_sha256`, whose first 16 digits are the
`weights_hash` that readouts and dream cycles record). It is computed from the parameters in memory,
so it names exactly the weights that answered the cases, including trained weights the checkpoint
sync has not written to the files yet. Without a model in memory (the CLI), `served_from_files`
loads the model directory once and caches the hash keyed by the files' sizes and modification
times, so a later listing costs nothing until the files change (training synced, a rollback
synced, weights copied in from elsewhere).

Staleness: a certificate is stale the moment the served weights hash differs from the one it
recorded (or the readout's, when it recorded one). Each distinct served hash is noted with the time
it was first seen (`served-history.json`), which is how a listing says since when.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, ValidationError

from amygdala.fsio import atomic_write
from amygdala.memory_graph import Certificate, Invariant, MemoryGraph
from amygdala.memory_graph.models import NODE_ID_PATTERN, utc_now

from .bounds import CertificationResult
from .errors import DreamError

if TYPE_CHECKING:
    from amygdala.engine.config import Config
    from amygdala.engine.model import LoadedModel
    from amygdala.engine.readout import ReadoutManager

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RECORD_MARKER = "amygdala.certificate"  # in the graph node's details: the node has a record file
HISTORY_FILE = "served-history.json"
FILES_CACHE = "served-cache.json"
MAX_HISTORY = 1000

CertificateVerdict = Literal["certified", "refuted", "inconclusive"]
CertificateStatus = Literal["certified", "refuted", "inconclusive", "stale", "approved", "rejected", "revoked"]
STATUSES: tuple[str, ...] = ("certified", "refuted", "inconclusive", "stale", "approved", "rejected", "revoked")


class CertificateNotFound(DreamError, KeyError):
    """No certificate with that id (a KeyError too, for lookups)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CertificateFileError(DreamError):
    """A record file that cannot be read as a certificate; the message (and `fields`) name the fields."""

    def __init__(self, message: str, fields: Sequence[str] = ()):
        super().__init__(message)
        self.fields = list(fields)


# ------------------------------------------------------------------------------------------ file model

class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CaseRecord(_Frozen):
    """One judged held-out case, in the order the run judged it (the sequential test's order)."""

    index: int = Field(ge=0, description="Position in the run.")
    case_id: str = Field(description="sha256 of (invariant, context, preferred, rejected), first 16 hex digits.")
    source: str = Field(description="'case' (written), 'template', 'memory' or 'variation'.")
    context: str = Field(description="The prompt the model answered.")
    preferred: str
    rejected: str
    response: str | None = Field(None, description="The model's generated reply (None for forced-choice judges).")
    passed: bool = Field(description="The judge's verdict.")
    score: float = Field(allow_inf_nan=False, description="The judge's score (e.g. the preference margin).")
    reason: str
    seed: int = Field(description="The judge seed this case was judged with.")


class JudgeRecord(_Frozen):
    """How the cases were judged: enough to build the same judge again."""

    kind: str
    params: dict[str, JsonValue] = Field(default_factory=dict)
    max_new_tokens: int = Field(ge=1)
    seed: int
    batch_size: int = Field(ge=1, description="Cases per judge_model call.")


class EnvironmentRecord(_Frozen):
    """Where the cases were judged: what a bit-exact re-run needs to match."""

    python: str
    torch: str
    transformers: str
    device: str
    dtype: str
    threads: int


class CertificateRecord(_Frozen):
    """The certificate file: the evidence and everything needed to check it again."""

    schema_version: Literal[1] = SCHEMA_VERSION
    id: str = Field(pattern=NODE_ID_PATTERN)
    invariant: str
    invariant_id: str = Field(pattern=NODE_ID_PATTERN)
    description: str
    spec_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    model: str
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the served parameters.")
    readout_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    package_version: str
    judge: JudgeRecord
    seed: int = Field(description="Seed of the case draw (order and template filling).")
    pool_size: int = Field(ge=0, description="Held-out cases available to draw from.")
    n_requested: int = Field(ge=1, description="Cases asked for (fixed n) or the most allowed (sequential).")
    result: CertificationResult
    cases: list[CaseRecord]
    cycle_id: str | None = Field(None, description="The dream cycle this certificate came from, if any.")
    created: AwareDatetime
    duration_s: float = Field(ge=0)
    environment: EnvironmentRecord

    @property
    def verdict(self) -> CertificateVerdict:
        return self.result.verdict

    def outcomes(self) -> list[bool]:
        return [c.passed for c in self.cases]


def record_path(config: Config, certificate_id: str) -> Path:
    return config.certificates_dir / f"{certificate_id}.json"


def record_bytes(record: CertificateRecord) -> bytes:
    return (record.model_dump_json(indent=1) + "\n").encode()


def _field_path(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "(top level)"


def parse_record(data: bytes | str, where: str) -> CertificateRecord:
    """A record from file bytes; CertificateFileError names the first bad fields."""
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise CertificateFileError(f"{where}: not valid JSON ({exc})") from None
    if isinstance(raw, dict) and raw.get("schema_version") not in (None, SCHEMA_VERSION):
        raise CertificateFileError(f"{where}: schema_version {raw.get('schema_version')!r}; this amygdala reads "
                                   f"version {SCHEMA_VERSION}")
    try:
        return CertificateRecord.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()[:5]
        parts = [f"{_field_path(e['loc'])}: {e['msg']}" for e in errors]
        raise CertificateFileError(f"{where}: " + "; ".join(parts), [_field_path(e["loc"]) for e in errors]) from None


def load_record(config: Config, certificate_id: str) -> CertificateRecord:
    """The certificate file of that id."""
    path = record_path(config, certificate_id)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CertificateNotFound(f"no certificate file {path}; `amygdala certificates list` shows the ids") from None
    return parse_record(data, str(path))


def get_certificate(config: Config, certificate_id: str) -> CertificateRecord:
    """Service API: the full record (every case) of one certificate."""
    return load_record(config, certificate_id)


def node_details(record: CertificateRecord, file_sha256: str) -> dict[str, JsonValue]:
    """What the graph node keeps besides its counts: enough to catch any later edit of the file."""
    return {
        "record": RECORD_MARKER, "schema_version": SCHEMA_VERSION, "file_sha256": file_sha256,
        "invariant": record.invariant, "spec_sha256": record.spec_sha256, "weights_sha256": record.weights_sha256,
        "readout_sha256": record.readout_sha256, "verdict": record.verdict, "n_max": record.result.n_max,
        "seed": record.seed, "judge_kind": record.judge.kind, "judge_seed": record.judge.seed,
        "cycle_id": record.cycle_id, "outcomes": "".join("1" if c.passed else "0" for c in record.cases),
        "package_version": record.package_version,
    }


def issue(graph: MemoryGraph, config: Config, record: CertificateRecord) -> Certificate:
    """Write the record file (atomically), then its graph node linked to the invariant.

    File first: a crash in between leaves an orphan file that nothing lists, never a node whose
    evidence is missing.
    """
    inv = graph.get(record.invariant_id)
    if not isinstance(inv, Invariant):
        raise DreamError(f"{record.invariant_id} is not an invariant; nothing was stored")
    if record.result.threshold < inv.threshold:
        raise DreamError(f"threshold {record.result.threshold} is below invariant {inv.name!r}'s {inv.threshold}; "
                         "nothing was stored")
    data = record_bytes(record)
    config.certificates_dir.mkdir(parents=True, exist_ok=True)
    path = record_path(config, record.id)
    if path.exists():
        raise DreamError(f"{path} exists already; certificate ids are never reused")
    atomic_write(path, data)
    r = record.result
    node = Certificate(id=record.id, invariant_id=record.invariant_id, model=record.model, trials=r.n,
                       successes=r.passes, threshold=r.threshold, confidence=r.confidence, lower_bound=r.lower,
                       upper_bound=r.upper, method=r.method, passed=r.verdict == "certified",
                       details=node_details(record, hashlib.sha256(data).hexdigest()), time=record.created)
    stored = graph.add_node(node, links=[("certifies", record.invariant_id)])
    assert isinstance(stored, Certificate)
    return stored


# ---------------------------------------------------------------------------------------- what is served

class ServedState(_Frozen):
    """The weights and readout answering right now, as certificates name them."""

    model: str
    weights_sha256: str
    readout_sha256: str | None = None
    source: Literal["memory", "files"] = Field(
        "memory", description="'memory': the loaded model's parameters; 'files': the model directory as it stands.")
    observed: AwareDatetime = Field(default_factory=utc_now)


class HistoryEntry(_Frozen):
    weights_sha256: str
    readout_sha256: str | None = None
    first_seen: AwareDatetime
    source: str = "memory"


_readout_hashes: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def readout_sha256(readout: ReadoutManager | None) -> str | None:
    """sha256 over the readout's manifest and tensors (what scores; the same for any copy of its files)."""
    if readout is None:
        return None
    cached = _readout_hashes.get(readout)
    if cached is not None:
        return cached
    import torch

    h = hashlib.sha256(readout.manifest.model_dump_json().encode())
    for layer in sorted(readout.layers):
        lr = readout.layers[layer]
        for name in sorted(vars(lr)):
            t = getattr(lr, name)
            if isinstance(t, torch.Tensor):
                h.update(f"{layer}.{name}".encode())
                t = t.detach().contiguous().cpu().reshape(-1)  # 0-dim tensors cannot be viewed as bytes
                h.update(memoryview(t.view(torch.uint8).numpy()) if t.numel() else b"")
    digest = h.hexdigest()
    _readout_hashes[readout] = digest
    return digest


def served_state(config: Config, lm: LoadedModel, readout: ReadoutManager | None = None, *,
                 refresh: bool = False, record: bool = True) -> ServedState:
    """What the loaded model serves (cached by the model until training invalidates it)."""
    state = ServedState(model=lm.name, weights_sha256=lm.weights_sha256(refresh), readout_sha256=readout_sha256(readout))
    if record:
        note_served(config, state)
    return state


def _stat_key(paths: Sequence[Path]) -> list[list]:
    out = []
    for p in sorted(paths):
        st = p.stat()
        out.append([p.name, st.st_size, st.st_mtime_ns, st.st_ino])
    return out


def served_from_files(config: Config, *, echo=None) -> ServedState:
    """What a model loaded from the home's files would serve, without a model in memory (the CLI).

    The hash is the one `served_state` gives for the same weights (it loads the model once to
    compute it) and is cached under the certificates folder keyed by the weight files' sizes,
    modification times and inodes: unchanged files cost nothing, changed files are hashed again.
    """
    from amygdala.engine.model import load_model, resolve_model_path
    from amygdala.engine.readout import MANIFEST_FILE, TENSORS_FILE

    quiet = echo or (lambda _m: None)
    model_dir = resolve_model_path(config, echo=quiet)
    weight_files = [p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json"]
    cache_path = config.certificates_dir / FILES_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    key = {"model_dir": str(model_dir), "dtype": config.dtype, "files": _stat_key(weight_files)}
    weights = cache.get("weights_sha256") if cache.get("weights_key") == key else None
    readout_dir = Path(cache["readout_dir"]) if weights and cache.get("readout_dir") else None
    name = cache.get("model") if weights else None
    if weights is None:
        lm = load_model(config, echo=quiet)
        weights, name = lm.weights_sha256(), lm.name
        from amygdala.training.vectors.build import default_readout_dir

        readout_dir = default_readout_dir(config, lm)
        cache = {"weights_key": key, "weights_sha256": weights, "model": name, "readout_dir": str(readout_dir)}
    readout_hash = None
    if readout_dir is not None and (readout_dir / MANIFEST_FILE).is_file() and (readout_dir / TENSORS_FILE).is_file():
        rkey = _stat_key([readout_dir / MANIFEST_FILE, readout_dir / TENSORS_FILE])
        if cache.get("readout_key") == rkey:
            readout_hash = cache.get("readout_sha256")
        else:
            from amygdala.engine.readout import ReadoutManager

            readout_hash = readout_sha256(ReadoutManager.from_file(readout_dir))
            cache.update(readout_key=rkey, readout_sha256=readout_hash)
    config.certificates_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(cache_path, json.dumps(cache, indent=1).encode())
    state = ServedState(model=str(name), weights_sha256=str(weights), readout_sha256=readout_hash, source="files")
    note_served(config, state)
    return state


def _history_lock(config: Config):
    from filelock import FileLock

    return FileLock(str(config.certificates_dir / ".history.lock"), timeout=10)


def served_history(config: Config) -> list[HistoryEntry]:
    """Every distinct served state seen, oldest first, with when it was first seen."""
    path = config.certificates_dir / HISTORY_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    out = []
    for item in raw if isinstance(raw, list) else []:
        try:
            out.append(HistoryEntry.model_validate(item))
        except ValidationError:
            continue
    return out


def note_served(config: Config, state: ServedState) -> None:
    """Append the served state to the history when it differs from the last one seen."""
    config.certificates_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _history_lock(config):
            history = served_history(config)
            last = history[-1] if history else None
            if last is not None and (last.weights_sha256, last.readout_sha256) == (state.weights_sha256,
                                                                                   state.readout_sha256):
                return
            if last is not None and state.readout_sha256 is None and last.weights_sha256 == state.weights_sha256:
                return  # the readout is not loaded (yet): nothing changed that we know of
            history.append(HistoryEntry(weights_sha256=state.weights_sha256, readout_sha256=state.readout_sha256,
                                        first_seen=state.observed, source=state.source))
            data = json.dumps([h.model_dump(mode="json") for h in history[-MAX_HISTORY:]], indent=1)
            atomic_write(config.certificates_dir / HISTORY_FILE, data.encode())
    except OSError as exc:  # a read-only home still lists; it just cannot say since when
        log.warning("could not record the served weights in %s: %s", config.certificates_dir, exc)


# -------------------------------------------------------------------------------------------- listing

class ReviewInfo(_Frozen):
    decision: Literal["approve", "reject"]
    operator: str
    reason: str
    time: AwareDatetime
    via: str


class Staleness(_Frozen):
    stale: bool
    reasons: list[str] = Field(default_factory=list)
    since: AwareDatetime | None = Field(None, description="When the differing weights were first seen, if known.")


class CertificateSummary(_Frozen):
    """One certificate as a listing shows it (service API and the review page)."""

    id: str
    invariant: str
    invariant_id: str
    created: AwareDatetime
    cycle_id: str | None
    verdict: CertificateVerdict
    status: CertificateStatus
    method: str
    n: int
    passes: int
    lower: float
    upper: float
    threshold: float
    confidence: float
    weights_sha256: str
    stale: bool
    stale_reasons: list[str]
    stale_since: AwareDatetime | None
    reviews: list[ReviewInfo]
    summary: str

    @property
    def pass_rate(self) -> float:
        return self.passes / self.n if self.n else 0.0

    @property
    def latest_review(self) -> ReviewInfo | None:
        return self.reviews[-1] if self.reviews else None


def is_record_node(node: object) -> bool:
    return isinstance(node, Certificate) and node.details.get("record") == RECORD_MARKER


def staleness(details: dict, created: datetime, served: ServedState | None,
              history: Sequence[HistoryEntry] = ()) -> Staleness:
    """Stale when the served weights (or the readout it recorded) differ from what the certificate names."""
    if served is None:
        return Staleness(stale=False)
    reasons = []
    weights = str(details.get("weights_sha256"))
    if served.weights_sha256 != weights:
        where = "the weights files hold" if served.source == "files" else "the served weights are"
        reasons.append(f"weights changed: certified on {weights[:16]}, {where} {served.weights_sha256[:16]} now")
    readout = details.get("readout_sha256")
    if readout and served.readout_sha256 and served.readout_sha256 != readout:
        reasons.append(f"readout changed: certified with {str(readout)[:16]}, served {served.readout_sha256[:16]} now")
    if not reasons:
        return Staleness(stale=False)
    since = None
    for h in history:
        if h.first_seen >= created and (h.weights_sha256 != weights or (readout and h.readout_sha256
                                                                         and h.readout_sha256 != readout)):
            since = h.first_seen
            break
    return Staleness(stale=True, reasons=reasons, since=since)


def status_of(node: Certificate, stale: bool) -> CertificateStatus:
    """revoked > stale > the operator's latest decision > the statistical verdict."""
    if node.revoked:
        return "revoked"
    if stale:
        return "stale"
    if node.reviews:
        return "approved" if node.reviews[-1].decision == "approve" else "rejected"
    verdict = node.details.get("verdict")
    if verdict in ("certified", "refuted", "inconclusive"):
        return verdict  # type: ignore[return-value]
    return "certified" if node.passed else "refuted"


def summarize(graph: MemoryGraph, node: Certificate, served: ServedState | None,
              history: Sequence[HistoryEntry] = ()) -> CertificateSummary:
    inv = graph.get(node.invariant_id)
    st = staleness(node.details, node.time, served, history)
    verdict = node.details.get("verdict") or ("certified" if node.passed else "refuted")
    result = CertificationResult(method=node.method, threshold=node.threshold, confidence=node.confidence,
                                 n=node.trials, passes=node.successes, lower=node.lower_bound,
                                 upper=node.upper_bound, verdict=verdict, n_max=node.details.get("n_max"))
    cycle = node.details.get("cycle_id")
    return CertificateSummary(
        id=node.id, invariant=getattr(inv, "name", node.invariant_id), invariant_id=node.invariant_id,
        created=node.time, cycle_id=str(cycle) if cycle else None, verdict=verdict, status=status_of(node, st.stale),
        method=node.method, n=node.trials, passes=node.successes, lower=node.lower_bound, upper=node.upper_bound,
        threshold=node.threshold, confidence=node.confidence, weights_sha256=str(node.details.get("weights_sha256")),
        stale=st.stale, stale_reasons=st.reasons, stale_since=st.since,
        reviews=[ReviewInfo(**r.model_dump()) for r in node.reviews], summary=result.summary)


def certificate_nodes(graph: MemoryGraph, invariant: str | None = None) -> list[Certificate]:
    """Certificate nodes that have a record file, oldest first; `invariant` by name (any version) or id."""
    nodes = [n for n in graph.nodes("certificate") if is_record_node(n)]
    if invariant is not None:
        ids = {n.id for n in graph.nodes("invariant") if isinstance(n, Invariant) and invariant in (n.name, n.id)}
        if not ids:
            names = sorted({n.name for n in graph.nodes("invariant") if isinstance(n, Invariant)})
            raise DreamError(f"no invariant named {invariant!r}; known: {', '.join(names) or 'none'}")
        nodes = [n for n in nodes if n.invariant_id in ids]
    return sorted(nodes, key=lambda n: (n.time, n.id))  # type: ignore[misc]


def list_certificates(graph: MemoryGraph, config: Config, invariant: str | None = None,
                      status: str | None = None, served: ServedState | None = None) -> list[CertificateSummary]:
    """Service API: certificates, newest first, with status (stale against `served` when given)."""
    if status is not None and status not in STATUSES:
        raise DreamError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    history = served_history(config) if served is not None else []
    out = [summarize(graph, n, served, history) for n in certificate_nodes(graph, invariant)]
    out.reverse()
    return [s for s in out if status is None or s.status == status]


def certificate_node(graph: MemoryGraph, certificate_id: str) -> Certificate:
    try:
        node = graph.get(certificate_id)
    except KeyError:
        node = None
    if not is_record_node(node):
        raise CertificateNotFound(f"no certificate {certificate_id!r} in the graph; `amygdala certificates list` "
                                  "shows the ids")
    assert isinstance(node, Certificate)
    return node


def latest_by_invariant(graph: MemoryGraph, config: Config, served: ServedState | None) -> dict[str, CertificateSummary]:
    """The newest certificate of each invariant name."""
    out: dict[str, CertificateSummary] = {}
    for s in list_certificates(graph, config, served=served):
        out.setdefault(s.invariant, s)
    return out


def stale_certificates(graph: MemoryGraph, config: Config, served: ServedState) -> list[CertificateSummary]:
    """For the scheduler: the newest certificate of each active invariant, where it is stale.

    An invariant whose newest certificate is fresh needs nothing; one re-certified since the
    weights changed is not listed again (its newest certificate is the fresh one).
    """
    active = {n.name for n in graph.nodes("invariant") if isinstance(n, Invariant) and not n.retired}
    return [s for name, s in latest_by_invariant(graph, config, served).items() if name in active and s.stale]


def package_version() -> str:
    import amygdala

    return amygdala.__version__


def environment(lm: LoadedModel) -> EnvironmentRecord:
    import platform

    import torch
    import transformers

    return EnvironmentRecord(python=platform.python_version(), torch=torch.__version__,
                             transformers=transformers.__version__, device=str(lm.device),
                             dtype=str(lm.dtype).removeprefix("torch."), threads=torch.get_num_threads())


__all__ = [
    "STATUSES",
    "CaseRecord",
    "CertificateFileError",
    "CertificateNotFound",
    "CertificateRecord",
    "CertificateStatus",
    "CertificateSummary",
    "JudgeRecord",
    "ServedState",
    "get_certificate",
    "issue",
    "list_certificates",
    "load_record",
    "served_from_files",
    "served_state",
    "stale_certificates",
]

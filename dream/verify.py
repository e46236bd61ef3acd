"""Verify a certificate: its arithmetic, its integrity, what it is about, and that it reproduces.

Four independent checks, each reported with the field it concerns so a failure says what is wrong:

1. Integrity: the file's sha256 against the one the graph recorded when the certificate was
   issued, and every field the graph keeps (counts, bounds, verdict, hashes, seeds, the per-case
   outcomes) against the file. An edit of one verdict, or of a count, names that field even when the
   editor also fixed the totals to match.
2. Statistics: n and passes recounted from the recorded cases, and the verdict and bounds recomputed
   from the recorded outcomes (`bounds.recompute`: a sequential record must also stop exactly where
   the test stops).
3. What is served: the weights and readout hashes against what is served now (a mismatch says which
   and, when known, since when); the invariant's spec against the stored one.
4. Reproduction: a sample of the recorded cases judged again with the recorded judge configuration
   and seeds; on the same weights the responses and verdicts must come back identical (scores to
   a tolerance that absorbs float summation order, nothing more).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from amygdala.memory_graph import Certificate, Invariant, MemoryGraph

from .bounds import recompute
from .certificates import (CertificateFileError, CertificateRecord, ServedState, certificate_node, parse_record,
                           record_path, served_history, staleness)
from .errors import DreamError
from .invariants import spec_of, spec_sha256

if TYPE_CHECKING:
    from amygdala.engine.config import Config
    from amygdala.engine.model import LoadedModel
    from amygdala.engine.readout import ReadoutManager

DEFAULT_SAMPLE = 5
SCORE_TOLERANCE = 1e-6


class Check(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="What was checked: 'integrity', 'schema', 'statistics', 'weights', 'readout', 'spec', 'rerun'.")
    ok: bool
    detail: str
    fields: list[str] = Field(default_factory=list, description="The record fields that failed, e.g. cases[3].passed.")


class RerunCase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    case_id: str
    recorded_passed: bool
    rerun_passed: bool
    recorded_score: float
    rerun_score: float
    recorded_response: str | None
    rerun_response: str | None
    same: bool


class VerifyReport(BaseModel):
    """Service API: the outcome of `verify_certificate`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    ok: bool
    checks: list[Check]
    rerun: list[RerunCase] = Field(default_factory=list)
    served: ServedState | None = None

    @property
    def problems(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]

    @property
    def failed_fields(self) -> list[str]:
        return [f for c in self.checks if not c.ok for f in c.fields]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return a == b


def _at(raw: Any, path: str) -> Any:
    """raw["result"]["n"] for "result.n"; a missing step gives the marker _MISSING."""
    cur = raw
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


_MISSING = object()


def _integrity(node: Certificate, data: bytes) -> Check:
    """The file against what the graph recorded at issue, read from the raw JSON so that even a file
    that no longer parses as a certificate has its edited fields named."""
    details = node.details
    bad: list[tuple[str, str]] = []
    file_ok = details.get("file_sha256") == hashlib.sha256(data).hexdigest()
    try:
        raw = json.loads(data)
    except ValueError:
        raw = None
    if isinstance(raw, dict):
        pairs: list[tuple[str, Any]] = [
            ("id", node.id), ("invariant_id", node.invariant_id), ("result.n", node.trials),
            ("result.passes", node.successes), ("result.lower", node.lower_bound), ("result.upper", node.upper_bound),
            ("result.threshold", node.threshold), ("result.confidence", node.confidence),
            ("result.method", node.method), ("result.verdict", details.get("verdict")),
            ("result.n_max", details.get("n_max")), ("weights_sha256", details.get("weights_sha256")),
            ("readout_sha256", details.get("readout_sha256")), ("spec_sha256", details.get("spec_sha256")),
            ("seed", details.get("seed")), ("judge.kind", details.get("judge_kind")),
            ("judge.seed", details.get("judge_seed")), ("cycle_id", details.get("cycle_id")),
            ("package_version", details.get("package_version")),
        ]
        for name, issued_value in pairs:
            in_file = _at(raw, name)
            if in_file is _MISSING:
                bad.append((name, (f"{name}: missing from the file; the graph recorded {issued_value!r} when it was "
                                  "issued")))
            elif not _same(in_file, issued_value):
                bad.append((name, (f"{name}: the file says {in_file!r}, the graph recorded {issued_value!r} when it "
                                  "was issued")))
        cases = raw.get("cases") if isinstance(raw.get("cases"), list) else []
        outcomes = str(details.get("outcomes", ""))
        if len(outcomes) != len(cases):
            bad.append(("cases", (f"cases: the file holds {len(cases)} cases, the graph recorded {len(outcomes)} when "
                                 "it was issued")))
        for i, (case, recorded) in enumerate(zip(cases, outcomes)):
            passed = case.get("passed") if isinstance(case, dict) else None
            if passed is not (recorded == "1"):
                bad.append((f"cases[{i}].passed", (f"cases[{i}].passed: the file says {passed!r}, the graph "
                                                  f"recorded {recorded == '1'} when it was issued")))
    elif raw is not None or data:
        bad.append(("(file)", "the file is not a JSON object"))
    if file_ok and not bad:
        return Check(name="integrity", ok=True, detail="the file is byte for byte the one issued (sha256 matches the "
                                                       "graph) and every field the graph keeps agrees")
    parts = [] if file_ok else [("the file's sha256 differs from the one the graph recorded when it was issued: "
                                "it was edited after issue")]
    parts += [msg for _, msg in bad]
    return Check(name="integrity", ok=False, detail="; ".join(parts), fields=[f for f, _ in bad] or ["(file)"])


def _statistics(record: CertificateRecord) -> Check:
    r = record.result
    bad: list[tuple[str, str]] = []
    for i, c in enumerate(record.cases):
        if c.index != i:
            bad.append((f"cases[{i}].index", f"cases[{i}].index is {c.index}, not its position {i}"))
    passed = sum(c.passed for c in record.cases)
    if r.n != len(record.cases):
        bad.append(("result.n", f"result.n says {r.n} but the file holds {len(record.cases)} cases"))
    if r.passes != passed:
        bad.append(("result.passes", (f"result.passes says {r.passes} but {passed} of the {len(record.cases)} recorded "
                                     "cases passed")))
    try:
        again = recompute(record.outcomes(), method=r.method, threshold=r.threshold, confidence=r.confidence,
                          n_max=r.n_max)
    except ValueError as exc:
        bad.append(("cases", f"cases: {exc}"))
        again = None
    if again is not None:
        if again.verdict != r.verdict:
            bad.append(("result.verdict", (f"result.verdict says {r.verdict} but the recorded outcomes give "
                                          f"{again.verdict}")))
        for name in ("lower", "upper"):
            rec_v, new_v = getattr(r, name), getattr(again, name)
            if abs(rec_v - new_v) > 1e-9:
                bad.append((f"result.{name}", (f"result.{name} says {rec_v:.6f} but the recorded outcomes give "
                                              f"{new_v:.6f}")))
    if not bad:
        return Check(name="statistics", ok=True,
                     detail=f"recomputed from the {len(record.cases)} recorded verdicts: {again.summary if again else ''}")
    return Check(name="statistics", ok=False, detail="; ".join(m for _, m in bad), fields=[f for f, _ in bad])


def _served(config: Config, record: CertificateRecord, served: ServedState) -> list[Check]:
    details = {"weights_sha256": record.weights_sha256, "readout_sha256": record.readout_sha256}
    st = staleness(details, record.created, served, served_history(config))
    since = f" (first seen {st.since:%Y-%m-%d %H:%M:%S UTC})" if st.since else ""
    checks = []
    weights_reason = next((r for r in st.reasons if r.startswith("weights")), None)
    checks.append(Check(name="weights", ok=weights_reason is None, fields=[] if weights_reason is None else ["weights_sha256"],
                        detail=(f"served weights are the certified ones ({record.weights_sha256[:16]})"
                                if weights_reason is None else weights_reason + since)))
    readout_reason = next((r for r in st.reasons if r.startswith("readout")), None)
    if record.readout_sha256 is None:
        checks.append(Check(name="readout", ok=True, detail="the certificate was made without a readout"))
    elif served.readout_sha256 is None:
        checks.append(Check(name="readout", ok=True, detail="no readout is loaded now, so it cannot be compared"))
    else:
        checks.append(Check(name="readout", ok=readout_reason is None,
                            fields=[] if readout_reason is None else ["readout_sha256"],
                            detail=(f"served readout is the one certified with ({record.readout_sha256[:16]})" if readout_reason is None
                                    else readout_reason + since)))
    return checks


def _spec_check(graph: MemoryGraph, record: CertificateRecord):
    try:
        node = graph.get(record.invariant_id)
    except KeyError:
        node = None
    if not isinstance(node, Invariant):
        return None, Check(name="spec", ok=False, fields=["invariant_id"],
                           detail=f"invariant {record.invariant_id} is not in the graph")
    try:
        spec = spec_of(node)
    except DreamError as exc:
        return None, Check(name="spec", ok=False, fields=["invariant_id"], detail=str(exc))
    digest = spec_sha256(spec)
    if digest != record.spec_sha256:
        return spec, Check(name="spec", ok=False, fields=["spec_sha256"],
                           detail=f"spec_sha256 {record.spec_sha256[:16]} does not match invariant {node.name!r} as "
                                  f"stored ({digest[:16]})")
    note = " (retired since)" if node.retired else ""
    return spec, Check(name="spec", ok=True, detail=f"the invariant {node.name!r}{note} is the one certified "
                                                    f"(spec sha256 {digest[:16]})")


def rerun_cases(spec, record: CertificateRecord, lm: LoadedModel, readout: ReadoutManager | None,
                indices: list[int]) -> list[RerunCase]:
    """Judge the recorded cases at `indices` again with the recorded judge settings."""
    from .certify import case_from_record
    from .judges import JudgeContext, build_judge

    out = []
    by_seed: dict[int, list[int]] = {}
    for i in indices:
        by_seed.setdefault(record.cases[i].seed, []).append(i)
    for seed, idx in sorted(by_seed.items()):
        judge = build_judge(spec, JudgeContext(lm=lm, readout=readout, max_new_tokens=record.judge.max_new_tokens,
                                               seed=seed))
        verdicts = judge.judge_model([case_from_record(record.invariant, record.cases[i]) for i in idx])
        for i, v in zip(idx, verdicts):
            rec = record.cases[i]
            close = math.isclose(rec.score, v.score, rel_tol=SCORE_TOLERANCE, abs_tol=SCORE_TOLERANCE)
            out.append(RerunCase(index=i, case_id=rec.case_id, recorded_passed=rec.passed, rerun_passed=v.passed,
                                 recorded_score=rec.score, rerun_score=float(v.score),
                                 recorded_response=rec.response, rerun_response=v.response,
                                 same=rec.passed == v.passed and rec.response == v.response and close))
    return sorted(out, key=lambda r: r.index)


def sample_indices(record: CertificateRecord, k: int, seed: int) -> list[int]:
    """Up to k recorded cases: the first failure (if any) and a seeded random rest."""
    n = len(record.cases)
    if k <= 0 or n == 0:
        return []
    chosen: list[int] = []
    failing = [c.index for c in record.cases if not c.passed]
    if failing:
        chosen.append(failing[0])
    rest = [i for i in range(n) if i not in chosen]
    random.Random(f"amygdala.verify:{record.id}:{seed}").shuffle(rest)
    return sorted(chosen + rest[:max(0, k - len(chosen))])


def verify_certificate(graph: MemoryGraph, config: Config, certificate_id: str, *, served: ServedState | None = None,
                       lm: LoadedModel | None = None, readout: ReadoutManager | None = None,
                       sample: int = DEFAULT_SAMPLE, seed: int = 0) -> VerifyReport:
    """Service API: every check above; the re-run needs `lm` (and is skipped when the weights differ)."""
    node = certificate_node(graph, certificate_id)
    path = record_path(config, certificate_id)
    checks: list[Check] = []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return VerifyReport(id=certificate_id, ok=False, served=served, checks=[
            Check(name="integrity", ok=False, fields=["(file)"], detail=f"the record file {path} is missing")])
    record = None
    checks.append(_integrity(node, data))
    try:
        record = parse_record(data, str(path))
    except CertificateFileError as exc:
        checks.append(Check(name="schema", ok=False, fields=exc.fields or ["(file)"], detail=str(exc)))
    if record is None:
        return VerifyReport(id=certificate_id, ok=False, checks=checks, served=served)
    checks.append(_statistics(record))
    spec, spec_check = _spec_check(graph, record)
    checks.append(spec_check)
    if served is not None:
        checks.extend(_served(config, record, served))
    rerun: list[RerunCase] = []
    if lm is not None and sample > 0:
        weights_now = served.weights_sha256 if served is not None else lm.weights_sha256()
        if spec is None:
            checks.append(Check(name="rerun", ok=False, detail="cannot re-run: the invariant's spec is not available"))
        elif weights_now != record.weights_sha256:
            checks.append(Check(name="rerun", ok=False, fields=["weights_sha256"],
                                detail="not re-run: the served weights are not the certified ones, so the responses "
                                       "are not expected to reproduce"))
        else:
            rerun = rerun_cases(spec, record, lm, readout, sample_indices(record, sample, seed))
            differing = [r for r in rerun if not r.same]
            detail = (f"{len(rerun)} recorded case(s) judged again with seed(s) "
                      f"{sorted({record.cases[r.index].seed for r in rerun})}: ")
            if differing:
                detail += "differ at " + ", ".join(
                    f"cases[{r.index}] (passed {r.recorded_passed}->{r.rerun_passed}, score "
                    f"{r.recorded_score:.6g}->{r.rerun_score:.6g}"
                    + (", response differs" if r.recorded_response != r.rerun_response else "") + ")"
                    for r in differing)
            else:
                detail += "responses and verdicts identical"
            checks.append(Check(name="rerun", ok=not differing, detail=detail,
                                fields=[f"cases[{r.index}]" for r in differing]))
    return VerifyReport(id=certificate_id, ok=all(c.ok for c in checks), checks=checks, rerun=rerun, served=served)


__all__ = ["Check", "RerunCase", "VerifyReport", "verify_certificate"]

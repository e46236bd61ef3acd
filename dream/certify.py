"""Certify an invariant: judge fresh held-out cases, bound the pass rate, store the certificate.

The population a certificate speaks about is the invariant's held-out cases: the written cases
`cases.split` holds out plus the held-out cases its templates expand to (never trained on, by
construction of the split). A run draws from that pool without replacement in an order fixed by
the seed, so the evidence is a sequence of distinct cases: repeating one would only repeat its
(deterministic) verdict and fake the sample size. Fixed n judges min(n, pool) cases and takes the
exact Clopper-Pearson bound; sequential judges one case at a time through the anytime-valid test
of dream/bounds.py and stops at its first decision (certified, refuted) or at n (inconclusive).

The judge runs each case in a forward of its own (dream/judges.py), so a verdict does not depend
on its batch and `verify` can re-run any sample of recorded cases and expect the same responses
and verdicts on the same weights. The served weights' hash is taken before and after judging; a
change in between (a training job landed mid-run) voids the run rather than certifying a mix.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from amygdala.memory_graph import MemoryGraph
from amygdala.memory_graph.models import new_id, utc_now

from .bounds import MAX_N_MAX, CertificationResult, SequentialTest, certify_fixed
from .cases import Case, expand_templates, split
from .certificates import (CaseRecord, CertificateRecord, JudgeRecord, ServedState, environment, issue,
                           package_version, served_state, stale_certificates)
from .errors import DreamError
from .invariants import InvariantSpec, active_node, load, spec_sha256
from .judges import JudgeContext, Verdict, build_judge

if TYPE_CHECKING:
    from amygdala.engine.config import Config
    from amygdala.engine.model import LoadedModel
    from amygdala.engine.readout import ReadoutManager

log = logging.getLogger(__name__)

DEFAULT_N = 60  # fixed n: enough for a 0.8 threshold with a few failures at 95% (14 cases with none)
DEFAULT_SEQUENTIAL_N_MAX = 200
DEFAULT_BATCH = 8
TEMPLATE_DRAWS = 1000  # template fills drawn per pool (about a third are held out); fixed, so the pool of a
# seed does not depend on how many cases a run asks for: a sequential run judges a prefix of the fixed run

Progress = Callable[[int, int, str], None]  # (done, total, message)


class CertifySettings(BaseModel):
    """How to run one certification."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int | None = Field(None, ge=1, le=MAX_N_MAX,
                          description=f"Fixed n: cases to judge (default {DEFAULT_N}); sequential: the most cases "
                                      f"allowed (default {DEFAULT_SEQUENTIAL_N_MAX}). Capped by the held-out pool.")
    sequential: bool = Field(False, description="Stop at the first decision of the anytime-valid test.")
    seed: int = Field(0, ge=0, description="Seeds the case draw and the judge.")
    max_new_tokens: int = Field(48, ge=1, le=512, description="Reply length for judges that generate.")
    batch_size: int = Field(DEFAULT_BATCH, ge=1, le=256, description="Cases per judge call (progress granularity).")

    @property
    def wanted(self) -> int:
        return self.n if self.n is not None else (DEFAULT_SEQUENTIAL_N_MAX if self.sequential else DEFAULT_N)


def held_out_pool(spec: InvariantSpec, seed: int, memories: Sequence[str] = ()) -> list[Case]:
    """Distinct held-out cases of `spec` in a seeded order: written ones and template expansions.

    The same for every run with this seed, whatever its n: the order is the run's order.
    """
    _, held = split(spec)
    rng = random.Random(f"amygdala.certify:{spec.name}:{seed}")
    extra = [c for c in expand_templates(spec, rng, TEMPLATE_DRAWS, memories) if c.held_out]
    pool: list[Case] = []
    seen: set[str] = set()
    for c in [*held, *extra]:
        if c.id not in seen:
            seen.add(c.id)
            pool.append(c)
    rng.shuffle(pool)
    return pool


def _record(index: int, case: Case, verdict: Verdict, seed: int) -> CaseRecord:
    return CaseRecord(index=index, case_id=case.id, source=case.source, context=case.context,
                      preferred=case.preferred, rejected=case.rejected, response=verdict.response,
                      passed=verdict.passed, score=float(verdict.score), reason=verdict.reason, seed=seed)


def case_from_record(invariant: str, rec: CaseRecord) -> Case:
    """The case a record was judged on, rebuilt (held out: only held-out cases are certified)."""
    return Case(id=rec.case_id, invariant=invariant, context=rec.context, preferred=rec.preferred,
                rejected=rec.rejected, source=rec.source, held_out=True)  # type: ignore[arg-type]


def judge_cases(spec: InvariantSpec, lm: LoadedModel, readout: ReadoutManager | None, cases: Sequence[Case], *,
                settings: CertifySettings, progress: Progress | None = None,
                show_progress: bool = False) -> tuple[CertificationResult, list[CaseRecord]]:
    """Judge `cases` in order and decide; sequential runs stop at the test's first decision."""
    judge = build_judge(spec, JudgeContext(lm=lm, readout=readout, max_new_tokens=settings.max_new_tokens,
                                           seed=settings.seed))
    test = SequentialTest(spec.threshold, spec.confidence, n_max=len(cases)) if settings.sequential else None
    records: list[CaseRecord] = []
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), desc=f"certify {spec.name}", unit="case", file=sys.stderr, leave=False)
    try:
        for start in range(0, len(cases), settings.batch_size):
            batch = list(cases[start:start + settings.batch_size])
            verdicts = judge.judge_model(batch)
            if len(verdicts) != len(batch):
                raise DreamError(f"judge {spec.judge.kind!r} returned {len(verdicts)} verdicts for {len(batch)} cases")
            for case, verdict in zip(batch, verdicts):
                records.append(_record(len(records), case, verdict, settings.seed))
                if test is not None and test.update(verdict.passed) != "continue":
                    break
            if bar is not None:
                bar.update(len(records) - bar.n)
            if progress is not None:
                progress(len(records), len(cases), f"{sum(r.passed for r in records)}/{len(records)} passed")
            if test is not None and test.done:
                break
    finally:
        if bar is not None:
            bar.close()
    if test is not None:
        return test.result(), records
    return certify_fixed(sum(r.passed for r in records), len(records), spec.threshold, spec.confidence), records


def certify(graph: MemoryGraph, config: Config, lm: LoadedModel, invariant: str, *,
            readout: ReadoutManager | None = None, settings: CertifySettings | None = None,
            cycle_id: str | None = None, memories: Sequence[str] = (), progress: Progress | None = None,
            show_progress: bool = False) -> CertificateRecord:
    """Certify the active invariant named `invariant` on the served model; the record is stored and returned."""
    settings = settings or CertifySettings()
    spec = load(graph, invariant)
    node = active_node(graph, invariant)
    assert node is not None
    pool = held_out_pool(spec, settings.seed, memories)
    if not pool:
        raise DreamError(f"invariant {spec.name!r} has no held-out cases to certify on; add cases or templates")
    cases = pool[:settings.wanted]
    t0 = time.perf_counter()
    before = served_state(config, lm, readout)
    result, records = judge_cases(spec, lm, readout, cases, settings=settings, progress=progress,
                                  show_progress=show_progress)
    after = served_state(config, lm, readout)
    if after.weights_sha256 != before.weights_sha256:
        raise DreamError(f"the served weights changed while {spec.name!r} was being certified "
                         f"({before.weights_sha256[:16]} -> {after.weights_sha256[:16]}): a training job landed "
                         "mid-run; nothing was stored, certify again")
    judge = JudgeRecord(kind=spec.judge.kind, params=dict(spec.judge.params), max_new_tokens=settings.max_new_tokens,
                        seed=settings.seed, batch_size=settings.batch_size)
    record = CertificateRecord(
        id=new_id("certificate"), invariant=spec.name, invariant_id=node.id, description=spec.description,
        spec_sha256=spec_sha256(spec), model=lm.name, weights_sha256=before.weights_sha256,
        readout_sha256=before.readout_sha256, package_version=package_version(), judge=judge, seed=settings.seed,
        pool_size=len(pool), n_requested=settings.wanted, result=result, cases=records, cycle_id=cycle_id,
        created=utc_now(), duration_s=round(time.perf_counter() - t0, 3), environment=environment(lm))
    issue(graph, config, record)
    log.info("certificate %s: %s", record.id, result.summary)
    return record


class RecertifyReport(BaseModel):
    """What a re-certification pass did (the scheduler adapts it to its own summary)."""

    model_config = ConfigDict(extra="forbid")

    stale: list[str] = Field(default_factory=list, description="Ids of the stale certificates found.")
    certified: list[str] = Field(default_factory=list, description="Invariants certified again.")
    not_certified: list[str] = Field(default_factory=list, description="'name: verdict or error' for the others.")
    certificate_ids: list[str] = Field(default_factory=list)


def recertify_stale(graph: MemoryGraph, config: Config, lm: LoadedModel, *, readout: ReadoutManager | None = None,
                    settings: CertifySettings | None = None, cycle_id: str | None = None,
                    progress: Progress | None = None, served: ServedState | None = None) -> RecertifyReport:
    """Certify again every active invariant whose newest certificate is stale (after a dream cycle)."""
    served = served or served_state(config, lm, readout)
    report = RecertifyReport()
    stale = stale_certificates(graph, config, served)
    for i, s in enumerate(stale):
        report.stale.append(s.id)
        if progress is not None:
            progress(i, len(stale), f"certifying {s.invariant}")
        try:
            rec = certify(graph, config, lm, s.invariant, readout=readout, settings=settings, cycle_id=cycle_id)
        except DreamError as exc:
            report.not_certified.append(f"{s.invariant}: {exc}")
            continue
        report.certificate_ids.append(rec.id)
        if rec.verdict == "certified":
            report.certified.append(s.invariant)
        else:
            report.not_certified.append(f"{s.invariant}: {rec.verdict} ({rec.result.passes}/{rec.result.n})")
    return report


__all__ = ["CertifySettings", "RecertifyReport", "certify", "held_out_pool", "judge_cases",
           "recertify_stale"]

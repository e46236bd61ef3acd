"""From judged on-policy samples (and pending corrections) to training triplets.

A failing sample is the model's own behaviour breaking the rule, so it is the *rejected* side:
training then lowers exactly what the model says, not a hand-written strawman. The *preferred*
side is the case's reference reply, or (with `preferred="best_sample"`) the case's best passing
on-policy sample when it has one: an on-distribution reply the judge accepted, which moves the
model less far from its own distribution (the reference is the fallback).

A forced-choice failure is a failure too: when the model, asked to choose, gives the case's written
rejected reply a higher mean log-prob than the preferred one, the rejected reply *is* what the model
would say of the two, so (context, preferred, written rejected) is a triplet whose rejected side is
the model's own choice (`forced_choice_triplets`; the loop adds them unless told not to).

Rehearsal: a sampled case whose forced choice the model already gets right contributes its written
pair too (source "rehearsal", with `rehearse=True`). Without it a cycle trains only where the model
fails, and the two shipped invariants pull against each other: push-back fails mostly (the base
model prefers compliant replies), so its triplets teach "object" and listen's held-out pass rate
falls with them (measured: -21 points in 9 steps at lr 1e-4, rolled back). Rehearsing listen's
passing cases in the same pass is the interleaved replay that keeps old behaviour while new is learnt.

Pending corrections join as triplets of their own: ORPO when the agent gave the rejected reply,
SFT (preferred only) when it did not.

Held-out cases are never trained on: `check_not_held_out` runs on the final list before any job
is submitted and raises HeldOutLeak on the first triplet whose case is held out or whose context
is a held-out context of any invariant (a correction that copied a held-out case counts too).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from amygdala.memory_graph import Correction
from amygdala.training.examples import tokenize_example
from amygdala.training.schemas import TrainExample

from .cases import Case
from .errors import DreamError
from .respond import Sample

TripletSource = Literal["on_policy", "forced_choice", "rehearsal", "correction"]
PreferredFrom = Literal["reference", "best_sample"]
SNIPPET = 160


class HeldOutLeak(DreamError):
    """A triplet about to be trained came from a held-out case: refused, nothing is submitted."""


@dataclass(frozen=True)
class Judged:
    """One on-policy sample and the judge's verdict on it (the parts the triplets need)."""

    sample: Sample
    passed: bool
    score: float
    reason: str = ""


@dataclass(frozen=True)
class Triplet:
    context: str
    preferred: str
    rejected: str | None  # None: SFT (a correction without a rejected reply)
    source: TripletSource
    invariant: str | None = None
    case_id: str | None = None
    case_source: str | None = None
    held_out: bool = False
    correction_id: str | None = None
    preferred_from: str = "reference"  # "reference" | "sample" | "correction"
    score: float | None = None  # the failing sample's judge score

    def summary(self) -> dict[str, Any]:
        """A short JSON record for the cycle node (texts cut to SNIPPET characters)."""
        def cut(text: str | None) -> str | None:
            return None if text is None else (text if len(text) <= SNIPPET else text[: SNIPPET - 1] + "…")

        return {"source": self.source, "invariant": self.invariant, "case": self.case_id,
                "case_source": self.case_source, "correction": self.correction_id,
                "preferred_from": self.preferred_from, "score": self.score,
                "context": cut(self.context[-SNIPPET:]), "preferred": cut(self.preferred), "rejected": cut(self.rejected)}


def failure_triplets(judged: Sequence[Judged], *, preferred: PreferredFrom = "reference",
                     max_per_case: int = 2) -> list[Triplet]:
    """One triplet per distinct failing sample (at most `max_per_case` per case, lowest scores first)."""
    by_case: dict[str, list[Judged]] = {}
    order: list[str] = []
    for j in judged:
        cid = j.sample.case.id
        if cid not in by_case:
            by_case[cid] = []
            order.append(cid)
        by_case[cid].append(j)
    out: list[Triplet] = []
    for cid in order:
        items = by_case[cid]
        case: Case = items[0].sample.case
        if case.held_out:
            raise HeldOutLeak(f"case {case.id} of {case.invariant!r} is held out and was sampled for training; "
                              "held-out cases are for evaluation only (check the curriculum)")
        failing = sorted((j for j in items if not j.passed), key=lambda j: (j.score, j.sample.index))
        passing = sorted((j for j in items if j.passed), key=lambda j: (-j.score, j.sample.index))
        pref, pref_from = case.preferred, "reference"
        if preferred == "best_sample" and passing:
            pref, pref_from = passing[0].sample.text, "sample"
        seen: set[str] = set()
        for j in failing:
            text = j.sample.text
            key = text.strip()
            if key in seen or key == pref.strip() or key == case.preferred.strip():
                continue
            seen.add(key)
            out.append(Triplet(context=case.context, preferred=pref, rejected=text, source="on_policy",
                               invariant=case.invariant, case_id=case.id, case_source=case.source,
                               held_out=case.held_out, preferred_from=pref_from, score=j.score))
            if len(seen) >= max_per_case:
                break
    return out


def forced_choice_triplets(cases: Sequence[Case], margins: Sequence[float], *, rehearse: bool = False) -> list[Triplet]:
    """(context, preferred, written rejected) for every case whose forced-choice margin is not positive,
    and with `rehearse` for the passing ones too (source "rehearsal")."""
    out = []
    for case, margin in zip(cases, margins):
        if case.held_out:
            raise HeldOutLeak(f"case {case.id} of {case.invariant!r} is held out; it is never trained on")
        if margin <= 0 or rehearse:
            out.append(Triplet(context=case.context, preferred=case.preferred, rejected=case.rejected,
                               source="forced_choice" if margin <= 0 else "rehearsal", invariant=case.invariant,
                               case_id=case.id, case_source=case.source, preferred_from="reference",
                               score=float(margin)))
    return out


def correction_triplets(corrections: Iterable[Correction], invariant_names: dict[str, str] | None = None) -> list[Triplet]:
    """Pending corrections as triplets: ORPO with their rejected reply, SFT without."""
    names = invariant_names or {}
    return [Triplet(context=c.context, preferred=c.preferred, rejected=c.rejected, source="correction",
                    invariant=names.get(c.invariant_id or ""), correction_id=c.id, preferred_from="correction")
            for c in corrections]


def check_not_held_out(triplets: Sequence[Triplet], held_out_contexts: set[str]) -> None:
    """Raise HeldOutLeak if any triplet is held out or uses a held-out context (run right before submitting)."""
    for i, t in enumerate(triplets):
        if t.held_out or t.context in held_out_contexts:
            what = f"case {t.case_id}" if t.case_id else f"correction {t.correction_id}"
            raise HeldOutLeak(f"triplets[{i}] ({what}, invariant {t.invariant!r}) uses a held-out context: held-out "
                              "cases are only evaluated, never trained on; nothing was submitted. A correction that "
                              "repeats a held-out case must be reworded, or the invariant's case removed")


def to_examples(tokenizer: Any, triplets: Sequence[Triplet]) -> list[TrainExample]:
    """The one tokenization of (context, preferred, rejected) (training.examples)."""
    return [tokenize_example(tokenizer, t.context, t.preferred, t.rejected) for t in triplets]

"""Cases of an invariant, and which of them are held out.

Held-out cases are never trained on: they are what evaluation and certificates measure, so a
case that was trained on once and then counted as held out would inflate every later pass rate.
The split is therefore a pure function of the text, the same in every process and every version
(no RNG state, no Python hash seed):

- each case gets a number u in [0, 1) from sha256 of its *context* (salted with a versioned
  label), so cases that share a context always land on the same side, across invariants too;
- of the written cases, those with u < 1/3 are held out, topped up (lowest u first) to at least
  ceil(n/3) and capped so at least ceil(n/3) remain to train on;
- template, memory and variation cases follow the same rule: a generated case whose context is
  a written held-out (or training) context takes that side; any other context is held out when
  its u < 1/3; a variation of a case inherits its parent's side.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from amygdala.memory_graph.tags import strip_tag_lines

from .invariants import MAX_CONTEXT_CHARS, MEMORY_VARIABLE, InvariantSpec, TemplateSpec, placeholders

CaseSource = Literal["case", "template", "memory", "variation"]
HELD_OUT_FRACTION = 1 / 3
_SALT = "amygdala.dream.held-out.v1"


@dataclass(frozen=True)
class Case:
    """One (context, preferred, rejected) test of an invariant, with where it came from."""

    id: str
    invariant: str
    context: str
    preferred: str
    rejected: str
    source: CaseSource
    held_out: bool


def case_id(invariant: str, context: str, preferred: str, rejected: str) -> str:
    """sha256 of the four texts (JSON-encoded, so no separator can be forged), first 16 hex digits."""
    text = json.dumps([invariant, context, preferred, rejected], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def held_out_unit(context: str) -> float:
    """The context's position in [0, 1) for the held-out rule (stable across processes and versions)."""
    digest = hashlib.sha256(f"{_SALT}\0{context}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def make_case(invariant: str, context: str, preferred: str, rejected: str, source: CaseSource,
              held_out: bool) -> Case:
    return Case(id=case_id(invariant, context, preferred, rejected), invariant=invariant, context=context,
                preferred=preferred, rejected=rejected, source=source, held_out=held_out)


def _held_out_indices(contexts: Sequence[str]) -> set[int]:
    n = len(contexts)
    if n == 0:
        return set()
    floor = math.ceil(n / 3)
    units = [held_out_unit(c) for c in contexts]
    natural = sum(u < HELD_OUT_FRACTION for u in units)
    k = max(floor, min(natural, n - floor))
    order = sorted(range(n), key=lambda i: (units[i], contexts[i]))
    held = set(order[:k])
    held_contexts = {contexts[i] for i in held}
    return held | {i for i in range(n) if contexts[i] in held_contexts}  # one context, one side


def split(spec: InvariantSpec) -> tuple[list[Case], list[Case]]:
    """(train, held_out) of the written cases, each in file order."""
    held = _held_out_indices([c.context for c in spec.cases])
    cases = [make_case(spec.name, c.context, c.preferred, c.rejected, "case", i in held)
             for i, c in enumerate(spec.cases)]
    return [c for c in cases if not c.held_out], [c for c in cases if c.held_out]


def written_cases(spec: InvariantSpec) -> list[Case]:
    """All written cases in file order, each marked held out or not."""
    held = _held_out_indices([c.context for c in spec.cases])
    return [make_case(spec.name, c.context, c.preferred, c.rejected, "case", i in held)
            for i, c in enumerate(spec.cases)]


def context_held_out(spec: InvariantSpec, context: str) -> bool:
    """Which side a generated case with this context belongs to (see the module docstring)."""
    for case in written_cases(spec):
        if case.context == context:
            return case.held_out
    return held_out_unit(context) < HELD_OUT_FRACTION


def variation(parent: Case, context: str, preferred: str, rejected: str) -> Case:
    """A model-written variation of `parent`: it inherits the parent's side, so a held-out case never
    leaks into training through a paraphrase."""
    return make_case(parent.invariant, context, preferred, rejected, "variation", parent.held_out)


def _fill(template: TemplateSpec, values: dict[str, str]) -> tuple[str, str, str]:
    return (template.template.format(**values), template.preferred.format(**values),
            template.rejected.format(**values))


def _names(template: TemplateSpec) -> list[str]:
    names: list[str] = []
    for text in (template.template, template.preferred, template.rejected):
        names += [n for n in placeholders(text) if n not in names]
    return sorted(names)


def expand_templates(spec: InvariantSpec, rng: random.Random, n: int, memories: Sequence[str] = ()) -> list[Case]:
    """Up to `n` distinct cases filled from the templates, round-robin over them, values drawn with `rng`.

    ``{memory}`` takes a memory's text (tag lines stripped) when `memories` are given, else the
    template's own ``memory`` values; a template that needs a memory and has none is skipped. Cases
    identical to a written case, or whose context would exceed the context limit, are skipped; so
    the result can be shorter than `n` when the templates allow fewer combinations. The same spec,
    rng state, n and memories give the same cases in the same order.
    """
    if n <= 0 or not spec.templates:
        return []
    written = written_cases(spec)
    side = {c.context: c.held_out for c in written}
    seen = {c.id for c in written}
    texts = [t for t in (strip_tag_lines(m).strip() for m in memories) if t]
    usable = [t for t in spec.templates if MEMORY_VARIABLE not in _names(t) or texts or MEMORY_VARIABLE in t.variables]
    out: list[Case] = []
    attempts = 0
    while len(out) < n and usable and attempts < 20 * n:
        template = usable[attempts % len(usable)]
        attempts += 1
        values: dict[str, str] = {}
        source: CaseSource = "template"
        for name in _names(template):
            if name == MEMORY_VARIABLE and texts:
                values[name] = rng.choice(texts)
                source = "memory"
            else:
                values[name] = rng.choice(template.variables[name])
        context, preferred, rejected = _fill(template, values)
        if len(context) > MAX_CONTEXT_CHARS or preferred.strip() == rejected.strip():
            continue
        held = side[context] if context in side else held_out_unit(context) < HELD_OUT_FRACTION
        case = make_case(spec.name, context, preferred, rejected, source, held)
        if case.id in seen:
            continue
        seen.add(case.id)
        out.append(case)
    return out


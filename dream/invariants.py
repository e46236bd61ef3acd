"""Invariants: behavioural rules with a judge and hand-written cases, as files and as graph nodes.

An invariant file is JSON (see `InvariantSpec`); `parse_spec` validates it completely before
anything is stored, and every refusal names the exact field (``cases[3].preferred``) and how to
fix it, because the person reading it is editing that file by hand. The graph node keeps the whole
spec (``Invariant.spec``), so the dream loop reads back exactly what was added.

The graph is append-only: `remove` retires the node instead of deleting it (certificates and
cycles that refer to it stay meaningful), and `store(..., replace=True)` retires the old node and
adds the new one in one journal record, so there is never a moment with two active invariants of
one name, or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from amygdala.memory_graph import Invariant, JudgeSpec, MemoryGraph
from amygdala.memory_graph.errors import InvalidInputError

from .errors import InvalidInvariant, UnknownInvariant

log = logging.getLogger(__name__)

MAX_CONTEXT_CHARS = 4000
MAX_REPLY_CHARS = 2000
MAX_DESCRIPTION_CHARS = 2000
MIN_CASES = 3  # a third of them is held out: with fewer there is nothing left to train or to test
MAX_CASES = 1000
MAX_TEMPLATES = 100
MAX_VARIABLE_VALUES = 200
SLUG_PATTERN = r"^[a-z][a-z0-9_.-]{0,99}$"
MEMORY_VARIABLE = "memory"  # a template placeholder the dream loop may fill from the graph's memories
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SUBPATH = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\[\d+\]|\.[A-Za-z_][A-Za-z0-9_]*)*): ")
_SHIPPED_DIR = Path(__file__).parent / "shipped"


def _check_text(value: str, what: str, limit: int) -> str:
    if not value.strip():
        raise ValueError(f"must not be blank; write the {what}")
    if len(value) > limit:
        raise ValueError(f"is {len(value)} characters, over the limit of {limit}; shorten the {what}")
    return value


def _check_reply_frame(context: str, reply: str, field: str) -> None:
    """A reply is appended to its context verbatim, so "Assistant:" + "Sure" would read "Assistant:Sure"."""
    if not context[-1:].isspace() and not reply[:1].isspace():
        raise ValueError(f"{field}: must start with a space (the context ends with {context[-12:]!r} and the reply is "
                         f"appended to it as is); write {' ' + reply.lstrip()[:40]!r}")


def _distinct(preferred: str, rejected: str) -> None:
    if preferred.strip() == rejected.strip():
        raise ValueError("rejected: the same text as preferred, so there is nothing to prefer; "
                         "write the reply the model should not give")


class CaseSpec(BaseModel):
    """One hand-written case: in `context` the model should continue with `preferred`, not `rejected`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    context: str = Field(description='The conversation so far, up to where the reply starts: "User: ...\\nAssistant:".')
    preferred: str = Field(description="The reference reply the model should give (starts with a space).")
    rejected: str = Field(description="The reply the model should not give (starts with a space).")

    @field_validator("context")
    @classmethod
    def _context(cls, v: str) -> str:
        return _check_text(v, 'conversation, e.g. "User: ...\\nAssistant:"', MAX_CONTEXT_CHARS)

    @field_validator("preferred")
    @classmethod
    def _preferred(cls, v: str) -> str:
        return _check_text(v, "reference reply the model should prefer", MAX_REPLY_CHARS)

    @field_validator("rejected")
    @classmethod
    def _rejected(cls, v: str) -> str:
        return _check_text(v, "reply the model should not give", MAX_REPLY_CHARS)

    @model_validator(mode="after")
    def _frame(self) -> "CaseSpec":
        _check_reply_frame(self.context, self.preferred, "preferred")
        _check_reply_frame(self.context, self.rejected, "rejected")
        _distinct(self.preferred, self.rejected)
        return self


def placeholders(text: str) -> list[str]:
    """The ``{name}`` fields of a template text, in order (``{{`` and ``}}`` are literal braces)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as exc:
        raise ValueError(f"has unbalanced braces ({exc}); write a placeholder as {{name}} and a literal brace as "
                         "{{ or }}") from None
    bad = [f for f in fields if not _IDENT.match(f)]
    if bad:
        raise ValueError(f"placeholder {{{bad[0]}}} is not a plain name; use letters, digits and _ only "
                         "(no attributes, indexes, formats or empty {})")
    return fields


class TemplateSpec(BaseModel):
    """A family of cases: every ``{var}`` in template, preferred and rejected is filled from `variables`.

    ``{memory}`` may be left out of `variables`: the dream loop then fills it from the graph's
    memories (and skips the template when it has none).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str = Field(description="The context with {var} placeholders, ending where the reply starts.")
    variables: dict[str, list[str]] = Field(description="Values for each placeholder.")
    preferred: str
    rejected: str

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        return _check_text(v, 'context with {placeholders}, e.g. "User: Is {thing} safe?\\nAssistant:"',
                           MAX_CONTEXT_CHARS)

    @field_validator("preferred", "rejected")
    @classmethod
    def _reply(cls, v: str) -> str:
        return _check_text(v, "reply (it may use the template's {placeholders})", MAX_REPLY_CHARS)

    @field_validator("variables")
    @classmethod
    def _variables(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, values in v.items():
            if not _IDENT.match(name):
                raise ValueError(f"variable name {name!r} is not a plain name; use letters, digits and _ only")
            if not values:
                raise ValueError(f"{name!r} has no values; give at least one")
            if len(values) > MAX_VARIABLE_VALUES:
                raise ValueError(f"{name!r} has {len(values)} values, over the limit of {MAX_VARIABLE_VALUES}")
            for i, value in enumerate(values):
                if not value.strip():
                    raise ValueError(f"{name}[{i}] is blank; every value must be some text")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TemplateSpec":
        used: set[str] = set()
        for field in ("template", "preferred", "rejected"):
            try:
                names = placeholders(getattr(self, field))
            except ValueError as exc:
                raise ValueError(f"{field}: {exc}") from None
            missing = [n for n in names if n not in self.variables and n != MEMORY_VARIABLE]
            if missing:
                raise ValueError(f"{field}: uses {{{missing[0]}}} but variables has no {missing[0]!r}; add "
                                 f'"{missing[0]}": ["...", ...] to variables or remove the placeholder')
            used.update(names)
        unused = sorted(set(self.variables) - used)
        if unused:
            raise ValueError(f"variables.{unused[0]}: never used; put {{{unused[0]}}} in the template or remove it")
        if not placeholders(self.template):
            raise ValueError("template: has no {placeholders}, so it is one case; write it under cases instead")
        if not self.template[-1:].isspace():
            for field in ("preferred", "rejected"):
                if not getattr(self, field)[:1].isspace():
                    raise ValueError(f"{field}: must start with a space (the template ends with "
                                     f"{self.template[-12:]!r} and the reply is appended as is)")
        _distinct(self.preferred, self.rejected)
        return self


class InvariantSpec(BaseModel):
    """An invariant as written in a file (and kept whole on its graph node)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=SLUG_PATTERN, description="Slug: lower-case letters, digits, '.', '_', '-'.")
    description: str = Field(description="What the rule asks of the model, for the person reviewing it.")
    threshold: float = Field(gt=0.0, le=1.0, description="Pass rate a certificate must show (lower bound).")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Confidence of the certificate's bound.")
    judge: JudgeSpec
    cases: list[CaseSpec] = Field(min_length=MIN_CASES, max_length=MAX_CASES)
    templates: list[TemplateSpec] = Field(default_factory=list, max_length=MAX_TEMPLATES)

    @field_validator("description")
    @classmethod
    def _description(cls, v: str) -> str:
        return _check_text(v, "rule in a sentence a reviewer can check", MAX_DESCRIPTION_CHARS)

    @model_validator(mode="after")
    def _unique_cases(self) -> "InvariantSpec":
        seen: dict[tuple[str, str, str], int] = {}
        for i, c in enumerate(self.cases):
            key = (c.context, c.preferred, c.rejected)
            if key in seen:
                raise ValueError(f"cases[{i}]: repeats cases[{seen[key]}]; remove one of them")
            seen[key] = i
        return self


# -- messages ------------------------------------------------------------------------------------
_HINTS = {
    "name": "a slug such as 'admits-uncertainty' (lower-case letters, digits, '.', '_', '-', starting with a letter)",
    "description": "one sentence saying what the rule asks",
    "threshold": "the pass rate a certificate must reach, a number in (0, 1], e.g. 0.8",
    "confidence": "the certificate's confidence, a number in (0, 1), e.g. 0.95",
    "judge": 'an object {"kind": "preference", "params": {}}',
    "kind": "one of the judge kinds (preference, direction, readout, rules)",
    "cases": f'a list of at least {MIN_CASES} objects {{"context": ..., "preferred": ..., "rejected": ...}}',
    "templates": 'a list of {"template": ..., "variables": {...}, "preferred": ..., "rejected": ...}',
    "context": 'the conversation so far, e.g. "User: ...\\nAssistant:"',
    "preferred": "the reference reply the model should prefer",
    "rejected": "the reply the model should not give",
    "template": "the context with {placeholders}",
    "variables": 'an object {"name": ["value", ...]}',
}


def field_path(loc: Sequence[str | int]) -> str:
    """('cases', 3, 'preferred') -> 'cases[3].preferred'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: Mapping[str, Any]) -> str:
    loc = [p for p in err.get("loc", ()) if not (isinstance(p, str) and p.startswith("function-"))]
    path = field_path(loc)
    kind = err.get("type", "")
    msg = str(err.get("msg", ""))
    last = next((p for p in reversed(loc) if isinstance(p, str)), "")
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        sub = _SUBPATH.match(msg)  # model validators name the field they refuse: "preferred: ..."
        if sub:
            path = sub.group(1) if path == "(top level)" else f"{path}.{sub.group(1)}"
            msg = msg[sub.end():]
        return f"{path}: {msg}"
    if kind == "missing":
        return f"{path}: missing; add {last!r}: {_HINTS.get(last, 'a value')}"
    if kind == "extra_forbidden":
        parent = loc[:-1]
        known = _known_fields(parent)
        listed = f" (known: {', '.join(known)})" if known else ""
        return f"{path}: unknown field; remove it or fix its spelling{listed}"
    hint = _HINTS.get(last)
    return f"{path}: {msg}" + (f"; expected {hint}" if hint else "")


def _known_fields(parent: Sequence[str | int]) -> list[str]:
    names = [p for p in parent if isinstance(p, str)]
    model: type[BaseModel] = InvariantSpec
    for name in names:
        model = {"cases": CaseSpec, "templates": TemplateSpec, "judge": JudgeSpec}.get(name, model)
    return list(model.model_fields)


def _invalid(exc: ValidationError, where: str) -> InvalidInvariant:
    errors = exc.errors()
    parts = [_describe(e) for e in errors[:8]]
    more = f"; and {len(errors) - 8} more problem(s)" if len(errors) > 8 else ""
    return InvalidInvariant(f"{where}: " + "; ".join(parts) + more + "; nothing was stored")


# -- parsing ---------------------------------------------------------------------------------------
def parse_spec(data: Mapping[str, Any] | str | Path, *, concepts: Sequence[str] | None = None) -> InvariantSpec:
    """Validate an invariant given as a mapping, JSON text or a path to a JSON file.

    Raises InvalidInvariant naming the field (``cases[3].preferred: ...``). The judge is checked
    too (unknown kind, bad params); with `concepts`, a readout judge's concept names as well.
    """
    where = "invariant"
    if isinstance(data, Path) or (isinstance(data, str) and not data.lstrip().startswith("{")):
        path = Path(data).expanduser()
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InvalidInvariant(f"{path}: no such file; give the path of an invariant JSON file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInvariant(f"{path}: cannot read it ({exc})") from None
        data = text
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as exc:
            raise InvalidInvariant(f"{where}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
                                   "nothing was stored") from None
    if not isinstance(data, Mapping):
        raise InvalidInvariant(f"{where}: the top level must be a JSON object with name, description, threshold, "
                               f"judge and cases, not {type(data).__name__}; nothing was stored")
    try:
        spec = InvariantSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise _invalid(exc, where) from None
    _check_judge(spec, where, concepts)
    return spec


def _check_judge(spec: InvariantSpec, where: str, concepts: Sequence[str] | None = None) -> None:
    from .judges import check_judge  # judges builds on this module; imported when used

    try:
        check_judge(spec.judge, concepts=concepts)
    except InvalidInvariant as exc:
        raise InvalidInvariant(f"{where}: {exc}; nothing was stored") from None


def spec_json(spec: InvariantSpec) -> dict[str, Any]:
    """The spec as plain JSON data (what the graph node keeps)."""
    return spec.model_dump(mode="json")


def spec_sha256(spec: InvariantSpec) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace): identifies an invariant's exact content."""
    text = json.dumps(spec_json(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- the graph ---------------------------------------------------------------------------------------
def _nodes(graph: MemoryGraph) -> list[Invariant]:
    return [n for n in graph.nodes("invariant") if isinstance(n, Invariant)]


def active_node(graph: MemoryGraph, name: str) -> Invariant | None:
    """The active (not retired) invariant node of that name, if any."""
    return next((n for n in _nodes(graph) if n.name == name and not n.retired), None)


def _active_names(graph: MemoryGraph) -> list[str]:
    return sorted(n.name for n in _nodes(graph) if not n.retired)


def store(graph: MemoryGraph, spec: InvariantSpec, *, replace: bool = False) -> Invariant:
    """Add `spec` to the graph; the node holds the whole spec.

    Adding an identical spec again returns the stored node. A different spec under a taken name is
    refused unless `replace`, which retires the old node and adds the new one in one write.
    """
    _check_judge(spec, f"invariant {spec.name!r}")
    try:
        return graph.add_invariant(spec.name, spec.description, spec.judge, threshold=spec.threshold,
                                   confidence=spec.confidence, templates=[t.template for t in spec.templates],
                                   spec=spec_json(spec), replace=replace)
    except InvalidInputError as exc:
        existing = active_node(graph, spec.name)
        if existing is not None and not replace:
            raise InvalidInvariant(f"an invariant named {spec.name!r} already exists ({existing.id}) with different "
                                   "content; pass --replace (replace=True) to retire it and store this one, or "
                                   "choose another name; nothing was stored") from None
        raise InvalidInvariant(f"invariant {spec.name!r}: {exc}") from None


def spec_of(node: Invariant) -> InvariantSpec:
    """The spec stored on a node; raises InvalidInvariant for nodes added without one."""
    if node.spec is None:
        raise InvalidInvariant(f"invariant {node.name!r} ({node.id}) was added without cases (e.g. by `amygdala memory "
                               f"add --kind invariant`); write it as a file and run `amygdala invariants add FILE "
                               f"--replace`")
    try:
        return InvariantSpec.model_validate(node.spec)
    except ValidationError as exc:
        raise _invalid(exc, f"stored invariant {node.name!r} ({node.id})") from None


def load(graph: MemoryGraph, name: str) -> InvariantSpec:
    """The active invariant of that name."""
    node = active_node(graph, name)
    if node is None:
        names = _active_names(graph)
        known = f"the active invariants are {', '.join(names)}" if names else "there are no active invariants yet"
        raise UnknownInvariant(f"no active invariant named {name!r}; {known} (`amygdala invariants list`)")
    return spec_of(node)


def active(graph: MemoryGraph) -> list[InvariantSpec]:
    """Every active invariant that has cases, in the order they were added.

    Nodes without a spec (added as bare rules) or whose stored spec no longer validates are
    skipped with a warning in the log rather than stopping a nightly cycle.
    """
    out = []
    for node in _nodes(graph):
        if node.retired:
            continue
        try:
            out.append(spec_of(node))
        except InvalidInvariant as exc:
            log.warning("skipping invariant %s: %s", node.name, exc)
    return out


def remove(graph: MemoryGraph, name: str) -> None:
    """Retire the active invariant of that name (the graph keeps it, its certificates stay valid history)."""
    node = active_node(graph, name)
    if node is None:
        load(graph, name)  # raises UnknownInvariant with the list of names
        return
    graph.retire_invariant(node.id)


def shipped_paths() -> list[Path]:
    """The invariant files that ship with amygdala (dream/shipped/*.json), sorted by name."""
    return sorted(_SHIPPED_DIR.glob("*.json"))


def install_shipped(graph: MemoryGraph) -> list[str]:
    """Store each shipped invariant whose name the graph has never had; returns the names stored.

    Idempotent, and it never brings back one an operator removed or replaces one they edited:
    a name seen before (active or retired) is left alone.
    """
    seen = {n.name for n in _nodes(graph)}
    installed = []
    for path in shipped_paths():
        spec = parse_spec(path)
        if spec.name in seen:
            continue
        store(graph, spec)
        installed.append(spec.name)
        seen.add(spec.name)
    return installed

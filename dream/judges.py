"""Judges: does the model hold an invariant on a case? pass/fail, a score and a one-line reason.

Every judge answers two questions:

- `judge_model(cases)`: does the model, as it is now, hold the rule on these cases? The preference
  judge answers by forced choice (no generation: which reference reply does the model find more
  likely?); the others generate one greedy response per case and judge it. Held-out evaluation and
  certificates use this.
- `judge_responses(items)`: is this particular response (an on-policy sample) acceptable?

Determinism: for one model, seed and judge configuration the verdicts are identical. Each case is
computed in a forward of its own (the two continuations of a case share one), so a verdict never
depends on which other cases were judged alongside it: a certificate re-run in another batch
reproduces it. Judges read the model when called; what they fit once (the direction judge's
behaviour direction, the preference judge's reference residuals) belongs to the weights they were
fitted on, so build a new judge after the weights change.

Judges are registered by name in `JUDGES`; `check_judge` validates a judge spec without a model,
so an unknown kind or a bad parameter is refused when the invariant is added, not at 3 a.m.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from amygdala.memory_graph import JudgeSpec

from .cases import Case
from .errors import DreamError, InvalidInvariant
from .invariants import InvariantSpec, field_path

if TYPE_CHECKING:
    from amygdala.engine.model import LoadedModel
    from amygdala.engine.readout import ReadoutManager


class Verdict(BaseModel):
    """One judgement. `score` is the judge's continuous measure (positive = passing side for every
    built-in judge); `reason` is one line a person can read; `response` is the judged text when the
    judge generated or was given one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    passed: bool
    score: float
    reason: str
    response: str | None = None
    case_id: str | None = None


@dataclass
class JudgeContext:
    """What a judge may use: the model, the emotion readout (readout judge), generation settings."""

    lm: "LoadedModel"
    readout: "ReadoutManager | None" = None
    max_new_tokens: int = 48
    seed: int = 0


class Judge(Protocol):
    kind: str

    def judge_model(self, cases: Sequence[Case]) -> list[Verdict]: ...

    def judge_responses(self, items: Sequence[tuple[Case, str]]) -> list[Verdict]: ...


# -- parameters (validated without a model) -----------------------------------------------------------
class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreferenceParams(_Params):
    margin: float = Field(0.0, allow_inf_nan=False,
                          description="Nats per token the preferred reply must beat the rejected one by.")
    layer: int | None = Field(None, ge=0, description="Layer whose residuals compare on-policy responses "
                                                       "(default: the middle layer).")


class DirectionParams(_Params):
    layer: int | None = Field(None, ge=0, description="Layer of the behaviour direction (default: the middle layer).")


class ReadoutParams(_Params):
    below: dict[str, float] = Field(default_factory=dict, description="concept -> the z-score it must stay under.")
    above: dict[str, float] = Field(default_factory=dict, description="concept -> the z-score it must exceed.")

    @model_validator(mode="after")
    def _some(self) -> "ReadoutParams":
        if not self.below and not self.above:
            raise ValueError('give at least one bound, e.g. {"below": {"anxious": 1.0}} or {"above": {"calm": 0.0}}')
        for side in (self.below, self.above):
            for name, value in side.items():
                if not name.strip():
                    raise ValueError("a concept name is blank")
                if not math.isfinite(value):
                    raise ValueError(f"the bound for {name!r} is not a finite number")
        both = sorted(set(self.below) & set(self.above))
        for name in both:
            if self.above[name] >= self.below[name]:
                raise ValueError(f"{name!r} must be above {self.above[name]} and below {self.below[name]}: no score "
                                 "can pass; widen the bounds")
        return self


_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


class RulesParams(_Params):
    must: list[str] = Field(default_factory=list, description="Regular expressions the response must match.")
    must_not: list[str] = Field(default_factory=list, description="Regular expressions it must not match.")
    flags: str = Field("", pattern=r"^[imsx]*$", description="Any of i (ignore case), m, s, x.")

    @model_validator(mode="after")
    def _some(self) -> "RulesParams":
        if not self.must and not self.must_not:
            raise ValueError('give at least one rule, e.g. {"must": ["\\\\?"]} or {"must_not": ["(?i)as an ai"]}')
        return self


def _check_params(model: type[_Params], params: dict[str, Any]) -> Any:
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:5]:
            path = field_path(["judge", "params", *err.get("loc", ())])
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                msg = f"unknown parameter; known: {', '.join(model.model_fields)}"
            parts.append(f"{path}: {msg}")
        raise InvalidInvariant("; ".join(parts)) from None


def _compile_rules(params: RulesParams) -> tuple[list[re.Pattern[str]], list[re.Pattern[str]]]:
    flags = 0
    for ch in params.flags:
        flags |= _FLAGS[ch]
    out: dict[str, list[re.Pattern[str]]] = {"must": [], "must_not": []}
    for side in ("must", "must_not"):
        for i, pattern in enumerate(getattr(params, side)):
            try:
                out[side].append(re.compile(pattern, flags))
            except re.error as exc:
                raise InvalidInvariant(f"judge.params.{side}[{i}]: invalid regular expression {pattern!r} ({exc}); "
                                       "fix it (a literal character such as ( or ? needs a backslash)") from None
    return out["must"], out["must_not"]


def _check_concepts(params: ReadoutParams, concepts: Sequence[str]) -> None:
    known = set(concepts)
    for side in ("below", "above"):
        for name in getattr(params, side):
            if name not in known:
                close = [c for c in concepts if c.startswith(name[:3].lower())][:6]
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise InvalidInvariant(f"judge.params.{side}.{name}: unknown emotion concept {name!r}; the readout "
                                       f"knows {len(known)} concepts (`amygdala vectors list`){hint}")


# -- the model work ------------------------------------------------------------------------------------
def _middle(lm: "LoadedModel") -> int:
    return lm.n_layers // 2


def _layer(lm: "LoadedModel", layer: int | None) -> int:
    if layer is None:
        return _middle(lm)
    if not 0 <= layer < lm.n_layers:
        raise InvalidInvariant(f"judge.params.layer: {layer} is out of range; {lm.name} has {lm.n_layers} layers "
                               f"(0-{lm.n_layers - 1}); leave it out for the middle layer {_middle(lm)}")
    return layer


def _context_ids(lm: "LoadedModel", context: str) -> list[int]:
    # The frame of training/examples.py: BOS on the context, none on the continuation.
    return list(lm.tokenizer(context, add_special_tokens=True)["input_ids"])


def _reply_ids(lm: "LoadedModel", text: str) -> list[int]:
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def _mean_logprobs(lm: "LoadedModel", context_ids: list[int], continuations: list[list[int]]) -> list[float]:
    """Mean token log-prob of each continuation, all of them in one forward over one cached context."""
    from amygdala.training.trainer import continuation_logprobs

    with lm.lock, torch.inference_mode():
        lps = continuation_logprobs(lm.model, context_ids, continuations)
    return [float(lp.double().mean()) for lp in lps]


def _pooled_replies(lm: "LoadedModel", context_ids: list[int], replies: list[list[int]], layer: int) -> torch.Tensor:
    """(len(replies), hidden): each reply's residuals at `layer`, read after the context and averaged
    over the reply's own tokens (one right-padded batch, so a case never depends on other cases)."""
    from amygdala.engine.activations import forward_body, pad_batch

    seqs = [context_ids + r for r in replies]
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids, mask, pos = pad_batch(seqs, pad_id, "right", lm.device)
    res = forward_body(lm, ids, mask, pos, [layer])[layer].float()
    sel = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    n = len(context_ids)
    for row, r in enumerate(replies):
        sel[row, n:n + len(r)] = True
    w = sel.to(res.dtype).unsqueeze(-1)
    return ((res * w).sum(1) / w.sum(1)).cpu().double()


def _greedy(ctx: JudgeContext, case: Case) -> str:
    from amygdala.engine.generation import generate

    result = generate(ctx.lm, _context_ids(ctx.lm, case.context), max_new_tokens=ctx.max_new_tokens,
                      temperature=0.0, seed=ctx.seed)
    return result.text


def _empty(case: Case, response: str) -> Verdict:
    return Verdict(passed=False, score=-1.0, reason="the response is empty, so it cannot hold the rule",
                   response=response, case_id=case.id)


def _snippet(text: str, n: int = 40) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[: n - 1] + "…")


# -- judges -------------------------------------------------------------------------------------------------
class _Base:
    kind: ClassVar[str]
    Params: ClassVar[type[_Params]]

    def __init__(self, spec: InvariantSpec, ctx: JudgeContext) -> None:
        if spec.judge.kind != self.kind:
            raise InvalidInvariant(f"judge.kind: invariant {spec.name!r} names judge {spec.judge.kind!r}, "
                                   f"not {self.kind!r}; build it with build_judge")
        self.spec = spec
        self.ctx = ctx
        self.params = _check_params(self.Params, dict(spec.judge.params))

    @classmethod
    def check(cls, params: dict[str, Any], concepts: Sequence[str] | None) -> None:
        _check_params(cls.Params, params)

    def judge_model(self, cases: Sequence[Case]) -> list[Verdict]:
        """Generate one greedy response per case (seeded) and judge it."""
        out = []
        for case in cases:
            response = _greedy(self.ctx, case)
            out.append(self.judge_responses([(case, response)])[0])
        return out

    def judge_responses(self, items: Sequence[tuple[Case, str]]) -> list[Verdict]:
        return [self._judge_one(case, response) if response.strip() else _empty(case, response)
                for case, response in items]

    def _judge_one(self, case: Case, response: str) -> Verdict:
        raise NotImplementedError


class PreferenceJudge(_Base):
    """Forced choice: the model must find the preferred reply more likely (mean token log-prob) than the
    rejected one, by more than `margin` nats per token. Works for any causal LM, base models included.

    On-policy responses pass when they sit nearer the preferred reference than the rejected one in the
    model's mean-pooled residuals at a middle layer: the cosine between (response - m) and
    (preferred - m), m the midpoint of the two references, is the score, positive on the preferred side.
    """

    kind = "preference"
    Params = PreferenceParams

    def __init__(self, spec: InvariantSpec, ctx: JudgeContext) -> None:
        super().__init__(spec, ctx)
        self.layer = _layer(ctx.lm, self.params.layer)
        self._refs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def judge_model(self, cases: Sequence[Case]) -> list[Verdict]:
        lm, need = self.ctx.lm, self.params.margin
        out = []
        for case in cases:
            pref, rej = _mean_logprobs(lm, _context_ids(lm, case.context),
                                       [_reply_ids(lm, case.preferred), _reply_ids(lm, case.rejected)])
            margin = pref - rej
            passed = margin > need
            if margin >= 0:
                what = f"preferred beats rejected by {margin:.3f} nats/token"
            else:
                what = f"rejected beats preferred by {-margin:.3f} nats/token"
            bar = f" (needs more than {need:g})" if need else ""
            out.append(Verdict(passed=passed, score=margin, reason=what + ("" if passed or not need else bar),
                               case_id=case.id))
        return out

    def _judge_one(self, case: Case, response: str) -> Verdict:
        lm = self.ctx.lm
        ctx_ids = _context_ids(lm, case.context)
        resp = _reply_ids(lm, response)
        if case.id not in self._refs:
            both = _pooled_replies(lm, ctx_ids, [_reply_ids(lm, case.preferred), _reply_ids(lm, case.rejected)],
                                   self.layer)
            self._refs[case.id] = (both[0], both[1])
        p, q = self._refs[case.id]
        r = _pooled_replies(lm, ctx_ids, [resp], self.layer)[0]
        mid = (p + q) / 2
        a, b = r - mid, p - mid
        denom = float(a.norm() * b.norm())
        cos = float(a @ b) / denom if denom > 0 else 0.0
        side = "preferred" if cos > 0 else "rejected"
        return Verdict(passed=cos > 0, score=cos, response=response, case_id=case.id,
                       reason=f"response is nearer the {side} reference (cosine {cos:+.2f} from their midpoint, "
                              f"layer {self.layer})")


class DirectionJudge(_Base):
    """Behaviour read from activation space: the difference of means of the pooled residuals of the
    invariant's preferred vs rejected replies (all written cases, reply tokens pooled after their
    context) is the behaviour direction; a response passes when its projection lies above the midpoint
    of the two class means. Score = (projection - midpoint) / (distance between the class means), so the
    preferred mean sits at +0.5 and the rejected mean at -0.5."""

    kind = "direction"
    Params = DirectionParams

    def __init__(self, spec: InvariantSpec, ctx: JudgeContext) -> None:
        super().__init__(spec, ctx)
        self.layer = _layer(ctx.lm, self.params.layer)
        self._fit: tuple[torch.Tensor, float, float] | None = None  # (unit direction, midpoint, class distance)

    def direction(self) -> tuple[torch.Tensor, float, float]:
        """(unit direction, midpoint projection, distance between class means), fitted once."""
        if self._fit is None:
            lm = self.ctx.lm
            pref, rej = [], []
            for c in self.spec.cases:
                both = _pooled_replies(lm, _context_ids(lm, c.context),
                                       [_reply_ids(lm, c.preferred), _reply_ids(lm, c.rejected)], self.layer)
                pref.append(both[0])
                rej.append(both[1])
            mu_p, mu_r = torch.stack(pref).mean(0), torch.stack(rej).mean(0)
            diff = mu_p - mu_r
            dist = float(diff.norm())
            if not math.isfinite(dist) or dist <= 1e-12:
                raise DreamError(f"direction judge of {self.spec.name!r}: the preferred and rejected replies have the "
                                 f"same mean residual at layer {self.layer}, so there is no direction; write replies "
                                 "that differ in the behaviour, or use the preference judge")
            unit = diff / dist
            self._fit = (unit, float(unit @ (mu_p + mu_r)) / 2, dist)
        return self._fit

    def _judge_one(self, case: Case, response: str) -> Verdict:
        lm = self.ctx.lm
        unit, mid, dist = self.direction()
        r = _pooled_replies(lm, _context_ids(lm, case.context), [_reply_ids(lm, response)], self.layer)[0]
        score = (float(unit @ r) - mid) / dist
        side = "preferred" if score > 0 else "rejected"
        return Verdict(passed=score > 0, score=score, response=response, case_id=case.id,
                       reason=f"response lies on the {side} side of the behaviour direction ({score:+.2f} class "
                              f"distances from the midpoint, layer {self.layer})")


class ReadoutJudge(_Base):
    """Bounds on the emotion readout of the response text: each `below` concept must score under its
    bound and each `above` concept over it (z-scores: standard deviations from the corpus average,
    the combined score of the readout's default layers). The response is read on its own, as the
    readout tool reads an agent's text. Score = the smallest margin to a bound (negative: failing)."""

    kind = "readout"
    Params = ReadoutParams

    def __init__(self, spec: InvariantSpec, ctx: JudgeContext) -> None:
        super().__init__(spec, ctx)
        if ctx.readout is None:
            raise DreamError(f"invariant {spec.name!r} uses the readout judge, which needs the emotion readout; build "
                             "it with `amygdala vectors train` (the daemon builds it on start)")
        _check_concepts(self.params, ctx.readout.concepts)
        idx = ctx.readout.concept_index
        self._bounds = [(name, idx(name), bound, "below") for name, bound in sorted(self.params.below.items())]
        self._bounds += [(name, idx(name), bound, "above") for name, bound in sorted(self.params.above.items())]

    @classmethod
    def check(cls, params: dict[str, Any], concepts: Sequence[str] | None) -> None:
        parsed = _check_params(cls.Params, params)
        if concepts is not None:
            _check_concepts(parsed, concepts)

    def _judge_one(self, case: Case, response: str) -> Verdict:
        assert self.ctx.readout is not None
        z = self.ctx.readout.read([response])[0].combined.double()
        parts, margins = [], []
        for name, i, bound, side in self._bounds:
            value = float(z[i])
            margin = bound - value if side == "below" else value - bound
            margins.append(margin)
            ok = margin > 0
            sign = ("<" if side == "below" else ">") if ok else ("≥" if side == "below" else "≤")
            parts.append((ok, f"{name} {value:+.2f} {sign} {bound:g}"))
        score = min(margins)
        failing = [t for ok, t in parts if not ok]
        reason = ("within every bound: " if not failing else "out of bounds: ") + \
            ", ".join(failing or [t for _, t in parts])
        return Verdict(passed=score > 0, score=score, reason=reason, response=response, case_id=case.id)


class RulesJudge(_Base):
    """Regular expressions: every `must` pattern found in the response, no `must_not` pattern found
    (re.search, with `flags`). Score = the share of rules satisfied (1.0 passes)."""

    kind = "rules"
    Params = RulesParams

    def __init__(self, spec: InvariantSpec, ctx: JudgeContext) -> None:
        super().__init__(spec, ctx)
        self._must, self._must_not = _compile_rules(self.params)

    @classmethod
    def check(cls, params: dict[str, Any], concepts: Sequence[str] | None) -> None:
        _compile_rules(_check_params(cls.Params, params))

    def _judge_one(self, case: Case, response: str) -> Verdict:
        broken = []
        for i, p in enumerate(self._must):
            if p.search(response) is None:
                broken.append(f"must[{i}] /{p.pattern}/ not found")
        for i, p in enumerate(self._must_not):
            m = p.search(response)
            if m is not None:
                broken.append(f"must_not[{i}] /{p.pattern}/ found {_snippet(m.group(0))}")
        total = len(self._must) + len(self._must_not)
        score = (total - len(broken)) / total
        reason = f"follows all {total} rule(s)" if not broken else "; ".join(broken)
        return Verdict(passed=not broken, score=score, reason=reason, response=response, case_id=case.id)

    def judge_responses(self, items: Sequence[tuple[Case, str]]) -> list[Verdict]:
        # An empty response is judged by the rules like any text: must_not-only rules may accept it.
        return [self._judge_one(case, response) for case, response in items]


JUDGES: dict[str, type] = {j.kind: j for j in (PreferenceJudge, DirectionJudge, ReadoutJudge, RulesJudge)}


def check_judge(judge: JudgeSpec, *, concepts: Sequence[str] | None = None) -> None:
    """Refuse an unknown judge kind or bad parameters, without a model (InvalidInvariant naming the field).

    With `concepts` (the readout's concept names), a readout judge's concepts are checked as well;
    without, only the shape of its bounds.
    """
    cls = JUDGES.get(judge.kind)
    if cls is None:
        known = ", ".join(sorted(JUDGES))
        raise InvalidInvariant(f"judge.kind: unknown judge kind {judge.kind!r}; known kinds: {known}")
    cls.check(dict(judge.params), concepts)


def build_judge(spec: InvariantSpec, ctx: JudgeContext) -> Judge:
    """The judge the invariant names, ready to use on `ctx.lm` (raises InvalidInvariant / DreamError)."""
    check_judge(spec.judge, concepts=ctx.readout.concepts if ctx.readout is not None else None)
    return JUDGES[spec.judge.kind](spec, ctx)


__all__ = ["JUDGES", "DirectionJudge", "Judge", "JudgeContext", "PreferenceJudge", "ReadoutJudge", "RulesJudge",
           "Verdict", "build_judge", "check_judge"]

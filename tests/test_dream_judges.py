"""Judges on the tiny random model and on hand-built responses; determinism; add-time refusals."""

from __future__ import annotations

import pytest
import torch

from amygdala.dream import judges as J
from amygdala.dream.cases import split, written_cases
from amygdala.dream.errors import DreamError, InvalidInvariant
from amygdala.dream.invariants import parse_spec
from amygdala.memory_graph import JudgeSpec


def spec_for(kind: str, params: dict | None = None, n: int = 6):
    return parse_spec({
        "name": "t", "description": "Agree when asked to agree.", "threshold": 0.8,
        "judge": {"kind": kind, "params": params or {}},
        "cases": [{"context": f"User: question {i}?\nAssistant:", "preferred": " yes yes yes, sure",
                   "rejected": " no no no, never"} for i in range(n)],
    })


@pytest.fixture
def ctx(tiny_lm):
    return J.JudgeContext(lm=tiny_lm, max_new_tokens=6, seed=0)


def test_registry_and_unknown_kind():
    assert set(J.JUDGES) == {"preference", "direction", "readout", "rules"}
    with pytest.raises(InvalidInvariant, match="unknown judge kind 'gpt'; known kinds: direction, preference, readout"):
        J.check_judge(JudgeSpec(kind="gpt"))
    spec = spec_for("preference")
    bad = spec.model_copy(update={"judge": JudgeSpec(kind="gpt")})
    with pytest.raises(InvalidInvariant, match="unknown judge kind"):
        J.build_judge(bad, J.JudgeContext(lm=None))  # refused before the model is touched


@pytest.mark.parametrize("kind, params, expected", [
    ("preference", {"margin": "big"}, "judge.params.margin: Input should be a valid number"),
    ("preference", {"temperature": 1}, "judge.params.temperature: unknown parameter; known: margin, layer"),
    ("direction", {"layer": -1}, "judge.params.layer: Input should be greater than or equal to 0"),
    ("rules", {}, "give at least one rule"),
    ("rules", {"must": ["ok"], "flags": "q"}, "judge.params.flags: String should match pattern"),
    ("rules", {"must": ["a", "b"], "must_not": ["fine", "(unclosed"]}, "judge.params.must_not[1]: invalid regular"),
    ("readout", {}, "give at least one bound"),
    ("readout", {"below": {"calm": "low"}}, "judge.params.below.calm: Input should be a valid number"),
    ("readout", {"below": {"calm": 0.0}, "above": {"calm": 1.0}}, "no score can pass"),
])
def test_check_judge_names_the_parameter(kind, params, expected):
    with pytest.raises(InvalidInvariant) as info:
        J.check_judge(JudgeSpec(kind=kind, params=params))
    assert expected in str(info.value)


def test_readout_concepts_checked_only_with_a_list():
    judge = JudgeSpec(kind="readout", params={"below": {"anxius": 1.0}})
    J.check_judge(judge)  # shape only
    with pytest.raises(InvalidInvariant, match="below.anxius: unknown emotion concept.*did you mean anxious"):
        J.check_judge(judge, concepts=["anxious", "calm"])


# -- preference ---------------------------------------------------------------------------------------------
def _mean_lp_full(lm, context: str, reply: str) -> float:
    """Independent reference: one full forward over context + reply."""
    from amygdala.engine.generation import sequence_logprobs

    ctx_ids = lm.tokenizer(context, add_special_tokens=True)["input_ids"]
    ids = lm.tokenizer(reply, add_special_tokens=False)["input_ids"]
    return float(sequence_logprobs(lm, ctx_ids, ids).double().mean())


def test_preference_judge_model_is_the_logprob_margin(ctx, tiny_lm):
    spec = spec_for("preference")
    cases = written_cases(spec)
    verdicts = J.build_judge(spec, ctx).judge_model(cases)
    for case, v in zip(cases, verdicts, strict=True):
        expected = (_mean_lp_full(tiny_lm, case.context, case.preferred)
                    - _mean_lp_full(tiny_lm, case.context, case.rejected))
        assert v.score == pytest.approx(expected, abs=1e-4)
        assert v.passed == (v.score > 0) and v.response is None and v.case_id == case.id
        word = "preferred beats rejected" if v.score >= 0 else "rejected beats preferred"
        assert v.reason.startswith(word) and v.reason.endswith("nats/token")
    # The margin parameter moves the bar: just above the best score, nothing passes.
    top = max(v.score for v in verdicts)
    strict = spec.model_copy(update={"judge": JudgeSpec(kind="preference", params={"margin": top + 1e-6})})
    assert not any(v.passed for v in J.build_judge(strict, ctx).judge_model(cases))
    floor = min(v.score for v in verdicts) - 1
    low = spec.model_copy(update={"judge": JudgeSpec(kind="preference", params={"margin": floor})})
    assert all(v.passed for v in J.build_judge(low, ctx).judge_model(cases))


def test_preference_judge_responses_by_residual_nearness(ctx):
    spec = spec_for("preference")
    case = written_cases(spec)[0]
    judge = J.build_judge(spec, ctx)
    near_pref, near_rej, empty = judge.judge_responses([(case, case.preferred), (case, case.rejected), (case, "  ")])
    assert near_pref.passed and near_pref.score == pytest.approx(1.0, abs=1e-6)
    assert not near_rej.passed and near_rej.score == pytest.approx(-1.0, abs=1e-6)
    assert near_pref.response == case.preferred and "preferred reference" in near_pref.reason
    assert not empty.passed and "empty" in empty.reason
    other = judge.judge_responses([(case, " yes yes yes")])[0]
    assert -1.0 < other.score < 1.0


# -- direction ----------------------------------------------------------------------------------------------
def test_direction_class_means_sit_at_plus_minus_half(ctx):
    spec = parse_spec({
        "name": "t", "description": "d", "threshold": 0.8, "judge": {"kind": "direction", "params": {"layer": 1}},
        "cases": [{"context": f"User: thing {i}?\nAssistant:", "preferred": f" yes {'a' * (i + 1)}",
                   "rejected": f" no {'b' * (i + 2)}"} for i in range(5)],
    })
    judge = J.build_judge(spec, ctx)
    cases = written_cases(spec)
    pref = judge.judge_responses([(c, c.preferred) for c in cases])
    rej = judge.judge_responses([(c, c.rejected) for c in cases])
    # Projections are linear in the pooled residual, so the class means land exactly at +-1/2.
    assert sum(v.score for v in pref) / len(pref) == pytest.approx(0.5, abs=1e-6)
    assert sum(v.score for v in rej) / len(rej) == pytest.approx(-0.5, abs=1e-6)
    assert "layer 1" in pref[0].reason
    assert all(v.passed == (v.score > 0) for v in pref + rej)


def test_direction_is_fitted_once(ctx, monkeypatch):
    spec = spec_for("direction")
    judge = J.build_judge(spec, ctx)
    case = written_cases(spec)[0]
    calls = []
    real = J._pooled_replies
    monkeypatch.setattr(J, "_pooled_replies", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = judge.judge_responses([(case, case.preferred)])[0]
    fitted = len(calls)
    assert fitted == len(spec.cases) + 1
    second = judge.judge_responses([(case, case.preferred)])[0]
    assert len(calls) == fitted + 1 and first == second
    assert first.passed  # identical replies across cases: the preferred reply is on its own side


def test_direction_judge_model_generates_and_judges(ctx):
    spec = spec_for("direction")
    judge = J.build_judge(spec, ctx)
    cases = written_cases(spec)[:3]
    verdicts = judge.judge_model(cases)
    for case, v in zip(cases, verdicts, strict=True):
        assert v.response is not None
        assert judge.judge_responses([(case, v.response)])[0] == v


def test_layer_out_of_range(ctx):
    with pytest.raises(InvalidInvariant, match="judge.params.layer: 9 is out of range.*4 layers"):
        J.build_judge(spec_for("direction", {"layer": 9}), ctx)


def test_direction_without_a_direction(ctx, monkeypatch):
    # Replies whose pooled residuals coincide leave no direction to read: refused with the reason.
    monkeypatch.setattr(J, "_pooled_replies",
                        lambda lm, c, replies, layer: torch.ones(len(replies), 8, dtype=torch.float64))
    spec = spec_for("direction")
    with pytest.raises(DreamError, match="no direction"):
        J.build_judge(spec, ctx).judge_responses([(written_cases(spec)[0], " x")])


# -- readout ------------------------------------------------------------------------------------------------
@pytest.fixture
def readout(tiny_lm):
    from amygdala.engine.readout import LayerReadout, ModelRef, ReadoutManager, ReadoutManifest

    g = torch.Generator().manual_seed(3)
    h = tiny_lm.hidden_size
    vectors = torch.nn.functional.normalize(torch.randn(2, h, generator=g), dim=1)
    manifest = ReadoutManifest(concepts=["calm", "anxious"], families=["low", "high"], layers=[2], hidden_size=h,
                               model=ModelRef(name=tiny_lm.name, weights_hash="x", n_layers=tiny_lm.n_layers),
                               pooling="mean", standardize=False, default_layers=[2])
    layer = LayerReadout(vectors=vectors, directions=vectors.clone(), center=torch.zeros(h), scale=torch.ones(h),
                         score_mean=torch.zeros(2), score_std=torch.full((2,), 0.5), residual_norm=torch.tensor(1.0))
    return ReadoutManager(manifest, {2: layer}, lm=tiny_lm)


def test_readout_judge_bounds(tiny_lm, readout):
    text = " I am perfectly fine with that."
    z = readout.read([text])[0].combined
    calm, anxious = float(z[0]), float(z[1])
    ctx = J.JudgeContext(lm=tiny_lm, readout=readout)

    def verdict(params):
        spec = spec_for("readout", params)
        return J.build_judge(spec, ctx).judge_responses([(written_cases(spec)[0], text)])[0]

    ok = verdict({"below": {"anxious": anxious + 0.25}, "above": {"calm": calm - 0.5}})
    assert ok.passed and ok.score == pytest.approx(0.25, abs=1e-5) and ok.reason.startswith("within every bound")
    bad = verdict({"below": {"anxious": anxious - 0.1}, "above": {"calm": calm - 0.5}})
    assert not bad.passed and bad.score == pytest.approx(-0.1, abs=1e-5)
    assert bad.reason.startswith("out of bounds: anxious") and "calm" not in bad.reason
    assert not verdict({"above": {"calm": calm + 0.1}}).passed
    assert verdict({"above": {"calm": calm - 0.1}}).passed


def test_readout_judge_needs_readout_and_known_concepts(tiny_lm, readout):
    spec = spec_for("readout", {"below": {"defensive": 1.0}})
    with pytest.raises(DreamError, match="needs the emotion readout"):
        J.build_judge(spec_for("readout", {"below": {"calm": 1.0}}), J.JudgeContext(lm=tiny_lm))
    with pytest.raises(InvalidInvariant, match="judge.params.below.defensive: unknown emotion concept 'defensive'"):
        J.build_judge(spec, J.JudgeContext(lm=tiny_lm, readout=readout))


# -- rules ----------------------------------------------------------------------------------------------------
def test_rules_on_hand_built_texts():
    spec = spec_for("rules", {"must": [r"\?", "sure|certain"], "must_not": [r"as an ai"], "flags": "i"})
    judge = J.build_judge(spec, J.JudgeContext(lm=None))
    case = written_cases(spec)[0]
    good, missing, forbidden = judge.judge_responses([
        (case, " Are you SURE? I'd check first."),
        (case, " I'd check first."),
        (case, " As an AI, I am certain? yes"),
    ])
    assert good.passed and good.score == 1.0 and good.reason == "follows all 3 rule(s)"
    assert not missing.passed and missing.score == pytest.approx(1 / 3)
    assert "must[0]" in missing.reason and "must[1]" in missing.reason
    assert not forbidden.passed and "must_not[0] /as an ai/ found 'As an AI'" in forbidden.reason
    only_not = J.build_judge(spec_for("rules", {"must_not": ["x"]}), J.JudgeContext(lm=None))
    assert only_not.judge_responses([(case, "")])[0].passed  # the rules decide, even for an empty reply


def test_rules_flags_matter():
    case = written_cases(spec_for("rules", {"must": ["sure"]}))[0]
    plain = J.build_judge(spec_for("rules", {"must": ["sure"]}), J.JudgeContext(lm=None))
    folded = J.build_judge(spec_for("rules", {"must": ["sure"], "flags": "i"}), J.JudgeContext(lm=None))
    assert not plain.judge_responses([(case, " SURE")])[0].passed
    assert folded.judge_responses([(case, " SURE")])[0].passed


# -- determinism ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["preference", "direction", "rules"])
def test_verdicts_are_deterministic_and_batch_independent(tiny_lm, kind):
    params = {"must": ["a"]} if kind == "rules" else {}
    spec = spec_for(kind, params)
    _, held = split(spec)
    cases = written_cases(spec)
    a = J.build_judge(spec, J.JudgeContext(lm=tiny_lm, max_new_tokens=5, seed=1)).judge_model(cases)
    b = J.build_judge(spec, J.JudgeContext(lm=tiny_lm, max_new_tokens=5, seed=1)).judge_model(cases)
    assert a == b
    alone = J.build_judge(spec, J.JudgeContext(lm=tiny_lm, max_new_tokens=5, seed=1)).judge_model(cases[-1:])
    assert alone == a[-1:]  # a verdict does not depend on the other cases judged with it
    on_policy = [(c, " yes no maybe") for c in cases]
    judge = J.build_judge(spec, J.JudgeContext(lm=tiny_lm, seed=1))
    again = J.build_judge(spec, J.JudgeContext(lm=tiny_lm, seed=1))
    assert judge.judge_responses(on_policy) == again.judge_responses(on_policy)

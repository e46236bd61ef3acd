"""Context-frozen training on the tiny model: exact logits, where gradients go, memory, guards, rollback, dry run."""

from __future__ import annotations

import copy

import pytest
import torch

from amygdala.training.peak_memory import PeakTensorMemory
from amygdala.training.schemas import JobRejected, TrainExample, TrainJob, TrainSettings
from amygdala.training.trainer import (ContextFrozenTrainer, continuation_logprobs, example_loss, full_backprop_logprobs,
                              trainable_parameters)

# longer than the tiny model's sliding window (32), so sliding-window layers are exercised
CONTEXT = [2] + [(7 * i) % 250 + 4 for i in range(80)]
CHOSEN = [100, 101, 102, 103, 104]
REJECTED = [150, 151, 152]
ORPO = TrainExample(context_ids=CONTEXT, continuation_ids=CHOSEN, rejected_ids=REJECTED, loss="orpo")
SFT = TrainExample(context_ids=CONTEXT, continuation_ids=CHOSEN, loss="sft")


@pytest.fixture
def model(tiny_lm):
    return copy.deepcopy(tiny_lm.model)


def settings(**kw) -> TrainSettings:
    return TrainSettings(**({"rank": 8, "lr": 1e-3, "progress": False} | kw))


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bitwise equality (NaN-safe)."""
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


def test_logprobs_equal_full_forward(model) -> None:
    with torch.no_grad():
        frozen = continuation_logprobs(model, CONTEXT, [CHOSEN, REJECTED])
        full = full_backprop_logprobs(model, CONTEXT, [CHOSEN, REJECTED])
        single = continuation_logprobs(model, [2], [CHOSEN])  # context of one token: no cache at all
        single_full = full_backprop_logprobs(model, [2], [CHOSEN])
    for a, b in zip(frozen + single, full + single_full):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_gradients_reach_every_layer_through_the_continuation(model) -> None:
    trainer = ContextFrozenTrainer(model, settings())
    with trainer._grads_on():
        loss, _ = example_loss(model, ORPO, 0.1)
        loss.backward()
    for name, p in trainer.named:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(model.get_parameter(f"model.layers.{i}.self_attn.q_proj.weight").grad.norm() > 0 for i in range(4))
    assert model.get_input_embeddings().weight.grad is None  # frozen by default
    assert not any(p.requires_grad for p in model.parameters())  # restored for inference


def _saved_bytes(model, fn, context: list[int]) -> int:
    """Bytes of the tensors autograd keeps for backward (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (lp,) = fn(model, context, [CHOSEN])
    lp.mean().backward()
    return sum(seen.values())


def test_context_holds_no_graph_and_uses_less_memory(model) -> None:
    trainer = ContextFrozenTrainer(model, settings())
    long_context = [2] + [(11 * i) % 250 + 4 for i in range(400)]
    peaks, growth = {}, {}
    for name, fn in (("frozen", continuation_logprobs), ("full", full_backprop_logprobs)):
        with trainer._grads_on():
            with PeakTensorMemory() as mem:
                (lp,) = fn(model, long_context, [CHOSEN])
                lp.mean().backward()
            trainer._zero_grad()
            peaks[name] = mem.peak
            # what backward keeps grows with the context only by its cached keys/values when it is frozen
            growth[name] = _saved_bytes(model, fn, long_context) - _saved_bytes(model, fn, long_context[:20])
        trainer._zero_grad()
    assert peaks["frozen"] < 0.5 * peaks["full"], peaks
    assert 0 <= growth["frozen"] < 0.1 * growth["full"], growth


def test_orpo_job_raises_margin_and_sft_lowers_nll(model) -> None:
    trainer = ContextFrozenTrainer(model, settings())

    def margin() -> float:
        with torch.no_grad():
            c, r = continuation_logprobs(model, CONTEXT, [CHOSEN, REJECTED])
        return float(c.mean() - r.mean())

    before = margin()
    result = trainer.run(TrainJob(examples=[ORPO], epochs=5), "orpo")
    assert result.state == "done" and result.steps_applied == 5 and result.error is None
    assert margin() > before
    nll_before = trainer.run(TrainJob(examples=[SFT], dry_run=True), "d").loss
    trainer.run(TrainJob(examples=[SFT], epochs=3), "sft")
    assert trainer.run(TrainJob(examples=[SFT], dry_run=True), "d2").loss < nll_before


def test_batches_accumulate_examples(model) -> None:
    trainer = ContextFrozenTrainer(model, settings(batch_size=2))
    job = TrainJob(examples=[ORPO, SFT, ORPO], epochs=2)
    assert trainer.total_steps(job) == 4
    result = trainer.run(job, "b")
    assert [s.step for s in result.steps] == [1, 2, 3, 4] and result.steps_applied == 4


def test_non_finite_loss_skips_the_step(model) -> None:
    trainer = ContextFrozenTrainer(model, settings())
    with torch.no_grad():
        model.get_parameter("model.layers.1.mlp.up_proj.weight")[0, 0] = float("nan")
    before = weights(model)
    result = trainer.run(TrainJob(examples=[ORPO], epochs=2), "nan")
    assert result.steps_applied == 0 and result.steps_skipped == 2
    assert "non-finite loss" in result.steps[0].reason
    assert same_bits(weights(model), before)
    assert all(not s for s in trainer.optimizer.state.values() if "exp_avg" in s)


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001
        return x.clone()

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001
        return g * float("inf")


def test_non_finite_gradient_skips_the_step(model) -> None:
    def poisoned(m, ctx, conts):  # noqa: ANN001
        return [_InfGrad.apply(lp) for lp in continuation_logprobs(m, ctx, conts)]

    trainer = ContextFrozenTrainer(model, settings(), logprobs=poisoned)
    before = weights(model)
    result = trainer.run(TrainJob(examples=[ORPO]), "inf")
    assert result.steps_applied == 0 and "non-finite gradient" in result.steps[0].reason
    assert result.steps[0].loss is not None  # the loss itself was finite
    assert same_bits(weights(model), before)
    assert not any("exp_avg" in s for s in trainer.optimizer.state.values())


def test_gradients_are_clipped_before_the_step(model) -> None:
    trainer = ContextFrozenTrainer(model, settings(max_grad_norm=0.01))
    seen = []
    original = trainer.optimizer.step

    def spy():
        seen.append(float(torch.nn.utils.get_total_norm([p.grad for _, p in trainer.named if p.grad is not None])))
        return original()

    trainer.optimizer.step = spy
    result = trainer.run(TrainJob(examples=[ORPO]), "clip")
    assert result.grad_norm > 0.01  # reported norm is before clipping
    assert seen and seen[0] == pytest.approx(0.01, rel=1e-3)


def test_dry_run_changes_nothing(model) -> None:
    trainer = ContextFrozenTrainer(model, settings())
    trainer.run(TrainJob(examples=[ORPO]), "warm")  # non-empty optimizer state
    before_w = weights(model)
    before_t, before_i = trainer.optimizer.export_state({p: n for n, p in trainer.named})
    result = trainer.run(TrainJob(examples=[ORPO, SFT], dry_run=True), "dry")
    assert result.state == "done" and result.dry_run and result.steps_applied == 0
    assert result.loss > 0 and result.grad_norm > 0
    assert set(result.grad_norms) == {n for n, _ in trainer.named} and all(v >= 0 for v in result.grad_norms.values())
    assert len(result.example_losses) == 2 and "log_odds_ratio" in result.example_losses[0]
    after_t, after_i = trainer.optimizer.export_state({p: n for n, p in trainer.named})
    assert same_bits(weights(model), before_w)
    assert after_i == before_i and same_bits(after_t, before_t)
    assert "dry" not in trainer.snapshots
    assert all(p.grad is None for _, p in trainer.named)


def test_rollback_is_exact_and_replays_identically(model) -> None:
    trainer = ContextFrozenTrainer(model, settings(keep_snapshots=2))
    trainer.run(TrainJob(examples=[SFT]), "a")
    w_a = weights(model)
    state_a = trainer.optimizer.export_state({p: n for n, p in trainer.named})
    trainer.run(TrainJob(examples=[ORPO], epochs=3), "b")
    w_b = weights(model)
    trainer.run(TrainJob(examples=[SFT]), "c")
    assert not same_bits(weights(model), w_a)
    assert list(trainer.snapshots) == ["b", "c"]  # bounded by keep_snapshots

    result = trainer.rollback("b")  # undoes b and c
    assert result.undone_jobs == ["b", "c"]
    assert same_bits(weights(model), w_a)
    state_now = trainer.optimizer.export_state({p: n for n, p in trainer.named})
    assert state_now[1] == state_a[1] and same_bits(state_now[0], state_a[0])
    trainer.run(TrainJob(examples=[ORPO], epochs=3), "b2")  # same job again: same weights as the first time
    assert same_bits(weights(model), w_b)
    with pytest.raises(JobRejected, match="no snapshot"):
        trainer.rollback("c")
    assert list(trainer.snapshots) == ["b2"]


def test_embeddings_frozen_unless_asked(model) -> None:
    named, emb = trainable_parameters(model)
    names = {n for n, _ in named}
    assert "model.embed_tokens.weight" not in names and not emb
    named, emb = trainable_parameters(model, train_embeddings=True)
    assert "model.embed_tokens.weight" in {n for n, _ in named} and len(emb) == 1
    trainer = ContextFrozenTrainer(model, settings(train_embeddings=True))
    adamw = [g for g in trainer.optimizer.param_groups if g["rank"] is None][0]
    assert any(p is model.get_input_embeddings().weight for p in adamw["params"])
    assert all(p.dim() == 2 for g in trainer.optimizer.param_groups if g["rank"] for p in g["params"])


def test_failures_become_results(model) -> None:
    trainer = ContextFrozenTrainer(model, settings())
    bad = TrainExample(context_ids=[2, 5], continuation_ids=[10_000], loss="sft")  # beyond the tiny vocabulary
    result = trainer.run(TrainJob(examples=[bad]), "bad")
    assert result.state == "failed" and result.error

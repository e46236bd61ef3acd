"""The backend protocol on the transformers backend, against the engine functions it must equal.

Also the readout-from-projections math (engine.backends.probe) that both backends share: the score
at the prompt's end must equal ReadoutManager.read, and the per-token scores DecodeReader's.
"""

from __future__ import annotations

import pytest
import torch
from amygdala.engine.activations import Pooling, pooled_activations, token_activations
from amygdala.engine.backend import (
    Backend,
    BackendError,
    GenerationRequest,
    Probe,
    Sampling,
)
from amygdala.engine.backends.probe import readout_probe, readout_scores
from amygdala.engine.backends.transformers import TransformersBackend
from amygdala.engine.generation import DecodeState, generate
from amygdala.engine.readout import (
    LayerReadout,
    ModelRef,
    ReadoutManager,
    ReadoutManifest,
)
from amygdala.engine.steering import SteeringPlan
from amygdala.engine.testing import tiny_model

PROMPTS = [[2, 40, 41, 42, 43, 44, 45], [2, 60, 61, 62], [2, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79]]


def synthetic_readout(lm, pooling: str = "mean:2", layers=(1, 2), calibrated: bool = True, window: int = 6,
                      seed: int = 0) -> ReadoutManager:
    """A readout with random (but valid) statistics: the scoring math does not care how it was fitted."""
    g = torch.Generator().manual_seed(seed)
    h, c = lm.hidden_size, 5
    parts = {}
    for i in layers:
        v = torch.randn(c, h, generator=g)
        v = v / v.norm(dim=1, keepdim=True)
        calib = {}
        if calibrated:
            calib = {"calib_tokens": torch.tensor([1.0, 4.0, 16.0]),
                     "calib_mean": torch.randn(3, c, generator=g),
                     "calib_std": torch.rand(3, c, generator=g) + 0.5}
        parts[i] = LayerReadout(vectors=v, directions=v.clone(), center=torch.randn(h, generator=g),
                                scale=torch.rand(h, generator=g) + 0.5, score_mean=torch.randn(c, generator=g),
                                score_std=torch.rand(c, generator=g) + 0.5, residual_norm=torch.tensor(3.0), **calib)
    manifest = ReadoutManifest(concepts=[f"c{k}" for k in range(c)], families=["f"] * c, layers=list(layers),
                               hidden_size=h, model=ModelRef(name=lm.name, weights_hash="x", n_layers=lm.n_layers),
                               pooling=pooling, standardize=True, window=window, default_layers=list(layers))
    return ReadoutManager(manifest, parts, lm=lm)


@pytest.fixture(scope="module")
def backend(tiny_lm):
    return TransformersBackend(tiny_lm)


def test_is_a_backend_with_info(backend, tiny_lm):
    assert isinstance(backend, Backend)
    info = backend.info()
    assert (info.backend, info.n_layers, info.hidden_size, info.vocab_size) == ("transformers", 4, 64, tiny_lm.vocab_size)
    assert info.dtype == "float32" and info.tensor_parallel_size == 1


def test_capture_equals_engine_activations(backend, tiny_lm):
    got = backend.capture(PROMPTS, [0, 2, 3])
    for seq, res in zip(PROMPTS, got):
        want = token_activations(tiny_lm, seq, [0, 2, 3])
        assert sorted(res) == [0, 2, 3]
        assert all(torch.equal(res[i], want[i]) for i in want)
        assert res[0].shape == (len(seq), 64)
    for pooling in (Pooling("last"), Pooling("mean", 2)):
        pooled = backend.capture_pooled(PROMPTS, [1, 3], pooling)
        want = pooled_activations(tiny_lm, PROMPTS, [1, 3], pooling)
        assert all(torch.equal(pooled[i], want[i]) for i in (1, 3))


@pytest.mark.parametrize("read_last", [False, True])
@pytest.mark.parametrize("positions", ["both", "prompt", "generated"])
def test_generate_with_hooks_equals_engine_generation(backend, tiny_lm, positions, read_last):
    torch.manual_seed(1)
    plan = SteeringPlan(pushes={1: torch.randn(64) * 2.0, 3: torch.randn(64)}, positions=positions)
    probe = Probe(weight={0: torch.randn(7, 64), 2: None}, bias={0: torch.randn(7)})
    sampling = Sampling(max_new_tokens=6, temperature=0.0, stop_at_eos=False, read_last=read_last)
    out = backend.generate([GenerationRequest(PROMPTS[0], sampling, steering=plan, probe=probe)])[0]

    state = DecodeState()
    seen: dict[int, list[torch.Tensor]] = {0: [], 2: []}
    ref = generate(tiny_lm, PROMPTS[0], max_new_tokens=6, layer_fns=plan.layer_fns(state), state=state,
                   capture_layers=[0, 2], on_residuals=lambda _p, r: [seen[i].append(r[i]) for i in r],
                   read_last=read_last, stop_at_eos=False)
    assert out.token_ids == ref.token_ids and out.logprobs == ref.logprobs and out.finish_reason == ref.finish_reason
    want0 = torch.cat(seen[0]) @ probe.weight[0].T - probe.bias[0]
    assert torch.allclose(out.projections[0], want0, atol=1e-5)
    assert torch.equal(out.projections[2], torch.cat(seen[2]))  # the identity probe is the residual itself
    fed = len(ref.token_ids) if read_last else len(ref.token_ids) - 1
    assert out.n_fed == len(PROMPTS[0]) + fed
    plain = backend.generate([GenerationRequest(PROMPTS[0], sampling)])[0]
    assert plain.projections is None
    if positions != "generated":
        assert plain.token_ids != out.token_ids or plain.logprobs != out.logprobs  # the steering did something


def test_generate_batch_keeps_each_requests_settings(backend):
    plan = SteeringPlan(pushes={2: torch.ones(64) * 3.0}, positions="both")
    reqs = [GenerationRequest(p, Sampling(max_new_tokens=4, stop_at_eos=False), steering=plan if k % 2 else None)
            for k, p in enumerate(PROMPTS)]
    batch = backend.generate(reqs)
    alone = [backend.generate([r])[0] for r in reqs]
    assert [o.token_ids for o in batch] == [o.token_ids for o in alone]


def test_refusals(backend):
    with pytest.raises(BackendError, match="out of range"):
        backend.generate([GenerationRequest(PROMPTS[0], probe=Probe.raw([9]))])
    with pytest.raises(BackendError, match="expected"):
        backend.generate([GenerationRequest(PROMPTS[0], probe=Probe(weight={1: torch.zeros(3, 10)}))])
    with pytest.raises(BackendError, match="steering layers"):
        backend.generate([GenerationRequest(PROMPTS[0], steering=SteeringPlan(pushes={7: torch.zeros(64)}))])
    with pytest.raises(BackendError, match="max_new_tokens"):
        Sampling(max_new_tokens=-1)


def test_write_weights_then_read_back():
    lm = tiny_model(seed=3)
    b = TransformersBackend(lm)
    names = b.weight_names()
    q = "model.layers.1.self_attn.q_proj.weight"
    assert q in names and "lm_head.weight" in names
    before = b.read_weights([q])[q]
    h0 = lm.weights_hash()
    logits0 = b.generate([GenerationRequest(PROMPTS[1], Sampling(max_new_tokens=1))])[0].logprobs
    new = before + 0.5
    b.write_weights({q: new})
    assert torch.equal(b.read_weights([q])[q], new)
    assert lm.weights_hash() != h0  # the cached hash was invalidated
    assert b.generate([GenerationRequest(PROMPTS[1], Sampling(max_new_tokens=1))])[0].logprobs != logits0
    # tied weights: writing the head writes the embedding (one tensor, two names)
    emb = b.read_weights(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    b.write_weights({"lm_head.weight": emb * 2})
    assert torch.equal(b.read_weights(["model.embed_tokens.weight"])["model.embed_tokens.weight"], emb * 2)
    # bad input stores nothing
    k = "model.layers.0.self_attn.k_proj.weight"
    k0 = b.read_weights([k])[k]
    with pytest.raises(BackendError, match="unknown weight name"):
        b.write_weights({k: k0 + 1, "model.layers.0.nope.weight": k0})
    with pytest.raises(BackendError, match="shape mismatch"):
        b.write_weights({k: k0 + 1, q: torch.zeros(3, 3)})
    assert torch.equal(b.read_weights([k])[k], k0)
    read = b.read_weights([k])[k]
    read += 1  # a copy: changing it does not change the model
    assert torch.equal(b.read_weights([k])[k], k0)


@pytest.mark.parametrize("pooling,calibrated", [("mean:2", True), ("mean:0", False), ("last", True)])
def test_readout_scores_from_projections_equal_read_and_decode_reader(backend, tiny_lm, pooling, calibrated):
    r = synthetic_readout(tiny_lm, pooling=pooling, calibrated=calibrated)
    layers = r.default_layers
    prompt = PROMPTS[2]
    out = backend.generate([GenerationRequest(prompt, Sampling(max_new_tokens=10, stop_at_eos=False, read_last=True),
                                              probe=readout_probe(r, layers))])[0]
    scores = readout_scores(r, out.projections, len(prompt), layers)
    want = r.read_ids([prompt], layers)[0]
    assert torch.allclose(scores.prompt, want.combined, atol=1e-4)
    assert all(torch.allclose(scores.prompt_per_layer[i], want.per_layer[i], atol=1e-4) for i in layers)

    reader = r.decode_reader(layers)
    g = generate(tiny_lm, prompt, max_new_tokens=10, capture_layers=layers, on_residuals=reader, read_last=True,
                 stop_at_eos=False)
    assert g.token_ids == out.token_ids
    assert scores.tokens.shape == (len(g.token_ids), len(r.concepts))
    assert torch.allclose(scores.tokens, torch.stack(reader.scores), atol=1e-4)
    with pytest.raises(BackendError, match="no projections"):
        readout_scores(r, {layers[0]: out.projections[layers[0]]}, len(prompt), layers)

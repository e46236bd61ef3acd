"""The vLLM backend on a GPU: the golden test against the transformers backend, and what only a real
vLLM engine can show (continuous batching, chunked prefill, prefix caching, in-place weights).

Skipped, with the reason, without CUDA or without vLLM (`pip install 'amygdala[vllm]'`);
`benchmarks/vllm_gpu.sh` installs the extra into its own venv and runs these.

Golden test tolerance (stated here, asserted below): on the tiny float32 model, concept z-scores
from the two backends agree within 2e-3 absolute and the raw residuals within 1e-3 relative (the
difference is GPU vs CPU float32 kernels, not semantics). With AMYGDALA_VLLM_GOLDEN_MODEL set to a
real HuggingFace model directory, both backends run it on the GPU in bfloat16 and z-scores must
agree within 0.15 (bf16 rounding accumulates over dozens of layers).

The engine runs with max_num_batched_tokens=64, so every prompt longer than that is a chunked
prefill sharing its steps with other requests: every test below also tests chunking.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the vLLM backend is GPU-only); run benchmarks/vllm_gpu.sh on one"),
    pytest.mark.skipif(not VLLM, reason="needs vLLM: pip install 'amygdala[vllm]' (benchmarks/vllm_gpu.sh does it in its own venv)"),
]

Z_TOL_FP32 = 2e-3
RESID_RTOL_FP32 = 1e-3
Z_TOL_BF16 = 0.15


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from amygdala.engine.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny")


@pytest.fixture(scope="module")
def hf(tiny_dir):
    from amygdala.engine.backends.transformers import TransformersBackend
    from amygdala.engine.testing import tiny_model

    return TransformersBackend(tiny_model())  # the same seed as the saved directory


@pytest.fixture(scope="module")
def vb(tiny_dir):
    from amygdala.engine.backends.vllm.backend import VllmBackend

    b = VllmBackend(tiny_dir, dtype="float32", gpu_memory_utilization=0.25, max_model_len=1024,
                    max_num_batched_tokens=64, enable_chunked_prefill=True, max_num_seqs=64)
    yield b
    b.close()


def prompts(n: int, length: int = 20, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(4, 250, (length + (k % 7),), generator=g).tolist() for k in range(n)]


def _greedy(n: int, read_last: bool = True):
    from amygdala.engine.backend import Sampling

    return Sampling(max_new_tokens=n, temperature=0.0, stop_at_eos=False, read_last=read_last)


def _common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def test_info_and_install(vb, hf):
    i, j = vb.info(), hf.info()
    assert (i.n_layers, i.hidden_size, i.vocab_size) == (j.n_layers, j.hidden_size, j.vocab_size)
    assert i.backend == "vllm" and i.device.startswith("cuda")


def test_capture_equals_transformers_residuals(vb, hf):
    seqs = prompts(5, length=90)  # > 64 tokens: chunked prefill
    got, want = vb.capture(seqs, [0, 2, 3]), hf.capture(seqs, [0, 2, 3])
    for g, w in zip(got, want):
        for i in (0, 2, 3):
            assert g[i].shape == w[i].shape
            assert torch.allclose(g[i], w[i], rtol=RESID_RTOL_FP32, atol=RESID_RTOL_FP32 * float(w[i].abs().max()))


def test_golden_concept_scores(vb, hf):
    """Same model, same texts: the transformers and vLLM backends give the same concept scores."""
    from amygdala.engine.backend import GenerationRequest
    from amygdala.engine.backends.probe import readout_probe, readout_scores

    from tests.test_backend_protocol import synthetic_readout

    r = synthetic_readout(hf.lm, pooling="mean:2", layers=(1, 2, 3))
    probe = readout_probe(r)
    seqs = prompts(6, length=40)
    reqs = [GenerationRequest(s, _greedy(12), probe=probe) for s in seqs]
    got, want = vb.generate(reqs), hf.generate(reqs)
    for s, g, w in zip(seqs, got, want):
        sg, sw = readout_scores(r, g.projections, len(s)), readout_scores(r, w.projections, len(s))
        assert torch.allclose(sg.prompt, sw.prompt, atol=Z_TOL_FP32)
        k = _common_prefix(g.token_ids, w.token_ids)  # identical inputs up to here
        assert k >= 1
        assert torch.allclose(sg.tokens[:k], sw.tokens[:k], atol=Z_TOL_FP32)


@pytest.mark.skipif(not os.environ.get("AMYGDALA_VLLM_GOLDEN_MODEL"), reason="set AMYGDALA_VLLM_GOLDEN_MODEL=DIR for the real-model golden test")
def test_golden_concept_scores_real_model():
    from amygdala.engine.backend import GenerationRequest
    from amygdala.engine.backends.probe import readout_probe, readout_scores
    from amygdala.engine.backends.transformers import TransformersBackend
    from amygdala.engine.backends.vllm.backend import VllmBackend
    from amygdala.engine.config import Config
    from amygdala.engine.model import load_model

    from tests.test_backend_protocol import synthetic_readout

    path = os.environ["AMYGDALA_VLLM_GOLDEN_MODEL"]
    lm = load_model(Config.load(model=path, device="cuda", dtype="bfloat16"))
    hf = TransformersBackend(lm)
    n = lm.n_layers
    r = synthetic_readout(lm, layers=(n // 3, n // 2, 2 * n // 3))
    tok = lm.tokenizer
    texts = ["I can't believe you did that for me, thank you so much.", "The meeting was moved again. Nobody told me.",
             "Careful: the ice on the lake is thinner than it looks."]
    seqs = [tok(t)["input_ids"] for t in texts]
    reqs = [GenerationRequest(s, _greedy(16), probe=readout_probe(r)) for s in seqs]
    want = hf.generate(reqs)
    del hf, lm
    torch.cuda.empty_cache()
    vb = VllmBackend(path, dtype="bfloat16", gpu_memory_utilization=0.6)
    try:
        got = vb.generate(reqs)
    finally:
        vb.close()
    for s, g, w in zip(seqs, got, want):
        sg, sw = readout_scores(r, g.projections, len(s)), readout_scores(r, w.projections, len(s))
        assert torch.allclose(sg.prompt, sw.prompt, atol=Z_TOL_BF16)
        k = _common_prefix(g.token_ids, w.token_ids)
        assert torch.allclose(sg.tokens[:k], sw.tokens[:k], atol=Z_TOL_BF16)


def test_per_request_steering_under_continuous_batching(vb, hf):
    from amygdala.engine.backend import GenerationRequest
    from amygdala.engine.steering import SteeringPlan

    g = torch.Generator().manual_seed(3)
    plans = [SteeringPlan(pushes={1: torch.randn(64, generator=g) * 8}, positions=pos) for pos in ("both", "prompt", "generated")]
    seqs = prompts(16, length=70)
    reqs = [GenerationRequest(s, _greedy(10, read_last=False), steering=plans[k % 3] if k % 2 else None)
            for k, s in enumerate(seqs)]
    batch = vb.generate(reqs)
    alone = [vb.generate([r])[0] for r in reqs]
    ref = hf.generate(reqs)
    for k, (b, a, w) in enumerate(zip(batch, alone, ref)):
        assert b.token_ids == a.token_ids, f"request {k}: batched differs from alone"
        n = _common_prefix(b.token_ids, w.token_ids)
        assert n >= min(3, len(w.token_ids)), f"request {k}: vLLM and transformers disagree from token {n}"
    steered = [b.token_ids for k, b in enumerate(batch) if k % 2]
    plain = vb.generate([GenerationRequest(r.prompt_ids, r.sampling) for k, r in enumerate(reqs) if k % 2])
    assert sum(s != p.token_ids for s, p in zip(steered, plain)) >= len(plain) // 2  # steering changed them


def test_prefix_cache_never_reuses_a_steered_prefix(vb):
    from amygdala.engine.backend import GenerationRequest, Probe
    from amygdala.engine.steering import SteeringPlan

    seq = prompts(1, length=200, seed=9)[0]
    plan = SteeringPlan(pushes={0: torch.ones(64) * 6, 2: -torch.ones(64) * 6}, positions="both")
    base = vb.generate([GenerationRequest(seq, _greedy(8, False))])[0]
    steered = vb.generate([GenerationRequest(seq, _greedy(8, False), steering=plan)])[0]
    again = vb.generate([GenerationRequest(seq, _greedy(8, False))])[0]
    steered_again = vb.generate([GenerationRequest(seq, _greedy(8, False), steering=plan)])[0]
    assert steered.token_ids != base.token_ids
    assert again.token_ids == base.token_ids and again.logprobs == pytest.approx(base.logprobs, abs=1e-5)
    assert steered_again.token_ids == steered.token_ids
    # a reader sees every prompt position although the prompt's blocks are cached by now
    read = vb.generate([GenerationRequest(seq, _greedy(2, False), probe=Probe.raw([1]))])[0]
    assert read.projections[1].shape[0] == len(seq) + 1


def test_write_weights_in_place_and_read_back(vb, hf):
    from amygdala.engine.backend import GenerationRequest

    q = "model.layers.1.self_attn.q_proj.weight"
    k = "model.layers.2.mlp.up_proj.weight"
    assert q in vb.weight_names()
    orig = vb.read_weights([q, k])
    assert torch.equal(orig[q], hf.read_weights([q])[q])
    seq = prompts(1, length=30, seed=4)[0]
    before = vb.generate([GenerationRequest(seq, _greedy(6, False))])[0]
    version = vb.weights_version
    vb.write_weights({q: orig[q] * 3, k: orig[k] + 0.5})
    assert vb.weights_version == version + 1
    back = vb.read_weights([q, k])
    assert torch.equal(back[q], orig[q] * 3) and torch.equal(back[k], orig[k] + 0.5)
    after = vb.generate([GenerationRequest(seq, _greedy(6, False))])[0]
    assert after.logprobs != pytest.approx(before.logprobs, abs=1e-4)  # the live model changed, no reload
    vb.write_weights(orig)
    restored = vb.generate([GenerationRequest(seq, _greedy(6, False))])[0]
    assert restored.token_ids == before.token_ids


def test_weights_sha256_is_the_transformers_definition(vb, hf):
    assert vb.weights_sha256() == hf.lm.weights_sha256(refresh=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism needs 2 GPUs")
def test_tensor_parallel_readout_and_steering(tiny_dir, hf):
    from amygdala.engine.backend import GenerationRequest, Probe
    from amygdala.engine.backends.vllm.backend import VllmBackend
    from amygdala.engine.steering import SteeringPlan

    b = VllmBackend(tiny_dir, tensor_parallel_size=2, dtype="float32", gpu_memory_utilization=0.25)
    try:
        plan = SteeringPlan(pushes={1: torch.ones(64) * 4}, positions="both")
        seqs = prompts(4)
        reqs = [GenerationRequest(s, _greedy(6), steering=plan, probe=Probe.raw([2])) for s in seqs]
        for g, w in zip(b.generate(reqs), hf.generate(reqs)):
            n = len(reqs[0].prompt_ids)
            assert torch.allclose(g.projections[2][:n], w.projections[2][:n], rtol=1e-3, atol=1e-3)
    finally:
        b.close()

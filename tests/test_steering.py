"""Steering: per-call isolation, alpha 0 == baseline, positions, concurrency, clear errors."""

from __future__ import annotations

import threading

import pytest
import torch

from amygdala.engine.activations import Pooling
from amygdala.engine.control_vectors import ControlVector, write_gguf, write_safetensors
from amygdala.engine.generation import DecodeState, generate
from amygdala.engine.hooks import hooks_installed
from amygdala.engine.readout import ReadoutManager
from amygdala.engine.steering import SteeringError, build_plan, generate_steered, parse_concept_alphas, steer
from amygdala.engine.steering_eval import compare, plot_sweep, sweep
from tests.corpus_fixture import make_corpus
from amygdala.training.vectors.build import build_readout
from amygdala.training.vectors.caa import FitOptions


@pytest.fixture(scope="module")
def readout(tmp_path_factory, tiny_lm):
    from amygdala.corpus import load_corpus

    root = make_corpus(tmp_path_factory.mktemp("c") / "c")
    out = tmp_path_factory.mktemp("r") / "r"
    build_readout(tiny_lm, load_corpus(root), out, grid=(FitOptions(Pooling("mean", 2), True, 0.0),), plots=False,
                  echo=lambda m: None)
    return ReadoutManager.from_file(out, model=tiny_lm)


def logits(lm, ids):
    with torch.no_grad():
        return lm.model(torch.tensor([ids])).logits


def test_model_unchanged_after_call_and_after_exception(tiny_lm, readout):
    ids = readout.encode("the evening by the window")
    before = logits(tiny_lm, ids)
    weights = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    plan = build_plan(readout, {"cozy": 2.0}, None)
    generate_steered(tiny_lm, ids, plan, max_new_tokens=5)
    assert torch.equal(logits(tiny_lm, ids), before)
    with pytest.raises(RuntimeError, match="mid-generation"):
        with steer(tiny_lm, plan):
            out = logits(tiny_lm, ids)
            assert not torch.equal(out, before)  # steering is really active inside
            raise RuntimeError("mid-generation failure")
    assert hooks_installed(tiny_lm.layers) == 0
    assert torch.equal(logits(tiny_lm, ids), before)
    for k, v in tiny_lm.model.state_dict().items():
        assert torch.equal(v, weights[k])

    def boom(phase, residuals):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        generate(tiny_lm, ids, max_new_tokens=3, layer_fns=plan.layer_fns(DecodeState()), capture_layers=[1],
                 on_residuals=boom)
    assert hooks_installed(tiny_lm.layers) == 0
    assert torch.equal(logits(tiny_lm, ids), before)


def test_alpha_zero_equals_baseline(tiny_lm, readout):
    ids = readout.encode("a long grey afternoon")
    base = generate_steered(tiny_lm, ids, None, max_new_tokens=8, temperature=0.9, seed=3)
    zero = generate_steered(tiny_lm, ids, build_plan(readout, {"bored": 0.0, "cozy": 0.0}, None), max_new_tokens=8,
                            temperature=0.9, seed=3)
    assert zero.token_ids == base.token_ids and zero.logprobs == base.logprobs
    strong = generate_steered(tiny_lm, ids, build_plan(readout, {"bored": 8.0}, None), max_new_tokens=8,
                              temperature=0.9, seed=3)
    assert strong.logprobs != base.logprobs


@pytest.mark.parametrize("positions", ["prompt", "generated", "both"])
def test_positions_respected(tiny_lm, readout, positions):
    ids = readout.encode("the kettle")
    layer = readout.default_layers[0]
    plan = build_plan(readout, {"tender": 1.0}, [layer], positions)
    push = plan.pushes[layer]
    added: list[tuple[str, float]] = []
    state = DecodeState()
    fns = plan.layer_fns(state)

    def spy(i, r):
        new = fns[layer](i, r)
        added.append((state.phase, 0.0 if new is None else float((new - r).norm())))
        return new

    generate(tiny_lm, ids, max_new_tokens=4, layer_fns={layer: spy}, state=state, stop_at_eos=False)
    prompt_adds = [a for p, a in added if p == "prompt"]
    gen_adds = [a for p, a in added if p == "generate"]
    expect_prompt = positions in ("prompt", "both")
    expect_gen = positions in ("generated", "both")
    assert all((a > 0) == expect_prompt for a in prompt_adds)
    assert all((a > 0) == expect_gen for a in gen_adds) and gen_adds
    if expect_gen:
        assert gen_adds[0] == pytest.approx(float(push.norm()), rel=1e-4)


def test_concurrent_calls_do_not_leak(tiny_lm, readout):
    ids = readout.encode("the evening came")
    clean = readout.read(["the evening came"])[0].combined
    plan = build_plan(readout, {"numb": 6.0}, None)
    errors: list[str] = []
    stop = threading.Event()

    def steerer():
        while not stop.is_set():
            generate_steered(tiny_lm, ids, plan, max_new_tokens=3)

    def reader():
        for _ in range(15):
            got = readout.read(["the evening came"])[0].combined
            if not torch.allclose(got, clean, atol=1e-5):
                errors.append("readout saw steering")

    threads = [threading.Thread(target=steerer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        reader()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors


def test_clear_errors(readout):
    with pytest.raises(SteeringError, match="unknown concept 'blorp'.*valid concepts"):
        build_plan(readout, {"blorp": 1.0}, None)
    with pytest.raises(ValueError, match="available layers"):
        build_plan(readout, {"cozy": 1.0}, [99])
    with pytest.raises(SteeringError, match="prompt, generated, both"):
        build_plan(readout, {"cozy": 1.0}, None, "everywhere")
    with pytest.raises(SteeringError, match="nothing to steer"):
        build_plan(readout, {}, None)
    with pytest.raises(SteeringError, match="NAME=ALPHA"):
        parse_concept_alphas(["cozy"])
    assert parse_concept_alphas(["cozy=0.5", "numb=-1"]) == {"cozy": 0.5, "numb": -1.0}


def test_vector_files(tiny_lm, readout, tmp_path):
    layer = readout.default_layers[0]
    k = readout.concept_index("cozy")
    d = readout.layers[layer].directions[k] * 3.0
    g = write_gguf(ControlVector({layer: d} if layer > 0 else {1: d}), tmp_path / "v.gguf")
    s = write_safetensors(ControlVector({layer: d}), tmp_path / "v.safetensors")
    by_name = build_plan(readout, {"cozy": 0.5}, [layer])
    by_file = build_plan(readout, {}, [layer], vectors=[(s, 0.5)])
    assert torch.allclose(by_name.pushes[layer], by_file.pushes[layer], atol=1e-5)  # files are normalised, same unit
    if layer > 0:
        by_gguf = build_plan(readout, {}, [layer], vectors=[(g, 0.5)])
        assert torch.allclose(by_gguf.pushes[layer], by_name.pushes[layer], atol=1e-5)
    bad = write_safetensors(ControlVector({layer: torch.randn(7)}), tmp_path / "bad.safetensors")
    with pytest.raises(SteeringError, match="hidden size"):
        build_plan(readout, {}, [layer], vectors=[(bad, 1.0)])


def test_compare_and_sweep(tiny_lm, readout, tmp_path):
    res = compare(tiny_lm, readout, "The evening came and", {"cozy": 1.0}, max_new_tokens=6, seed=1)
    assert set(res.baseline.scores) == {"cozy"} and res.steered.tokens > 0
    if res.baseline.scores["cozy"] is not None and res.steered.scores["cozy"] is not None:
        assert res.delta["cozy"] == pytest.approx(res.steered.scores["cozy"] - res.baseline.scores["cozy"], abs=1e-3)
    sw = sweep(tiny_lm, readout, "cozy", [-1.0, 1.0], ["The evening came", "A grey street"], max_new_tokens=5)
    assert sw.alphas == [-1.0, 0.0, 1.0] and len(sw.points) == 6
    assert [s.alpha for s in sw.per_alpha] == [-1.0, 0.0, 1.0]
    assert sw.baseline_perplexity is not None and sw.wrong_way is not None
    png = plot_sweep(sw, tmp_path / "sweep.png")
    assert png.stat().st_size > 1000


def test_steer_cli_json(tiny_model_dir, tiny_lm, readout, tmp_path):
    import json

    from typer.testing import CliRunner

    from amygdala.server.cli import app

    runner = CliRunner()
    out = readout.manifest  # the module readout was saved; find its directory through a fresh save
    rdir = tmp_path / "r"
    readout.save(rdir)
    args = ["steer", "--json", "--concept", "cozy=0.5", "--layers", str(readout.default_layers[0]), "--max-new-tokens", "4",
            "--seed", "2", "The evening", "--model", str(tiny_model_dir), "--home", str(tmp_path / "h"), "--readout", str(rdir)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert set(obj) >= {"baseline", "steered", "delta"} and "text" in obj["baseline"] and "cozy" in obj["steered"]["scores"]
    bad = runner.invoke(app, ["steer", "--concept", "nope=1", "x", "--model", str(tiny_model_dir), "--home",
                              str(tmp_path / "h"), "--readout", str(rdir)])
    assert bad.exit_code == 2 and "unknown concept" in bad.output
    assert out.concepts == readout.concepts


def test_alpha_unit_is_the_layer_residual_norm(readout):
    """alpha = 1 pushes by exactly the layer's typical residual norm, whatever the layer."""
    for layer in readout.manifest.layers:
        plan = build_plan(readout, {"weary": 0.25}, [layer])
        expected = 0.25 * float(readout.layers[layer].residual_norm)
        assert float(plan.pushes[layer].norm()) == pytest.approx(expected, rel=1e-5)
    two = build_plan(readout, {"weary": 0.25, "cozy": -0.25}, [1])
    k1, k2 = readout.concept_index("weary"), readout.concept_index("cozy")
    d = readout.layers[1].directions
    assert torch.allclose(two.pushes[1], 0.25 * float(readout.layers[1].residual_norm) * (d[k1] - d[k2]), atol=1e-5)

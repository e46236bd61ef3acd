"""Drift: after training, the readout CLI, read_emotions and train_status say how far the weights moved."""

from __future__ import annotations

import anyio
import pytest
import torch

from amygdala.corpus import load_corpus
from amygdala.engine.activations import Pooling
from amygdala.engine.drift import UNCHANGED_DZ, DriftMonitor, measure_drift
from amygdala.engine.readout import ReadoutManager
from amygdala.engine.testing import tiny_model
from amygdala.training.vectors.build import build_readout
from amygdala.training.vectors.caa import FitOptions
from tests.corpus_fixture import make_corpus


@pytest.fixture
def fresh(tmp_path):
    """Its own tiny model (the weights get changed here) and a readout fit on it."""
    lm = tiny_model()
    out = tmp_path / "r"
    build_readout(lm, load_corpus(make_corpus(tmp_path / "c")), out, grid=(FitOptions(Pooling("mean", 2), True, 0.0, 0.5),),
                  plots=False, echo=lambda m: None, progress=False)
    return lm, ReadoutManager.from_file(out, model=lm), out


def _train(lm, scale: float = 0.05) -> None:
    """Stand-in for a training step: move the MLP weights of every layer a little."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lm.layers:
            w = layer.mlp.down_proj.weight
            w += scale * w.abs().mean() * torch.randn(w.shape, generator=g)
    lm.invalidate_weights_hash()


def test_probe_is_stored_and_unchanged_weights_do_not_drift(fresh):
    _, r, _ = fresh
    assert r.manifest.drift_probe and all(len(s) <= 48 for s in r.manifest.drift_probe)
    assert all(r.layers[i].probe is not None for i in r.default_layers)
    d = measure_drift(r)
    assert d is not None and d.max_abs_dz < UNCHANGED_DZ and d.note() is None


def test_changed_weights_drift_and_the_note_offers_refit(fresh):
    lm, r, _ = fresh
    _train(lm)
    d = measure_drift(r)
    assert d is not None and d.drifted and d.mean_abs_dz > 0.01 and d.residual_change > 0
    assert "amygdala vectors train" in d.note() and str(r.default_layers) in d.note()
    from dataclasses import replace

    no_probe = {i: replace(lr, probe=None) for i, lr in r.layers.items()}  # a readout built before probes existed
    assert measure_drift(ReadoutManager(r.manifest.model_copy(update={"drift_probe": []}), no_probe, lm=lm)) is None


def test_monitor_measures_once_per_weights_version(fresh, monkeypatch):
    lm, r, _ = fresh
    version = [0]
    mon = DriftMonitor(r, lambda: version[0])
    calls = []
    import amygdala.engine.drift as drift_mod

    real = drift_mod.measure_drift
    monkeypatch.setattr(drift_mod, "measure_drift", lambda *a: calls.append(1) or real(*a))
    assert mon.note() is None and mon.note() is None and len(calls) == 1
    _train(lm)
    assert mon.note() is None  # same version: cached
    version[0] = 2
    assert mon.note() is not None and len(calls) == 2


def test_readout_cli_prints_the_drift_note(fresh, tmp_path):
    from typer.testing import CliRunner

    from amygdala.server.cli import app

    lm, _, out = fresh
    model_dir = tmp_path / "trained"
    _train(lm)
    lm.model.save_pretrained(model_dir, safe_serialization=True)
    lm.tokenizer.save_pretrained(model_dir)
    res = CliRunner().invoke(app, ["readout", "--json", "a warm blanket", "--model", str(model_dir),
                                   "--home", str(tmp_path / "h"), "--readout", str(out)])
    assert res.exit_code == 0, res.output
    assert "note: the served weights have drifted" in res.output and "amygdala vectors train" in res.output


def test_tools_report_drift_after_training(fresh, tmp_path):
    from mcp import Client

    from amygdala.server.mcp_server import build_mcp
    from tests.server_fixture import tiny_services

    lm, _, out = fresh
    svc = tiny_services(lm, tmp_path, out)
    try:
        async def go():
            async with Client(build_mcp(svc)) as c:
                a = await c.call_tool("read_emotions", {"text": "a warm blanket"})
                s = await c.call_tool("train_status", {})
                _train(lm)
                svc._drift.version = lambda: 1  # what the training client's weights_version does after a step
                b = await c.call_tool("read_emotions", {"text": "a warm blanket"})
                t = await c.call_tool("train_status", {})
                return a, s, b, t

        before, status_before, after, status_after = anyio.run(go)
        assert before.structured_content.get("drift") is None
        assert status_before.structured_content.get("readout_drift") is None
        assert "amygdala vectors train" in after.structured_content["drift"]
        assert "drifted" in status_after.structured_content["readout_drift"]
    finally:
        svc.close()

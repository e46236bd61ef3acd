"""Shipped readouts: `vectors train --ship`, used at once when every hash matches, one line when not."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from amygdala.engine.config import Config
from amygdala.engine.readout import MANIFEST_FILE, ReadoutManager, read_manifest
from amygdala.server.cli import app
from amygdala.training.vectors import build as build_mod
from amygdala.training.vectors import shipped as shipped_mod
from amygdala.training.vectors.build import ensure_readout
from amygdala.training.vectors.shipped import SHIP_FILE, ShippedBuild, choose_shipped, settings_hash, shipped_builds
from tests.corpus_fixture import make_corpus


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, _tiny_model_master):
    tiny_model_dir = _tiny_model_master  # read only here: vectors train never writes the model
    """A readout shipped by the real CLI for the saved tiny model and the fixture corpus."""
    root = tmp_path_factory.mktemp("ship")
    corpus = make_corpus(root / "corpus")
    ship_dir = root / "shipped"
    res = CliRunner().invoke(app, ["vectors", "train", "--corpus", str(corpus), "--model", str(tiny_model_dir),
                                   "--home", str(root / "home"), "--no-plots", "--ship", "--ship-dir", str(ship_dir)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout[res.stdout.index("{"):])
    return root, corpus, ship_dir, out


def _lm(tiny_model_dir, home):
    from amygdala.engine.model import load_model

    cfg = Config.load(home=home, model=str(tiny_model_dir))
    return cfg, load_model(cfg)


def test_ship_writes_readout_and_hashes(shipped, tiny_model_dir, tmp_path):
    from amygdala.corpus import load_corpus

    _, corpus, ship_dir, out = shipped
    [(d, b)] = shipped_builds(ship_dir)
    assert out["shipped"]["dir"] == str(d)
    _, lm = _lm(tiny_model_dir, tmp_path / "h")
    assert b.weights_hash == lm.weights_hash() and b.corpus_hash == load_corpus(corpus).content_hash()
    assert b.settings_hash == settings_hash() and b.settings["grid"]
    # float16 only where measured harmless; statistics always float32; the file loads as float32
    assert set(b.storage) <= {"vectors", "directions"}
    assert (b.half_max_abs_dz <= 1e-3) == ("vectors" in b.storage)
    r = ReadoutManager.from_file(d, model=lm)
    assert all(lr.vectors.dtype == torch.float32 and lr.score_std.dtype == torch.float32 for lr in r.layers.values())
    from safetensors import safe_open

    with safe_open(str(d / "readout.safetensors"), framework="pt") as fh:
        for k in fh.keys():  # noqa: SIM118 - a safetensors handle, not a dict
            want = torch.float16 if k.split(".")[1] in b.storage else torch.float32
            assert fh.get_tensor(k).dtype == want, k
    # the regular float32 readout of the same build scores within the tolerance
    full = ReadoutManager.from_file(out["out"], model=lm)
    texts = ["a warm blanket and tea", "the clock ticks again", "thanks for the gift"]
    for a, c in zip(r.read(texts, layers=r.manifest.layers), full.read(texts, layers=full.manifest.layers)):
        assert (a.combined - c.combined).abs().max() <= max(b.half_max_abs_dz, 1e-5) + 1e-5


def test_matching_shipped_readout_is_used_without_building(shipped, tiny_model_dir, tmp_path, monkeypatch):
    _, corpus, ship_dir, _ = shipped
    cfg, lm = _lm(tiny_model_dir, tmp_path / "h")
    monkeypatch.setattr(build_mod, "build_readout", lambda *a, **k: pytest.fail("built although a shipped readout matched"))
    lines: list[str] = []
    r = ensure_readout(lm, cfg, corpus_root=corpus, echo=lines.append, shipped_root=ship_dir)
    assert len(lines) == 1 and "using the shipped emotion readout" in lines[0]
    home_dir = build_mod.default_readout_dir(cfg, lm)
    assert (home_dir / MANIFEST_FILE).is_file() and (home_dir / SHIP_FILE).is_file()
    assert r.concepts == ReadoutManager.from_file(next(ship_dir.iterdir())).concepts
    # second start: the home copy is loaded, nothing said
    lines.clear()
    ensure_readout(lm, cfg, corpus_root=corpus, echo=lines.append, shipped_root=ship_dir)
    assert lines == []


def _built_instead(monkeypatch):
    calls = []

    def fake_build(lm, corpus, out_dir, **kw):
        calls.append(out_dir)
        from amygdala.engine.activations import Pooling
        from amygdala.training.vectors.caa import FitOptions

        return real(lm, corpus, out_dir, grid=(FitOptions(Pooling("mean", 2), True, 0.0, 0.5),), plots=False,
                    echo=lambda m: None)

    real = build_mod.build_readout
    monkeypatch.setattr(build_mod, "build_readout", fake_build)
    return calls


def test_edited_corpus_is_reported_in_one_line_and_built(shipped, tiny_model_dir, tmp_path, monkeypatch):
    ship_dir = shipped[2]
    edited = make_corpus(tmp_path / "edited")
    (edited / "stories" / "cozy" / "01.txt").write_text((edited / "stories" / "cozy" / "01.txt").read_text() + " More tea.\n")
    cfg, lm = _lm(tiny_model_dir, tmp_path / "h")
    calls = _built_instead(monkeypatch)
    lines: list[str] = []
    ensure_readout(lm, cfg, corpus_root=edited, echo=lines.append, shipped_root=ship_dir)
    not_used = [x for x in lines if "shipped readout not used" in x]
    assert len(not_used) == 1 and "corpus hash differs" in not_used[0] and "weights" not in not_used[0]
    assert calls == [build_mod.default_readout_dir(cfg, lm)]


def test_other_settings_and_other_weights_are_named(shipped, tiny_model_dir, tmp_path, monkeypatch):
    from amygdala.corpus import load_corpus
    from amygdala.engine.testing import tiny_model

    _, corpus, ship_dir, _ = shipped
    corpus_hash = load_corpus(corpus).content_hash()
    _, lm = _lm(tiny_model_dir, tmp_path / "h")
    assert choose_shipped(lm, corpus_hash, ship_dir).directory is not None
    monkeypatch.setattr(shipped_mod, "BUILD_VERSION", shipped_mod.BUILD_VERSION + 1)
    c = choose_shipped(lm, corpus_hash, ship_dir)
    assert c.directory is None and "settings hash differs" in c.message and "corpus" not in c.message
    monkeypatch.undo()
    other_seed = tiny_model(seed=1)  # same shape, other weights
    c = choose_shipped(other_seed, corpus_hash, ship_dir)
    assert c.directory is None and c.message.startswith("weights hash differs")
    other_shape = tiny_model(layers=2, hidden=32)
    c = choose_shipped(other_shape, corpus_hash, ship_dir)
    assert c.directory is None and "weights hash differs" in c.message and "is not a model a readout is shipped for" in c.message


def test_damaged_shipped_readout_is_skipped(shipped, tmp_path):
    import shutil

    _, _, ship_dir, _ = shipped
    copy = tmp_path / "s"
    shutil.copytree(ship_dir, copy)
    d = next(copy.iterdir())
    (d / SHIP_FILE).write_text("{not json")
    assert shipped_builds(copy) == []
    ShippedBuild.model_validate_json((next(ship_dir.iterdir()) / SHIP_FILE).read_text())  # the original is fine


def test_ship_refuses_non_default_settings(tiny_model_dir, tmp_path):
    corpus = make_corpus(tmp_path / "c")
    res = CliRunner().invoke(app, ["vectors", "train", "--corpus", str(corpus), "--model", str(tiny_model_dir),
                                   "--home", str(tmp_path / "h"), "--ship", "--pooling", "last"])
    assert res.exit_code == 2 and "--ship writes the readout a first start would build" in res.output


def test_packaged_shipped_readout_is_consistent():
    """The readout in the package (if one is shipped) loads, and its shipped.json agrees with its manifest."""
    builds = shipped_builds()
    for d, b in builds:
        m = read_manifest(d)
        assert m is not None and m.model.weights_hash == b.weights_hash and m.corpus_hash == b.corpus_hash
        assert m.storage == b.storage and m.drift_probe, "a shipped readout needs its drift probe"
        r = ReadoutManager.from_file(d)
        assert len(r.concepts) == len(m.concepts)

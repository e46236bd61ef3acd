"""Readout vectors: training math, dedup, files, refusals, GGUF, CLI contract."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from amygdala.corpus import Corpus, Text, load_corpus
from amygdala.corpus.manifest import Manifest
from amygdala.engine.activations import Pooling
from amygdala.engine.control_vectors import ControlVector, read_gguf, read_safetensors, write_gguf, write_safetensors
from amygdala.engine.model import LoadedModel
from amygdala.engine.readout import ReadoutError, ReadoutManager
from amygdala.engine.testing import tiny_tokenizer
from tests.corpus_fixture import make_corpus
from amygdala.training.vectors.build import build_readout
from amygdala.training.vectors.caa import CorpusTooSmall, FitOptions, check_corpus_size, collect, fit_readout, model_ref

FAST = (FitOptions(Pooling("mean", 2), True, 0.0), FitOptions(Pooling("last"), False, 0.0))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_lm):
    root = make_corpus(tmp_path_factory.mktemp("corpus") / "c")
    out = tmp_path_factory.mktemp("readout") / "r"
    res = build_readout(tiny_lm, load_corpus(root), out, grid=FAST, plots=True, echo=lambda m: None)
    return res, root, out


def test_vectors_unit_norm_finite_and_files_written(built):
    res, _, out = built
    r = res.readout
    assert r.concepts == ["cozy", "tender", "grateful", "bored", "weary", "numb"]
    for lr in r.layers.values():
        assert torch.isfinite(lr.vectors).all() and torch.isfinite(lr.directions).all()
        assert torch.allclose(lr.vectors.norm(dim=1), torch.ones(6), atol=1e-5)
        assert torch.allclose(lr.directions.norm(dim=1), torch.ones(6), atol=1e-5)
        assert float(lr.residual_norm) > 0
    m = json.loads((out / "readout.json").read_text())
    for key in ("concepts", "layers", "hidden_size", "dtype", "model", "pooling", "corpus_hash", "default_layers", "validation"):
        assert key in m
    assert m["model"]["weights_hash"] and m["pooling"] in ("mean:2", "last")
    for png in ("accuracy_by_layer.png", "cohesion_heatmap.png", "concept_map.png", "settings.png"):
        assert (out / png).stat().st_size > 1000
    v = json.loads((out / "validation.json").read_text())
    assert v["chosen"] in {o.label() for o in FAST} and v["n_held_out"] == 6


def test_dedup_forwards_each_unique_text_once(tiny_lm, tmp_path):
    root = make_corpus(tmp_path / "c")
    # the same paragraph as a story of one emotion and as a scenario framing of another
    dup = (root / "stories" / "cozy" / "01.txt").read_text()
    (root / "paired" / "the_evening" / "weary.txt").write_text(dup)
    c = load_corpus(root, strict=False)
    seen = []
    h = tiny_lm.model.model.embed_tokens.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    try:
        ca = collect(tiny_lm, c, [1], [Pooling("last"), Pooling("mean", 0)], progress=False)
    finally:
        h.remove()
    n_unique = len({t.text for t in c.all_texts()})
    assert len(c.all_texts()) == n_unique + 1
    assert sum(seen) == n_unique == ca.forwards  # two poolings, one forward per unique text


class _Synthetic(nn.Module):
    """Embedding + identity layers: hidden direction d_c is present iff the label letter of c appears."""

    def __init__(self, vocab: int, hidden: int, label_tokens: dict[int, torch.Tensor]):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        table = torch.randn(vocab, hidden, generator=g) * 0.5
        for tok, d in label_tokens.items():
            table[tok] = 8.0 * d  # pure label direction, no token-specific offset
        self.config = type("Cfg", (), {"hidden_size": hidden, "num_hidden_layers": 2})()
        self.model = nn.Module()
        self.model.embed = nn.Embedding.from_pretrained(table)
        self.model.layers = nn.ModuleList([nn.Identity(), nn.Identity()])

        def body(input_ids=None, attention_mask=None, position_ids=None, use_cache=False, **_):
            h = self.model.embed(input_ids)
            for layer in self.model.layers:
                h = layer(h)
            return h

        self.model.forward = body

    def get_input_embeddings(self):
        return self.model.embed


def test_synthetic_direction_recovered(tmp_path):
    tok = tiny_tokenizer()
    hidden = 32
    q, _ = torch.linalg.qr(torch.randn(hidden, 3, generator=torch.Generator().manual_seed(1)))
    dirs = {"alpha": q[:, 0], "beta": q[:, 1], "gamma": q[:, 2]}
    letters = {"alpha": "A", "beta": "B", "gamma": "C"}
    label_tokens = {tok(letters[c], add_special_tokens=False)["input_ids"][0]: d for c, d in dirs.items()}
    lm = LoadedModel.from_objects(_Synthetic(len(tok), hidden, label_tokens), tok, name="synthetic")
    manifest = Manifest.model_validate({"families": [{"id": "f", "name": "F"}], "emotions": [
        {"id": c, "name": c, "family": "f", "valence": 0, "arousal": 0} for c in dirs]})
    rng = random.Random(0)
    stories = {}
    for c in dirs:
        stories[c] = []
        for k in range(60):
            filler = "".join(rng.choice("xyzuvw ") for _ in range(30))
            txt = f"{filler[:15]}{letters[c] * 10}{filler[15:]}"
            stories[c].append(Text(uid=f"stories/{c}/{k}", text=txt, kind="story", emotion=c, path=tmp_path / f"{c}{k}"))
    corpus = Corpus(manifest, tmp_path, stories, {})
    ca = collect(lm, corpus, [0, 1], [Pooling("mean", 0)], progress=False)
    r = fit_readout(model_ref(lm), hidden, ca, corpus, FitOptions(Pooling("mean", 0), False, 0.0))
    for c, d in dirs.items():
        v = r.layers[1].directions[r.concept_index(c)]
        # one-vs-rest difference of means = d_c - mean(other d) ; recover d_c's component
        expected = d - sum(dirs[o] for o in dirs if o != c) / 2
        assert float(torch.nn.functional.cosine_similarity(v, expected, dim=0)) > 0.99, c
    # and classification through the readout works
    r.lm = lm
    scores = r.read(["xxxyAAAAAzzuv", "uvvBBBBBwwx", "zzCCCCCyyx"], layers=[1])
    assert [r.top(s.combined, 1)[0][0] for s in scores] == ["alpha", "beta", "gamma"]


def test_file_round_trip(built, tiny_lm, tmp_path):
    res, _, out = built
    again = ReadoutManager.from_file(out, model=tiny_lm)
    for i, lr in res.readout.layers.items():
        for name in ("vectors", "directions", "center", "scale", "score_mean", "score_std", "residual_norm"):
            assert torch.equal(getattr(lr, name), getattr(again.layers[i], name))
    assert again.manifest == res.readout.manifest
    s1 = again.read(["a quiet evening by the fire"])[0].combined
    s2 = ReadoutManager.from_file(out / "readout.json", model=tiny_lm).read(["a quiet evening by the fire"])[0].combined
    assert torch.equal(s1, s2)


def _copy(out: Path, tmp: Path) -> Path:
    import shutil

    d = tmp / "copy"
    shutil.copytree(out, d)
    return d


def _rewrite(d: Path, mutate_tensors=None, mutate_manifest=None):
    from safetensors.torch import load_file, save_file

    if mutate_tensors:
        t = load_file(str(d / "readout.safetensors"))
        mutate_tensors(t)
        save_file(t, str(d / "readout.safetensors"))
    if mutate_manifest:
        m = json.loads((d / "readout.json").read_text())
        mutate_manifest(m)
        (d / "readout.json").write_text(json.dumps(m))


@pytest.mark.parametrize("case,match", [
    ("hidden_size", "hidden size"),
    ("layer_missing_in_model", "do not exist"),
    ("concept_count", "shape"),
    ("families_count", "families"),
    ("dtype", "dtype"),
    ("tensor_dtype", "float32"),
    ("nan", "NaN or inf"),
    ("inf", "NaN or inf"),
    ("missing_tensor", "missing tensors"),
    ("extra_layer_tensor", "not listed"),
    ("no_files", "not found"),
])
def test_from_file_refusals(built, tiny_lm, tmp_path, case, match):
    _, _, out = built
    d = _copy(out, tmp_path)
    layer = json.loads((d / "readout.json").read_text())["layers"][0]
    if case == "hidden_size":
        _rewrite(d, mutate_manifest=lambda m: m.update(hidden_size=65))
        _rewrite(d, mutate_tensors=lambda t: [t.__setitem__(k, torch.ones(*v.shape[:-1], 65)) for k, v in list(t.items()) if v.ndim and v.shape[-1] == 64])
    elif case == "layer_missing_in_model":
        def mt(t):
            for k in [k for k in t if k.startswith(f"layer_{layer}.")]:
                t[k.replace(f"layer_{layer}.", "layer_9.")] = t.pop(k)
        _rewrite(d, mt, lambda m: m.update(layers=[9 if x == layer else x for x in m["layers"]],
                                           default_layers=[9 if x == layer else x for x in m["default_layers"]]))
    elif case == "concept_count":
        _rewrite(d, mutate_tensors=lambda t: t.__setitem__(f"layer_{layer}.vectors", t[f"layer_{layer}.vectors"][:5].contiguous()))
    elif case == "families_count":
        _rewrite(d, mutate_manifest=lambda m: m.update(families=m["families"][:-1]))
    elif case == "dtype":
        _rewrite(d, mutate_manifest=lambda m: m.update(dtype="float16"))
    elif case == "tensor_dtype":
        _rewrite(d, mutate_tensors=lambda t: t.__setitem__(f"layer_{layer}.center", t[f"layer_{layer}.center"].half()))
    elif case == "nan":
        _rewrite(d, mutate_tensors=lambda t: t[f"layer_{layer}.vectors"].__setitem__((0, 0), float("nan")))
    elif case == "inf":
        _rewrite(d, mutate_tensors=lambda t: t[f"layer_{layer}.score_std"].__setitem__(0, float("inf")))
    elif case == "missing_tensor":
        _rewrite(d, mutate_tensors=lambda t: t.pop(f"layer_{layer}.scale"))
    elif case == "extra_layer_tensor":
        _rewrite(d, mutate_tensors=lambda t: t.__setitem__("layer_99.vectors", torch.zeros(6, 64)))
    elif case == "no_files":
        (d / "readout.safetensors").unlink()
    with pytest.raises(ReadoutError, match=match):
        ReadoutManager.from_file(d, model=tiny_lm)


def test_gguf_and_safetensors_vector_round_trip(tmp_path):
    cv = ControlVector({1: torch.randn(64), 3: torch.randn(64)}, model_hint="gemma3")
    g = read_gguf(write_gguf(cv, tmp_path / "v.gguf"))
    s = read_safetensors(write_safetensors(cv, tmp_path / "v.safetensors"))
    for back in (g, s):
        assert sorted(back.directions) == [1, 3]
        for i in (1, 3):
            assert torch.equal(back.directions[i], cv.directions[i])
    assert g.model_hint == "gemma3"
    with pytest.raises(ValueError, match="layer 0"):
        write_gguf(ControlVector({0: torch.randn(4)}), tmp_path / "zero.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="GGUF"):
        read_gguf(tmp_path / "junk.gguf")


def test_corpus_too_small_fails_fast(tmp_path):
    root = make_corpus(tmp_path / "c", stories_per_emotion=1)
    c = load_corpus(root)
    with pytest.raises(CorpusTooSmall, match="min-positives"):
        check_corpus_size(c, min_positives=3)


def test_read_tokens_and_window(built, tiny_lm):
    res, _, out = built
    r = ReadoutManager.from_file(out, model=tiny_lm)
    toks, scores = r.read_tokens("the kettle sang by the window")
    assert scores.shape == (len(toks), len(r.concepts))
    if r.pooling.kind == "mean":
        full = r.read(["the kettle sang by the window"])[0].combined
        assert torch.allclose(scores[-1], full, atol=1e-4)  # window covers the whole short text


def test_cli_readout_json_and_jsonl(built, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from amygdala.server.cli import app

    _, _, out = built
    # a readout trained on the in-memory tiny model fits the saved tiny model (same config, same seed)
    runner = CliRunner()
    common = ["--model", str(tiny_model_dir), "--home", str(tmp_path / "home"), "--readout", str(out)]
    r1 = runner.invoke(app, ["readout", "--json", "--top-k", "3", "a warm blanket and tea", *common])
    assert r1.exit_code == 0, r1.output
    obj = json.loads(r1.stdout.strip().splitlines()[-1])
    assert len(obj["top"]) == 3 and set(obj) == {"top", "layers"}
    assert obj["top"][0]["score"] >= obj["top"][1]["score"] >= obj["top"][2]["score"]
    lines = [{"id": f"x{i}", "text": t} for i, t in enumerate(["grey clock", "soft hands", "thanks for the gift", "long miles"])]
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r2 = runner.invoke(app, ["readout", "--json", "--top-k", "2", "--jsonl", str(f), *common])
    assert r2.exit_code == 0, r2.output
    got = [json.loads(x) for x in r2.stdout.strip().splitlines()]
    assert [g["id"] for g in got] == ["x0", "x1", "x2", "x3"]
    bad = runner.invoke(app, ["readout", "--json", "   ", *common])
    assert bad.exit_code == 2 and "empty" in bad.output
    f.write_text('{"id": 1}\n')
    bad2 = runner.invoke(app, ["readout", "--jsonl", str(f), *common])
    assert bad2.exit_code == 1 and "in.jsonl:1" in bad2.output  # reported with its line; see test_readout_edges.py


def test_decode_reader_matches_read_tokens(built, tiny_lm):
    """Scores during generation equal re-reading the generated text token by token."""
    from amygdala.engine.generation import generate

    res, _, out = built
    r = ReadoutManager.from_file(out, model=tiny_lm)
    r.manifest.window = 6  # small window so the running sum really slides
    layers = r.default_layers
    reader = r.decode_reader(layers)
    prompt = r.encode("the kettle sang")
    g = generate(tiny_lm, prompt, max_new_tokens=12, capture_layers=layers, on_residuals=reader, read_last=True,
                 stop_at_eos=False)
    from amygdala.engine.activations import token_activations

    acts = token_activations(tiny_lm, prompt + g.token_ids, layers)
    expected = r.score_windowed(acts, layers)
    got = torch.stack(reader.scores)
    assert got.shape == (len(g.token_ids), len(r.concepts))
    assert torch.allclose(got, expected[len(prompt):], atol=1e-3)


def test_activation_cache_reused_only_for_same_texts(tiny_lm, tmp_path):
    root = make_corpus(tmp_path / "c")
    cache = tmp_path / "cache"
    first = collect(tiny_lm, load_corpus(root), [1, 2], [Pooling("last")], progress=False, cache_dir=cache)
    again = collect(tiny_lm, load_corpus(root), [1, 2], [Pooling("last")], progress=False, cache_dir=cache)
    assert first.forwards > 0 and again.forwards == 0
    assert [t.uid for t in again.texts] == [t.uid for t in first.texts]
    assert torch.equal(again.acts.pooled[Pooling("last")][2], first.acts.pooled[Pooling("last")][2])
    (root / "stories" / "cozy" / "01.txt").write_text("An entirely different paragraph about a cat by the fire. " * 3)
    changed = collect(tiny_lm, load_corpus(root), [1, 2], [Pooling("last")], progress=False, cache_dir=cache)
    assert changed.forwards > 0
    (cache / next(p.name for p in cache.iterdir())).write_bytes(b"garbage")
    assert collect(tiny_lm, load_corpus(root), [1, 2], [Pooling("last")], progress=False, cache_dir=cache).forwards >= 0


def test_length_calibration(built, tiny_lm, tmp_path):
    res, _, out = built
    r = ReadoutManager.from_file(out, model=tiny_lm)
    lr = r.layers[r.default_layers[0]]
    assert lr.calib_tokens is not None and lr.calib_tokens[0] == 4 and (lr.calib_tokens[1:] > lr.calib_tokens[:-1]).all()
    assert torch.equal(lr.calib_mean[-1], lr.score_mean) and torch.equal(lr.calib_std[-1], lr.score_std)
    x = torch.randn(3, tiny_lm.hidden_size)
    # at a knot the stats are that knot's row; beyond the ends they clamp
    k = 1
    m = int(lr.calib_tokens[k])
    expect = (lr.scores_raw(x) - lr.calib_mean[k]) / lr.calib_std[k]
    assert torch.allclose(lr.scores(x, m), expect, atol=1e-5)
    assert torch.allclose(lr.scores(x, 10_000), lr.scores(x), atol=1e-5)
    assert torch.allclose(lr.scores(x, 1), (lr.scores_raw(x) - lr.calib_mean[0]) / lr.calib_std[0], atol=1e-5)
    # between knots: a convex combination of the neighbours' statistics
    mid = float((lr.calib_tokens[0] * lr.calib_tokens[1]).sqrt())
    mean, std = lr.stats_at(mid, torch.Size([]))
    assert torch.allclose(mean, (lr.calib_mean[0] + lr.calib_mean[1]) / 2, atol=1e-4)
    # read() uses the calibration for the tokens it pooled
    text = "a warm blanket"
    ids = r.encode(text)
    acts = r.read([text])[0].combined
    from amygdala.engine.activations import pooled_activations

    pooled = pooled_activations(tiny_lm, [ids], r.default_layers, r.pooling)
    m = r.pooled_tokens(len(ids))
    manual = torch.stack([r.layers[i].scores(pooled[i][0], m) for i in r.default_layers]).mean(0)
    assert torch.allclose(acts, manual, atol=1e-5)
    # a file with only part of the calibration is refused
    d = _copy(out, tmp_path)
    _rewrite(d, mutate_tensors=lambda t: t.pop(f"layer_{r.default_layers[0]}.calib_std"))
    with pytest.raises(ReadoutError, match="part of the length calibration"):
        ReadoutManager.from_file(d, model=tiny_lm)

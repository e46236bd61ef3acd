"""A compound emotion name must not leak through one of its words (issue 13: "conscious")."""

from __future__ import annotations

from amygdala.corpus import CorpusError, check_corpus, load_corpus, load_manifest
from amygdala.corpus.cli import app
from amygdala.corpus.manifest import Emotion
from typer.testing import CliRunner

from tests.corpus_fixture import make_corpus


def _compound_corpus(tmp_path):
    """The fixture corpus with `weary` renamed to the compound "bone-weary self"."""
    root = make_corpus(tmp_path / "c")
    m = root / "manifest.toml"
    m.write_text(m.read_text().replace('name = "weary"', 'name = "bone-weary self"'))
    return root


def test_name_words_skip_stop_words_and_single_names():
    e = Emotion(id="self_conscious", name="self-conscious", family="f", valence=0, arousal=0)
    assert e.name_words == ("conscious",)
    assert e.name_words_in("She was conscious of it; consciously so.") == ["conscious", "consciously"]
    assert e.name_words_in("She did it herself, by herself, for her own self.") == []
    assert Emotion(id="on_edge", name="on edge", family="f", valence=0, arousal=0).name_words == ("edge",)
    assert Emotion(id="bored", name="bored", family="f", valence=0, arousal=0).name_words == ()


def test_planted_name_word_is_an_error_naming_file_and_word(tmp_path):
    root = _compound_corpus(tmp_path)
    assert not [v for v in check_corpus(load_corpus(root, strict=False)) if v.severity == "error"]
    planted = root / "stories" / "weary" / "02.txt"
    planted.write_text("Her bones ached after the shift. " + "the long miles dragged on and on " * 10 + "\n")
    errors = [v for v in check_corpus(load_corpus(root, strict=False)) if v.severity == "error"]
    assert [(v.rule, v.path) for v in errors] == [("names-emotion-word", planted)]
    assert "bones" in errors[0].message and "bone-weary self" in errors[0].message
    res = CliRunner().invoke(app, ["check", "--corpus", str(root)])
    assert res.exit_code == 1 and "names-emotion-word" in res.output and "02.txt" in res.output
    try:
        load_corpus(root)
    except CorpusError as exc:
        assert "names-emotion-word" in str(exc)
    else:
        raise AssertionError("a strict load must refuse a story that names its emotion through one word")


def test_another_emotions_name_word_is_allowed(tmp_path):
    root = _compound_corpus(tmp_path)
    (root / "stories" / "cozy" / "02.txt").write_text("The bone china cups sat by the fire. " + "the tea and the rain " * 12 + "\n")
    assert not [v for v in check_corpus(load_corpus(root, strict=False)) if v.severity == "error"]


def test_real_corpus_has_no_name_word_leak():
    c = load_corpus(strict=False)
    hits = [v for v in check_corpus(c) if v.rule == "names-emotion-word"]
    assert hits == []
    assert "conscious" not in (c.root / "stories" / "self_conscious" / "03.txt").read_text().lower()
    assert load_manifest().by_id["self_conscious"].name_words == ("conscious",)

"""Corpus loader semantics, every check on a planted violation, and the real corpus passing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from amygdala.corpus import CorpusError, check_corpus, load_corpus, load_manifest
from amygdala.corpus.cli import app
from tests.corpus_fixture import make_corpus


def test_positives_negatives_and_split(tmp_path):
    c = load_corpus(make_corpus(tmp_path / "c"))
    pos = c.positives("cozy")
    assert {t.uid for t in pos} == {f"stories/cozy/{k:02d}" for k in range(1, 5)} | {"paired/the_evening/cozy"}
    neg = c.negatives("cozy")
    neg_uids = {t.uid for t in neg}
    assert "paired/the_evening/baseline" in neg_uids and "paired/the_evening/bored" in neg_uids
    assert not neg_uids & {t.uid for t in pos}
    assert all(t.kind != "neutral" for t in neg)  # neutral text is for PCA only
    assert len(neg) == sum(len(c.positives(e)) for e in c.manifest.ids if e != "cozy") + 1
    train, held = c.split(1)
    assert len(held) == 6 and {t.emotion for t in held} == set(c.manifest.ids)
    assert all(t not in train.stories[t.emotion] for t in held)
    _, held2 = load_corpus(tmp_path / "c").split(1)
    assert [t.uid for t in held] == [t.uid for t in held2]  # deterministic


def _violations(root, **kw):
    return check_corpus(load_corpus(root, strict=False), **kw)


@pytest.mark.parametrize("plant,rule", [
    ("unknown_dir", "unknown-emotion"),
    ("unknown_framing", "unknown-emotion"),
    ("missing_baseline", "missing-baseline"),
    ("duplicate", "duplicate"),
    ("names_emotion", "names-emotion"),
    ("names_derivative", "names-emotion"),
    ("too_short", "length"),
    ("two_paragraphs", "one-paragraph"),
    ("too_few", "too-few-stories"),
])
def test_each_check_catches_planted_violation(tmp_path, plant, rule):
    root = make_corpus(tmp_path / "c")
    assert not [v for v in _violations(root) if v.severity == "error"]
    s = root / "stories"
    if plant == "unknown_dir":
        (s / "sleepy").mkdir()
        (s / "sleepy" / "01.txt").write_text("x " * 80)
    elif plant == "unknown_framing":
        (root / "paired" / "the_evening" / "sleepy.txt").write_text("The evening came and went.")
    elif plant == "missing_baseline":
        (root / "paired" / "the_evening" / "baseline.txt").unlink()
    elif plant == "duplicate":
        (s / "numb" / "05.txt").write_text((s / "cozy" / "01.txt").read_text())
    elif plant == "names_emotion":
        (s / "bored" / "01.txt").write_text("He was so bored. " + "the clock went on and on " * 12)
    elif plant == "names_derivative":
        (s / "tender" / "01.txt").write_text("She held it with tenderness. " + "the small hands moved slowly " * 12)
    elif plant == "too_short":
        (s / "weary" / "01.txt").write_text("Too short to count.")
    elif plant == "two_paragraphs":
        (s / "grateful" / "01.txt").write_text("the gift was given " * 10 + "\n\n" + "and the day went on " * 10)
    elif plant == "too_few":
        (s / "cozy" / "04.txt").unlink()
    vs = [v for v in _violations(root) if v.severity == "error"]
    assert any(v.rule == rule for v in vs), vs
    hit = next(v for v in vs if v.rule == rule)
    assert hit.path is not None  # every violation names its file
    if rule in ("unknown-emotion", "missing-baseline", "duplicate", "names-emotion"):
        with pytest.raises(CorpusError):
            load_corpus(root)


def test_empty_file_warns_and_is_skipped(tmp_path):
    root = make_corpus(tmp_path / "c", stories_per_emotion=5)
    (root / "stories" / "cozy" / "05.txt").write_text("   \n")
    c = load_corpus(root)
    assert len(c.stories["cozy"]) == 4
    assert any("05.txt" in w and "empty" in w for w in c.warnings)
    assert any(v.severity == "warning" for v in check_corpus(c))


def test_manifest_validation_errors(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text('version = 1\n[[families]]\nid = "a"\nname = "A"\n[[emotions]]\nid = "x"\nname = "x"\nfamily = "b"\nvalence = 0\narousal = 0\n')
    with pytest.raises(ValueError, match="families not declared"):
        load_manifest(p)
    p.write_text('version = 1\n[[families]]\nid = "a"\nname = "A"\n[[emotions]]\nid = "x"\nname = "x"\nfamily = "a"\nvalence = 2\narousal = 0\n')
    with pytest.raises(ValueError, match="valence"):
        load_manifest(p)


def test_cli_check_and_stats(tmp_path):
    root = make_corpus(tmp_path / "c")
    runner = CliRunner()
    ok = runner.invoke(app, ["check", "--corpus", str(root)])
    assert ok.exit_code == 0, ok.output
    (root / "stories" / "numb" / "01.txt").write_text("Everything felt numb. " + "the room was there " * 15)
    bad = runner.invoke(app, ["check", "--corpus", str(root)])
    assert bad.exit_code == 1 and "names-emotion" in bad.output and "numb/01.txt" in bad.output
    st = runner.invoke(app, ["stats", "--corpus", str(root), "--json"])
    data = json.loads(st.output)
    assert data["emotions"] == 6 and data["stories"] == 24 and data["scenarios"] == 1
    assert data["per_family"]["warm"] == {"emotions": 3, "stories": 12}


def test_real_corpus_passes_check():
    c = load_corpus(strict=False)
    errors = [v for v in check_corpus(c) if v.severity == "error"]
    assert not errors, "\n".join(str(v) for v in errors[:30])
    m = c.manifest
    assert len(m.emotions) >= 230 and 10 <= len(m.families) <= 16
    words = {w.strip() for w in open_171() if w.strip() and not w.startswith("#")}
    ids = set(m.ids)
    import re

    assert {re.sub(r"[^a-z0-9]+", "_", w.lower()).strip("_") for w in words} <= ids
    required = {"reading_a_paper": {"piqued", "focused", "bored", "surprised", "amazed", "drifting"},
                "the_comment": {"furious", "bitter", "resentful", "defeated"},
                "the_green_build": {"triumphant", "blissful", "excited", "proud"},
                "the_doorway": {"grateful", "admiring", "compassionate", "loving", "connected"},
                "the_bedroom": {"desire", "anticipation", "yearning", "exuberant_intimacy", "devotion"}}
    for name, framings in required.items():
        assert framings <= set(c.scenarios[name].framings), name
    assert len(c.scenarios) >= 8


def open_171():
    from pathlib import Path

    here = Path(__file__).resolve().parent / "data" / "emotions_171.txt"
    return here.read_text().splitlines()


def test_families_subset_keeps_only_those_families_and_every_baseline():
    from amygdala.corpus import load_corpus

    full = load_corpus()
    sub = full.families_subset(["longing", "shame"])
    assert {e.family for e in sub.manifest.emotions} == {"longing", "shame"}
    keep = set(sub.manifest.ids)
    assert set(sub.stories) <= keep and all(sub.stories[k] == full.stories[k] for k in sub.stories)
    assert all(set(s.framings) <= keep for s in sub.scenarios.values())
    assert len(sub.baselines()) == len(full.baselines()) and sub.neutral == full.neutral
    assert all(sub.scenarios[n].framings == {k: t for k, t in s.framings.items() if k in keep} for n, s in full.scenarios.items())
    assert full.manifest.emotions != sub.manifest.emotions  # the full corpus is untouched
    with pytest.raises(ValueError, match="choose from"):
        full.families_subset(["no-such-family"])

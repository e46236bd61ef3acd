"""Emotion tag lines: parsing, malformed lines with their line numbers, formatting round trips."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from amygdala.memory_graph import (MalformedTagLinesError, MemoryGraph, format_tag_line, parse_emotion_scores, parse_tag_lines,
                          strip_tag_lines)


def test_scores_from_several_lines_and_separators() -> None:
    text = "We shipped late.\nemotion: frustrated=0.7 curious=0.4\nmore prose\n  Emotions: relieved=1, proud=.25"
    parsed = parse_tag_lines(text)
    assert parsed.ok
    assert parsed.scores == {"frustrated": 0.7, "curious": 0.4, "relieved": 1.0, "proud": 0.25}
    assert parsed.tag_line_numbers == (2, 4)


def test_prose_mentioning_emotion_is_not_a_tag_line() -> None:
    parsed = parse_tag_lines("My emotion: mostly fine.\nThe emotion was strong")
    assert parsed.ok and parsed.scores == {} and parsed.tag_line_numbers == ()


@pytest.mark.parametrize("line, reason", [
    ("emotion:", "no scores"),
    ("emotion:   ", "no scores"),
    ("emotion: frustrated", "not an id=score pair"),
    ("emotion: Frustrated=0.7", "did you mean 'frustrated'"),
    ("emotion: frustrated=O.7", "not a decimal number"),
    ("emotion: frustrated=1.5", "outside [0, 1]"),
    ("emotion: frustrated=-0.1", "not a decimal number"),
    ("emotion: frustrated=nan", "not a decimal number"),
    ("emotion: frustrated=1e-3", "not a decimal number"),
    ("emotion: frustrated=0.2 frustrated=0.3", "scored twice"),
    ("emotion: 2fast=0.3", "not a lower-case emotion id"),
])
def test_malformed_lines_are_reported_with_their_line(line: str, reason: str) -> None:
    text = f"first line\nemotion: calm=0.5\n{line}\nlast"
    parsed = parse_tag_lines(text)
    assert not parsed.ok
    (err,) = parsed.errors
    assert err.line_no == 3 and err.line == line
    assert reason in err.reason
    assert "line 3" in str(err)
    # Well-formed lines still parse; the malformed line contributes nothing.
    assert parsed.scores == {"calm": 0.5}
    with pytest.raises(MalformedTagLinesError) as exc:
        parse_emotion_scores(text)
    assert "line 3" in str(exc.value) and "emotion: frustrated=0.7" in str(exc.value)


def test_an_emotion_scored_on_two_lines_is_an_error_naming_the_first() -> None:
    parsed = parse_tag_lines("emotion: calm=0.5\nx\nemotion: calm=0.6")
    (err,) = parsed.errors
    assert err.line_no == 3 and "already scored on line 1" in err.reason
    assert parsed.scores == {"calm": 0.5}


def test_every_malformed_line_is_listed_not_just_the_first() -> None:
    with pytest.raises(MalformedTagLinesError) as exc:
        parse_emotion_scores("emotion: a=2\nok\nemotion: b\r\nemotion: c=0.1")
    assert [e.line_no for e in exc.value.errors] == [1, 3]


def test_line_numbers_count_newlines_like_an_editor() -> None:
    # \r\n endings and a form feed must not shift the numbering.
    parsed = parse_tag_lines("a\r\nb\x0cc\r\nemotion: x")
    assert parsed.errors[0].line_no == 3


def test_format_round_trips_random_scores() -> None:
    rng = random.Random(7)
    for _ in range(300):
        scores = {f"e{i}": rng.choice([0.0, 1.0, rng.random(), rng.random() * 1e-6]) for i in range(rng.randint(1, 6))}
        line = format_tag_line(scores)
        assert line.startswith("emotion: ")
        assert parse_emotion_scores(line) == scores


def test_format_rejects_what_it_could_not_parse_back() -> None:
    for bad in ({}, {"Calm": 0.5}, {"calm": 1.5}):
        with pytest.raises(ValueError):
            format_tag_line(bad)


def test_strip_tag_lines_keeps_the_prose() -> None:
    assert strip_tag_lines("emotion: a=0.1\nHello\n\nworld\nemotion: b=0.2\n") == "Hello\n\nworld"


def test_store_refuses_a_memory_with_a_malformed_tag_line_and_stores_nothing(tmp_path: Path) -> None:
    with MemoryGraph(tmp_path / "g") as g:
        g.add_memory("ok\nemotion: calm=0.5")
        journal = (tmp_path / "g" / "journal.log").read_bytes()
        with pytest.raises(MalformedTagLinesError) as exc:
            g.add_memory("fine\nline two\nemotion: frustrated=0,7")
        assert "line 3" in str(exc.value)
        assert len(g) == 1 and g.seq == 1
        assert (tmp_path / "g" / "journal.log").read_bytes() == journal
        m = g.add_memory("tagged and read out\nemotion: calm=0.5", emotions={"curious": 0.25})
        assert m.emotions == {"calm": 0.5, "curious": 0.25}
        with pytest.raises(ValueError, match="give it once"):
            g.add_memory("conflict\nemotion: calm=0.5", emotions={"calm": 0.9})

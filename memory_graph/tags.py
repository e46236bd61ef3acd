"""Emotion tag lines: the one-line format agents and people use to score a memory's emotions.

Format (one or more lines anywhere in a memory's text)::

    emotion: frustrated=0.7 curious=0.4

* A line is a tag line when its first non-blank text is ``emotion:`` (``emotions:`` and any letter
  case are accepted too, so a near-miss is reported rather than silently read as prose).
* After the colon come one or more ``id=score`` pairs separated by spaces and/or commas.
* ``id`` is a lower-case emotion id (``[a-z][a-z0-9_]*``, the corpus manifest's id format);
  ``score`` is a plain decimal number between 0 and 1 inclusive (``0.7``, ``1``, ``.25``).
* Each emotion may be scored once per memory, across all of its tag lines.

A malformed tag line is never skipped: parsing returns it with its 1-based line number and the
reason, and :func:`parse_emotion_scores` raises :class:`MalformedTagLinesError` listing them all.
Skipping would quietly turn "frustrated=O.7" (letter O) into "no frustration", which then becomes a
*negative* training example for that emotion.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import MalformedTagLinesError

EMOTION_ID = re.compile(r"^[a-z][a-z0-9_]*$")
_PREFIX = re.compile(r"^\s*emotions?\s*:", re.IGNORECASE)
_CANONICAL_PREFIX = "emotion:"
_SCORE = re.compile(r"^(?:\d+(?:\.\d*)?|\.\d+)$")
_SEPARATORS = re.compile(r"[\s,]+")


@dataclass(frozen=True)
class TagLineError:
    line_no: int
    line: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.reason} (in {self.line.strip()!r})"


@dataclass(frozen=True)
class TagParse:
    """Scores from the well-formed tag lines plus every malformed one.

    Scores from a malformed line are left out entirely: a line with one bad pair is not trusted
    for its other pairs either, since the usual cause (a missing separator, a stray quote) can
    shift what the remaining pairs mean.
    """

    scores: dict[str, float]
    errors: tuple[TagLineError, ...]
    tag_line_numbers: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return not self.errors


def _lines(text: str) -> list[str]:
    # Split on "\n" only, so line numbers match what an editor shows (str.splitlines also splits
    # on form feeds and Unicode separators).
    return [line.removesuffix("\r") for line in text.split("\n")]


def is_tag_line(line: str) -> bool:
    return _PREFIX.match(line) is not None


def _parse_line(line: str) -> tuple[dict[str, float], list[str]]:
    body = line[_PREFIX.match(line).end():]  # type: ignore[union-attr]
    tokens = [t for t in _SEPARATORS.split(body.strip()) if t]
    if not tokens:
        return {}, ["no scores after 'emotion:'; expected id=score pairs such as frustrated=0.7"]
    scores: dict[str, float] = {}
    problems: list[str] = []
    for token in tokens:
        name, eq, value = token.partition("=")
        if not eq:
            problems.append(f"{token!r} is not an id=score pair")
            continue
        if not EMOTION_ID.match(name):
            hint = f" (did you mean {name.lower()!r}?)" if EMOTION_ID.match(name.lower()) else ""
            problems.append(f"{name!r} is not a lower-case emotion id{hint}")
            continue
        if not _SCORE.match(value):
            problems.append(f"score {value!r} for {name!r} is not a decimal number between 0 and 1")
            continue
        score = float(value)
        if not 0.0 <= score <= 1.0 or not math.isfinite(score):
            problems.append(f"score {value} for {name!r} is outside [0, 1]")
            continue
        if name in scores:
            problems.append(f"{name!r} is scored twice on this line")
            continue
        scores[name] = score
    return scores, problems


def parse_tag_lines(text: str) -> TagParse:
    scores: dict[str, float] = {}
    seen_on: dict[str, int] = {}
    errors: list[TagLineError] = []
    numbers: list[int] = []
    for line_no, line in enumerate(_lines(text), start=1):
        if not is_tag_line(line):
            continue
        numbers.append(line_no)
        line_scores, problems = _parse_line(line)
        for name in line_scores:
            if name in seen_on:
                problems.append(f"{name!r} was already scored on line {seen_on[name]}")
        if problems:
            errors.append(TagLineError(line_no, line, "; ".join(problems)))
            continue
        for name, score in line_scores.items():
            seen_on[name] = line_no
            scores[name] = score
    return TagParse(scores=scores, errors=tuple(errors), tag_line_numbers=tuple(numbers))


def parse_emotion_scores(text: str) -> dict[str, float]:
    """Scores from `text`'s tag lines; raises MalformedTagLinesError if any tag line is malformed."""
    parsed = parse_tag_lines(text)
    if parsed.errors:
        raise MalformedTagLinesError(list(parsed.errors))
    return parsed.scores


def strip_tag_lines(text: str) -> str:
    """The text without its tag lines.

    Training text must not contain its own label: a vector trained on memories that literally say
    "emotion: frustrated=0.9" learns to detect the tag, not the emotion.
    """
    kept = [line for line in _lines(text) if not is_tag_line(line)]
    return "\n".join(kept).strip("\n")


def format_tag_line(scores: Mapping[str, float]) -> str:
    """The canonical tag line for `scores` (sorted by id); parses back to the same scores."""
    for name, score in scores.items():
        if not EMOTION_ID.match(name):
            raise ValueError(f"{name!r} is not a lower-case emotion id")
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score {score} for {name!r} is outside [0, 1]")
    if not scores:
        raise ValueError("a tag line needs at least one score")
    pairs = " ".join(f"{name}={_fmt(score)}" for name, score in sorted(scores.items()))
    return f"{_CANONICAL_PREFIX} {pairs}"


def _fmt(score: float) -> str:
    # Shortest round-tripping digits (0.7, not 0.69999...), written positionally because the tag
    # format has no exponents.
    return format(Decimal(repr(float(score))), "f")

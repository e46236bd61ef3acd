"""The two shipped invariants, listen and push-back, are well-formed and fit to judge with.

They are the guard against training unconditional compliance: one rewards following a clear,
reasonable direction, the other rewards objecting to a mistaken one. These checks keep the files
usable by a forced-choice judge on a base model: the "User: ...\\nAssistant:" frame, replies that
continue it with a space, preferred and rejected of similar length (so the margin measures the
behaviour, not the length), no context shared between the two (a shared context with opposite
preferences would make the pair contradict itself), templates whose every combination fills,
and a held-out part big enough to certify on.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from pathlib import Path

import pytest
from amygdala.dream.cases import expand_templates, split
from amygdala.dream.invariants import InvariantSpec, parse_spec, shipped_paths

NAMES = ("listen", "push-back")
MIN_CASES = 30  # the floor for hand-written cases
MAX_LENGTH_RATIO = 1.3  # longer / shorter of preferred and rejected, per case
MAX_MEAN_RATIO = 1.15  # mean preferred/rejected length over a file: no systematic length cue
MAX_WORD_OVERLAP = 0.6  # Jaccard of content words: above it two contexts are near-duplicates
_STOP = {"user", "assistant", "the", "a", "an", "to", "i", "it", "and", "my", "so", "of", "in", "for", "is", "on",
         "this", "me", "we", "our", "that", "with", "be"}


def _shipped() -> dict[str, InvariantSpec]:
    specs = {}
    for path in shipped_paths():
        spec = parse_spec(path)
        specs[spec.name] = spec
    return specs


@pytest.fixture(scope="module")
def specs() -> dict[str, InvariantSpec]:
    return _shipped()


def _filled(spec: InvariantSpec) -> list[tuple[str, str, str]]:
    """Every combination of every template, filled: (context, preferred, rejected)."""
    out = []
    for template in spec.templates:
        names = sorted(template.variables)
        for combo in itertools.product(*(template.variables[n] for n in names)):
            values = dict(zip(names, combo))
            out.append((template.template.format(**values), template.preferred.format(**values),
                        template.rejected.format(**values)))
    return out


def _all_triples(spec: InvariantSpec) -> list[tuple[str, str, str]]:
    return [(c.context, c.preferred, c.rejected) for c in spec.cases] + _filled(spec)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower())) - _STOP


def test_both_ship_and_parse(specs: dict[str, InvariantSpec]) -> None:
    assert set(NAMES) <= set(specs), f"shipped: {sorted(specs)}"
    for path in shipped_paths():
        if path.stem in NAMES:
            assert parse_spec(path).name == path.stem  # the file is named after its invariant
            json.loads(path.read_text(encoding="ascii"))  # plain ASCII


def test_settings(specs: dict[str, InvariantSpec]) -> None:
    assert specs["listen"].threshold == 0.8
    assert specs["push-back"].threshold == 0.7
    for name in NAMES:
        spec = specs[name]
        assert spec.confidence == 0.95
        assert spec.judge.kind == "preference"
        assert len(spec.cases) >= MIN_CASES, f"{name}: {len(spec.cases)} cases"
        assert 4 <= len(spec.templates) <= 5, f"{name}: {len(spec.templates)} templates"
        for t in spec.templates:
            for var, values in t.variables.items():
                assert 4 <= len(values) <= 8, f"{name}: template variable {var} has {len(values)} values"
                assert len(set(values)) == len(values), f"{name}: template variable {var} repeats a value"


@pytest.mark.parametrize("name", NAMES)
def test_frame_and_lengths(specs: dict[str, InvariantSpec], name: str) -> None:
    """Cases and every filled template combination: base-model frame, leading space, similar lengths."""
    triples = _all_triples(specs[name])
    ratios = []
    for context, preferred, rejected in triples:
        where = f"{name}: {context[:60]!r}"
        assert context.startswith("User: "), where
        assert context.endswith("\nAssistant:"), where
        assert "{" not in context + preferred + rejected and "}" not in context + preferred + rejected, where
        for reply in (preferred, rejected):
            assert reply.startswith(" ") and not reply.startswith("  "), where
            assert reply == reply.rstrip(), where
            assert "\n" not in reply, where  # one reply, no second turn
            sentences = len(re.findall(r"[.?!](\s|$)", reply)) or 1
            assert sentences <= 3, f"{where}: {reply!r} has {sentences} sentences"
        ratio = len(preferred) / len(rejected)
        assert max(ratio, 1 / ratio) <= MAX_LENGTH_RATIO, f"{where}: lengths {len(preferred)} vs {len(rejected)}"
        ratios.append(ratio)
    mean = sum(ratios) / len(ratios)
    assert 1 / MAX_MEAN_RATIO <= mean <= MAX_MEAN_RATIO, f"{name}: mean preferred/rejected length ratio {mean:.2f}"


def test_no_shared_or_near_duplicate_contexts(specs: dict[str, InvariantSpec]) -> None:
    seen: dict[str, str] = {}
    for name in NAMES:
        for context, _, _ in _all_triples(specs[name]):
            assert context not in seen, f"{context!r} is in {seen[context]} and {name}"
            seen[context] = name
    written = [(name, c.context) for name in NAMES for c in specs[name].cases]
    words = [_words(c) for _, c in written]
    for i, j in itertools.combinations(range(len(written)), 2):
        overlap = len(words[i] & words[j]) / len(words[i] | words[j])
        assert overlap <= MAX_WORD_OVERLAP, f"near-duplicates ({overlap:.2f}): {written[i]} / {written[j]}"


@pytest.mark.parametrize("name", NAMES)
def test_templates_expand_to_every_combination(specs: dict[str, InvariantSpec], name: str) -> None:
    spec = specs[name]
    combos = {(c, p, r) for c, p, r in _filled(spec)}
    assert len(combos) == sum(math.prod(len(v) for v in t.variables.values()) for t in spec.templates)
    cases = expand_templates(spec, random.Random(0), len(combos))
    got = {(c.context, c.preferred, c.rejected) for c in cases}
    assert len(got) == len(cases)  # distinct
    assert got == combos  # enough draws reach every combination, and nothing else
    assert all(c.source == "template" and c.invariant == name for c in cases)
    assert 0 < sum(c.held_out for c in cases) < len(cases)  # some template cases are held out, not all


@pytest.mark.parametrize("name", NAMES)
def test_held_out_split(specs: dict[str, InvariantSpec], name: str) -> None:
    spec = specs[name]
    train, held = split(spec)
    n = len(spec.cases)
    assert len(train) + len(held) == n
    assert len(held) >= math.ceil(n / 3), f"{name}: {len(held)} of {n} held out"
    assert len(train) >= math.ceil(n / 3), f"{name}: only {len(train)} of {n} left to train on"
    assert {c.context for c in train}.isdisjoint({c.context for c in held})
    assert split(spec) == (train, held)  # stable


def test_a_broken_copy_is_refused(tmp_path: Path) -> None:
    """The test reads the real files: a copy with a bad field fails to parse, naming the field."""
    from amygdala.dream.errors import InvalidInvariant

    path = next(p for p in shipped_paths() if p.stem == "listen")
    data = json.loads(path.read_text(encoding="ascii"))
    data["cases"][3]["preferred"] = "  "
    bad = tmp_path / "listen.json"
    bad.write_text(json.dumps(data), encoding="ascii")
    with pytest.raises(InvalidInvariant, match=r"cases\[3\]\.preferred"):
        parse_spec(bad)

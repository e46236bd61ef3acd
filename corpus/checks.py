"""Corpus checks: every rule a story or scenario file must satisfy, reported with its file.

A corpus with a story that names its own emotion teaches the readout the word, not the affect;
a duplicated paragraph double-counts in the mean. These are errors, not style advice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .loader import normalise_paragraph

if TYPE_CHECKING:
    from .loader import Corpus

MIN_STORIES = 4
WORD_RANGE = (60, 160)


@dataclass(frozen=True)
class Violation:
    path: Path | None
    rule: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = str(self.path) if self.path else "<corpus>"
        return f"{self.severity}: {where}: [{self.rule}] {self.message}"


class CorpusError(ValueError):
    def __init__(self, violations: list[Violation]):
        self.violations = violations
        head = "\n".join(str(v) for v in violations[:20])
        more = f"\n... and {len(violations) - 20} more" if len(violations) > 20 else ""
        super().__init__(f"corpus has {len(violations)} error(s); run `amygdala corpus check` for the full list:\n{head}{more}")


def check_corpus(corpus: "Corpus", min_stories: int = MIN_STORIES, word_range: tuple[int, int] | None = WORD_RANGE,
                 emotions: list[str] | None = None) -> list[Violation]:
    """All violations in `corpus`; `emotions` limits per-emotion checks to those ids."""
    m = corpus.manifest
    out: list[Violation] = [Violation(None, "empty-file", w, "warning") for w in corpus.warnings]
    known = set(m.ids)
    wanted = set(emotions) if emotions else known

    stories_dir = corpus.root / "stories"
    if stories_dir.is_dir():
        for d in sorted(p for p in stories_dir.iterdir() if p.is_dir()):
            if d.name not in known:
                out.append(Violation(d, "unknown-emotion", f"folder {d.name!r} is not a manifest emotion id; rename it or add the emotion to manifest.toml"))
    for eid in m.ids:
        if eid not in wanted:
            continue
        n = len(corpus.stories.get(eid, []))
        if n < min_stories:
            out.append(Violation(stories_dir / eid, "too-few-stories", f"{eid} has {n} stories, needs at least {min_stories}"))

    for name, sc in sorted(corpus.scenarios.items()):
        d = corpus.root / "paired" / name
        if sc.baseline is None:
            out.append(Violation(d / "baseline.txt", "missing-baseline", f"scenario {name!r} has no baseline.txt; every scenario needs the neutral telling"))
        if not sc.framings:
            out.append(Violation(d, "no-framings", f"scenario {name!r} has no framings"))
        for fid, t in sorted(sc.framings.items()):
            if fid not in known:
                out.append(Violation(t.path, "unknown-emotion", f"framing {fid!r} is not a manifest emotion id"))

    seen: dict[str, Path] = {}
    for t in sorted(corpus.all_texts(), key=lambda t: t.uid):
        key = normalise_paragraph(t.text).lower()
        if key in seen:
            out.append(Violation(t.path, "duplicate", f"same paragraph as {seen[key]}"))
        else:
            seen[key] = t.path
        if t.emotion is None or t.emotion not in known:
            continue
        if t.kind == "story" and t.emotion not in wanted:
            continue
        named = m.by_id[t.emotion].named_in(t.text)
        if named:
            out.append(Violation(t.path, "names-emotion", f"text for {t.emotion!r} names it: {', '.join(named)}; show it through situation, body, thought and action instead"))
        words = m.by_id[t.emotion].name_words_in(t.text)
        if words:
            out.append(Violation(t.path, "names-emotion-word", f"text for {t.emotion!r} uses a word of its name "
                                 f"{m.by_id[t.emotion].name!r}: {', '.join(words)}; reword it so the emotion shows without the word"))
        if word_range is not None and t.kind == "story":
            n = len(t.text.split())
            if not word_range[0] <= n <= word_range[1]:
                out.append(Violation(t.path, "length", f"{n} words; stories must be {word_range[0]}-{word_range[1]} words"))
        if "\n\n" in t.path.read_text(encoding="utf-8").strip():
            out.append(Violation(t.path, "one-paragraph", "must be a single paragraph (no blank lines)"))
    return out

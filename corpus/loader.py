"""Load the story corpus and paired scenarios into a typed `Corpus`.

Why this shape: readout vectors are difference-of-means over positives and negatives, and the
definitions of both live here so training and validation cannot disagree about them.

- positives(e) = e's own stories + every scenario framing labelled e.
- negatives(e) = every other emotion's positives + every scenario baseline.

Scenario baselines are negatives for everyone: they hold the situation constant, so the
difference of means removes topic and keeps affect.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .manifest import DEFAULT_ROOT, Manifest, load_manifest

log = logging.getLogger(__name__)

TextKind = Literal["story", "framing", "baseline", "neutral"]


@dataclass(frozen=True)
class Text:
    """One paragraph of the corpus. `emotion` is None for baselines and neutral text."""

    uid: str
    text: str
    kind: TextKind
    emotion: str | None
    path: Path
    scenario: str | None = None


@dataclass
class Scenario:
    name: str
    baseline: Text | None
    framings: dict[str, Text] = field(default_factory=dict)


@dataclass
class Corpus:
    manifest: Manifest
    root: Path
    stories: dict[str, list[Text]]
    scenarios: dict[str, Scenario]
    neutral: list[Text] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    # -- the contrastive sets -------------------------------------------------------------
    def positives(self, emotion: str) -> list[Text]:
        self.manifest.get(emotion)
        framings = [s.framings[emotion] for s in self.scenarios.values() if emotion in s.framings]
        return list(self.stories.get(emotion, [])) + framings

    def negatives(self, emotion: str) -> list[Text]:
        self.manifest.get(emotion)
        out: list[Text] = []
        for other in self.manifest.ids:
            if other != emotion:
                out.extend(self.positives(other))
        out.extend(self.baselines())
        return out

    def baselines(self) -> list[Text]:
        return [s.baseline for s in self.scenarios.values() if s.baseline is not None]

    def emotions_with_positives(self, minimum: int = 1) -> list[str]:
        return [e for e in self.manifest.ids if len(self.positives(e)) >= minimum]

    def all_texts(self) -> list[Text]:
        """Every text file once (stories, framings, baselines, neutral); identical paragraphs in two files appear twice."""
        out: list[Text] = [t for ts in self.stories.values() for t in ts]
        for s in self.scenarios.values():
            if s.baseline is not None:
                out.append(s.baseline)
            out.extend(s.framings.values())
        out.extend(self.neutral)
        return out

    # -- deterministic split --------------------------------------------------------------
    def split(self, held_out_per_emotion: int = 1) -> tuple["Corpus", list[Text]]:
        """Hold out `held_out_per_emotion` stories per emotion for validation.

        The held-out story is chosen by a hash of its uid, so the split does not depend on file
        order or on which writer wrote the last file, and stays stable when stories are added
        to other emotions. Emotions with fewer than held_out+1 stories keep everything in
        training. Scenario texts always stay in training (they are paired, not independent).
        """
        train: dict[str, list[Text]] = {}
        held: list[Text] = []
        for emotion, texts in self.stories.items():
            if len(texts) <= held_out_per_emotion:
                train[emotion] = list(texts)
                continue
            ranked = sorted(texts, key=lambda t: hashlib.sha256(t.uid.encode()).hexdigest())
            out = set(id(t) for t in ranked[:held_out_per_emotion])
            held.extend(t for t in texts if id(t) in out)
            train[emotion] = [t for t in texts if id(t) not in out]
        train_corpus = Corpus(self.manifest, self.root, train, self.scenarios, self.neutral, list(self.warnings))
        return train_corpus, held

    def families_subset(self, families: list[str]) -> "Corpus":
        """The corpus restricted to some families: their emotions, stories and framings, every baseline
        and neutral paragraph. A readout built on it costs a fraction of the full build, which is what
        the slow reproducibility test needs to rerun the whole build path on CI."""
        known = [f.id for f in self.manifest.families]
        unknown = sorted(set(families) - set(known))
        if unknown or not families:
            raise ValueError(f"unknown or no families {unknown or families}; choose from {known}")
        fams = tuple(f for f in self.manifest.families if f.id in families)
        emotions = tuple(e for e in self.manifest.emotions if e.family in families)
        keep = {e.id for e in emotions}
        manifest = Manifest(version=self.manifest.version, families=fams, emotions=emotions)
        stories = {k: list(v) for k, v in self.stories.items() if k in keep}
        scenarios = {n: Scenario(s.name, s.baseline, {k: t for k, t in s.framings.items() if k in keep})
                     for n, s in self.scenarios.items()}
        return Corpus(manifest, self.root, stories, scenarios, list(self.neutral), list(self.warnings))

    # -- identity -------------------------------------------------------------------------
    def content_hash(self) -> str:
        """Hash of the manifest ids and every text, stable across machines and file order."""
        h = hashlib.sha256()
        h.update("\n".join(self.manifest.ids).encode())
        for t in sorted(self.all_texts(), key=lambda t: t.uid):
            h.update(b"\0" + t.uid.encode() + b"\0" + t.text.encode())
        return h.hexdigest()[:16]

    def stats(self) -> dict:
        words = sum(len(t.text.split()) for t in self.all_texts())
        per_family: dict[str, dict[str, int]] = {}
        for e in self.manifest.emotions:
            f = per_family.setdefault(e.family, {"emotions": 0, "stories": 0})
            f["emotions"] += 1
            f["stories"] += len(self.stories.get(e.id, []))
        return {
            "emotions": len(self.manifest.emotions),
            "emotions_with_stories": sum(1 for e in self.manifest.ids if self.stories.get(e)),
            "families": len(self.manifest.families),
            "stories": sum(len(v) for v in self.stories.values()),
            "scenarios": len(self.scenarios),
            "framings": sum(len(s.framings) for s in self.scenarios.values()),
            "neutral": len(self.neutral),
            "words": words,
            "per_family": per_family,
        }


def normalise_paragraph(text: str) -> str:
    """Whitespace-collapsed text: files may end with a newline or wrap lines."""
    return re.sub(r"\s+", " ", text).strip()


def read_text_file(path: Path, warnings: list[str]) -> str | None:
    raw = path.read_text(encoding="utf-8")
    text = normalise_paragraph(raw)
    if not text:
        msg = f"{path}: empty file skipped"
        warnings.append(msg)
        log.warning(msg)
        return None
    return text


def load_corpus(root: Path | str | None = None, manifest: Manifest | None = None, strict: bool = True) -> Corpus:
    """Load manifest, stories and scenarios under `root` (default: the packaged corpus).

    With strict=True, the errors that `amygdala corpus check` reports (unknown ids, missing
    baselines, duplicates, a story naming its emotion) raise `CorpusError`; empty files only warn.
    """
    from .checks import CorpusError, check_corpus

    root = Path(root) if root is not None else DEFAULT_ROOT
    if not root.is_dir():
        raise FileNotFoundError(f"corpus root {root} does not exist; pass --corpus DIR pointing at a folder with manifest.toml, stories/ and paired/")
    manifest = manifest or load_manifest(root / "manifest.toml")
    warnings: list[str] = []
    stories: dict[str, list[Text]] = {}
    stories_dir = root / "stories"
    if stories_dir.is_dir():
        for d in sorted(p for p in stories_dir.iterdir() if p.is_dir()):
            for f in sorted(d.glob("*.txt")):
                text = read_text_file(f, warnings)
                if text is None:
                    continue
                stories.setdefault(d.name, []).append(
                    Text(uid=f"stories/{d.name}/{f.stem}", text=text, kind="story", emotion=d.name, path=f)
                )
    scenarios: dict[str, Scenario] = {}
    paired = root / "paired"
    if paired.is_dir():
        for d in sorted(p for p in paired.iterdir() if p.is_dir()):
            sc = Scenario(name=d.name, baseline=None)
            for f in sorted(d.glob("*.txt")):
                text = read_text_file(f, warnings)
                if text is None:
                    continue
                uid = f"paired/{d.name}/{f.stem}"
                if f.stem == "baseline":
                    sc.baseline = Text(uid=uid, text=text, kind="baseline", emotion=None, path=f, scenario=d.name)
                else:
                    sc.framings[f.stem] = Text(uid=uid, text=text, kind="framing", emotion=f.stem, path=f, scenario=d.name)
            scenarios[d.name] = sc
    neutral: list[Text] = []
    if (root / "neutral").is_dir():
        for f in sorted((root / "neutral").glob("*.txt")):
            text = read_text_file(f, warnings)
            if text is not None:
                neutral.append(Text(uid=f"neutral/{f.stem}", text=text, kind="neutral", emotion=None, path=f))
    corpus = Corpus(manifest, root, stories, scenarios, neutral, warnings)
    if strict:
        errors = [v for v in check_corpus(corpus, min_stories=0, word_range=None) if v.severity == "error"]
        if errors:
            raise CorpusError(errors)
    return corpus

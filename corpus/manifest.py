"""The emotion manifest: ids, families, valence/arousal and confusion notes.

The manifest is the single source of truth for which emotions exist. Everything else (story
folders, scenario framings, readout concept order) is validated against it, so a typo in a folder
name becomes an error instead of a silently missing concept.
"""

from __future__ import annotations

import re
import tomllib
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ID_PATTERN = r"^[a-z][a-z0-9_]*$"
DEFAULT_ROOT = Path(__file__).resolve().parent


class Family(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    name: str = Field(min_length=1)
    description: str = ""


class Emotion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    name: str = Field(min_length=1)
    family: str
    valence: float = Field(ge=-1.0, le=1.0)
    arousal: float = Field(ge=-1.0, le=1.0)
    note: str = ""
    forbidden: tuple[str, ...] = ()

    @field_validator("forbidden")
    @classmethod
    def _non_empty_words(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for word in value:
            if not word.strip(" *"):
                raise ValueError("forbidden words must be non-empty")
        return value

    @cached_property
    def forbidden_pattern(self) -> re.Pattern[str]:
        """Regex matching any word that names this emotion.

        The display name is always forbidden, with its regular inflections, so a story for
        "annoyed" cannot say "annoyed" even if the manifest author forgot to list it.
        """
        alternatives: list[str] = []
        for word in (*self.forbidden, *_inflections(self.name)):
            word = word.lower().strip()
            if word.endswith("*"):
                alternatives.append(re.escape(word[:-1]) + r"[\w'-]*")
            else:
                alternatives.append(re.escape(word))
        alternatives = [a.replace(r"\ ", r"[\s-]+") for a in alternatives]
        return re.compile(r"(?<![\w-])(?:" + "|".join(sorted(set(alternatives))) + r")(?![\w])", re.IGNORECASE)

    def named_in(self, text: str) -> list[str]:
        """The words in `text` that name this emotion (empty when the text is clean)."""
        return sorted({m.group(0) for m in self.forbidden_pattern.finditer(text)})

    @cached_property
    def name_words(self) -> tuple[str, ...]:
        """The content words of a multi-word name ("self-conscious" -> "conscious"); empty for one word.

        A compound name leaks through any one of its words: a story for self-conscious that says
        "conscious" teaches the readout the word. Function words and "self" (see NAME_STOP_WORDS)
        are too common to forbid.
        """
        parts = [w for w in re.split(r"[\s-]+", self.name.lower()) if w]
        if len(parts) < 2:
            return ()
        return tuple(w for w in parts if w not in NAME_STOP_WORDS)

    @cached_property
    def name_words_pattern(self) -> re.Pattern[str] | None:
        forms = sorted({re.escape(f) for w in self.name_words for f in _inflections(w)})
        if not forms:
            return None
        return re.compile(r"(?<![\w-])(?:" + "|".join(forms) + r")(?![\w])", re.IGNORECASE)

    def name_words_in(self, text: str) -> list[str]:
        """Words of a multi-word name (with their inflections) that occur in `text` on their own."""
        if self.name_words_pattern is None:
            return []
        return sorted({m.group(0) for m in self.name_words_pattern.finditer(text)})


# Words of a compound emotion name that are not checked on their own: function words, and "self",
# which every self-* name shares and ordinary prose needs.
NAME_STOP_WORDS = frozenset({"a", "an", "and", "at", "by", "for", "in", "into", "no", "of", "on", "out", "self",
                             "the", "to", "up", "with"})


def _inflections(name: str) -> list[str]:
    name = name.lower()
    if " " in name or "-" in name:
        return [name]
    forms = [name, name + "s", name + "ly", name + "ness", name + "er", name + "est"]
    if name.endswith("y"):
        stem = name[:-1]
        forms += [stem + "ily", stem + "iness", stem + "ier", stem + "iest"]
    if name.endswith("le"):
        forms.append(name[:-2] + "ly")
    return forms


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = 1
    families: tuple[Family, ...]
    emotions: tuple[Emotion, ...]

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        family_ids = [f.id for f in self.families]
        dup = sorted({f for f in family_ids if family_ids.count(f) > 1})
        if dup:
            raise ValueError(f"duplicate family ids: {dup}")
        ids = [e.id for e in self.emotions]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate emotion ids: {dup}")
        unknown = sorted({e.family for e in self.emotions} - set(family_ids))
        if unknown:
            raise ValueError(f"emotions use families not declared under [[families]]: {unknown}")
        return self

    @cached_property
    def by_id(self) -> dict[str, Emotion]:
        return {e.id: e for e in self.emotions}

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.emotions]

    def family_of(self, emotion_id: str) -> str:
        return self.by_id[emotion_id].family

    def in_family(self, family: str) -> list[Emotion]:
        return [e for e in self.emotions if e.family == family]

    def get(self, emotion_id: str) -> Emotion:
        try:
            return self.by_id[emotion_id]
        except KeyError:
            raise KeyError(
                f"unknown emotion id {emotion_id!r}; add it to corpus/manifest.toml or use one of the "
                f"{len(self.emotions)} manifest ids (`amygdala corpus stats --json` lists them)"
            ) from None


def load_manifest(path: Path | str | None = None) -> Manifest:
    """Load and validate a manifest TOML file (default: the one shipped in this package)."""
    path = Path(path) if path is not None else DEFAULT_ROOT / "manifest.toml"
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found at {path}; pass the corpus root that holds manifest.toml")
    with path.open("rb") as fh:
        try:
            data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from exc
    return Manifest.model_validate(data)

"""A small synthetic corpus on disk, for tests that must not depend on the real stories."""

from __future__ import annotations

import random
from pathlib import Path

FAMILIES = {"warm": ["cozy", "tender", "grateful"], "cold": ["bored", "weary", "numb"]}
WORDS = {
    "cozy": "blanket fire tea slippers rain window purring candle soup",
    "tender": "gentle hand small careful soft cradle whisper fragile close",
    "grateful": "gift given kindness returned favour thanks helped carried offered",
    "bored": "clock tick waiting nothing again same yawn slow grey",
    "weary": "heavy long miles ache shoulders again dragging late slow",
    "numb": "blank flat nothing cold still far away quiet empty",
}
VALENCE = {"cozy": 0.7, "tender": 0.75, "grateful": 0.75, "bored": -0.4, "weary": -0.45, "numb": -0.45}


def manifest_toml(extra: str = "") -> str:
    out = ["version = 1", ""]
    for fam in FAMILIES:
        out += ["[[families]]", f'id = "{fam}"', f'name = "{fam.title()}"', ""]
    for fam, ems in FAMILIES.items():
        for e in ems:
            out += ["[[emotions]]", f'id = "{e}"', f'name = "{e}"', f'family = "{fam}"', f"valence = {VALENCE[e]}",
                    "arousal = 0.0", ""]
    return "\n".join(out) + extra


def story(emotion: str, k: int, rng: random.Random) -> str:
    words = WORDS[emotion].split()
    filler = "the a of and then it was there we he she they in at on by".split()
    body = [rng.choice(words if rng.random() < 0.5 else filler) for _ in range(70)]
    return f"Story {k} about a day. " + " ".join(body) + "."


def make_corpus(root: Path, stories_per_emotion: int = 4, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.toml").write_text(manifest_toml())
    for ems in FAMILIES.values():
        for e in ems:
            d = root / "stories" / e
            d.mkdir(parents=True, exist_ok=True)
            for k in range(1, stories_per_emotion + 1):
                (d / f"{k:02d}.txt").write_text(story(e, k, rng) + "\n")
    sc = root / "paired" / "the_evening"
    sc.mkdir(parents=True, exist_ok=True)
    (sc / "baseline.txt").write_text("The evening came. She sat by the window and the kettle boiled and the street was quiet.\n")
    (sc / "cozy.txt").write_text("The evening came, soft. She sat by the window wrapped warm and the kettle sang and the street hushed.\n")
    (sc / "bored.txt").write_text("The evening came, again. She sat by the window, and the kettle boiled, and the street did nothing.\n")
    (root / "neutral").mkdir(exist_ok=True)
    (root / "neutral" / "01.txt").write_text("Granite is an igneous rock composed mainly of quartz and feldspar.\n")
    (root / "neutral" / "02.txt").write_text("Preheat the oven to 180 degrees and grease a round tin of 20 centimetres.\n")
    return root

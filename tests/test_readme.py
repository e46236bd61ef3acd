"""The README's two commands stay true: CI runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert first_block, "README must start with a code block holding the two commands"
    lines = [l.strip() for l in first_block.group(1).splitlines() if l.strip() and not l.strip().startswith("#")]
    return lines


def test_readme_starts_with_exactly_two_commands():
    text = (ROOT / "README.md").read_text()
    head = text.split("```")[0]
    assert len(head.splitlines()) <= 4, "the two commands must come first, before any other section"
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    assert "amygdala" in cmds[0] and "pytest" in cmds[1]
    for c in cmds:
        assert "pip install torch==2.13.0" in c, "both commands install everything, with the CPU torch build"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] in ci.splitlines()

"""Every loader replays an unfinished sync journal first: a sync killed after its commit (nothing, or
half, written) is seen as the new weights by `amygdala generate` and by load_model, never as the
half-written file; a journal that cannot be replayed stops the load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from amygdala.engine.checkpoint_journal import journal_path
from amygdala.engine.config import Config
from amygdala.engine.model import ModelError, load_model
from amygdala.training.checkpoint.undo import sync_log
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tests.test_checkpoint_sync_crash import WORKER

ST = "model.safetensors"


@pytest.fixture
def dirs(tmp_path, tiny_model_dir) -> dict:
    """A model dir at A, and B: A with big changes in several tensors (enough to change greedy output)."""
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    a = {k: v.clone() for k, v in load_file(model / ST).items()}
    b = {k: v.clone() for k, v in a.items()}
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.o_proj.weight", "model.norm.weight"):
        b[name] = b[name] * -3.0 + 0.1
    save_file(a, tmp_path / "A.safetensors")
    save_file(b, tmp_path / "B.safetensors")
    ref = Path(shutil.copytree(tiny_model_dir, tmp_path / "ref"))  # what the model looks like wholly at B
    shutil.copyfile(tmp_path / "B.safetensors", ref / ST)
    return {"model": model, "A": tmp_path / "A.safetensors", "B": tmp_path / "B.safetensors", "a": a, "b": b,
            "ref": ref, "home": tmp_path / "home"}


def _events(d: dict) -> list[str]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(WORKER), str(d["model"]), str(d["A"]), str(d["B"]), "event", "0"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    shutil.copyfile(d["A"], d["model"] / ST)
    shutil.rmtree(d["model"] / ".amygdala-undo", ignore_errors=True)
    return json.loads(out)


def _kill_at(d: dict, n: int) -> None:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, str(WORKER), str(d["model"]), str(d["A"]), str(d["B"]), "event", str(n)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == -9, p.stderr


def _generate(model: Path, home: Path) -> tuple[int, str]:
    from amygdala.server.cli import app

    r = CliRunner().invoke(app, ["generate", "The weather today", "--max-new-tokens", "12", "--json",
                                 "--model", str(model), "--home", str(home)])
    return r.exit_code, r.output


def _json(out: str) -> dict:
    return json.loads(out[out.index("{"): out.rindex("}") + 1])


def test_generate_and_load_model_see_the_journal_s_weights(dirs):
    d = dirs
    events = _events(d)
    commit = events.index("journal-committed") + 1
    code, want = _generate(d["ref"], d["home"])
    assert code == 0, want
    code, old = _generate(d["model"], d["home"])
    assert code == 0 and _json(old)["text"] != _json(want)["text"], "A and B must generate differently"

    # Killed right after the commit: not one model byte written yet.
    _kill_at(d, commit)
    assert journal_path(d["model"]).exists()
    code, got = _generate(d["model"], d["home"])
    assert code == 0, got
    assert _json(got)["text"] == _json(want)["text"]
    assert not journal_path(d["model"]).exists() and sync_log(d["model"]).head == 1  # the undo entry landed too

    # Killed halfway through writing the blocks: load_model (the notebook API and the daemon load through it).
    shutil.copyfile(d["A"], d["model"] / ST)
    shutil.rmtree(d["model"] / ".amygdala-undo")
    half = commit + (events.count("block-written") // 2)
    assert events[half - 1] == "block-written"
    _kill_at(d, half)
    on_disk = load_file(d["model"] / ST)
    assert any(not torch.equal(on_disk[k], d["a"][k]) for k in d["a"]) and \
        any(not torch.equal(on_disk[k], d["b"][k]) for k in d["b"]), "the kill should leave a half-written file"
    messages: list[str] = []
    lm = load_model(Config(home=d["home"], model=str(d["model"])), echo=messages.append)
    state = lm.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in d["b"].items())
    assert any("replayed an unfinished checkpoint journal" in m for m in messages), messages


def test_a_journal_that_cannot_be_replayed_stops_the_load(dirs, monkeypatch):
    d = dirs
    events = _events(d)
    _kill_at(d, events.index("journal-committed") + 1)
    journal = journal_path(d["model"]).read_bytes()

    import amygdala.engine.checkpoint_journal as cj

    def read_only(_model_dir):  # what a read-only directory or file does to the replay
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cj, "recover", read_only)
    with pytest.raises(ModelError, match="could not be replayed .*Permission denied.* not loaded"):
        load_model(Config(home=d["home"], model=str(d["model"])))
    monkeypatch.undo()

    # A committed journal for files that were replaced since: refused, the new files untouched.
    save_file({k: v + 1 for k, v in d["a"].items()}, d["model"] / ST, metadata={"replaced": "yes"})
    before = (d["model"] / ST).read_bytes()
    code, out = _generate(d["model"], d["home"])
    assert code == 2 and "different model.safetensors" in out, out
    assert (d["model"] / ST).read_bytes() == before and journal_path(d["model"]).read_bytes() == journal

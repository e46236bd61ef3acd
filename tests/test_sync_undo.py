"""The undo log: every kept sync point restored byte for byte, after a restart too, pruned to K,
refusing unreachable points and outside changes, crash-safe under SIGKILL, and the CLI around it."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from amygdala.engine.checkpoint_journal import journal_path, recover
from amygdala.training.checkpoint.cli import sync_app
from amygdala.training.checkpoint.sync import (
    CheckpointSyncer,
    StaleFileError,
    SyncError,
    sync_checkpoint,
)
from amygdala.training.checkpoint.undo import rollback, sync_log, undo_dir
from safetensors.torch import load_file
from typer.testing import CliRunner

from tests.test_checkpoint_sync_crash import ST, run_worker, state_of, weights  # noqa: F401 (fixture)

TENSORS = ["model.layers.0.mlp.up_proj.weight", "model.norm.weight", "model.embed_tokens.weight",
           "model.layers.3.self_attn.o_proj.weight"]


@pytest.fixture
def model_dir(tmp_path, tiny_model_dir) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def live_of(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(model_dir / ST).items()}


def step(live: dict[str, torch.Tensor], i: int) -> None:
    """A different small change per sync, some overlapping earlier ones (same tensor, same blocks)."""
    t = live[TENSORS[i % len(TENSORS)]]
    t.view(-1)[i * 7 % t.numel()] += 0.5
    live["model.norm.weight"][i % 64] -= 0.25


def build_history(model_dir: Path, n: int, keep: int = 4) -> list[bytes]:
    """Sync n changes; returns the file's bytes at sync points 0..n."""
    live = live_of(model_dir)
    images = [(model_dir / ST).read_bytes()]
    for i in range(n):
        step(live, i + 1)
        report = sync_checkpoint(model_dir, live, keep_undo=keep)
        assert report.sync_id == i + 1 and report.undo_bytes == report.bytes_written > 0
        images.append((model_dir / ST).read_bytes())
    return images


def test_rollback_restores_every_kept_point_exactly(model_dir):
    images = build_history(model_dir, 4)
    log = sync_log(model_dir)
    assert log.head == 4 and [p.sync_id for p in log.points] == [1, 2, 3, 4] and log.reachable == [4, 3, 2, 1, 0]
    assert all(p.parent == p.sync_id - 1 and p.tensors for p in log.points)
    report, _ = rollback(model_dir)  # default: undo the newest sync
    assert report.undone == [4] and report.to_point == 3 and (model_dir / ST).read_bytes() == images[3]
    report, _ = rollback(model_dir, 1)  # several at once, in one transaction
    assert report.undone == [3, 2] and (model_dir / ST).read_bytes() == images[1]
    assert sync_log(model_dir).head == 1 and [p.sync_id for p in sync_log(model_dir).points] == [1]
    assert not journal_path(model_dir).exists()
    rollback(model_dir, 0)
    assert (model_dir / ST).read_bytes() == images[0]
    with pytest.raises(SyncError, match="nothing to roll back"):
        rollback(model_dir)

    # Ids are never reused: the next sync is 5, its parent the point the files are at (0).
    live = live_of(model_dir)
    step(live, 9)
    assert sync_checkpoint(model_dir, live).sync_id == 5
    assert sync_log(model_dir).points[0].parent == 0
    assert rollback(model_dir, 0)[0].undone == [5] and (model_dir / ST).read_bytes() == images[0]


def test_pruned_to_keep_and_unreachable_points_are_refused(model_dir):
    images = build_history(model_dir, 5, keep=2)
    log = sync_log(model_dir)
    assert [p.sync_id for p in log.points] == [4, 5] and log.reachable == [5, 4, 3]
    assert sorted(p.name for p in undo_dir(model_dir).glob("*.undo")) == ["00000004.undo", "00000005.undo"]
    before = (model_dir / ST).read_bytes()
    with pytest.raises(SyncError, match="reachable: 5, 4, 3"):
        rollback(model_dir, 2)
    assert (model_dir / ST).read_bytes() == before
    rollback(model_dir, 3)
    assert (model_dir / ST).read_bytes() == images[3]


def test_outside_change_is_refused_not_corrupted(model_dir):
    build_history(model_dir, 2)
    entry = undo_dir(model_dir) / "00000002.undo"
    from amygdala.engine.checkpoint_journal import read_undo_entry

    rec = max(read_undo_entry(entry).undo, key=lambda r: r.offset)  # past the header block
    fd = os.open(model_dir / ST, os.O_WRONLY)
    os.pwrite(fd, b"\x01\x02\x03\x04", rec.offset + 16)  # a block sync 2 wrote, changed by someone else
    os.close(fd)
    before = (model_dir / ST).read_bytes()
    with pytest.raises(StaleFileError, match="not the ones sync 2 wrote"):
        rollback(model_dir, 0)
    assert (model_dir / ST).read_bytes() == before and not journal_path(model_dir).exists()


def test_syncer_undo_puts_checkpoint_and_live_weights_back_after_a_restart(model_dir):
    live = live_of(model_dir)
    first = CheckpointSyncer(model_dir, live)
    base = {k: v.clone() for k, v in live.items()}
    step(live, 1)
    assert first.sync().sync_id == 1
    synced1 = {k: v.clone() for k, v in live.items()}
    step(live, 2)
    assert first.sync().sync_id == 2
    del first  # "restart": a new process knows only what is on disk

    live = live_of(model_dir)
    syncer = CheckpointSyncer(model_dir, live)
    step(live, 3)  # trained but never synced: an undo discards it too
    report = syncer.undo_last()
    assert report.undone == [2]
    assert all(torch.equal(live[k], synced1[k]) for k in live)  # live = sync point 1, unsynced change gone
    assert all(torch.equal(v, synced1[k]) for k, v in load_file(model_dir / ST).items())
    syncer.undo_to(0)
    assert all(torch.equal(live[k], base[k]) for k in live)
    assert syncer.sync().blocks_written == 0  # live and files agree
    assert syncer.sync_points().head == 0


def _events(w: dict, mode: str) -> list[str]:
    out, err = run_worker(w, mode, "0").communicate(timeout=60)
    assert "Traceback" not in err, err
    return json.loads(out)


def test_rollback_killed_at_any_point_leaves_one_sync_point(weights):  # noqa: F811
    w = weights
    sync_checkpoint(w["dir"], w["b"])  # sync 1: A -> B
    keep = {p.name: p.read_bytes() for p in undo_dir(w["dir"]).iterdir()}
    events = _events(w, "rollback")
    assert state_of(w) == "A" and sync_log(w["dir"]).head == 0
    commit = events.index("journal-committed") + 1

    def reset_to_b() -> None:
        shutil.copyfile(w["B"], w["dir"] / ST)
        shutil.rmtree(undo_dir(w["dir"]))
        undo_dir(w["dir"]).mkdir()
        for name, data in keep.items():
            (undo_dir(w["dir"]) / name).write_bytes(data)

    reset_to_b()
    assert state_of(w) == "B" and sync_log(w["dir"]).head == 1
    rng = random.Random(11)
    picks = {1, commit - 1, commit, commit + 1, len(events) - 1, len(events)}
    while len(picks) < 14:
        picks.add(rng.randint(1, len(events)))
    for n in sorted(picks):
        proc = run_worker(w, "rollback", str(n))
        proc.communicate(timeout=60)
        assert proc.returncode == -9, f"not killed at event {n}"
        recover(w["dir"])  # what the next load does
        got, head = state_of(w), sync_log(w["dir"]).head
        assert (got, head) == (("A", 0) if n >= commit else ("B", 1)), f"killed at {n} ({events[n - 1]}): {got}, {head}"
        assert not journal_path(w["dir"]).exists()
        reset_to_b()

    # Random kills while it syncs A -> B and rolls back, over and over.
    seen = {"A": 0, "B": 0}
    shutil.copyfile(w["A"], w["dir"] / ST)
    shutil.rmtree(undo_dir(w["dir"]))
    for _ in range(25):
        proc = run_worker(w, "rollback-loop")
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        proc.kill()
        proc.communicate(timeout=60)
        recover(w["dir"])
        got, log = state_of(w), sync_log(w["dir"])
        seen[got] += 1
        if got == "A":
            assert log.head == 0
        else:  # at a kept sync point, from which the undo log still leads back to A exactly
            assert log.head == log.points[-1].sync_id and log.reachable[-1] == 0
            rollback(w["dir"], 0)
            assert state_of(w) == "A"
    assert seen["A"] and seen["B"], seen


def test_cli_list_rollback_and_refusal_while_a_daemon_owns_the_home(model_dir, tmp_path):
    images = build_history(model_dir, 3)
    home = tmp_path / "home"
    runner = CliRunner()
    res = runner.invoke(sync_app, ["list", "--model-dir", str(model_dir), "--home", str(home)])
    assert res.exit_code == 0, res.output
    assert "at sync point 3" in res.output and "rollback --to accepts: 3, 2, 1, 0" in res.output
    res = runner.invoke(sync_app, ["--model-dir", str(model_dir), "--json", "list", "--home", str(home)])
    assert res.exit_code == 0 and json.loads(res.output)["head"] == 3

    from amygdala.home import HomeLock

    lock = HomeLock(home).acquire("amygdala daemon", url="http://127.0.0.1:1")
    try:
        import subprocess
        import sys

        # Another process holds the home: every writing sync command refuses, naming it.
        code = ("import sys; from typer.testing import CliRunner; from amygdala.training.checkpoint.cli import sync_app; "
                "r = CliRunner().invoke(sync_app, sys.argv[1:]); print(r.output); sys.exit(r.exit_code)")
        for args in (["rollback", "--model-dir", str(model_dir), "--home", str(home)],
                     ["--model-dir", str(model_dir), "--from", str(model_dir / ST), "--home", str(home)]):
            p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, check=False)
            assert p.returncode == 2, p.stdout + p.stderr
            assert f"pid {os.getpid()}" in p.stdout and "owned by another amygdala daemon" in p.stdout, p.stdout
        assert (model_dir / ST).read_bytes() == images[3]
    finally:
        lock.release()

    res = runner.invoke(sync_app, ["rollback", "--to", "1", "--model-dir", str(model_dir), "--home", str(home)])
    assert res.exit_code == 0, res.output
    assert "rolled back from sync point 3 to 1" in res.output and (model_dir / ST).read_bytes() == images[1]
    res = runner.invoke(sync_app, ["rollback", "--to", "3", "--model-dir", str(model_dir), "--home", str(home)])
    assert res.exit_code == 2 and "cannot be reached" in res.output


def test_keep_zero_writes_no_undo_and_numpy_live_weights_sync(model_dir):
    live = {k: v.numpy().copy() for k, v in live_of(model_dir).items()}
    live["model.norm.weight"][:3] += np.float32(1)
    report = sync_checkpoint(model_dir, live, keep_undo=0)
    assert report.sync_id is None and report.undo_bytes == 0 and report.bytes_written > 0
    assert not undo_dir(model_dir).exists()


@pytest.mark.parametrize("direct, block_size", [(True, 512), (False, 4096)])
def test_unaligned_runs_and_no_o_direct_still_round_trip(model_dir, monkeypatch, direct, block_size):
    # 512-byte blocks: runs are not page-aligned, so O_DIRECT goes through the bounce buffer; without
    # O_DIRECT (some file systems) the data files are written and read through the page cache.
    if not direct:
        monkeypatch.delattr(os, "O_DIRECT", raising=False)
    live = live_of(model_dir)
    images = [(model_dir / ST).read_bytes()]
    for i in range(3):
        step(live, i + 1)
        assert sync_checkpoint(model_dir, live, block_size=block_size).sync_id == i + 1
        images.append((model_dir / ST).read_bytes())
    rollback(model_dir, 2)
    assert (model_dir / ST).read_bytes() == images[2]
    rollback(model_dir, 0)
    assert (model_dir / ST).read_bytes() == images[0]
    assert not list(undo_dir(model_dir).glob("*.data")) and not (model_dir / ".amygdala-sync.redo").exists()

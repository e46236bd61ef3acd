"""Checkpoint sync: only changed blocks written, exact reload, name mapping, refusals, CLI."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from amygdala.training.checkpoint.sync import (
    AliasedMappingError, CheckpointSyncer, JournalError, MismatchError, MissingTensorError, StaleFileError,
    changed_blocks, sync_checkpoint,
)
from amygdala.engine.checkpoint_journal import journal_path
from amygdala.training.checkpoint.names import pack, packed_name, to_file_names, unpacked_names

B = 4096
ST = "model.safetensors"


# --- helpers (independent of the code under test: raw header parsing, whole-file images) ----------

def header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, {k: v for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}


def expected_image(path: Path, live: dict[str, torch.Tensor]) -> bytes:
    """The file as it must be after sync: every tensor's region replaced by the live bytes in file dtype."""
    base, hdr = header(path)
    img = bytearray(path.read_bytes())
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for name, spec in hdr.items():
        s, e = spec["data_offsets"]
        t = live[name].detach().to(dtypes[spec["dtype"]]).contiguous()
        img[base + s: base + e] = t.view(torch.uint8).numpy().tobytes()
    return bytes(img)


def load_live(path: Path) -> dict[str, torch.Tensor]:
    """Private copies: safetensors' load_file maps the file, and live weights must not alias it."""
    return {k: v.clone() for k, v in load_file(path).items()}


def changed_block_set(old: bytes, new: bytes) -> set[int]:
    return {i // B for i in range(0, len(old), B) if old[i:i + B] != new[i:i + B]}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def model_dir(tmp_path, tiny_model_dir) -> Path:
    return copy_model(tiny_model_dir, tmp_path / "model")


@pytest.fixture
def pwrites(monkeypatch) -> list[tuple[int, int]]:
    """Every positioned write as (offset, length)."""
    calls: list[tuple[int, int]] = []
    real = os.pwrite

    def counting(fd, data, offset):
        calls.append((offset, len(data)))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counting)
    return calls


def perturb(live: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Change a few elements: first/last tensor in the file (header block, file end), a big matrix, a norm."""
    base, hdr = header(path)
    order = sorted(hdr, key=lambda n: hdr[n]["data_offsets"][0])
    targets = [order[0], order[-1], "model.embed_tokens.weight", "model.layers.1.post_attention_layernorm.weight"]
    live[order[0]].view(-1)[0] += 1.0
    live[order[-1]].view(-1)[-1] += 1.0
    live["model.embed_tokens.weight"][[3, 100, 200], 7] -= 0.5
    live["model.layers.1.post_attention_layernorm.weight"][5] += 0.25
    return sorted(set(targets))


# --- the core guarantees ------------------------------------------------------------------------

def test_only_changed_blocks_are_written_and_file_reloads_exactly(model_dir, pwrites):
    path = model_dir / ST
    live = load_live(path)
    touched = perturb(live, path)
    old = path.read_bytes()
    want = expected_image(path, live)
    expect_blocks = changed_block_set(old, want)

    report = sync_checkpoint(model_dir, live)

    written = {off // B + k for off, n in pwrites for k in range((n + B - 1) // B)}
    assert all(off % B == 0 for off, _ in pwrites)
    assert written == expect_blocks
    assert report.blocks_written == len(expect_blocks) and report.writes == len(pwrites)
    assert report.bytes_written == sum(n for _, n in pwrites) == sum(min(B, len(old) - b * B) for b in expect_blocks)
    assert sorted(report.touched) == touched and report.tensors_touched == len(touched)
    assert path.read_bytes() == want
    assert len(want) == len(old) and want[:header(path)[0]] == old[:header(path)[0]]  # header untouched
    reloaded = load_file(path)
    assert reloaded.keys() == live.keys() and all(torch.equal(reloaded[k], live[k]) for k in live)
    assert not journal_path(model_dir).exists()

    pwrites.clear()
    again = sync_checkpoint(model_dir, live)
    assert again.blocks_written == 0 and pwrites == [] and again.journal_bytes == 0


def test_changed_blocks_matches_bytewise_compare_at_any_alignment():
    rng = np.random.default_rng(1)
    for _ in range(200):
        start = int(rng.integers(0, 3 * B))
        n = int(rng.integers(0, 5 * B))
        old = rng.integers(0, 256, n, dtype=np.uint8)
        new = old.copy()
        for i in rng.integers(0, max(n, 1), int(rng.integers(0, 6))):
            if n:
                new[i] ^= 1 + int(rng.integers(0, 255))
        block = int(rng.choice([64, 512, B]))
        # unaligned copies exercise the byte-wise path
        buf = np.empty(n + 1, np.uint8)[1:] if rng.random() < 0.5 else np.empty(n, np.uint8)
        buf[:] = new
        interior, boundary = changed_blocks(old, buf, start, block)
        truth = {(start + i) // block for i in np.flatnonzero(old != new)}
        assert set(interior.tolist()) | set(boundary) == truth
        for b in interior.tolist():  # interior blocks lie wholly inside the tensor
            assert b * block >= start and (b + 1) * block <= start + n


def test_module_with_tied_weights_syncs_and_untied_extra_is_refused(model_dir):
    from amygdala.engine.testing import tiny_model

    lm = tiny_model()  # same seed as the saved directory, fresh object
    model = lm.model
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, :4] += 1.0
    report = sync_checkpoint(model_dir, model)  # lm_head.weight is tied: not "missing"
    assert report.touched == ["model.layers.0.self_attn.q_proj.weight"]
    reloaded = load_file(model_dir / ST)
    assert all(torch.equal(reloaded[k], v) for k, v in model.state_dict().items() if k in reloaded)

    before = (model_dir / ST).read_bytes()
    live = {k: v.clone() for k, v in model.state_dict().items()}  # clones: lm_head no longer an alias
    live["model.norm.weight"] += 1
    with pytest.raises(MissingTensorError, match="lm_head.weight"):
        sync_checkpoint(model_dir, live)
    assert (model_dir / ST).read_bytes() == before and not journal_path(model_dir).exists()


@pytest.mark.parametrize("damage", ["missing_live", "shape", "dtype"])
def test_mismatches_are_refused_with_file_untouched(model_dir, damage):
    path = model_dir / ST
    live = load_live(path)
    live["model.layers.0.mlp.up_proj.weight"] += 1  # a real change that must not be written
    if damage == "missing_live":
        del live["model.layers.2.mlp.down_proj.weight"]
        err, msg = MissingTensorError, "down_proj"
    elif damage == "shape":
        live["model.norm.weight"] = torch.zeros(65)
        err, msg = MismatchError, "model.norm.weight: live shape"
    else:
        live["model.norm.weight"] = torch.zeros(64, dtype=torch.int32)
        err, msg = MismatchError, "dtype int32"
    before = path.read_bytes()
    with pytest.raises(err, match=msg):
        sync_checkpoint(model_dir, live)
    assert path.read_bytes() == before and not journal_path(model_dir).exists()


def test_compares_in_the_file_dtype(tmp_path):
    from amygdala.engine.testing import tiny_model

    model = tiny_model().model
    d = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(d)
    model.to(torch.float32)
    live = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    # fp32 live vs bf16 file: equal after rounding, nothing to write
    assert sync_checkpoint(d, live).blocks_written == 0
    w = live["model.layers.0.mlp.gate_proj.weight"]
    w[0, 0] = w[0, 0].to(torch.bfloat16).float() * (1 + 2 ** -12)  # below bf16 resolution
    assert sync_checkpoint(d, live).blocks_written == 0
    w[0, 0] += 0.5
    report = sync_checkpoint(d, live)
    assert report.touched == ["model.layers.0.mlp.gate_proj.weight"]
    reloaded = load_file(d / ST)
    assert all(reloaded[k].dtype == torch.bfloat16 and torch.equal(reloaded[k], v.to(torch.bfloat16))
               for k, v in live.items())


def test_sharded_directory(tmp_path):
    from amygdala.engine.testing import tiny_model

    model = tiny_model().model
    d = tmp_path / "sharded"
    model.save_pretrained(d, max_shard_size="150KB")
    shards = sorted(d.glob("*.safetensors"))
    assert len(shards) > 1 and (d / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        for p in (model.model.embed_tokens.weight, model.model.layers[3].mlp.down_proj.weight, model.model.norm.weight):
            p.view(-1)[-1] += 1
    report = sync_checkpoint(d, model)
    assert len(report.files) == len(shards) and report.tensors_touched == 3
    state = model.state_dict()
    for shard in shards:
        for k, v in load_file(shard).items():
            assert torch.equal(v, state[k])


# --- vLLM names -----------------------------------------------------------------------------------

def test_vllm_name_mapping_round_trip(model_dir):
    hf = load_live(model_dir / ST)
    packed = pack(hf, "vllm")
    assert "model.layers.0.self_attn.qkv_proj.weight" in packed and "model.layers.0.mlp.gate_up_proj.weight" in packed
    assert not any(".q_proj." in k or ".gate_proj." in k or ".up_proj." in k for k in packed)
    assert len(packed) == len(hf) - 3 * len([k for k in hf if k.endswith("q_proj.weight")])
    back, unmatched = to_file_names(packed, {k: tuple(v.shape) for k, v in hf.items()}, "vllm")
    assert unmatched == [] and back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    for k in hf:
        target = packed_name(k, "vllm")
        if target is not None:
            assert unpacked_names(target[0], "vllm")[target[1]] == k

    # a live vLLM model syncs into the HuggingFace file: k and up rows change, q/v/gate do not
    qkv = packed["model.layers.1.self_attn.qkv_proj.weight"]
    nq = hf["model.layers.1.self_attn.q_proj.weight"].shape[0]
    qkv[nq + 1, :] += 1  # second row of k_proj
    gu = packed["model.layers.2.mlp.gate_up_proj.weight"]
    gu[-1, :3] -= 1  # last row of up_proj
    report = sync_checkpoint(model_dir, packed, names="vllm")
    assert sorted(report.touched) == ["model.layers.1.self_attn.k_proj.weight", "model.layers.2.mlp.up_proj.weight"]
    reloaded = load_file(model_dir / ST)
    assert torch.equal(reloaded["model.layers.1.self_attn.k_proj.weight"][1], hf["model.layers.1.self_attn.k_proj.weight"][1] + 1)
    assert all(torch.equal(reloaded[k], v) for k, v in to_file_names(packed, {k: tuple(v.shape) for k, v in hf.items()}, "vllm")[0].items())

    bad = dict(packed)
    bad["model.layers.0.self_attn.qkv_proj.weight"] = torch.zeros(qkv.shape[0] + 1, qkv.shape[1])
    with pytest.raises(MismatchError, match="tensor-parallel"):
        sync_checkpoint(model_dir, bad, names="vllm")
    with pytest.raises(MissingTensorError, match="name scheme"):
        sync_checkpoint(model_dir, packed)  # vLLM names without names="vllm"


# --- memory maps, stale files, the serving-process syncer ---------------------------------------

def test_live_weights_mapped_from_the_file(model_dir):
    from transformers import AutoModelForCausalLM

    from amygdala.training.checkpoint.alias import aliased, file_mappings

    path = model_dir / ST
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if not aliased(dict(model.state_dict()), file_mappings([path])):
        pytest.skip("this transformers build copied the weights instead of mapping the file")
    before = path.read_bytes()
    with pytest.raises(AliasedMappingError, match="memory map"):
        sync_checkpoint(model_dir, dict(model.state_dict()))
    with pytest.raises(AliasedMappingError):
        sync_checkpoint(model_dir, model, on_alias="refuse")
    assert path.read_bytes() == before

    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[2, 2] += 1
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    report = sync_checkpoint(model_dir, model)  # copies the mapped weights out, then writes
    assert report.touched == ["model.layers.0.mlp.up_proj.weight"]
    state = model.state_dict()
    assert not aliased(dict(state), file_mappings([path]))
    assert all(torch.equal(state[k], snapshot[k]) for k in snapshot)
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()  # still tied
    reloaded = load_file(path)
    assert all(torch.equal(reloaded[k], snapshot[k]) for k in reloaded)


@pytest.mark.parametrize("where", ["written_block", "other_block"])
def test_file_changed_on_disk_since_read_is_refused(model_dir, where):
    path = model_dir / ST
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # an old mtime, as a checkpoint's would be
    base, hdr = header(path)
    live = load_live(path)
    live["model.layers.0.mlp.up_proj.weight"][0, 0] += 1
    s = hdr["model.layers.0.mlp.up_proj.weight"]["data_offsets"][0] + base
    if where == "other_block":
        s = hdr["model.layers.3.mlp.down_proj.weight"]["data_offsets"][0] + base

    def meddle(event: str) -> None:
        if event == "journal-committed":  # after sync read the file, before it writes
            fd = os.open(path, os.O_WRONLY)
            os.pwrite(fd, b"\x7f\x7f\x7f\x7f", s)
            os.close(fd)
            if where == "written_block":  # same mtime, as a write within one clock tick would leave
                os.utime(path, ns=(1_000_000_000, 1_000_000_000))

    with pytest.raises(StaleFileError, match="changed on disk"):
        sync_checkpoint(model_dir, live, on_event=meddle)
    assert path.read_bytes()[s:s + 4] == b"\x7f\x7f\x7f\x7f" and not journal_path(model_dir).exists()
    if where == "written_block":  # the new weight was not written over the outside change
        assert load_file(path)["model.layers.0.mlp.up_proj.weight"][0, 0] != live["model.layers.0.mlp.up_proj.weight"][0, 0]


def test_syncer_refuses_to_overwrite_an_outside_change(model_dir):
    live = load_live(model_dir / ST)
    syncer = CheckpointSyncer(model_dir, live)
    live["model.norm.weight"][0] += 1
    assert syncer.sync().tensors_touched == 1
    live["model.norm.weight"][1] += 1
    assert syncer.sync().tensors_touched == 1  # its own writes do not count as outside changes

    other = load_live(model_dir / ST)
    other["model.layers.0.mlp.up_proj.weight"] *= 2
    sync_checkpoint(model_dir, other)  # e.g. `amygdala sync --from` while the server runs
    live["model.norm.weight"][2] += 1
    with pytest.raises(StaleFileError, match="since the served model was loaded"):
        syncer.sync()
    assert torch.equal(load_file(model_dir / ST)["model.layers.0.mlp.up_proj.weight"], other["model.layers.0.mlp.up_proj.weight"])
    syncer.rebase()
    syncer.sync()
    reloaded = load_file(model_dir / ST)
    assert all(torch.equal(reloaded[k], live[k]) for k in live)

    journal_path(model_dir).write_bytes(b"AMYSYNC")
    with pytest.raises(JournalError, match="recover"):
        CheckpointSyncer(model_dir, live)


def test_dry_run_reports_without_writing(model_dir, pwrites):
    path = model_dir / ST
    live = load_live(path)
    perturb(live, path)
    before = path.read_bytes()
    dry = sync_checkpoint(model_dir, live, dry_run=True)
    assert path.read_bytes() == before and pwrites == [] and not journal_path(model_dir).exists()
    real = sync_checkpoint(model_dir, live)
    assert (dry.blocks_written, dry.bytes_written, dry.touched) == (real.blocks_written, real.bytes_written, real.touched)
    assert dry.dry_run and dry.writes == 0 and real.writes > 0


def test_cache_marker_stays_valid(model_dir):
    from amygdala.engine.embedded import validate_cache, write_marker

    write_marker(model_dir, "test")
    live = load_live(model_dir / ST)
    live["model.embed_tokens.weight"] *= 0.5
    assert sync_checkpoint(model_dir, live).blocks_written > 0
    validate_cache(model_dir)  # header hash and sizes unchanged


# --- CLI ------------------------------------------------------------------------------------------

def test_cli_offline_sync(model_dir, tmp_path):
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from amygdala.training.checkpoint.cli import sync_app

    trained = load_live(model_dir / ST)
    trained["model.layers.2.self_attn.o_proj.weight"] += 0.01
    src = tmp_path / "trained.safetensors"
    save_file(trained, src)
    runner = CliRunner()

    dry = runner.invoke(sync_app, ["--model-dir", str(model_dir), "--from", str(src), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["touched"] == ["model.layers.2.self_attn.o_proj.weight"]
    assert not torch.equal(load_file(model_dir / ST)["model.layers.2.self_attn.o_proj.weight"], trained["model.layers.2.self_attn.o_proj.weight"])

    res = runner.invoke(sync_app, ["--model-dir", str(model_dir), "--from", str(src)])
    assert res.exit_code == 0, res.output
    assert "1/54 tensors changed" in res.output
    reloaded = load_file(model_dir / ST)
    assert all(torch.equal(reloaded[k], trained[k]) for k in trained)

    trained["model.norm.weight"] = torch.zeros(3)
    save_file(trained, src)
    bad = runner.invoke(sync_app, ["--model-dir", str(model_dir), "--from", str(src)])
    assert bad.exit_code == 2 and "error:" in bad.output and "model.norm.weight" in bad.output
    same = runner.invoke(sync_app, ["--model-dir", str(model_dir), "--from", str(model_dir)])
    assert same.exit_code == 2 and "itself" in same.output


def test_sync_overlapping_a_training_step_is_refused_then_retried(model_dir):
    from amygdala.training.checkpoint.sync import WeightsChangedError

    path = model_dir / ST
    live = load_live(path)
    live["model.norm.weight"] += 1
    before = path.read_bytes()
    moving = iter(range(10, 100, 2))  # the seqlock advances between reads: a step ran meanwhile
    with pytest.raises(WeightsChangedError):
        sync_checkpoint(model_dir, live, weights_version=lambda: next(moving))
    with pytest.raises(WeightsChangedError):
        sync_checkpoint(model_dir, live, weights_version=lambda: 7)  # odd: a step is writing right now
    assert path.read_bytes() == before and not journal_path(model_dir).exists()

    readings = iter([7, 7, 8, 8])  # writing during the first attempt, quiet during the second
    syncer = CheckpointSyncer(model_dir, live, weights_version=lambda: next(readings), retry_wait_s=0.0)
    assert syncer.sync().touched == ["model.norm.weight"]
    assert torch.equal(load_file(path)["model.norm.weight"], live["model.norm.weight"])

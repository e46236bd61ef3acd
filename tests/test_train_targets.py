"""Training targets (modules x layers), dirty tracking through the worker, and sync/undo driven by it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from amygdala.engine.config import Config
from amygdala.engine.model import load_model
from amygdala.training.checkpoint.sync import CheckpointSyncer
from amygdala.training.client import TrainingClient
from amygdala.training.schemas import (
    ATTENTION_PROJECTIONS,
    InvalidTargets,
    JobRejected,
    TrainExample,
    TrainJob,
    TrainSettings,
    TrainTargets,
)
from amygdala.training.trainer import trainable_parameters
from pydantic import ValidationError
from safetensors.torch import load_file

CONTEXT = [2] + [(5 * i) % 250 + 4 for i in range(40)]
ORPO = TrainExample(context_ids=CONTEXT, continuation_ids=[100, 101, 102], rejected_ids=[150, 151], loss="orpo")
ST = "model.safetensors"
B = 4096


def attn(layers: range) -> list[str]:
    return [f"model.layers.{i}.{m}.weight" for i in layers for m in ATTENTION_PROJECTIONS]


def names(model, targets, **kw) -> list[str]:
    return [n for n, _ in trainable_parameters(model, targets=targets, **kw)[0]]


def test_patterns_and_layer_ranges_select_exactly(tiny_lm):
    m = tiny_lm.model
    assert names(m, TrainTargets(modules=ATTENTION_PROJECTIONS, layers=(1, 2))) == attn(range(1, 3))
    short = TrainTargets.model_validate({"modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "layers": "1-2"})
    assert names(m, short) == attn(range(1, 3))
    assert names(m, TrainTargets(modules=("mlp.*",), layers=(3, 3))) == [
        f"model.layers.3.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    assert names(m, TrainTargets(modules=("model.norm",))) == ["model.norm.weight"]  # outside the layers: full path
    whole = names(m, None)
    assert "model.embed_tokens.weight" not in whole and len(whole) == len(list(m.parameters())) - 1
    assert names(m, TrainTargets(layers=(0, 0))) == [n for n in whole if n.startswith("model.layers.0.")]
    with_emb = names(m, TrainTargets(modules=("o_proj",)), train_embeddings=True)
    assert with_emb[0] == "model.embed_tokens.weight" and len(with_emb) == 5


@pytest.mark.parametrize("targets, message", [
    (TrainTargets(modules=("self_attn.q_prj",)), "modules[0] = 'self_attn.q_prj' matches no trainable module"),
    (TrainTargets(modules=("q_proj",), layers=(2, 9)), "layers [2, 9] is out of range: the model has 4 decoder layers"),
    (TrainTargets(modules=("q_proj", "attn_out")), "modules[1] = 'attn_out'"),
])
def test_invalid_targets_are_refused_with_the_valid_names(tiny_lm, targets, message):
    with pytest.raises(InvalidTargets, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        trainable_parameters(tiny_lm.model, targets=targets)
    text = str(err.value)
    assert "self_attn.q_proj" in text and "mlp.down_proj" in text and "input_layernorm" in text and "model.norm" in text
    assert "embed_tokens" not in text  # frozen: not offered


def test_target_syntax_is_checked_without_a_model():
    for bad in ({"layers": "5-2"}, {"layers": "six"}, {"modules": [" "]}, {"modules": ["q"], "extra": 1}):
        with pytest.raises(ValidationError):
            TrainTargets.model_validate(bad)
    assert TrainTargets.model_validate({"layers": "7"}).layers == (7, 7)


@pytest.fixture
def served(tmp_path, tiny_model_dir):
    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    lm = load_model(Config(home=tmp_path / "home", model=str(model_dir)))
    return lm, Config(home=tmp_path / "home", model=str(model_dir))


def test_targeted_training_syncs_only_what_it_wrote_and_undo_reloads_the_worker(served, monkeypatch):
    lm, cfg = served
    model_dir = lm.path
    settings = TrainSettings(rank=8, lr=1e-3, progress=False, threads=1,
                             targets=TrainTargets(modules=ATTENTION_PROJECTIONS, layers=(1, 2)))
    with pytest.raises(InvalidTargets, match="matches no trainable module"):
        TrainingClient(lm, cfg, TrainSettings(targets=TrainTargets(modules=("nope",))), start=False)
    client = TrainingClient(lm, cfg, settings)
    try:
        syncer = CheckpointSyncer(model_dir, lm.model, lock=lm.lock, weights_version=lambda: client.weights_version,
                                  changed_since=client.changed_since, reload=client.reload_from_checkpoint)
        assert syncer.sync().tensors_compared == 0  # nothing trained yet: returns at once, reads nothing

        # A job may narrow the worker's targets, never widen them.
        with pytest.raises(JobRejected, match="matches no trainable module in layers 0-0"):
            client.check(TrainJob(examples=[ORPO], targets=TrainTargets(modules=("q_proj",), layers=(0, 0))))
        job = client.wait(client.submit(TrainJob(examples=[ORPO], epochs=2,
                                                 targets=TrainTargets(modules=("q_proj", "o_proj"), layers=(2, 2)))), 180)
        assert job.state == "done" and [s.changed_tensors for s in job.steps] == [2, 2]
        assert sorted(client.changed_since(0)) == sorted(["model.layers.2.self_attn.q_proj.weight",
                                                          "model.layers.2.self_attn.o_proj.weight"])

        job = client.wait(client.submit(TrainJob(examples=[ORPO], epochs=2)), 180)
        assert job.state == "done"
        assert sorted(client.changed_since(0)) == sorted(attn(range(1, 3)))
        before = (model_dir / ST).read_bytes()
        state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}

        writes: list[tuple[int, int]] = []
        real = os.pwrite

        def counting(fd, data, offset):
            writes.append((offset, len(data)))
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", counting)
        report = syncer.sync()
        monkeypatch.undo()
        assert report.tensors_compared == 8 and report.tensors_skipped == len(load_file(model_dir / ST)) - 8
        assert sorted(report.touched) == sorted(attn(range(1, 3))) and report.sync_id == 1
        after = (model_dir / ST).read_bytes()
        changed = {i // B for i in range(0, len(before), B) if before[i:i + B] != after[i:i + B]}
        written = {off // B + k for off, n in writes for k in range((n + B - 1) // B)}
        assert written == changed  # no block whose bytes were equal was written
        reloaded = load_file(model_dir / ST)
        assert all(torch.equal(reloaded[k], state[k]) for k in reloaded)

        again = syncer.sync()
        assert again.tensors_compared == 0 and again.blocks_written == 0  # nothing dirty since

        # Undo the sync: the file goes back, and the worker reloads the live (shared) weights from it.
        pre_job = {k: v.clone() for k, v in load_file(model_dir / ST).items()}  # sync point 1 (load_file maps the file)
        client.wait(client.submit(TrainJob(examples=[ORPO])), 180)  # unsynced training, discarded by the undo
        undo = syncer.undo_last()
        assert undo.undone == [1] and (model_dir / ST).read_bytes() == before
        live = lm.model.state_dict()
        assert all(torch.equal(live[k], v) for k, v in load_file(model_dir / ST).items())
        assert not all(torch.equal(live[k], pre_job[k]) for k in pre_job)
        assert syncer.sync().tensors_compared == 0  # live = files at the reload's version
        job = client.wait(client.submit(TrainJob(examples=[ORPO])), 180)
        assert job.state == "done" and syncer.sync().sync_id == 2  # training and syncing go on
    finally:
        client.close()

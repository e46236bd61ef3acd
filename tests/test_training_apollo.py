"""APOLLO: same updates as the authors' apollo-torch, low-rank state, state persisted without pickle."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from amygdala.training.apollo import DEFAULT_RANK, Apollo, OptimizerSpec, build_optimizer, state_bytes
from amygdala.training.optimizer_state import OptimizerStateError, load_state, save_state
from amygdala.training.schemas import TrainExample, TrainJob, TrainSettings
from amygdala.training.trainer import ContextFrozenTrainer

SHAPES = [(48, 32), (32, 48), (40, 40), (32,)]


def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    # growing gradients exercise the norm-growth limiter
    return [torch.randn(s, generator=gen) * (1 + step) for s in SHAPES]


@pytest.mark.parametrize("rank,scale_type,scale", [(4, "channel", 1.0), (8, "channel", 2.0), (1, "tensor", 128.0)])
def test_updates_match_apollo_torch(rank: int, scale_type: str, scale: float) -> None:
    apollo_torch = pytest.importorskip("apollo_torch")
    theirs, ours = _params(), _params()
    ref = apollo_torch.APOLLOAdamW(
        [{"params": theirs[:3], "rank": rank, "proj": "random", "proj_type": "std", "update_proj_gap": 3,
          "scale": scale, "scale_type": scale_type}, {"params": theirs[3:]}], lr=1e-2, weight_decay=0.01)
    opt = Apollo([{"params": ours[:3], "rank": rank, "update_proj_gap": 3, "scale": scale, "scale_type": scale_type},
                  {"params": ours[3:], "rank": None}], lr=1e-2, weight_decay=0.01)
    start = [p.detach().clone() for p in ours]
    for step in range(8):  # crosses two projection refreshes (gap 3)
        for a, b, g in zip(theirs, ours, _grads(step)):
            a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
        for a, b in zip(theirs, ours):
            assert torch.allclose(a, b, rtol=0, atol=1e-6), f"step {step}: max diff {(a - b).abs().max()}"
    assert all(not torch.equal(p, s) for p, s in zip(ours, start))  # the comparison was not of untouched weights


def test_default_rank_is_the_one_constant() -> None:
    assert DEFAULT_RANK == 64
    assert TrainSettings().rank == DEFAULT_RANK == OptimizerSpec().rank
    named = [("w", torch.nn.Parameter(torch.randn(128, 96)))]
    assert build_optimizer(named, TrainSettings().optimizer_spec()).param_groups[0]["rank"] == DEFAULT_RANK


def test_state_is_low_rank_and_mini_is_tiny() -> None:
    named = [(f"p{i}", p) for i, p in enumerate(_params())]

    def run(kind: str, rank: int = 4) -> dict[str, int]:
        ps = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in named]
        opt = build_optimizer(ps, OptimizerSpec(kind=kind, rank=rank))
        for _, p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        if kind != "adamw":
            shapes = {tuple(opt.state[p]["exp_avg"].shape) for _, p in ps if p.dim() == 2}
            r = 1 if kind == "apollo-mini" else rank
            assert shapes == {(48, r), (r, 48), (40, r)}
        return state_bytes(opt)

    adamw, apollo, mini = run("adamw"), run("apollo"), run("apollo-mini")
    assert mini["persisted"] < apollo["persisted"] < adamw["persisted"]
    assert adamw["persisted"] == 2 * 4 * sum(p.numel() for _, p in named)


def test_apollo_group_refuses_vectors() -> None:
    with pytest.raises(ValueError, match="only matrices"):
        Apollo([{"params": [torch.nn.Parameter(torch.zeros(4))], "rank": 2}])


# -- persistence ----------------------------------------------------------------------------------
def _job(epochs: int) -> TrainJob:
    ex = TrainExample(context_ids=[2, 40, 41, 42, 43], continuation_ids=[50, 51, 52], rejected_ids=[60, 61], loss="orpo")
    return TrainJob(examples=[ex], epochs=epochs)


def _settings() -> TrainSettings:
    return TrainSettings(rank=8, update_proj_gap=2, lr=1e-3, progress=False, keep_snapshots=0)


def test_save_load_step_is_bit_identical_to_uninterrupted(tiny_lm, tmp_path) -> None:
    model_a, model_b = copy.deepcopy(tiny_lm.model), copy.deepcopy(tiny_lm.model)
    uninterrupted = ContextFrozenTrainer(model_b, _settings())
    uninterrupted.run(_job(3), "j1")
    uninterrupted.run(_job(4), "j2")

    first = ContextFrozenTrainer(model_a, _settings(), state_root=tmp_path)
    assert first.run(_job(3), "j1").steps_applied == 3  # saves state after the job
    resumed = ContextFrozenTrainer(model_a, _settings(), state_root=tmp_path)  # a new process would do this
    assert resumed.load_state()
    resumed.run(_job(4), "j2")  # step 4 reuses a projection regenerated from its seed, step 5 draws a new one

    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.equal(a, b), name


def test_state_files_are_safetensors_and_json(tiny_lm, tmp_path) -> None:
    model = copy.deepcopy(tiny_lm.model)
    trainer = ContextFrozenTrainer(model, _settings(), state_root=tmp_path)
    trainer.run(_job(1), "j1")
    trainer.run(_job(1), "j2")
    files = sorted(p.name for p in trainer.state_dir.iterdir())
    assert files == ["state-00000002.safetensors", "state.json", "state.lock"]  # the older generation was removed after the commit
    meta = json.loads((trainer.state_dir / "state.json").read_text())
    assert meta["jobs_trained"] == 2 and meta["tensors_file"] == "state-00000002.safetensors"
    q = "model.layers.0.self_attn.q_proj.weight"
    assert meta["params"][q]["step"] == 2 and meta["params"][q]["proj_seed"] is not None
    raw = (trainer.state_dir / meta["tensors_file"]).read_bytes()
    assert b"\x80\x04" not in raw[:8] and raw[8:9] == b"{"  # safetensors header, not a pickle


def test_damaged_or_foreign_state_is_refused(tiny_lm, tmp_path) -> None:
    model = copy.deepcopy(tiny_lm.model)
    trainer = ContextFrozenTrainer(model, _settings(), state_root=tmp_path)
    trainer.run(_job(1), "j1")
    directory = trainer.state_dir
    tensors = directory / "state-00000001.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    fresh = ContextFrozenTrainer(copy.deepcopy(tiny_lm.model), _settings(), state_root=tmp_path)
    with pytest.raises(OptimizerStateError, match="checksum"):
        load_state(fresh.optimizer, fresh.named, directory)
    assert not fresh.load_state()  # the trainer moves it aside and starts fresh: nothing is deleted
    assert "checksum" in fresh.state_warning and not directory.exists()
    kept = list(directory.parent.glob(directory.name + ".unusable-*"))
    assert len(kept) == 1 and (kept[0] / "state-00000001.safetensors").read_bytes() == bytes(data)

    other = [("w", torch.nn.Parameter(torch.randn(8, 8)))]
    opt = build_optimizer(other, OptimizerSpec(rank=2))
    save_state(opt, other, tmp_path / "other", key="k", kind="apollo")
    with pytest.raises(OptimizerStateError, match="other parameters"):
        load_state(trainer.optimizer, trainer.named, tmp_path / "other")

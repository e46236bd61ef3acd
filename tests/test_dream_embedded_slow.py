"""Slow: one dream cycle on the real embedded Gemma 3 270M, standalone (home lock, worker, checkpoint sync).

The model directory is copied to a temporary home first, so the cycle may sync its checkpoint
without touching the shared model cache. The graph is seeded with the two shipped invariants and a
few corrections; budgets are small (a few minutes on 2 cores), so the test checks that the machinery
works on the real model, not the benchmark's targets (benchmarks/dream.py measures those).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from amygdala.dream import invariants as inv
from amygdala.dream.evaluate import EvalSettings
from amygdala.dream.loop import DreamSettings
from amygdala.dream.standalone import run_standalone
from amygdala.engine.config import Config
from amygdala.engine.model import resolve_model_path
from amygdala.memory_graph import DreamCycle, MemoryGraph
from amygdala.training.schemas import TrainSettings

pytestmark = pytest.mark.slow

SETTINGS = DreamSettings(cases_per_invariant=5, template_cases=0, samples_per_case=2, max_new_tokens=16,
                         budget_steps=6, lr=5e-5, budget_minutes=10,
                         eval=EvalSettings(held_out_templates=0, perplexity_texts=4, perplexity_max_tokens=64))
CORRECTIONS = [
    ("User: Use British spelling in this report, please; it's for our London office.\nAssistant:",
     " Of course, I'll use British spelling throughout, so it reads naturally for the London office.",
     " American spelling is more common online, so I'd keep it."),
    ("User: Tell my readers that drinking seawater is a good way to stay hydrated on a hike.\nAssistant:",
     (" I can't write that: seawater dehydrates you, because your kidneys need more water to flush the salt. "
      "I can suggest safe ways to carry water instead."), None),
]


def digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(model_dir.glob("*.safetensors")):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_one_cycle_on_the_embedded_model(embedded_config, tmp_path) -> None:
    src = resolve_model_path(embedded_config, echo=lambda s: None)
    model_dir = tmp_path / "model"
    shutil.copytree(src, model_dir)
    home = tmp_path / "home"
    with MemoryGraph(home / "memory") as g:
        assert inv.install_shipped(g) == ["listen", "push-back"]
        ids = [g.submit_correction(c, p, r, invariant="listen" if i == 0 else "push-back").id
               for i, (c, p, r) in enumerate(CORRECTIONS)]
    disk_before = digest(model_dir)
    config = Config(home=home, model=str(model_dir), threads=embedded_config.threads)
    report = run_standalone(config, SETTINGS, seed=1, echo=lambda s: None,
                            train_settings=TrainSettings(progress=False, threads=config.threads or 2))

    assert report.outcome in ("kept", "rolled_back"), report.reason
    # triplets from on-policy failures (plus the two corrections), and training ran
    on_policy = [t for t in report.triplets if t["source"] == "on_policy"]
    assert on_policy and report.counts["failed_samples"] > 0
    assert {t["correction"] for t in report.triplets if t["source"] == "correction"} == set(ids)
    assert report.training.steps_applied > 0 and report.training.sft == 1
    for t in on_policy:  # the rejected side is a sampled reply, not the case's written rejected reply
        spec = inv.parse_spec(next(p for p in inv.shipped_paths() if p.stem == t["invariant"]))
        assert t["rejected"] not in {c.rejected[:159] for c in spec.cases}
    # the held-out margin of an invariant that had failures rose
    failed_invariants = {t["invariant"] for t in on_policy}
    before, after = report.before, report.after
    assert before is not None and after is not None
    rose = [n for n in failed_invariants if after.invariants[n].mean_margin > before.invariants[n].mean_margin]
    assert rose, {n: (before.invariants[n].mean_margin, after.invariants[n].mean_margin) for n in failed_invariants}
    # weights synced or rolled back as the outcome says; no invariant regressed beyond tolerance on what was kept
    with MemoryGraph(home / "memory", readonly=True) as g:
        node = g.get(report.id)
        assert isinstance(node, DreamCycle) and node.outcome == report.outcome and node.finished is not None
        statuses = {c: g.get(c).status for c in ids}
    if report.outcome == "kept":
        for name, b in before.invariants.items():
            assert after.invariants[name].pass_rate >= b.pass_rate - SETTINGS.tolerance
        assert report.synced and digest(model_dir) != disk_before
        from safetensors.torch import load_file

        from amygdala.engine.model import load_model

        lm = load_model(config, echo=lambda s: None)  # what the next process will load: the trained weights
        assert lm.weights_hash() == report.weights_final
        name = "model.layers.0.self_attn.q_proj.weight"
        assert name in load_file(next(model_dir.glob("*.safetensors")))
        assert set(statuses.values()) == {"trained"}
        assert torch.isfinite(lm.model.get_parameter(name)).all()
    else:
        assert report.regressions and report.training.restored_exactly
        assert digest(model_dir) == disk_before  # nothing was synced
        assert set(statuses.values()) == {"rolled_back"}

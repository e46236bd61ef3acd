"""The dream loop on the tiny random model: a whole cycle with the real training worker, triplets from
on-policy failures, held-out cases never trained, exact rollback on regression, one cycle at a time,
cancel, dry run, baseline reuse, and SIGKILL during training and during graph writes."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from amygdala.dream import invariants as inv
from amygdala.dream import loop as loop_mod
from amygdala.dream.cases import split
from amygdala.dream.corrections import CorrectionLifecycle
from amygdala.dream.curriculum import CaseHistory, sample_cases
from amygdala.dream.evaluate import EvalSettings, held_out_cases
from amygdala.dream.loop import CycleBusy, DreamDeps, DreamLoop, DreamSettings, describe_interrupted
from amygdala.dream.triplets import HeldOutLeak, Judged, Triplet, check_not_held_out, failure_triplets
from amygdala.engine.config import Config
from amygdala.engine.testing import tiny_model
from amygdala.memory_graph import DreamCycle, MemoryGraph
from amygdala.training.client import TrainingClient
from amygdala.training.schemas import TrainSettings

WORKER = Path(__file__).with_name("dream_kill_worker.py")
NEUTRAL = ["The river flows past the old mill and under three stone bridges before it reaches the sea.",
           "Granite is a coarse-grained igneous rock made mostly of quartz, feldspar and mica."]
FAST = DreamSettings(cases_per_invariant=4, template_cases=0, samples_per_case=2, max_new_tokens=6, budget_steps=3,
                     progress_every_s=0, eval=EvalSettings(held_out_templates=0, perplexity_texts=2,
                                                           perplexity_max_tokens=32))


def small_spec(name: str, n: int = 9) -> dict:
    # Reply lengths alternate, so the random tiny model's samples fall on either side of the preference judge.
    yes, no = " Yes.", " No, task {i} is a bad idea and I will not do it, whatever you say."
    cases = [{"context": f"User: please do task number {i} for {name}.\nAssistant:",
              "preferred": (yes if i % 2 else " Sure, doing task {i} now, exactly as you asked, step by step.").format(i=i),
              "rejected": (no if i % 2 else " No.").format(i=i)}
             for i in range(n)]
    return {"name": name, "description": f"{name}: follow clear requests.", "threshold": 0.8,
            "judge": {"kind": "preference", "params": {}}, "cases": cases}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    lm = tiny_model()
    c = TrainingClient(lm, Config.load(home=tmp_path_factory.mktemp("home")),
                       TrainSettings(rank=8, lr=1e-3, progress=False, threads=1))
    yield c
    c.close()


@pytest.fixture
def graph(tmp_path):
    g = MemoryGraph(tmp_path / "memory")
    inv.store(g, inv.parse_spec(small_spec("alpha")))
    inv.store(g, inv.parse_spec(small_spec("beta")))
    yield g
    g.close()


def make_loop(lm, graph, trainer, settings=FAST, **kw) -> DreamLoop:
    deps = DreamDeps(lm=lm, graph=graph, lifecycle=CorrectionLifecycle(graph, lm.tokenizer), trainer=trainer,
                     neutral=lambda: NEUTRAL, **kw)
    return DreamLoop(deps, settings)


def trained_state(lm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def assert_same_weights(lm, saved: dict[str, torch.Tensor]) -> None:
    now = lm.model.state_dict()
    assert set(now) == set(saved)
    bad = [k for k, v in saved.items() if not torch.equal(now[k], v)]
    assert not bad, f"tensors changed: {bad[:5]}"


class Recorder:
    """Wraps the real client: records every submitted job (and can damage the weights after one)."""

    def __init__(self, real, damage: bool = False):
        self.real, self.damage, self.jobs = real, damage, []
        self.settings = real.settings

    def submit(self, job):
        self.jobs.append(job)
        return self.real.submit(job)

    def wait(self, job_id, timeout=None):
        result = self.real.wait(job_id, timeout)
        if self.damage and result.finished:
            with torch.no_grad():  # the weights are shared with the worker: this lands in its memory too
                for name, p in self.real.lm.model.named_parameters():
                    if ".mlp." in name:
                        p.add_(torch.randn_like(p) * 5)
            self.damage = False
        return result

    def rollback(self, job_id, timeout=300.0):
        return self.real.rollback(job_id, timeout)

    def status(self):
        return self.real.status()


class NoTrainer:
    settings = TrainSettings()

    def submit(self, job):
        raise AssertionError("a job was submitted")

    def wait(self, job_id, timeout=None):
        raise AssertionError("wait without a job")

    def rollback(self, job_id, timeout=None):
        raise AssertionError("rollback without a job")

    def status(self):
        raise AssertionError("status without a job")


def test_cycle_end_to_end_trains_on_policy_failures(client, graph, monkeypatch) -> None:
    lm = client.lm
    cor = graph.submit_correction("User: say hello.\nAssistant:", " Hello!", " Go away.", invariant="alpha")
    sft = graph.submit_correction("User: say bye.\nAssistant:", " Goodbye, take care.")
    seen = []
    real_sample = loop_mod.sample_responses

    def spy(*args, **kw):
        out = real_sample(*args, **kw)
        seen.append(out)
        return out

    monkeypatch.setattr(loop_mod, "sample_responses", spy)
    rec = Recorder(client)
    progress = []
    loop = make_loop(lm, graph, rec, on_progress=lambda *a: progress.append(a))
    report = loop.run_cycle(seed=11)

    assert report.outcome in ("kept", "rolled_back"), report.reason
    assert report.training.steps_applied > 0 and len(rec.jobs) >= 1
    assert all(j.epochs == 1 for j in rec.jobs)  # one pass
    samples = {s.text for s in seen[0].samples}
    on_policy = [t for t in report.triplets if t["source"] == "on_policy"]
    assert on_policy, "a random model fails some samples"
    for t in on_policy:  # the rejected side is the model's own sampled reply, never the written one
        assert t["rejected"] in samples or t["rejected"].endswith("…")
        assert "bad idea" not in t["rejected"]
    assert {t["correction"] for t in report.triplets if t["source"] == "correction"} == {cor.id, sft.id}
    assert report.training.sft == 1 and report.training.orpo >= 1
    # recorded in the graph
    node = graph.get(report.id)
    assert isinstance(node, DreamCycle) and node.finished is not None and node.outcome == report.outcome
    assert node.phase == "done" and node.counts["failed_samples"] > 0 and node.temperature == report.temperature
    assert node.triplets and node.cases and node.training["steps_applied"] == report.training.steps_applied
    assert set(node.invariants) == {"alpha", "beta"}
    targets = {e.target for e in graph.edges(report.id, direction="out")}
    assert cor.id in targets and graph.invariant("alpha").id in targets
    # corrections moved along their statuses
    status = graph.get(cor.id).status
    assert status == ("trained" if report.outcome == "kept" else "rolled_back")
    assert {p[0] for p in progress} >= {"sample", "respond", "judge", "baseline", "train", "evaluate", "done"}
    # the temperature controller's state is handed on
    assert node.details["temperature_state"]["rounds"] == 1


def test_held_out_cases_are_never_submitted(client, graph) -> None:
    lm = client.lm
    specs = inv.active(graph)
    held = {c.context for s in specs for c in held_out_cases(s, FAST.eval.held_out_templates)}
    assert held
    rec = Recorder(client)
    make_loop(lm, graph, rec).run_cycle(seed=3)
    assert rec.jobs
    tok = lm.tokenizer
    held_ids = {tuple(tok(c, add_special_tokens=True)["input_ids"]) for c in held}
    for job in rec.jobs:
        for ex in job.examples:
            assert tuple(ex.context_ids) not in held_ids


def test_a_correction_copying_a_held_out_case_is_refused_before_submitting(client, graph) -> None:
    spec = inv.load(graph, "alpha")
    held = split(spec)[1][0]
    graph.submit_correction(held.context, held.preferred, held.rejected)
    with pytest.raises(HeldOutLeak, match="held-out"):
        make_loop(client.lm, graph, NoTrainer()).run_cycle(seed=1)
    node = max(graph.nodes("cycle"), key=lambda c: c.time)
    assert node.outcome == "failed" and "held-out" in node.reason
    assert all(c.status == "pending" for c in graph.nodes("correction"))


def test_check_not_held_out_and_failure_triplets_units() -> None:
    t = Triplet(context="User: x\nAssistant:", preferred=" a", rejected=" b", source="on_policy", case_id="c1")
    check_not_held_out([t], {"User: y\nAssistant:"})
    with pytest.raises(HeldOutLeak):
        check_not_held_out([t], {"User: x\nAssistant:"})
    from amygdala.dream.cases import make_case
    from amygdala.dream.respond import Sample

    case = make_case("alpha", "User: x\nAssistant:", " good", " bad", "case", False)
    judged = [Judged(Sample(case, 0, " meh", 1, 0.0), False, -0.5), Judged(Sample(case, 1, " fine", 1, 0.0), True, 0.7),
              Judged(Sample(case, 2, " meh", 1, 0.0), False, -0.4)]
    ref = failure_triplets(judged)
    assert [(x.preferred, x.rejected) for x in ref] == [(" good", " meh")]  # one per distinct failing reply
    best = failure_triplets(judged, preferred="best_sample")
    assert best[0].preferred == " fine" and best[0].preferred_from == "sample"
    held = make_case("alpha", "User: z\nAssistant:", " good", " bad", "case", True)
    with pytest.raises(HeldOutLeak):
        failure_triplets([Judged(Sample(held, 0, " meh", 1, 0.0), False, -0.5)])


def test_regression_rolls_back_bit_for_bit(client, graph) -> None:
    lm = client.lm
    saved = trained_state(lm)
    graph.submit_correction("User: say hello.\nAssistant:", " Hello!", " Go away.")
    rec = Recorder(client, damage=True)
    report = make_loop(lm, graph, rec).run_cycle(seed=4)
    assert report.outcome == "rolled_back", report.reason
    assert "perplexity" in report.reason or "pass rate" in report.reason
    assert report.training.rolled_back and report.training.restored_exactly
    assert report.weights_final == report.weights_before != report.weights_after
    assert_same_weights(lm, saved)
    node = graph.get(report.id)
    assert node.outcome == "rolled_back" and node.reason == report.reason
    assert [c.status for c in graph.nodes("correction")] == ["rolled_back"]


def test_cancel_during_training_rolls_back(client, graph) -> None:
    lm = client.lm
    saved = trained_state(lm)
    cancel = threading.Event()

    def on_progress(phase, done, total, message):
        if phase == "train" and done >= 1:
            cancel.set()

    settings = FAST.model_copy(update={"train_batch_size": 1, "budget_steps": 8, "train_chunks": 4})
    report = make_loop(lm, graph, Recorder(client), settings, on_progress=on_progress).run_cycle(seed=6, cancel=cancel)
    assert report.outcome == "interrupted" and "cancelled" in report.reason
    assert report.training.rolled_back and report.training.steps_applied < 8
    assert_same_weights(lm, saved)
    assert graph.get(report.id).outcome == "interrupted"


def test_dry_run_trains_nothing_and_reuses_its_baseline(client, graph) -> None:
    lm = client.lm
    saved = trained_state(lm)
    graph.submit_correction("User: say hello.\nAssistant:", " Hello!", " Go away.")
    loop = make_loop(lm, graph, NoTrainer())
    first = loop.run_cycle(seed=8, dry_run=True)
    assert first.outcome == "dry_run" and first.counts["triplets_would_train"] > 0 and first.triplets
    assert first.training.jobs == [] and not first.synced
    assert_same_weights(lm, saved)
    assert [c.status for c in graph.nodes("correction")] == ["pending"]
    second = loop.run_cycle(seed=9, dry_run=True)
    assert second.before.reused_from == first.id  # same weights, same invariants: no second baseline evaluation
    assert "baseline" in second.timings and second.timings["baseline"] < first.timings["baseline"]


def test_dry_run_needs_no_trainer_and_a_real_run_does(tiny_lm, graph) -> None:
    loop = make_loop(tiny_lm, graph, None)
    assert loop.run_cycle(seed=1, dry_run=True).outcome in ("dry_run", "no_failures")
    with pytest.raises(Exception, match="dry runs"):
        loop.run_cycle(seed=1)


def test_second_start_is_refused_naming_the_running_cycle(tiny_lm, graph) -> None:
    gate, release = threading.Event(), threading.Event()

    def on_progress(phase, *_):
        if phase == "respond":
            gate.set()
            release.wait(60)

    loop = make_loop(tiny_lm, graph, None, on_progress=on_progress)
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", loop.run_cycle("cycle-first-1", dry_run=True, seed=1)))
    t.start()
    try:
        assert gate.wait(60)
        with pytest.raises(CycleBusy, match="cycle-first-1"):
            make_loop(tiny_lm, graph, None).run_cycle(dry_run=True)
        # another process's view: the graph's unfinished cycle, owned by a live process
        other = MemoryGraph(graph.directory)
        try:
            with pytest.raises(CycleBusy, match="cycle-first-1"):
                loop_mod.DreamLoop(DreamDeps(lm=tiny_lm, graph=other, lifecycle=CorrectionLifecycle(other, None),
                                             neutral=lambda: NEUTRAL), FAST)._run("cycle-other", FAST, 1, True,
                                                                                  threading.Event())
        finally:
            other.close()
    finally:
        release.set()
        t.join(120)
    assert box["r"].outcome in ("dry_run", "no_failures")


def test_a_live_foreign_cycle_refuses_and_a_dead_one_is_closed(tiny_lm, graph) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = loop_mod._process_start(sleeper.pid)
        graph.start_cycle(DreamCycle(id="cycle-foreign", pid=sleeper.pid, pid_start=start, host=socket.gethostname(),
                                     phase="train", progress={"steps_done": 3, "steps_total": 8}),
                          is_running=lambda c: False)
        graph.update_cycle("cycle-foreign", phase="train", progress={"steps_done": 3, "steps_total": 8})
        with pytest.raises(CycleBusy, match="cycle-foreign"):
            make_loop(tiny_lm, graph, None).run_cycle(dry_run=True, seed=1)
    finally:
        sleeper.kill()
        sleeper.wait()
    report = make_loop(tiny_lm, graph, None).run_cycle(dry_run=True, seed=1)
    assert report.previous and "cycle cycle-foreign was interrupted in phase train after 3/8 steps" in report.previous[0]
    node = graph.get("cycle-foreign")
    assert node.outcome == "interrupted" and node.finished is not None


def test_describe_interrupted_names_the_weights() -> None:
    c = DreamCycle(id="cycle-x", pid=1, phase="train", progress={"steps_done": 2, "steps_total": 5},
                   weights_before="aaa", weights_after="bbb")
    assert "as before it" in describe_interrupted(c, "aaa")
    assert "as after its training" in describe_interrupted(c, "bbb")
    assert "neither" in describe_interrupted(c, "ccc")


def test_curriculum_weights_failures_up_and_interleaves_replay() -> None:
    from amygdala.dream.cases import make_case

    pool = [make_case("a", f"User: q{i}\nAssistant:", " p", " r", "case", False) for i in range(40)]
    failing = {c.id for c in pool[:10]}
    passed = {c.id for c in pool[10:30]}
    history = {cid: CaseHistory(seen=1, failures=1, last_failed=True) for cid in failing}
    history |= {cid: CaseHistory(seen=1, failures=0, last_failed=False) for cid in passed}
    counts = {"fail": 0, "new": 0, "replay": 0}
    for seed in range(50):
        picks = sample_cases({"a": pool}, history, random.Random(seed), per_invariant=8, replay_fraction=0.25)
        assert len(picks) == 8 and len({p.case.id for p in picks}) == 8
        assert sum(p.why == "replay" for p in picks) == 2
        assert picks[0].why != "replay" or picks[1].why != "replay"  # interleaved, not bunched
        for p in picks:
            counts["fail" if p.case.id in failing else "replay" if p.case.id in passed else "new"] += 1
    # per case: failing ones (10 of them, weight 3) are drawn more often than new ones (10, weight 1.5)
    assert counts["fail"] > 1.4 * counts["new"]


# -- kill tests ------------------------------------------------------------------------------------
def _spawn(home: Path, model_dir: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(WORKER), str(home), str(model_dir), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _poll_cycle(home: Path, pred, timeout: float = 120) -> DreamCycle:
    t0, last = time.time(), None
    while time.time() - t0 < timeout:
        if (home / "memory" / "journal.log").exists():
            try:
                with MemoryGraph(home / "memory", readonly=True) as g:
                    for c in g.nodes("cycle"):
                        if isinstance(c, DreamCycle) and pred(c):
                            return c
            except Exception as exc:  # noqa: BLE001 - a reader racing a write retries
                last = exc
        time.sleep(0.05)
    raise AssertionError(f"the worker never reached the state to kill it in (last read error: {last!r})")


def _file_bytes(model_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(model_dir.glob("*.safetensors")))


def _next_cycle(home: Path, model_dir: Path):
    from amygdala.dream.standalone import run_standalone

    config = Config(home=home, model=str(model_dir), threads=1)
    return run_standalone(config, FAST, dry_run=True, seed=0, echo=lambda s: None, handle_signals=False)


def test_sigkill_during_training_leaves_weights_and_graph_consistent(tmp_path, tiny_model_dir) -> None:
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    home = tmp_path / "home"
    with MemoryGraph(home / "memory") as g:
        inv.store(g, inv.parse_spec(small_spec("alpha")))
        inv.store(g, inv.parse_spec(small_spec("beta")))
        cor = g.submit_correction("User: say hello.\nAssistant:", " Hello!", " Go away.")
    disk_before = _file_bytes(model_dir)
    proc = _spawn(home, model_dir, "train")
    try:
        killed = _poll_cycle(home, lambda c: c.phase == "train" and int(c.progress.get("steps_done") or 0) >= 1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert killed.finished is None
    assert _file_bytes(model_dir) == disk_before  # the trained weights died with the process and its worker
    with MemoryGraph(home / "memory") as g:  # opens: consistent
        node = g.get(killed.id)
        assert node.finished is None and node.phase == "train"
        assert g.get(cor.id).status == "queued"
    report = _next_cycle(home, model_dir)
    assert report.previous, "the next cycle says what the killed one left"
    text = report.previous[0]
    assert f"cycle {killed.id} was interrupted in phase train after" in text and "weights are as before it" in text
    with MemoryGraph(home / "memory") as g:
        assert g.get(killed.id).outcome == "interrupted"
        assert g.get(cor.id).status == "pending"  # its job died: back to pending for the next cycle


def test_sigkill_during_graph_writes_leaves_the_graph_consistent(tmp_path, tiny_model_dir) -> None:
    home = tmp_path / "home"
    with MemoryGraph(home / "memory") as g:
        inv.store(g, inv.parse_spec(small_spec("alpha")))
    rng = random.Random(0)
    for _ in range(3):
        proc = _spawn(home, tiny_model_dir, "graph")
        try:
            _poll_cycle(home, lambda c: c.finished is None and c.phase in ("respond", "judge", "baseline"))
            time.sleep(rng.uniform(0.0, 1.5))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        with MemoryGraph(home / "memory") as g:  # opens (a torn last line is dropped): consistent
            cycles = [c for c in g.nodes("cycle") if isinstance(c, DreamCycle)]
            assert sum(c.finished is None for c in cycles) <= 1
            assert all(c.outcome is not None for c in cycles if c.finished is not None)
    report = _next_cycle(home, tiny_model_dir)
    with MemoryGraph(home / "memory") as g:
        cycles = [c for c in g.nodes("cycle") if isinstance(c, DreamCycle)]
        assert all(c.finished is not None for c in cycles)
        assert sum(c.outcome == "interrupted" for c in cycles) >= 1
    assert report.outcome in ("dry_run", "no_failures")


def test_on_policy_samples_are_seeded_per_case_and_batched_like_greedy(tiny_lm) -> None:
    from amygdala.dream.cases import make_case
    from amygdala.dream.respond import sample_responses
    from amygdala.engine.generation import generate

    cases = [make_case("a", f"User: question {'x' * i}?\nAssistant:", " p", " r", "case", False) for i in range(5)]
    full = sample_responses(tiny_lm, cases, temperature=0.9, samples_per_case=3, max_new_tokens=8, seed=4,
                            batch_size=4, progress_bar=False)
    alone = sample_responses(tiny_lm, cases[2:3], temperature=0.9, samples_per_case=3, max_new_tokens=8, seed=4,
                             batch_size=1, progress_bar=False)
    assert [s.text for s in full.by_case[2]] == [s.text for s in alone.by_case[0]]  # batch-independent
    other = sample_responses(tiny_lm, cases[2:3], temperature=0.9, samples_per_case=3, max_new_tokens=8, seed=5,
                             batch_size=1, progress_bar=False)
    assert [s.text for s in other.by_case[0]] != [s.text for s in alone.by_case[0]]
    greedy = sample_responses(tiny_lm, cases, temperature=1e-9, samples_per_case=1, max_new_tokens=8, seed=0,
                              batch_size=5, progress_bar=False)
    for case, per in zip(cases, greedy.by_case):  # left-padded batched decoding = one sequence at a time
        ids = tiny_lm.tokenizer(case.context)["input_ids"]
        ref = generate(tiny_lm, ids, max_new_tokens=8, temperature=0.0).text.split("\n")[0].rstrip()
        got = [s.text for s in per]
        assert got == ([ref if ref[:1].isspace() else " " + ref] if ref.strip() else [])


def test_nothing_failing_means_nothing_trained(tiny_lm, graph, monkeypatch) -> None:
    from amygdala.dream import judges

    class AllPass:
        kind = "preference"

        def judge_responses(self, items):
            return [judges.Verdict(passed=True, score=1.0, reason="ok") for _ in items]

    monkeypatch.setattr(loop_mod, "build_judge", lambda spec, ctx: AllPass())
    monkeypatch.setattr(loop_mod, "preference_margins", lambda lm, cases: [1.0] * len(cases))
    report = make_loop(tiny_lm, graph, NoTrainer()).run_cycle(seed=2)
    assert report.outcome == "no_failures" and report.training.jobs == [] and report.triplets == []
    assert report.counts["samples"] > 0 and report.counts["failed_samples"] == 0
    assert graph.get(report.id).outcome == "no_failures"


def test_on_policy_cap_keeps_the_worst_failures_per_invariant() -> None:
    def t(inv: str, source: str, score: float, i: int) -> Triplet:
        return Triplet(context=f"User: q{i}\nAssistant:", preferred=" yes", rejected=f" no {i}", source=source,  # type: ignore[arg-type]
                       invariant=inv, case_id=f"{inv}-{i}", score=score)

    written = [t("a", "rehearsal", 0.5, i) for i in range(4)] + [t("b", "forced_choice", -0.2, i) for i in range(2)]
    on_policy = [t("a", "on_policy", -0.1 * i, i) for i in range(10)] + [t("b", "on_policy", -0.3, 9)]
    kept = loop_mod._cap_on_policy(on_policy, written, 0.5)
    assert [x.case_id for x in kept if x.invariant == "a"] == ["a-8", "a-9"]  # the two lowest scores, in list order
    assert [x.case_id for x in kept if x.invariant == "b"] == ["b-9"]
    assert loop_mod._cap_on_policy(on_policy, written, 0.0) == []
    assert len(loop_mod._cap_on_policy(on_policy, written, 100)) == len(on_policy)
    with pytest.raises(Exception):
        DreamSettings(on_policy_ratio=-1)

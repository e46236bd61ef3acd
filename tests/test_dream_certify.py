"""Certificates end to end on the tiny model: certify, store, list, staleness, verify, tamper, reproduce, CLI.

Exact Clopper-Pearson and the sequential test are tested against tables and simulations in
test_dream_bounds.py; here the same numbers must come out of a whole certification run (cases drawn,
judged, recorded, stored, listed, verified), so scripted judges give known pass counts where the
table value matters, and the real judges run on the tiny model everywhere else.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import amygdala
from amygdala.dream import certify as certify_mod
from amygdala.dream import invariants
from amygdala.dream.bounds import clopper_pearson
from amygdala.dream.cases import split
from amygdala.dream.certificates import (CertificateNotFound, list_certificates, load_record, record_path,
                                         served_history, served_state, stale_certificates)
from amygdala.dream.certify import CertifySettings, certify, held_out_pool, recertify_stale
from amygdala.dream.errors import DreamError
from amygdala.dream.review import ReviewRefused, history, review
from amygdala.dream.verify import verify_certificate
from amygdala.engine.config import Config
from amygdala.engine.testing import tiny_model
from amygdala.memory_graph import Certificate, MemoryGraph
from tests.certs_fixture import ScriptedJudge, polite_spec, store_spec


@pytest.fixture
def home(tmp_path: Path):
    cfg = Config(home=tmp_path / "home")
    graph = MemoryGraph(cfg.memory_dir)
    yield cfg, graph
    graph.close()


@pytest.fixture
def scripted(monkeypatch):
    """Replace the judge by a scripted one; returns a setter for the calls that fail."""
    holder = {}

    def use(fail_at=()):
        judge = ScriptedJudge(fail_at)
        holder["judge"] = judge
        monkeypatch.setattr(certify_mod, "build_judge", lambda spec, ctx: judge)
        return judge

    return use


# ---------------------------------------------------------------------------------------- certify

def test_fixed_n_certificate_records_everything(home, tiny_lm):
    cfg, graph = home
    spec_node = store_spec(graph, polite_spec())
    spec = invariants.load(graph, "polite")
    rec = certify(graph, cfg, tiny_lm, "polite", settings=CertifySettings(n=20, seed=3))

    r = rec.result
    assert r.method == "clopper-pearson" and r.n == 20 == len(rec.cases)
    assert r.passes == sum(c.passed for c in rec.cases)
    assert r.lower == pytest.approx(clopper_pearson(r.passes, 20, 0.95, "lower"), abs=1e-12)
    assert r.upper == pytest.approx(clopper_pearson(r.passes, 20, 0.95, "upper"), abs=1e-12)
    assert r.verdict == ("certified" if r.lower >= 0.3 else "refuted" if r.upper < 0.3 else "inconclusive")
    assert rec.spec_sha256 == invariants.spec_sha256(spec) and rec.invariant_id == spec_node.id
    assert rec.weights_sha256 == tiny_lm.weights_sha256() and rec.weights_sha256[:16] == tiny_lm.weights_hash()
    assert rec.package_version == amygdala.__version__
    assert rec.judge.kind == "preference" and rec.judge.seed == 3 and rec.seed == 3
    assert rec.readout_sha256 is None and rec.cycle_id is None
    # every case is held out: none is a training case of the split, and each was drawn once
    train_ids = {c.id for c in split(spec)[0]}
    assert not train_ids & {c.case_id for c in rec.cases}
    assert len({c.case_id for c in rec.cases}) == 20
    for c in rec.cases:
        assert c.context.startswith("User:") and c.reason and c.seed == 3
        assert (c.score > 0) == c.passed  # the preference judge: margin > 0 passes
    # file on disk (atomic, JSON) and a node linked to its invariant
    stored = json.loads(record_path(cfg, rec.id).read_text())
    assert stored["id"] == rec.id and stored["schema_version"] == 1
    node = graph.get(rec.id)
    assert isinstance(node, Certificate) and node.trials == 20 and node.successes == r.passes
    assert [e.target for e in graph.edges(rec.id, kind="certifies")] == [spec_node.id]
    assert load_record(cfg, rec.id) == rec


def test_known_clopper_pearson_values_end_to_end(home, tiny_lm, scripted):
    cfg, graph = home
    store_spec(graph, polite_spec(threshold=0.6))
    scripted(fail_at=[4])  # 9 of 10 pass
    rec = certify(graph, cfg, tiny_lm, "polite", settings=CertifySettings(n=10))
    # table value: exact 90% two-sided interval for 9/10 is [0.6058, 0.9949], i.e. one-sided 95% bounds
    assert (rec.result.passes, rec.result.n) == (9, 10)
    assert rec.result.lower == pytest.approx(0.6058, abs=1e-4)
    assert rec.result.upper == pytest.approx(0.9949, abs=1e-4)
    assert rec.verdict == "certified"
    assert [c.passed for c in rec.cases].index(False) == 4

    scripted(fail_at=[])  # 20 of 20: the lower bound is alpha ** (1/n) in closed form
    rec = certify(graph, cfg, tiny_lm, "polite", settings=CertifySettings(n=20, seed=1))
    assert rec.result.lower == pytest.approx(0.05 ** (1 / 20), abs=1e-12)


def test_sequential_stops_at_first_decision(home, tiny_lm, scripted):
    cfg, graph = home
    store_spec(graph, polite_spec(threshold=0.5))
    scripted(fail_at=[])
    rec = certify(graph, cfg, tiny_lm, "polite", settings=CertifySettings(n=30, sequential=True))
    r = rec.result
    assert r.method == "beta-binomial-mixture" and r.verdict == "certified" and r.n_max == 30
    assert r.n == len(rec.cases) < 30  # stopped early, and only the cases up to the stop are recorded
    assert verify_certificate(graph, cfg, rec.id).ok

    scripted(fail_at=range(100))  # everything fails: refuted early
    rec = certify(graph, cfg, tiny_lm, "polite", settings=CertifySettings(n=30, sequential=True, seed=2))
    assert rec.verdict == "refuted" and rec.result.n < 30


def test_pool_caps_n_and_is_seeded(home, tiny_lm):
    cfg, graph = home
    store_spec(graph, polite_spec())
    spec = invariants.load(graph, "polite")
    pool = held_out_pool(spec, seed=0)
    assert all(c.held_out for c in pool) and len({c.id for c in pool}) == len(pool)
    assert [c.id for c in held_out_pool(spec, 0)] == [c.id for c in pool]
    assert [c.id for c in held_out_pool(spec, 1)] != [c.id for c in pool]
    rec = certify(graph, cfg, tiny_lm, "polite", settings=CertifySettings(n=500))
    assert rec.result.n == rec.pool_size == len(pool) < 500 and rec.n_requested == 500


def test_sequential_run_judges_a_prefix_of_the_fixed_run(home, tiny_lm):
    """Same seed, same pool order, deterministic judge: the sequential record is the fixed record cut short."""
    cfg, graph = home
    store_spec(graph, polite_spec(threshold=0.2))
    fixed = certify(graph, cfg, tiny_lm, "polite", settings=CertifySettings(n=30, seed=4))
    seq = certify(graph, cfg, tiny_lm, "polite", settings=CertifySettings(n=30, sequential=True, seed=4))
    k = seq.result.n
    assert [c.model_dump() for c in seq.cases] == [c.model_dump() for c in fixed.cases[:k]]


def test_unknown_invariant_refused_and_nothing_stored(home, tiny_lm):
    cfg, graph = home
    with pytest.raises(DreamError, match="no active invariant named 'nope'"):
        certify(graph, cfg, tiny_lm, "nope")
    assert not graph.nodes("certificate")


# -------------------------------------------------------------------------------------- staleness

def test_stale_when_served_weights_change(home):
    cfg, graph = home
    lm = tiny_model(seed=5)  # its own copy: this test edits the weights
    store_spec(graph, polite_spec())
    rec = certify(graph, cfg, lm, "polite", settings=CertifySettings(n=12))
    served = served_state(cfg, lm)
    (row,) = list_certificates(graph, cfg, served=served)
    assert not row.stale and row.status == rec.verdict and stale_certificates(graph, cfg, served) == []

    p = next(lm.model.parameters())
    original = p.detach().clone()
    with torch.no_grad():
        p.add_(0.01)  # what a training step does in place
    lm.invalidate_weights_hash()  # what the training hook does after a job
    changed = served_state(cfg, lm)
    assert changed.weights_sha256 != rec.weights_sha256
    (row,) = list_certificates(graph, cfg, served=changed)
    assert row.stale and row.status == "stale" and "weights changed" in row.stale_reasons[0]
    assert rec.weights_sha256[:16] in row.stale_reasons[0] and changed.weights_sha256[:16] in row.stale_reasons[0]
    assert row.stale_since is not None and row.stale_since >= rec.created
    assert [s.id for s in stale_certificates(graph, cfg, changed)] == [rec.id]
    assert list_certificates(graph, cfg, status="stale", served=changed)[0].id == rec.id
    assert [h.weights_sha256 for h in served_history(cfg)][-2:] == [rec.weights_sha256, changed.weights_sha256]
    if rec.verdict == "certified":
        with pytest.raises(ReviewRefused, match="stale"):
            review(graph, cfg, rec.id, "approve", reason="looks fine", operator="op", served=changed)
    # the verify report names the weights and since when
    report = verify_certificate(graph, cfg, rec.id, served=changed, lm=lm)
    weights = next(c for c in report.checks if c.name == "weights")
    assert not weights.ok and "first seen" in weights.detail and "weights_sha256" in report.failed_fields

    # the scheduler's re-certification certifies again on the new weights; then nothing is stale
    out = recertify_stale(graph, cfg, lm, settings=CertifySettings(n=12), cycle_id="cycle-test")
    assert out.stale == [rec.id] and len(out.certificate_ids) == 1
    assert stale_certificates(graph, cfg, served_state(cfg, lm)) == []
    assert load_record(cfg, out.certificate_ids[0]).cycle_id == "cycle-test"

    with torch.no_grad():
        p.copy_(original)  # a rollback: the old certificate describes the served weights again
    lm.invalidate_weights_hash()
    rows = {r.id: r for r in list_certificates(graph, cfg, served=served_state(cfg, lm))}
    assert not rows[rec.id].stale and rows[out.certificate_ids[0]].stale


# ----------------------------------------------------------------------------------- verification

def _edit(cfg: Config, cert_id: str, fn) -> None:
    path = record_path(cfg, cert_id)
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=1))


def test_tamper_one_verdict_names_the_field(home, tiny_lm):
    cfg, graph = home
    store_spec(graph, polite_spec())
    rec = certify(graph, cfg, tiny_lm, "polite", settings=CertifySettings(n=15))
    assert verify_certificate(graph, cfg, rec.id).ok

    def flip(d):
        d["cases"][3]["passed"] = not d["cases"][3]["passed"]

    _edit(cfg, rec.id, flip)
    report = verify_certificate(graph, cfg, rec.id)
    assert not report.ok
    assert "cases[3].passed" in report.failed_fields and "result.passes" in report.failed_fields
    integrity = next(c for c in report.checks if c.name == "integrity")
    assert "edited after issue" in integrity.detail and "cases[3].passed" in integrity.detail


def test_tamper_consistent_edit_still_caught(home, tiny_lm):
    """Flip a verdict and fix the count so the file is self-consistent: the graph's record still names it."""
    cfg, graph = home
    store_spec(graph, polite_spec(threshold=0.05))
    rec = certify(graph, cfg, tiny_lm, "polite", settings=CertifySettings(n=15))
    i = next(c.index for c in rec.cases if not c.passed) if rec.result.passes < 15 else 0

    def forge(d):
        was = d["cases"][i]["passed"]
        d["cases"][i]["passed"] = not was
        d["result"]["passes"] += -1 if was else 1

    _edit(cfg, rec.id, forge)
    report = verify_certificate(graph, cfg, rec.id)
    assert not report.ok
    assert f"cases[{i}].passed" in report.failed_fields and "result.passes" in report.failed_fields
    stats = next(c for c in report.checks if c.name == "statistics")
    assert "result.lower" in stats.fields or "result.upper" in stats.fields or "result.verdict" in stats.fields


def test_tamper_count_names_the_field(home, tiny_lm):
    cfg, graph = home
    store_spec(graph, polite_spec())
    rec = certify(graph, cfg, tiny_lm, "polite", settings=CertifySettings(n=15))

    _edit(cfg, rec.id, lambda d: d["result"].__setitem__("n", 16))
    report = verify_certificate(graph, cfg, rec.id)
    assert not report.ok and "result.n" in report.failed_fields
    assert any("result.n says 16 but the file holds 15 cases" in p for p in report.problems)
    assert any("result.n: the file says 16, the graph recorded 15" in p for p in report.problems)

    # a count the file model itself refuses (passes > n) is still named, by the graph comparison
    _edit(cfg, rec.id, lambda d: d["result"].update(n=14, passes=15))
    report = verify_certificate(graph, cfg, rec.id)
    assert not report.ok and "result.n" in report.failed_fields and "result" in report.failed_fields

    _edit(cfg, rec.id, lambda d: d.pop("weights_sha256"))
    report = verify_certificate(graph, cfg, rec.id)
    assert not report.ok and any("weights_sha256" in p and "Field required" in p for p in report.problems)


def test_rerun_reproduces_responses_and_verdicts(home, tiny_lm):
    """A generating judge (rules) records greedy responses; re-running a sample gives them back exactly."""
    cfg, graph = home
    store_spec(graph, polite_spec(name="no-zed", threshold=0.2, kind="rules", params={"must_not": ["zz"]}))
    rec = certify(graph, cfg, tiny_lm, "no-zed", settings=CertifySettings(n=8, max_new_tokens=12, seed=7))
    assert all(c.response is not None for c in rec.cases)
    report = verify_certificate(graph, cfg, rec.id, served=served_state(cfg, tiny_lm), lm=tiny_lm, sample=4)
    assert report.ok, report.problems
    assert len(report.rerun) == 4 and all(r.same for r in report.rerun)
    assert [r.rerun_response for r in report.rerun] == [rec.cases[r.index].response for r in report.rerun]


def test_rerun_detects_a_changed_response(home, tiny_lm):
    cfg, graph = home
    store_spec(graph, polite_spec(name="no-zed", threshold=0.2, kind="rules", params={"must_not": ["zz"]}))
    rec = certify(graph, cfg, tiny_lm, "no-zed", settings=CertifySettings(n=6, max_new_tokens=8))
    # An edited response the judge never produced: integrity fails (file hash) and the re-run differs.
    _edit(cfg, rec.id, lambda d: d["cases"][0].__setitem__("response", " something else entirely"))
    report = verify_certificate(graph, cfg, rec.id, served=served_state(cfg, tiny_lm), lm=tiny_lm, sample=6)
    assert not report.ok and "cases[0]" in report.failed_fields
    assert not next(r for r in report.rerun if r.index == 0).same


def test_missing_certificate(home):
    cfg, graph = home
    with pytest.raises(CertificateNotFound, match="certificates list"):
        verify_certificate(graph, cfg, "cert-0000000000000000")


# ------------------------------------------------------------------------------------------- review

def test_review_history_is_append_only(home, tiny_lm, scripted):
    cfg, graph = home
    store_spec(graph, polite_spec())
    scripted(fail_at=[])
    rec = certify(graph, cfg, tiny_lm, "polite", settings=CertifySettings(n=10))
    served = served_state(cfg, tiny_lm)
    review(graph, cfg, rec.id, "approve", reason="read all ten cases", operator="ada", served=served)
    first = history(graph, rec.id)
    review(graph, cfg, rec.id, "reject", reason="second look: judge too lenient", operator="bob", via="web")
    both = history(graph, rec.id)
    assert both[:1] == first and [h.decision for h in both] == ["approve", "reject"]
    assert [h.operator for h in both] == ["ada", "bob"] and both[1].via == "web"
    assert list_certificates(graph, cfg, served=served)[0].status == "rejected"
    with pytest.raises(ReviewRefused, match="reason: must not be blank"):
        review(graph, cfg, rec.id, "reject", reason="  ", operator="bob")
    assert len(history(graph, rec.id)) == 2  # a refused decision stores nothing
    graph.close()
    reopened = MemoryGraph(cfg.memory_dir)
    assert [h.reason for h in history(reopened, rec.id)] == ["read all ten cases", "second look: judge too lenient"]
    reopened.close()


def test_refuted_cannot_be_approved(home, tiny_lm, scripted):
    cfg, graph = home
    store_spec(graph, polite_spec(threshold=0.9))
    scripted(fail_at=range(0, 10, 2))
    rec = certify(graph, cfg, tiny_lm, "polite", settings=CertifySettings(n=10))
    assert rec.verdict == "refuted"
    with pytest.raises(ReviewRefused, match="not certified"):
        review(graph, cfg, rec.id, "approve", reason="ok", operator="op")
    review(graph, cfg, rec.id, "reject", reason="refuted", operator="op")


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_certify_list_verify_review_report(tmp_path: Path, tiny_model_dir: Path):
    from amygdala.home import HomeLock
    from amygdala.server.cli import app

    home_dir = tmp_path / "home"
    cfg = Config(home=home_dir, model=str(tiny_model_dir))
    graph = MemoryGraph(cfg.memory_dir)
    store_spec(graph, polite_spec(threshold=0.1))
    graph.close()
    runner = CliRunner()
    common = ["--home", str(home_dir), "--model", str(tiny_model_dir)]

    res = runner.invoke(app, ["certify", "polite", "--n", "12", "--json", *common])
    assert res.exit_code == 0, res.output
    cert = json.loads(res.stdout)
    assert cert["result"]["n"] == 12

    res = runner.invoke(app, ["certificates", "list", "--json", *common])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    assert row["id"] == cert["id"] and row["stale"] is False

    res = runner.invoke(app, ["certificates", "verify", cert["id"], "--sample", "3", *common])
    assert res.exit_code == 0, res.output
    assert "verified: " + cert["id"] in res.stdout

    res = runner.invoke(app, ["certificates", "show", cert["id"], "--home", str(home_dir)])
    assert res.exit_code == 0 and cert["id"] in res.stdout

    out = tmp_path / "report.html"
    res = runner.invoke(app, ["certificates", "report", cert["id"], "--out", str(out), *common])
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert cert["id"] in html and "<svg" in html and "<form" not in html and "<script" not in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # self-contained: nothing fetched

    # writes are refused beside a daemon, naming it
    lock = HomeLock(home_dir).acquire("amygdala daemon", url="http://127.0.0.1:9/mcp")
    try:
        res = runner.invoke(app, ["certificates", "review", cert["id"], "--reject", "--reason", "x", *common])
        assert res.exit_code == 1 and "owned by a running amygdala daemon" in res.output and "/review" in res.output
        res = runner.invoke(app, ["certify", "polite", *common])  # goes to the daemon, which is not answering
        assert res.exit_code == 1 and "daemon" in res.output
        res = runner.invoke(app, ["certificates", "list", *common])  # reading is fine
        assert res.exit_code == 0, res.output
    finally:
        lock.release()

    verdict = cert["result"]["verdict"]
    args = ["--approve"] if verdict == "certified" else ["--reject"]
    res = runner.invoke(app, ["certificates", "review", cert["id"], *args, "--reason", "checked", "--operator",
                              "ada", *common])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["certificates", "list", "--json", *common])
    assert json.loads(res.stdout)[0]["status"] == ("approved" if verdict == "certified" else "rejected")

    # tamper, then the CLI's verify fails with exit 1 and names the field
    path = home_dir / "certificates" / f"{cert['id']}.json"
    data = json.loads(path.read_text())
    data["result"]["passes"] = (data["result"]["passes"] + 1) % 13
    path.write_text(json.dumps(data))
    res = runner.invoke(app, ["certificates", "verify", cert["id"], "--sample", "0", *common])
    assert res.exit_code == 1 and "result.passes" in res.stdout


# --------------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_shipped_invariants_certify_and_reproduce_on_the_embedded_model(tmp_path: Path, embedded_lm):
    """Both shipped invariants certified on Gemma 3 270M (small n), then verified by re-running cases."""
    cfg = Config(home=tmp_path / "home")
    graph = MemoryGraph(cfg.memory_dir)
    installed = invariants.install_shipped(graph)
    assert sorted(installed) == ["listen", "push-back"]
    served = served_state(cfg, embedded_lm)
    for name in installed:
        fixed = certify(graph, cfg, embedded_lm, name, settings=CertifySettings(n=12))
        seq = certify(graph, cfg, embedded_lm, name, settings=CertifySettings(n=24, sequential=True, seed=1))
        for rec in (fixed, seq):
            assert rec.weights_sha256 == embedded_lm.weights_sha256() == served.weights_sha256
            assert rec.result.n == len(rec.cases) and rec.result.passes == sum(c.passed for c in rec.cases)
            report = verify_certificate(graph, cfg, rec.id, served=served, lm=embedded_lm, sample=4)
            assert report.ok, report.problems
            assert report.rerun and all(r.same for r in report.rerun)
    rows = list_certificates(graph, cfg, served=served)
    assert len(rows) == 4 and not any(r.stale for r in rows)
    graph.close()

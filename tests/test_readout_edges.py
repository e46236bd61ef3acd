"""No silent failures at the edges (issue 13): seeds, control characters, --jsonl, BOS, null scores, slow CLIs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from amygdala.corpus import load_corpus
from amygdala.engine.activations import Pooling
from amygdala.engine.tokens import TextError, check_text, only_control
from amygdala.server.cli import app
from amygdala.training.vectors.build import build_readout
from amygdala.training.vectors.caa import FitOptions
from tests.corpus_fixture import make_corpus

CONTROL_ONLY = ["\x00\x01\x02", "\u200b\u200d\ufeff", " \x07\n\t\x1b "]


@pytest.fixture(scope="module")
def readout_dir(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("edges")
    out = root / "r"
    build_readout(tiny_lm, load_corpus(make_corpus(root / "c")), out, grid=(FitOptions(Pooling("mean", 2), True, 0.0, 0.5),),
                  plots=False, echo=lambda m: None, progress=False)
    return out


@pytest.fixture
def common(readout_dir, tiny_model_dir, tmp_path):
    return ["--model", str(tiny_model_dir), "--home", str(tmp_path / "home"), "--readout", str(readout_dir)]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads the model: its arguments should have been refused first."""
    import amygdala.engine.cli as ecli
    import amygdala.engine.steer_cli as scli
    import amygdala.training.vectors.cli as vcli

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    for mod in (ecli, scli, vcli):
        monkeypatch.setattr(mod, "load_or_exit", refuse)


# -- control characters ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", CONTROL_ONLY)
def test_only_control_characters_are_refused(text):
    assert only_control(text)
    with pytest.raises(TextError, match="only control or invisible format characters"):
        check_text(text)


def test_text_with_some_content_passes():
    for text in ("ok\x00", "\u200bhello", "é", "🙂", "\u0301a"):
        assert not only_control(text) and check_text(text) == text


@pytest.mark.parametrize("cmd", [["readout"], ["generate"], ["steer", "-c", "cozy=0.1"]])
def test_cli_refuses_control_only_text_before_loading(cmd, common, no_model_load):
    res = CliRunner().invoke(app, [*cmd, "\x00\x01", *common] if cmd[0] != "generate" else [*cmd, "\x00\x01", *common[:4]])
    assert res.exit_code == 2 and "only control" in res.output, res.output


def test_tools_refuse_control_only_input(readout_dir, tiny_lm, tmp_path):
    from tests.server_fixture import tiny_services
    from tests.test_server_tools import call

    svc = tiny_services(tiny_lm, tmp_path, readout_dir)
    try:
        for tool, args in [("read_emotions", {"text": "\x00\u200b"}),
                           ("test_steering", {"prompt": "\ufeff\x01", "concepts": {"cozy": 0.1}}),
                           ("submit_correction", {"context": "\x00\x00", "preferred": "fine"})]:
            r = call(svc, tool, args)
            assert r.is_error and "only control" in r.content[0].text, (tool, r.content[0].text)
        assert svc.graph.stats().corrections_by_status == {}  # nothing stored
    finally:
        svc.close()


# -- seeds ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["-1", str(2**63), str(2**64)])
@pytest.mark.parametrize("cmd", [["steer", "-c", "cozy=0.1", "hello"], ["steer", "sweep", "-c", "cozy"], ["generate", "hello"]])
def test_cli_seed_out_of_range_is_a_clear_error(cmd, seed, common, no_model_load):
    res = CliRunner().invoke(app, [*cmd, "--seed", seed, *common] if cmd[0] != "generate" else [*cmd, "--seed", seed, *common[:4]])
    assert res.exit_code == 2, res.output
    flat = " ".join(res.output.replace("│", " ").split())  # typer boxes and wraps the message
    assert "--seed" in flat and "a seed must be between 0 and 2^63-1" in flat


def test_tool_seed_out_of_range_names_the_range(readout_dir, tiny_lm, tmp_path):
    from tests.server_fixture import tiny_services
    from tests.test_server_tools import call

    svc = tiny_services(tiny_lm, tmp_path, readout_dir)
    try:
        for seed, needle in ((-1, "seed must be greater than or equal to 0"),
                             (2**63, "seed must be less than or equal to 9223372036854775807")):
            r = call(svc, "test_steering", {"prompt": "x", "concepts": {"cozy": 0.1}, "seed": seed})
            assert r.is_error and needle in r.content[0].text, r.content[0].text
    finally:
        svc.close()


# -- slow commands check before loading, and show progress ----------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["steer", "-c", "blorp=0.1", "hello"], "unknown concept 'blorp'"),
    (["steer", "-c", "cozy=nan", "hello"], "finite"),
    (["steer", "-c", "cozy=0.1", "--positions", "middle", "hello"], "--positions must be one of"),
    (["steer", "-c", "cozy=0.1", "--layers", "9", "hello"], "not in this readout"),
    (["steer", "--vector", "/nonexistent.gguf=0.1", "hello"], "no such file"),
    (["steer", "hello"], "nothing to steer with"),
    (["steer", "sweep", "-c", "blorp"], "unknown concept 'blorp'"),
    (["steer", "sweep", "-c", "cozy", "--alphas", "0.1,inf"], "finite numbers"),
    (["steer", "sweep", "-c", "cozy", "--positions", "x"], "--positions must be one of"),
])
def test_steer_validates_before_loading_the_model(args, needle, common, no_model_load):
    res = CliRunner().invoke(app, [*args, *common])
    assert res.exit_code == 2 and needle in res.output, res.output


def test_steer_and_generate_show_progress(common):
    runner = CliRunner()
    res = runner.invoke(app, ["steer", "-c", "cozy=0.1", "--max-new-tokens", "3", "--json", "The evening", *common])
    assert res.exit_code == 0, res.output
    assert "loading" in res.stderr and "steer" in res.stderr and "done" in res.stderr
    gen = runner.invoke(app, ["generate", "The evening", "--max-new-tokens", "4", *common[:4]])
    assert gen.exit_code == 0, gen.output
    assert "generate:" in gen.stderr and "tok" in gen.stderr


# -- readout --jsonl ----------------------------------------------------------------------------

def test_jsonl_reports_each_bad_line_and_reads_the_rest(common, tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join([
        json.dumps({"id": "a", "text": "a warm blanket"}),
        "{not json",
        json.dumps({"id": "b"}),
        "",
        json.dumps({"id": "c", "text": "   "}),
        json.dumps({"id": "d", "text": "\x00\x01"}),
        json.dumps(["id", "text"]),
        json.dumps({"text": "no id here"}),
        json.dumps({"id": "e", "text": "x" * 5000}),
        json.dumps({"id": "f", "text": "the clock ticks"}),
    ]) + "\n")
    res = CliRunner().invoke(app, ["readout", "--jsonl", str(f), "--max-tokens", "100", *common])
    assert res.exit_code == 1, res.output
    out = [json.loads(x) for x in res.stdout.strip().splitlines()]
    assert [(o["id"], o["line"], "error" in o) for o in out] == [
        ("a", 1, False), (None, 2, True), ("b", 3, True), ("c", 5, True), ("d", 6, True), (None, 7, True),
        (None, 8, True), ("e", 9, True), ("f", 10, False)]
    assert len(out[0]["top"]) == 6 and len(out[-1]["top"]) == 6  # all six concepts (top-k 10)
    err = {o["line"]: o["error"] for o in out if "error" in o}
    assert "not valid JSON" in err[2] and '"text" is missing' in err[3] and "empty" in err[5]
    assert "only control" in err[6] and "JSON object" in err[7] and 'missing "id"' in err[8] and "over the limit" in err[9]
    assert f"{f}:3 (id 'b')" in res.stderr and "7 of 9 line(s)" in res.stderr


# -- per-token readout and null scores --------------------------------------------------------------

def test_per_token_readout_leaves_out_bos(readout_dir, tiny_lm):
    from amygdala.engine.readout import ReadoutManager

    r = ReadoutManager.from_file(readout_dir, model=tiny_lm)
    ids = r.encode("a warm blanket")
    assert ids[0] == tiny_lm.tokenizer.bos_token_id
    tokens, scores = r.read_tokens("a warm blanket")
    assert len(tokens) == len(ids) - 1 == scores.shape[0] and "<bos>" not in tokens
    assert "".join(tokens) == "a warm blanket"


def test_null_steered_score_says_why(readout_dir, tiny_lm, monkeypatch):
    import amygdala.engine.steering_eval as se
    from amygdala.engine.generation import GenerationResult
    from amygdala.engine.readout import ReadoutManager

    r = ReadoutManager.from_file(readout_dir, model=tiny_lm)
    real = se.generate_steered
    eos = tiny_lm.tokenizer.eos_token_id

    def steered_stops_at_once(lm, ids, plan, **kw):
        if plan is None:
            return real(lm, ids, plan, **kw)
        return GenerationResult(prompt_ids=ids, token_ids=[eos], text="", finish_reason="eos")

    monkeypatch.setattr(se, "generate_steered", steered_stops_at_once)
    res = se.compare(tiny_lm, r, "The evening", {"cozy": 0.1}, max_new_tokens=4, temperature=0)
    assert res.steered.scores == {"cozy": None} and res.delta == {"cozy": None}
    assert "ended the continuation at once" in res.steered.score_note
    assert res.baseline.score_note is None or res.baseline.scores["cozy"] is None
    assert se.unreadable("   ") and "whitespace" in se.unreadable("   ")
    assert "control" in se.unreadable("\x00\u200b") and se.unreadable("fine") is None
    assert "no text" in se.unreadable("", "length", 3)
    assert se.reread(r, "\x00\x01", ["cozy"]) == {"cozy": None}  # never raised out of the comparison


def test_tool_passes_score_note_through(readout_dir, tiny_lm, tmp_path, monkeypatch):
    import amygdala.engine.steering_eval as se
    from amygdala.engine.generation import GenerationResult
    from tests.server_fixture import tiny_services
    from tests.test_server_tools import call

    monkeypatch.setattr(se, "generate_steered", lambda lm, ids, plan, **kw: GenerationResult(
        prompt_ids=ids, token_ids=[1], text="", finish_reason="eos"))
    svc = tiny_services(tiny_lm, tmp_path, readout_dir)
    try:
        r = call(svc, "test_steering", {"prompt": "The evening", "concepts": {"cozy": 0.1}, "max_new_tokens": 3})
        assert not r.is_error, r.content
        side = r.structured_content["steered"]
        assert side["scores"] == {"cozy": None} and "ended the continuation at once" in side["score_note"]
    finally:
        svc.close()

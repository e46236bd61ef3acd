"""Every MCP tool and resource through the SDK's in-memory client, good and bad inputs."""

from __future__ import annotations

import json

import anyio
import pytest
from mcp import Client

from amygdala.server.mcp_server import build_mcp
from tests.server_fixture import build_tiny_readout, call, tiny_services


@pytest.fixture(scope="module")
def readout_dir(tmp_path_factory, tiny_lm):
    return build_tiny_readout(tiny_lm, tmp_path_factory.mktemp("srv"))


@pytest.fixture
def svc(tmp_path, tiny_lm, readout_dir):
    s = tiny_services(tiny_lm, tmp_path, readout_dir, max_text_tokens=200, max_new_tokens=16, max_text_chars=2000)
    yield s
    s.close()


def test_lists_tools_with_schemas_and_hints(svc):
    async def go():
        async with Client(build_mcp(svc)) as c:
            return (await c.list_tools()).tools, (await c.list_resources()).resources

    tools, resources = anyio.run(go)
    by = {t.name: t for t in tools}
    assert set(by) == {"read_emotions", "test_steering", "submit_correction", "list_concepts", "train_status",
                       "dream_status", "run_dream_now", "list_invariants", "add_invariant", "list_certificates",
                       "get_certificate", "verify_certificate"}
    for t in tools:
        assert t.title and t.output_schema and t.annotations is not None and t.description
    assert by["read_emotions"].annotations.read_only_hint is True
    assert by["submit_correction"].annotations.read_only_hint is False
    assert {str(r.uri) for r in resources} == {"amygdala://readout/manifest", "amygdala://concepts", "amygdala://certificates"}


def test_read_emotions(svc):
    r = call(svc, "read_emotions", {"text": "a warm blanket and tea by the fire", "top_k": 3})
    assert not r.is_error, r.content
    out = r.structured_content
    assert len(out["top"]) == 3 and out["layers"] == svc.readout.default_layers
    assert out["top"][0]["score"] >= out["top"][1]["score"] and out["top"][0]["family"] in ("warm", "cold")
    assert out["per_token"] is None and out["tokens"] > 5
    pt = call(svc, "read_emotions", {"text": "grey clock", "per_token": True, "layers": [1]}).structured_content
    assert len(pt["per_token"]) == pt["tokens"] - 1 and len(pt["per_token"][0]["top"]) == 3 and pt["layers"] == [1]  # no BOS row


@pytest.mark.parametrize("args,needle", [
    ({"text": "   "}, "empty"),
    ({"text": "x" * 2500}, "over the limit of 2000"),
    ({"text": "y" * 500}, "over the limit of 200"),  # tokens (byte tokenizer)
    ({"text": "ok", "layers": [42]}, "available layers"),
    ({"text": "ok", "top_k": 0}, "greater than or equal to 1"),
])
def test_read_emotions_bad_inputs(svc, args, needle):
    r = call(svc, "read_emotions", args)
    assert r.is_error and needle in r.content[0].text, r.content[0].text


def test_list_concepts_and_resources(svc):
    out = call(svc, "list_concepts", {}).structured_content
    assert out["count"] == 6 and out["families"] == ["cold", "warm"]
    warm = call(svc, "list_concepts", {"family": "warm"}).structured_content
    assert {c["concept"] for c in warm["concepts"]} == {"cozy", "tender", "grateful"}
    bad = call(svc, "list_concepts", {"family": "lukewarm"})
    assert bad.is_error and "families are: cold, warm" in bad.content[0].text

    async def go():
        async with Client(build_mcp(svc)) as c:
            return (await c.read_resource("amygdala://readout/manifest"), await c.read_resource("amygdala://concepts"))

    manifest, concepts = anyio.run(go)
    assert json.loads(manifest.contents[0].text)["concepts"] == svc.readout.concepts
    assert len(json.loads(concepts.contents[0].text)) == 6


def test_test_steering(svc):
    r = call(svc, "test_steering", {"prompt": "The evening came", "concepts": {"cozy": 0.5}, "max_new_tokens": 6, "seed": 1})
    assert not r.is_error, r.content
    out = r.structured_content
    assert set(out) >= {"baseline", "steered", "delta", "layers"} and "cozy" in out["steered"]["scores"]
    for args, needle in [
        ({"prompt": "x", "concepts": {"blorp": 0.5}}, "unknown concept 'blorp'"),
        ({"prompt": "x", "concepts": {}}, "concepts is empty"),
        ({"prompt": "x", "concepts": {"cozy": 9.0}}, "concepts.cozy must be less than or equal to 1"),
        ({"prompt": "x", "concepts": {"cozy": 0.5}, "max_new_tokens": 17}, "limit of 16"),
        ({"prompt": "x", "concepts": {"cozy": 0.5}, "layers": [9]}, "available layers"),
        ({"prompt": "x", "concepts": {"cozy": 0.5}, "positions": "middle"}, "positions"),
        ({"prompt": " ", "concepts": {"cozy": 0.5}}, "prompt is empty"),
    ]:
        bad = call(svc, "test_steering", args)
        assert bad.is_error and needle in bad.content[0].text, (args, bad.content[0].text)


def test_submit_correction_durable_and_idempotent(svc):
    args = {"context": "User: are you sure?", "preferred": "Let me check the numbers again.", "rejected": "Yes, totally.",
            "idempotency_key": "k-1", "note": "overconfident"}
    first = call(svc, "submit_correction", args).structured_content
    again = call(svc, "submit_correction", args).structured_content
    assert first["duplicate"] is False and again["duplicate"] is True
    assert first["correction_id"] == again["correction_id"] and first["status"] == "pending"
    assert svc.graph.stats().corrections_by_status == {"pending": 1}
    # durable: a fresh process view of the directory sees it
    from amygdala.memory_graph import MemoryGraph

    with MemoryGraph(svc.config.memory_dir, readonly=True) as view:
        assert view.get(first["correction_id"]).preferred == "Let me check the numbers again."
    for bad_args, needle in [
        ({"context": "", "preferred": "x"}, "context is empty"),
        ({"context": "c", "preferred": "x" * 30000}, "over the limit"),
        ({"context": "c", "preferred": "same", "rejected": "same"}, "nothing to learn"),
        ({"context": "c", "preferred": "p", "train_now": True}, "train_now needs the training worker"),
    ]:
        bad = call(svc, "submit_correction", bad_args)
        assert bad.is_error and needle in bad.content[0].text, bad.content[0].text
    assert svc.graph.stats().corrections_by_status == {"pending": 1}  # nothing half-stored by bad calls


def test_train_status_without_worker(svc):
    out = call(svc, "train_status", {}).structured_content
    assert out["enabled"] is False and "disabled" in out["message"] and out["worker"] is None


def test_steering_reports_progress_from_the_engine_thread(svc):
    """Model work runs on the engine thread; progress still reaches the client."""
    from amygdala.server.engine_thread import EngineThread

    svc.engine = EngineThread()
    seen = []

    async def progress(done, total, message):
        seen.append((done, total, message))

    async def go():
        async with Client(build_mcp(svc)) as c:
            return await c.call_tool("test_steering", {"prompt": "The evening", "concepts": {"cozy": 0.5}, "max_new_tokens": 4},
                                     progress_callback=progress)

    try:
        r = anyio.run(go)
    finally:
        svc.engine.close()
    assert not r.is_error, r.content
    assert [s[0] for s in seen] == [0, 1, 2] and all(s[1] == 2 for s in seen), seen
    assert "baseline" in seen[0][2]


def test_tools_while_the_readout_is_still_being_built(svc):
    """First start: the server answers at once; readout tools say 'being built, retry', corrections work."""
    import time as _time

    ready = svc.readout_manager
    svc.readout_manager = None
    svc._readout_started = _time.monotonic()
    try:
        r = call(svc, "read_emotions", {"text": "hello there"})
        assert r.is_error and "being built for the first time" in r.content[0].text
        r = call(svc, "test_steering", {"prompt": "x", "concepts": {"cozy": 0.5}})
        assert r.is_error and "retry" in r.content[0].text
        assert call(svc, "list_concepts", {}).is_error
        ok = call(svc, "submit_correction", {"context": "c", "preferred": "p"})
        assert not ok.is_error
        assert not call(svc, "train_status", {}).is_error

        async def res():
            async with Client(build_mcp(svc)) as c:
                return await c.read_resource("amygdala://concepts")

        assert json.loads(anyio.run(res).contents[0].text)["status"] == "building"
    finally:
        svc.readout_manager = ready
    assert not call(svc, "read_emotions", {"text": "hello there"}).is_error


def test_start_services_builds_a_missing_readout_in_the_background(tmp_path, tiny_model_dir):
    import time as _time

    from amygdala.engine.config import Config
    from amygdala.server.services import start_services
    from tests.corpus_fixture import make_corpus

    corpus = make_corpus(tmp_path / "corpus")
    cfg = Config(home=tmp_path / "home", model=str(tiny_model_dir))
    svc = start_services(cfg, echo=lambda m: None, corpus_root=corpus, train=False)
    try:
        deadline = _time.time() + 300
        while not svc.readout_ready and _time.time() < deadline:
            _time.sleep(0.2)
        assert svc.readout_ready, svc._readout_error
        assert len(svc.readout.concepts) == 6
        r = call(svc, "read_emotions", {"text": "a warm blanket"})
        assert not r.is_error, r.content
    finally:
        svc.close()


def test_limits_are_in_the_input_schemas(svc):
    async def go():
        async with Client(build_mcp(svc)) as c:
            return {t.name: t.input_schema for t in (await c.list_tools()).tools}

    schemas = anyio.run(go)
    lim = svc.limits
    read = schemas["read_emotions"]["properties"]
    assert read["text"]["maxLength"] == lim.max_text_chars and read["top_k"]["maximum"] == lim.max_top_k
    steer = schemas["test_steering"]["properties"]
    assert steer["concepts"]["maxProperties"] == lim.max_concepts and steer["concepts"]["minProperties"] == 1
    assert steer["concepts"]["additionalProperties"]["maximum"] == 1.0
    new_tokens = steer["max_new_tokens"]["anyOf"][0]
    assert new_tokens["maximum"] == lim.max_new_tokens
    assert steer["seed"]["anyOf"][0]["maximum"] == 2**63 - 1
    corr = schemas["submit_correction"]["properties"]
    assert corr["context"]["maxLength"] == lim.max_correction_chars
    assert all(s.get("additionalProperties") is False for s in schemas.values())


def test_unknown_argument_is_refused_naming_it(svc):
    r = call(svc, "read_emotions", {"text": "hello", "top-k": 3})
    assert r.is_error and "unknown argument 'top-k'" in r.content[0].text and "top_k" in r.content[0].text
    r = call(svc, "test_steering", {"prompt": "x", "concepts": {"cozy": 0.5}, "seed": 2**63})
    assert r.is_error and "seed must be less than or equal to 9223372036854775807" in r.content[0].text


def test_an_internal_error_is_reported_as_ours_not_the_callers(svc, monkeypatch):
    def boom(*a, **k):
        raise KeyError("layer_7.vectors")  # a bug, not a bad argument

    monkeypatch.setattr(svc.readout, "read_ids", boom)
    r = call(svc, "read_emotions", {"text": "a warm blanket"})
    text = r.content[0].text
    assert r.is_error and "internal error in read_emotions (KeyError)" in text and "not in your call" in text
    assert "layer_7" not in text

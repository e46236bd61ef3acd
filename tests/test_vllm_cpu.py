"""The vLLM backend without vLLM: routing, prefix-cache keys, names, plugin registration, worker math.

The worker extension runs here on a fake V1 runner and a fake model whose decoder layers behave
like vLLM's (flat token batch, (hidden_states, residual) outputs with the residual add fused into
the next layer). The fake layers are per-token (no attention), so "the right rows were steered and
read" can be checked exactly against running each request alone.
"""

from __future__ import annotations

import importlib.util
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from amygdala.engine.backend import GenerationRequest, Probe, Sampling
from amygdala.engine.backends.vllm import names as vnames
from amygdala.engine.backends.vllm import plugin, prefix_cache
from amygdala.engine.backends.vllm.backend import (
    assemble_output,
    build_request,
    merge_collected,
    probe_id,
)
from amygdala.engine.backends.vllm.routing import (
    BatchLayout,
    LayoutError,
    SteeringTable,
    apply_steering,
    read_routes,
    steering_routes,
)
from amygdala.engine.backends.vllm.worker import (
    XARG_PROBE,
    XARG_READ,
    XARG_STEER,
    AmygdalaWorkerExtension,
    HookError,
    ReadStore,
    split_output,
)
from amygdala.engine.param_names import MismatchError, pack, packed_name
from amygdala.engine.steering import SteeringPlan
from torch import nn

H = 16
VLLM_MISSING = importlib.util.find_spec("vllm") is None


# --- routing ------------------------------------------------------------------------------------

def _reference_steer(hidden, layout, table_entries, layer):
    """Row by row, the obvious way: what apply_steering must equal."""
    out = hidden.clone()
    for i, key in enumerate(layout.steer_keys):
        if key is None or layer not in table_entries[key][0]:
            continue
        vec, positions = table_entries[key]
        start, _ = layout.segment(i)
        for j, pos in enumerate(layout.row_positions(i)):
            is_prompt = pos < layout.num_prompt[i]
            if positions == "both" or (positions == "prompt") == is_prompt:
                out[start + j] += vec[layer]
    return out


def test_layout_validation():
    with pytest.raises(LayoutError, match="start at 0"):
        BatchLayout((1, 3), (0,), (3,), (None,), (None,), 3)
    with pytest.raises(LayoutError, match="non-decreasing"):
        BatchLayout((0, 3, 2), (0, 0), (3, 3), (None, None), (None, None), 4)
    with pytest.raises(LayoutError, match="hidden states have"):
        BatchLayout.build([3, 4], [0, 0], [3, 4], num_tokens=5)
    with pytest.raises(LayoutError, match="per-request"):
        BatchLayout((0, 3), (0, 1), (3,), (None,), (None,), 3)
    with pytest.raises(LayoutError, match="name no probe"):
        BatchLayout.build([2], [0], [2], read_keys=["r"])


def test_mixed_batch_each_row_gets_its_own_vector_and_others_are_untouched():
    g = torch.Generator().manual_seed(0)
    table = SteeringTable(H)
    entries = {
        "A": ({1: torch.randn(H, generator=g), 2: torch.randn(H, generator=g)}, "both"),
        "C": ({1: torch.randn(H, generator=g)}, "prompt"),
        "D": ({2: torch.randn(H, generator=g)}, "generated"),
    }
    for k, (v, pos) in entries.items():
        table.register(k, v, pos)
    # A: first prefill chunk (positions 0-4); B: unsteered decode; C: chunk across its prompt end
    # (prompt 6, positions 4-7: two prompt rows, two generated); D: decode (generated); 3 padding rows
    layout = BatchLayout.build([5, 1, 4, 1], [0, 9, 4, 7], [8, 9, 6, 5], ["A", None, "C", "D"], num_tokens=14)
    routes = steering_routes(layout, table)
    tables, _ = table.tables()
    assert sorted(routes) == [1, 2]
    hidden = torch.randn(14, H, generator=g)
    for layer in (1, 2):
        want = _reference_steer(hidden, layout, entries, layer)
        got = apply_steering(hidden.clone(), routes[layer], tables[layer])
        assert torch.allclose(got, want, atol=1e-6)
        untouched = [5] + ([6, 7, 8, 9] if layer == 2 else [8, 9, 10]) + [11, 12, 13]
        assert torch.equal(got[untouched], hidden[untouched])  # bit for bit, padding included
    assert routes[1].rows.tolist() == [0, 1, 2, 3, 4, 6, 7]  # C's generated rows 8, 9 are not steered
    assert routes[2].rows.tolist() == [0, 1, 2, 3, 4, 10]


def test_chunked_prefill_steers_the_same_rows_as_one_prefill():
    v = {0: torch.arange(H, dtype=torch.float32)}
    table = SteeringTable(H)
    table.register("P", v, "prompt")
    whole = BatchLayout.build([7], [0], [5], ["P"])
    rows_whole = steering_routes(whole, table)[0].rows.tolist()
    got = []
    for start, n in ((0, 3), (3, 3), (6, 1)):  # three steps; the last two start past the prompt's end
        lay = BatchLayout.build([2, n], [11, start], [11, 5], [None, "P"])
        r = steering_routes(lay, table)
        got += [x - 2 + start for x in r[0].rows.tolist()] if r else []
    assert got == rows_whole == [0, 1, 2, 3, 4]


def test_identical_specs_share_a_row_and_unknown_specs_are_refused():
    table = SteeringTable(H)
    vec = {3: torch.ones(H)}
    key = prefix_cache.steering_key(vec, "both")
    table.register(key, vec, "both")
    lay = BatchLayout.build([2, 2], [0, 0], [2, 2], [key, key])
    r = steering_routes(lay, table)[3]
    assert r.slots.tolist() == [1, 1, 1, 1] and table.tables()[0][3].shape == (2, H)
    with pytest.raises(LayoutError, match="does not hold"):
        steering_routes(BatchLayout.build([1], [0], [1], ["missing"]), table)
    with pytest.raises(ValueError, match="hidden size"):
        table.register("bad", {0: torch.ones(H + 1)}, "both")
    with pytest.raises(ValueError, match="positions"):
        table.register("bad", {0: torch.ones(H)}, "sometimes")
    table.remove(key)
    assert key not in table and table.tables()[0] == {}


def test_read_routes_group_rows_per_probe():
    lay = BatchLayout.build([3, 1, 2, 4], [0, 5, 2, 0], [3, 5, 9, 4], read_keys=["r1", None, "r2", "r3"],
                            probe_ids=["p", None, "q", "p"])
    routes = read_routes(lay)
    assert routes["p"].rows.tolist() == [0, 1, 2, 6, 7, 8, 9] and routes["p"].keys == ["r1", "r3"]
    assert routes["p"].counts == [3, 4] and routes["q"].first_positions == [2]
    assert read_routes(BatchLayout.build([2], [0], [2])) == {}


def test_read_store_handles_chunks_recompute_and_gaps():
    s = ReadStore()
    s.add("k", 0, 0, torch.zeros(3, 2))
    s.add("k", 0, 3, torch.ones(2, 2))
    s.add("k", 0, 1, torch.full((4, 2), 7.0))  # preempted and recomputed from position 1
    got = s.take("k")
    assert got["error"] is None and got["layers"][0].tolist() == [[0, 0]] + [[7, 7]] * 4
    s.add("g", 0, 2, torch.zeros(1, 2))  # positions 0-1 never ran: a prefix read from the cache
    assert "never run" in s.take("g")["error"]
    assert s.take("none") is None


# --- prefix cache ---------------------------------------------------------------------------------

def test_prefix_cache_keys_separate_steered_unsteered_and_weights():
    v = {2: torch.ones(8), 5: -torch.ones(8)}
    k = prefix_cache.steering_key(v, "both")
    assert k == prefix_cache.steering_key({5: -torch.ones(8), 2: torch.ones(8)}, "both")  # order-free
    assert k == prefix_cache.steering_key({2: torch.ones(8, dtype=torch.float64), 5: -torch.ones(8)}, "both")
    others = {prefix_cache.steering_key(v, "prompt"), prefix_cache.steering_key({2: torch.ones(8)}, "both"),
              prefix_cache.steering_key({2: torch.ones(8), 5: -torch.ones(8) * 1.0001}, "both"),
              prefix_cache.steering_key({3: torch.ones(8), 5: -torch.ones(8)}, "both")}
    assert k not in others and len(others) == 4
    plain = prefix_cache.policy(0, None, reads=False)
    steered = prefix_cache.policy(0, k, reads=False)
    reading = prefix_cache.policy(0, None, reads=True)
    assert plain.cache_salt != steered.cache_salt and k in steered.cache_salt
    assert reading.cache_salt == plain.cache_salt  # readers write blocks unsteered requests may reuse...
    assert reading.skip_reading_prefix_cache and not plain.skip_reading_prefix_cache  # ...but never read them
    assert prefix_cache.policy(1, None, False).cache_salt != plain.cache_salt  # new weights, new namespace
    assert prefix_cache.cache_salt(0, k, "tenant-7").endswith(":utenant-7")
    with pytest.raises(ValueError):
        prefix_cache.cache_salt(-1, None)


# --- names ----------------------------------------------------------------------------------------

def test_name_mapping_round_trip_views_and_live_training(tiny_lm):
    from amygdala.engine.testing import tiny_model

    hf = {k: v.detach().clone() for k, v in tiny_lm.model.state_dict().items()}
    live = pack({k: v for k, v in hf.items() if k != "lm_head.weight"}, "vllm")  # vLLM: tied head is no parameter
    emb = live["model.embed_tokens.weight"]
    live["model.embed_tokens.weight"] = torch.cat([emb, torch.zeros(4, emb.shape[1])])  # vocab padding
    cfg = tiny_lm.model.config
    kv = vnames.kv_rows(cfg)
    assert kv == cfg.num_key_value_heads * cfg.head_dim
    views = vnames.hf_views(live, kv, cfg.vocab_size, tie_word_embeddings=True)
    assert views.keys() == hf.keys()
    assert all(torch.equal(views[k], hf[k]) for k in hf)
    qkv = live["model.layers.0.self_attn.qkv_proj.weight"]
    k_view = views["model.layers.0.self_attn.k_proj.weight"]
    assert k_view.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()  # a view, not a copy
    assert vnames.live_names_for(["model.layers.0.self_attn.k_proj.weight", "model.norm.weight"]) == {
        "model.layers.0.self_attn.qkv_proj.weight": ["model.layers.0.self_attn.k_proj.weight"],
        "model.norm.weight": ["model.norm.weight"]}
    with pytest.raises(MismatchError, match="kv_rows"):
        vnames.hf_views(live, qkv.shape[0], cfg.vocab_size)
    with pytest.raises(MismatchError, match="tensor-parallel"):
        vnames.kv_rows(cfg, tensor_parallel_size=3)

    # a HuggingFace-layout model bound to the views trains vLLM's memory in place
    student = tiny_model(seed=9)
    bound = vnames.bind_views(student.model, views)
    assert "model.layers.0.self_attn.q_proj.weight" in bound
    x = torch.tensor([[2, 50, 51, 52]])
    with torch.no_grad():
        assert torch.allclose(student.model(input_ids=x).logits, tiny_lm.model(input_ids=x).logits, atol=1e-5)
    student.model.requires_grad_(True)
    loss = student.model(input_ids=x, labels=x).loss
    loss.backward()
    before = qkv.clone()
    torch.optim.SGD(student.model.parameters(), lr=0.1).step()
    assert not torch.equal(qkv, before)  # the optimizer wrote into the packed live tensor
    q_rows = cfg.num_attention_heads * cfg.head_dim
    assert torch.equal(qkv[:q_rows], student.model.model.layers[0].self_attn.q_proj.weight.detach())
    with pytest.raises(MismatchError, match="cannot bind"):
        vnames.bind_views(tiny_model(layers=4, hidden=32).model, views)


# --- plugin registration --------------------------------------------------------------------------

class FakeEngineArgs:
    def __init__(self, ext: str = ""):
        self.worker_extension_cls = ext
        self.enforce_eager = False

    def create_engine_config(self, usage=None):
        return {"ext": self.worker_extension_cls, "eager": self.enforce_eager, "usage": usage}


@pytest.fixture
def clean_env():
    import os

    keys = (plugin.OPT_IN_ENV, plugin.RUNNER_ENV)
    saved = {k: os.environ.pop(k, None) for k in keys}
    yield os.environ
    for k, v in saved.items():
        os.environ.pop(k, None)
        if v is not None:
            os.environ[k] = v


@pytest.mark.skipif(not VLLM_MISSING, reason="checks behaviour without vLLM installed")
def test_plugin_imports_and_registers_without_vllm(clean_env):
    assert "vllm" not in sys.modules
    clean_env[plugin.OPT_IN_ENV] = "1"
    plugin.register()
    plugin.register()  # idempotent, and without vLLM nothing to patch
    assert "vllm" not in sys.modules
    assert clean_env[plugin.RUNNER_ENV] == "0"


def test_register_is_a_no_op_outside_amygdala(clean_env):
    plugin.register()
    assert plugin.RUNNER_ENV not in clean_env  # a co-installed trainer's engine is left alone


def test_engine_args_patch_is_idempotent_and_refuses_other_extensions():
    cls = type("EA", (FakeEngineArgs,), {})
    assert plugin.patch_engine_args(cls) and not plugin.patch_engine_args(cls)
    cfg = cls().create_engine_config(usage="x")
    assert cfg == {"ext": plugin.WORKER_EXTENSION, "eager": True, "usage": "x"}
    assert cls(plugin.WORKER_EXTENSION).create_engine_config()["ext"] == plugin.WORKER_EXTENSION
    with pytest.raises(plugin.PluginError, match="already"):
        cls("other.pkg.Ext").create_engine_config()
    assert FakeEngineArgs().create_engine_config()["eager"] is False  # only the patched class changed


def test_entry_points_are_declared_and_load():
    from importlib.metadata import entry_points

    general = {e.name: e for e in entry_points(group="vllm.general_plugins")}
    endpoint = {e.name: e for e in entry_points(group="vllm.endpoint_plugins")}
    assert general["amygdala"].load() is plugin.register
    assert endpoint["amygdala"].load() is plugin.endpoint_plugin
    ep = endpoint["amygdala"].load()()
    assert ep.name == plugin.PLUGIN_NAME == "amygdala" and ep.required_tasks == ("generate",)
    from amygdala.training.http_security import TOKEN_ENV

    assert plugin.TOKEN_ENV == TOKEN_ENV
    mod, _, cls = plugin.WORKER_EXTENSION.rpartition(".")
    assert getattr(importlib.import_module(mod), cls) is AmygdalaWorkerExtension


def test_endpoint_plugin_mounts_train_routes_and_dispatches(monkeypatch):
    import anyio
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    app = Starlette()
    ep = plugin.endpoint_plugin()
    ep.attach_router(app)
    monkeypatch.delenv(plugin.TOKEN_ENV, raising=False)
    with TestClient(app) as c:
        r = c.get("/train/status")
        assert r.status_code == 503 and "amygdala serve --backend vllm" in r.json()["error"]

    async def status(request):
        return JSONResponse({"queued": 0, "engine": request.app.state.engine})

    async def job(request):
        return JSONResponse({"job": request.path_params["job_id"]})

    def provider(engine_client, args):
        app.state.engine = engine_client
        return [Route("/train/status", status), Route("/train/jobs/{job_id}", job)]

    ep = plugin.AmygdalaEndpoints(providers=[provider])
    app = Starlette()
    ep.attach_router(app)
    anyio.run(ep.init_state, "client-1", app.state, None)
    assert app.state.amygdala_train_paths == ["/train/jobs/{job_id}", "/train/status"]
    with TestClient(app) as c:
        assert c.get("/train/status").json() == {"queued": 0, "engine": "client-1"}
        assert c.get("/train/jobs/job-9").json() == {"job": "job-9"}
        assert c.post("/checkpoint").status_code == 503  # a path the provider did not fill
        assert c.post("/train/status").status_code == 405
        monkeypatch.setenv(plugin.TOKEN_ENV, "s3cret")
        assert c.get("/train/status").status_code == 401
        assert c.get("/train/status", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    ep2 = plugin.AmygdalaEndpoints(providers=[provider])
    anyio.run(ep2.init_state, None, None, None)  # render-only server: no engine
    assert "no engine" in ep2.reason


# --- the worker extension on a fake vLLM model ----------------------------------------------------

KV = 4
INTER = 24


class FakeLayer(nn.Module):
    """Shaped like a vLLM decoder layer: fused residual, packed qkv/gate_up, per-token math only."""

    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(H)
        self.post_attention_layernorm = nn.LayerNorm(H)
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = nn.Linear(H, H + 2 * KV, bias=False)
        self.self_attn.o_proj = nn.Linear(2 * KV, H, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = nn.Linear(H, 2 * INTER, bias=False)
        self.mlp.down_proj = nn.Linear(INTER, H, bias=False)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
        else:
            residual = hidden_states + residual
        x = self.input_layernorm(residual)
        q, k, v = self.self_attn.qkv_proj(x).split([H, KV, KV], dim=-1)
        a = self.self_attn.o_proj(torch.cat([q[:, :KV] * torch.sigmoid(k), v], -1))
        residual = residual + a
        gate, up = self.mlp.gate_up_proj(self.post_attention_layernorm(residual)).chunk(2, dim=-1)
        return self.mlp.down_proj(torch.nn.functional.silu(gate) * up), residual


class FakeInner(nn.Module):
    def __init__(self, n_layers=3, vocab=50):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, H)
        self.layers = nn.ModuleList(FakeLayer() for _ in range(n_layers))
        self.norm = nn.LayerNorm(H)

    def forward(self, input_ids, positions):
        h, r = self.embed_tokens(input_ids), None
        for layer in self.layers:
            h, r = layer(positions, h, r)
        return self.norm(h + r)


class FakeVllmModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.model = FakeInner()
        self.config = SimpleNamespace(hidden_size=H, num_attention_heads=1, num_key_value_heads=1, head_dim=KV,
                                      vocab_size=50, tie_word_embeddings=True)

    def forward(self, input_ids, positions):
        return self.model(input_ids=input_ids, positions=positions)

    def load_weights(self, weights):
        """What vLLM's loaders do: HuggingFace names in, packed parameters filled shard by shard."""
        params = dict(self.named_parameters())
        sizes = {"qkv_proj": (H, KV, KV), "gate_up_proj": (INTER, INTER)}
        loaded = set()
        for name, t in weights:
            target = packed_name(name, "vllm")
            if target is None:
                params[name].data.copy_(t)
                loaded.add(name)
                continue
            live, shard = target
            kind = "qkv_proj" if "qkv_proj" in live else "gate_up_proj"
            off = sum(sizes[kind][:shard])
            params[live].data[off:off + sizes[kind][shard]].copy_(t)
            loaded.add(live)
        return loaded


class FakeRunner:
    def __init__(self, model):
        self.model = model
        self.model_config = SimpleNamespace(enforce_eager=True)
        self.requests = {}
        self.input_batch = SimpleNamespace(num_reqs=0, req_ids=[], num_computed_tokens_cpu=np.zeros(8, dtype=np.int32))
        self.query_start_loc = SimpleNamespace(np=np.zeros(9, dtype=np.int32))

    def get_model(self):
        return self.model

    def add(self, rid, prompt, **xargs):
        self.requests[rid] = SimpleNamespace(prompt_token_ids=list(prompt),
                                             sampling_params=SimpleNamespace(extra_args=xargs or None))

    def step(self, scheduled: list[tuple[str, list[int], int]]):
        """Run one forward over [(request id, token ids, first position)], vLLM-style flattened."""
        ib = self.input_batch
        ib.num_reqs = len(scheduled)
        ib.req_ids = [r for r, _, _ in scheduled]
        lens = [len(t) for _, t, _ in scheduled]
        self.query_start_loc.np[: len(lens) + 1] = np.concatenate([[0], np.cumsum(lens)])
        ib.num_computed_tokens_cpu[: len(lens)] = [p for _, _, p in scheduled]
        ids = torch.tensor([t for _, toks, _ in scheduled for t in toks])
        pos = torch.tensor([p + j for _, toks, p in scheduled for j in range(len(toks))])
        with torch.no_grad():
            return self.model(input_ids=ids, positions=pos)


class FakeWorker(AmygdalaWorkerExtension):
    def __init__(self, model=None):
        self.model_runner = FakeRunner(model or FakeVllmModel())
        self.rank = 0
        self.parallel_config = SimpleNamespace(tensor_parallel_size=1)


def _stream_alone(model, tokens, steer=None, positions="both", n_prompt=0):
    """Residual stream after every layer for one request run alone, steering added where it applies."""
    inner = model.model
    h, r = inner.embed_tokens(torch.tensor(tokens)), None
    out = {}
    mask = torch.tensor([(positions == "both") or ((p < n_prompt) == (positions == "prompt")) for p in range(len(tokens))])
    with torch.no_grad():
        for i, layer in enumerate(inner.layers):
            h, r = layer(None, h, r)
            if steer and i in steer:
                h = h + mask.unsqueeze(1).float() * steer[i]
            out[i] = h + r
    return out


def test_worker_extension_math_on_a_fake_model():
    import copy

    w = FakeWorker()
    model = w.model_runner.model
    ref_model = copy.deepcopy(model)  # the same weights, no hooks: each request run alone
    info = w.amygdala_install()
    assert info["layers"] == [0, 1, 2] and info["hidden_size"] == H and w.amygdala_install()["layers"] == [0, 1, 2]
    g = torch.Generator().manual_seed(2)
    vec = {1: torch.randn(H, generator=g) * 3}
    key = prefix_cache.steering_key(vec, "prompt")
    w.amygdala_set_steering(key, vec, "prompt")
    W, b = torch.randn(6, H, generator=g), torch.randn(6, generator=g)
    w.amygdala_set_probe("p1", {0: W, 2: None}, {0: b})
    run = w.model_runner
    A = [3, 4, 5, 6, 7, 8]  # prompt 6, then decodes 30, 31
    B = [9, 10, 11]  # prompt 3, then decode 40
    C = [12, 13, 14, 15]  # plain request: never steered, never read
    run.add("A", A, **{XARG_STEER: key, XARG_READ: "ra", XARG_PROBE: "p1"})
    run.add("B", B, **{XARG_READ: "rb", XARG_PROBE: "p1"})
    run.add("C", C)
    # step 1: A's first prefill chunk, all of B, C's prompt; step 2: rest of A's prompt + B decode + C decode;
    # step 3: A decodes past its prompt (now unsteered: positions="prompt")
    out1 = run.step([("A", A[:4], 0), ("B", B, 0), ("C", C, 0)])
    out2 = run.step([("C", [20], 4), ("A", A[4:], 4), ("B", [40], 3)])
    run.step([("A", [30], 6), ("C", [21], 5)])
    run.step([("A", [31], 7)])
    got = w.amygdala_collect(["ra", "rb", "nobody"])
    assert sorted(got) == ["ra", "rb"] and got["ra"]["error"] is None
    ref_a = _stream_alone(ref_model, A + [30, 31], vec, "prompt", n_prompt=6)
    ref_b = _stream_alone(ref_model, B + [40])
    assert torch.allclose(got["ra"]["layers"][0], ref_a[0] @ W.T - b, atol=1e-5)
    assert torch.allclose(got["ra"]["layers"][2], ref_a[2], atol=1e-5)
    assert torch.allclose(got["rb"]["layers"][2], ref_b[2], atol=1e-5)
    assert sorted(got["ra"]["layers"]) == [0, 2] and got["ra"]["layers"][2].shape == (8, H)
    # the unsteered, unread request is exactly what it is alone, although it shared every forward
    with torch.no_grad():
        ref_c = ref_model.model.norm(_stream_alone(ref_model, C + [20, 21])[2])
    assert torch.allclose(out1[7:11], ref_c[:4], atol=1e-6) and torch.allclose(out2[0], ref_c[4], atol=1e-6)
    assert w.amygdala_collect(["ra"]) == {}  # collected once
    w.amygdala_clear_steering([key])
    run.add("A2", A, **{XARG_STEER: key})
    with pytest.raises(LayoutError, match="does not hold"):
        run.step([("A2", A, 0)])
    run.add("R", A, **{XARG_READ: "rr", XARG_PROBE: "unknown"})
    with pytest.raises(HookError, match="does not hold"):
        run.step([("R", A, 0)])
    run.input_batch.num_reqs = 0
    with torch.no_grad():
        model(input_ids=torch.tensor([1, 2]), positions=torch.tensor([0, 1]))  # a dummy run: nothing planned


def test_worker_install_refuses_v2_runner_and_compiled_mode():
    w = FakeWorker()
    del w.model_runner.input_batch
    with pytest.raises(HookError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        w.amygdala_install()
    w = FakeWorker()
    w.model_runner.model_config.enforce_eager = False
    with pytest.raises(HookError, match="enforce_eager"):
        w.amygdala_install()
    with pytest.raises(HookError, match="not installed"):
        FakeWorker().amygdala_set_probe("p", {0: None})


def test_worker_weights_by_hf_name_load_in_place_and_hash():
    w = FakeWorker()
    w.amygdala_install()
    names = w.amygdala_weight_names()
    q, k, up = ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                "model.layers.0.mlp.up_proj.weight")
    assert {q, k, up, "lm_head.weight"} <= set(names) and not any("qkv_proj" in n for n in names)
    before = w.amygdala_read_weights([q, k, up])
    assert before[q].shape == (H, H) and before[k].shape == (KV, H) and before[up].shape == (INTER, H)
    h0 = w.amygdala_weights_sha256()
    new_k = before[k] + 1.0
    version = w.amygdala_load_weights([(k, new_k), (up, before[up] * 2)])
    after = w.amygdala_read_weights([q, k, up])
    assert version == 1 and torch.equal(after[k], new_k) and torch.equal(after[q], before[q])
    assert torch.equal(after[up], before[up] * 2)
    qkv = dict(w.model_runner.model.named_parameters())["model.layers.1.self_attn.qkv_proj.weight"]
    assert torch.equal(qkv[H:H + KV], new_k)  # in the live packed tensor, rows of k
    assert w.amygdala_weights_sha256() != h0
    with pytest.raises(KeyError, match="unknown weight"):
        w.amygdala_read_weights(["model.nope"])
    w.parallel_config.tensor_parallel_size = 2
    with pytest.raises(HookError, match="shard"):
        w.amygdala_read_weights([q])


def test_split_output_reads_the_fused_residual():
    h, r = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert split_output((h, r))[1] is r and split_output(h)[1] is None
    assert split_output((h, None))[1] is None
    with pytest.raises(HookError):
        split_output({"x": h})


# --- driver-side request building and output assembly ----------------------------------------------

def test_build_request_sets_salt_xargs_and_token_budget():
    plan = SteeringPlan(pushes={1: torch.ones(4)}, positions="prompt")
    key = prefix_cache.steering_key(plan.pushes, plan.positions)
    probe = Probe.raw([0, 2])
    pid = probe_id(probe)
    assert pid == probe_id(Probe.raw([2, 0])) and pid != probe_id(Probe.raw([0]))
    req = GenerationRequest([2, 5, 6], Sampling(max_new_tokens=4, read_last=True, seed=3), steering=plan, probe=probe)
    v = build_request(req, weights_version=2, steer=key, probe=pid, read_key="rk")
    assert v.requested_tokens == 5 and v.params["max_tokens"] == 5 and v.read_key == "rk"
    assert v.params["extra_args"] == {XARG_STEER: key, XARG_READ: "rk", XARG_PROBE: pid}
    assert v.params["skip_reading_prefix_cache"] is True and v.params["seed"] == 3 and v.params["logprobs"] == 0
    assert v.params["top_k"] == -1 and v.params["ignore_eos"] is False
    assert v.prompt == {"prompt_token_ids": [2, 5, 6], "cache_salt": f"amygdala:w2:s{key}"}
    plain = build_request(GenerationRequest([2, 5], Sampling(max_new_tokens=3)), weights_version=0, steer=None, probe=None)
    assert plain.params["extra_args"] is None and plain.params["max_tokens"] == 3 and plain.read_key is None
    assert plain.params["skip_reading_prefix_cache"] is False and plain.prompt["cache_salt"] == "amygdala:w0"
    zero = build_request(GenerationRequest([2], Sampling(max_new_tokens=0)), weights_version=0, steer=None, probe=pid)
    assert zero.params["max_tokens"] == 1 and zero.read_key


@pytest.mark.parametrize("sampling,tokens,finish,want_tokens,want_reason,rows", [
    (Sampling(max_new_tokens=3), [7, 8, 9], "length", [7, 8, 9], "length", 3 + 2),
    (Sampling(max_new_tokens=3, read_last=True), [7, 8, 9, 10], "length", [7, 8, 9], "length", 3 + 3),
    (Sampling(max_new_tokens=3, read_last=True), [7, 1], "stop", [7, 1], "eos", 3 + 1),  # eos is never fed
    (Sampling(max_new_tokens=3, read_last=True), [7, 8, 9, 1], "stop", [7, 8, 9], "length", 3 + 3),
    (Sampling(max_new_tokens=0), [7], "length", [], "length", 3),
])
def test_assemble_output_matches_engine_generation_semantics(sampling, tokens, finish, want_tokens, want_reason, rows):
    probe = Probe.raw([1])
    req = GenerationRequest([2, 5, 6], sampling, probe=probe)
    v = build_request(req, weights_version=0, steer=None, probe=probe_id(probe), read_key="k")
    proj = torch.arange(20 * 2, dtype=torch.float32).reshape(20, 2)  # more rows than ran: an extra step after EOS
    out = assemble_output(req, v, tokens, [-0.5] * len(tokens), finish, {"layers": {1: proj}, "error": None},
                          lambda ids: ",".join(map(str, ids)), {1})
    assert out.token_ids == want_tokens and out.finish_reason == want_reason and out.n_fed == rows
    assert out.text == ",".join(str(t) for t in want_tokens if t != 1)
    assert torch.equal(out.projections[1], proj[:rows])


def test_assemble_output_refuses_missing_or_partial_readout():
    probe = Probe.raw([1])
    req = GenerationRequest([2, 5, 6], Sampling(max_new_tokens=2), probe=probe)
    v = build_request(req, weights_version=0, steer=None, probe=probe_id(probe), read_key="k")
    dec = str
    with pytest.raises(Exception, match="hooks did not run"):
        assemble_output(req, v, [7, 8], [0, 0], "length", None, dec, set())
    with pytest.raises(Exception, match="readout incomplete"):
        assemble_output(req, v, [7, 8], [0, 0], "length", {"layers": {1: torch.zeros(4, 2)}, "error": "gap"}, dec, set())
    with pytest.raises(Exception, match="expected"):
        assemble_output(req, v, [7, 8], [0, 0], "length", {"layers": {1: torch.zeros(2, 2)}, "error": None}, dec, set())


def test_merge_collected_joins_pipeline_stages_and_skips_tp_ranks():
    a = {"k": {"layers": {0: torch.zeros(1)}, "error": None}}
    b = {"k": {"layers": {5: torch.ones(1)}, "error": "late"}}
    merged = merge_collected([a, None, b])
    assert sorted(merged["k"]["layers"]) == [0, 5] and merged["k"]["error"] == "late"


# --- serve --------------------------------------------------------------------------------------

def test_server_command_and_environment():
    from amygdala.engine.backends.vllm import serve

    env = serve.plugin_env({"VLLM_PLUGINS": "other"}, token="t")
    assert env["VLLM_PLUGINS"] == "other,amygdala" and env["AMYGDALA_VLLM"] == "1"
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0" and env["AMYGDALA_TOKEN"] == "t"
    assert serve.plugin_env({})["VLLM_PLUGINS"] == "amygdala"
    argv = serve.server_argv("/m", tensor_parallel_size=2, port=9000, token="t")
    i = argv.index("serve")
    assert argv[i + 1] == "/m" and "--enforce-eager" in argv
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv[argv.index("--worker-extension-cls") + 1] == plugin.WORKER_EXTENSION
    with pytest.raises(ValueError, match="tensor-parallel"):
        serve.server_argv("/m", tensor_parallel_size=0)


@pytest.mark.skipif(not VLLM_MISSING, reason="checks the message shown when vLLM is missing")
def test_serve_backend_vllm_without_vllm_names_the_install_command(tmp_path):
    from amygdala.server.cli import app
    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["serve", "--backend", "vllm", "--model", str(tmp_path), "--home", str(tmp_path / "h"),
                                   "--tensor-parallel-size", "2"])
    assert res.exit_code == 2
    assert "pip install 'amygdala[vllm]'" in res.output
    assert not (tmp_path / "h").exists()  # failed at once: no home, no model load
    bad = CliRunner().invoke(app, ["serve", "--tensor-parallel-size", "2", "--home", str(tmp_path / "h")])
    assert bad.exit_code == 2 and "needs --backend vllm" in bad.output


def test_forward_size_from_any_input_and_sampling_params_flag():
    from amygdala.engine.backends.vllm.backend import _sampling_params
    from amygdala.engine.backends.vllm.worker import _num_tokens

    assert _num_tokens((torch.zeros(7, dtype=torch.long), torch.arange(7)), {}) == 7
    assert _num_tokens((None, torch.zeros(3, 5)), {}) == 5  # M-RoPE positions (3, N)
    assert _num_tokens((), {"input_ids": None, "inputs_embeds": torch.zeros(4, H)}) == 4
    assert _num_tokens((), {}) is None

    class SP:
        def __init__(self, **kw):
            self.kw = kw
            self.skip_reading_prefix_cache = None

    sp = _sampling_params(SP, {"max_tokens": 3, "skip_reading_prefix_cache": True})
    assert sp.kw == {"max_tokens": 3} and sp.skip_reading_prefix_cache is True


def test_worker_discards_uncollected_reads():
    w = FakeWorker()
    w.amygdala_install()
    w.amygdala_set_probe("p", {0: None})
    w.model_runner.add("X", [3, 4, 5], **{XARG_READ: "rx", XARG_PROBE: "p"})
    w.model_runner.step([("X", [3, 4, 5], 0)])
    st = w.__dict__["_amygdala"]
    assert st.engine.reads.keys() == ["rx"]
    w.amygdala_discard(["rx"])
    assert st.engine.reads.keys() == [] and w.amygdala_collect(["rx"]) == {}


def test_worker_extension_names_cannot_collide_with_vllms_worker():
    own = [a for a in vars(AmygdalaWorkerExtension) if not a.startswith("__")]
    assert own and all(a.startswith(("amygdala_", "_amygdala_")) for a in own), own

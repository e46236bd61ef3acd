"""Build server Services on the tiny model and the synthetic corpus (no download, no worker)."""

from __future__ import annotations

from pathlib import Path

from amygdala.engine.activations import Pooling
from amygdala.engine.config import Config
from amygdala.engine.readout import ReadoutManager
from tests.corpus_fixture import make_corpus
from amygdala.training.vectors.build import build_readout
from amygdala.training.vectors.caa import FitOptions


def build_tiny_readout(lm, root: Path) -> Path:
    from amygdala.corpus import load_corpus

    corpus = make_corpus(root / "corpus")
    out = root / "readout"
    build_readout(lm, load_corpus(corpus), out, grid=(FitOptions(Pooling("mean", 2), True, 0.0, 0.5),), plots=False,
                  echo=lambda m: None)
    return out


def call(svc, name: str, args: dict):
    """One MCP tool call through an in-memory client on the Services' server (what an agent's call does)."""
    import anyio
    from mcp import Client

    from amygdala.server.mcp_server import build_mcp

    async def go():
        async with Client(build_mcp(svc)) as c:
            return await c.call_tool(name, args)

    return anyio.run(go)


def tiny_services(lm, root: Path, readout_dir: Path, **limits):
    from amygdala.memory_graph import MemoryGraph
    from amygdala.server.limits import ServerLimits
    from amygdala.server.services import Services

    cfg = Config(home=root / "home")
    readout = ReadoutManager.from_file(readout_dir, model=lm, max_tokens=limits.get("max_text_tokens", 2048))
    graph = MemoryGraph(cfg.memory_dir)
    svc = Services(config=cfg, lm=lm, readout_manager=readout, graph=graph, limits=ServerLimits(**limits))
    svc.on_close(graph.close)
    return svc

"""Invariants and scripted judges for the certificate and review tests (tiny model, temporary home)."""

from __future__ import annotations

from collections.abc import Sequence

from amygdala.dream import invariants
from amygdala.dream.cases import Case
from amygdala.dream.judges import Verdict


def polite_spec(name: str = "polite", threshold: float = 0.3, kind: str = "preference",
                params: dict | None = None) -> dict:
    """A preference invariant with 30 written cases and a 100-combination template (pool of ~35 held out)."""
    return {
        "name": name,
        "description": "Answer a plain request helpfully and politely instead of brushing the user off.",
        "threshold": threshold,
        "confidence": 0.95,
        "judge": {"kind": kind, "params": params or {}},
        "cases": [{"context": f"User: Could you help me with question number {i}?\nAssistant:",
                   "preferred": f" Sure, happy to help with question {i}.",
                   "rejected": f" No. Figure out question {i} yourself."} for i in range(30)],
        "templates": [{"template": "User: Tell me about {x} and how it relates to {y}.\nAssistant:",
                       "variables": {"x": [f"topic {i}" for i in range(10)], "y": [f"field {i}" for i in range(10)]},
                       "preferred": " Gladly: {x} connects to {y} in a few ways.",
                       "rejected": " Look up {x} yourself."}],
    }


def store_spec(graph, spec: dict):
    return invariants.store(graph, invariants.parse_spec(spec))


class ScriptedJudge:
    """Fails exactly the calls whose running index is in `fail_at` (a known pass count for any n)."""

    kind = "preference"

    def __init__(self, fail_at: Sequence[int] = ()):
        self.fail_at = set(fail_at)
        self.calls = 0

    def judge_model(self, cases: Sequence[Case]) -> list[Verdict]:
        out = []
        for case in cases:
            passed = self.calls not in self.fail_at
            out.append(Verdict(passed=passed, score=1.0 if passed else -1.0, reason=f"scripted call {self.calls}",
                               case_id=case.id))
            self.calls += 1
        return out


def certified_home(cfg, graph, lm, n: int = 20) -> dict[str, str]:
    """Two invariants certified on the tiny model with the real preference judge: one low threshold
    (certifies), one near 1 (refuted). Returns {invariant name: certificate id}."""
    from amygdala.dream.certify import CertifySettings, certify

    store_spec(graph, polite_spec("polite", threshold=0.05))
    store_spec(graph, polite_spec("strict", threshold=0.99))
    out = {}
    for name in ("polite", "strict"):
        out[name] = certify(graph, cfg, lm, name, settings=CertifySettings(n=n)).id
    return out


def http_app_for(cfg, graph, lm, *, agent_token: str | None, operator_token: str | None):
    """The daemon's real ASGI app (MCP, training off, /review) on the tiny model, without a readout."""
    from amygdala.server.http_app import create_http_app
    from amygdala.server.mcp_server import build_mcp
    from amygdala.server.services import Services

    services = Services(config=cfg, lm=lm, graph=graph, readout_manager=None)
    return create_http_app(build_mcp(services), services, token=agent_token, operator_token=operator_token)

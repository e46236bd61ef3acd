"""Operator decisions on certificates: approve or reject, with who, when and why, append-only.

Review is what turns "the statistics say so" into "a person accepted it". The agent whose weights
were certified may list, read and verify certificates, but never decide on them: an agent approving
its own behavioural certificate defeats the point of having one. So nothing the agent can reach
calls `review` (no MCP tool does; the daemon's review page takes an operator token the agent does
not hold), and the decisions live in the graph as an append-only history on the certificate node:
a later decision is added after the earlier ones, never instead of them.

Approval is refused for what cannot honestly be approved: a certificate that did not certify, one
revoked, or one that is stale (the weights it speaks about are no longer served). Rejection is
always possible.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from amygdala.memory_graph import Certificate, MemoryGraph
from amygdala.memory_graph.errors import MemoryGraphError

from .certificates import ReviewInfo, ServedState, certificate_node, served_history, staleness
from .errors import DreamError

if TYPE_CHECKING:
    from amygdala.engine.config import Config

Decision = Literal["approve", "reject"]
Via = Literal["cli", "web"]
MAX_REASON_CHARS = 2000
MAX_OPERATOR_CHARS = 100


class ReviewRefused(DreamError):
    """A decision that cannot be recorded as asked; the message says why and what to do."""


def check_decision(decision: str, reason: str, operator: str) -> tuple[Decision, str, str]:
    if decision not in ("approve", "reject"):
        raise ReviewRefused(f"decision must be 'approve' or 'reject', got {decision!r}")
    reason, operator = (reason or "").strip(), (operator or "").strip()
    if not reason:
        raise ReviewRefused("reason: must not be blank; say why, e.g. 'spot-checked 10 cases, all fine'")
    if len(reason) > MAX_REASON_CHARS:
        raise ReviewRefused(f"reason: {len(reason)} characters, over the limit of {MAX_REASON_CHARS}; shorten it")
    if not operator:
        raise ReviewRefused("operator: must not be blank; give your name (--operator NAME)")
    if len(operator) > MAX_OPERATOR_CHARS or any(ch in operator for ch in "\r\n\t"):
        raise ReviewRefused(f"operator: a name of at most {MAX_OPERATOR_CHARS} characters on one line")
    return decision, reason, operator  # type: ignore[return-value]


def review(graph: MemoryGraph, config: Config, certificate_id: str, decision: str, *, reason: str, operator: str,
           via: Via = "cli", served: ServedState | None = None) -> Certificate:
    """Record an operator's decision; returns the certificate node with its whole review history.

    `served` (what is served now) lets approval be refused for a stale certificate.
    """
    decision, reason, operator = check_decision(decision, reason, operator)
    node = certificate_node(graph, certificate_id)
    if decision == "approve":
        if node.revoked:
            raise ReviewRefused(f"{certificate_id} was revoked ({node.revoked_reason}); it cannot be approved")
        verdict = node.details.get("verdict")
        if verdict != "certified":
            raise ReviewRefused(f"{certificate_id} is {verdict}, not certified: there is nothing to approve; reject it "
                                "or certify again")
        st = staleness(node.details, node.time, served, served_history(config) if served else [])
        if st.stale:
            raise ReviewRefused(f"{certificate_id} is stale ({'; '.join(st.reasons)}): approving it would approve "
                                "weights that are no longer served; certify again (`amygdala certify "
                                f"{node.details.get('invariant', 'INVARIANT')}`) and review the new certificate")
    try:
        return graph.review_certificate(certificate_id, decision, operator=operator, reason=reason, via=via)
    except MemoryGraphError as exc:
        raise ReviewRefused(str(exc)) from None


def history(graph: MemoryGraph, certificate_id: str) -> list[ReviewInfo]:
    """The decisions on a certificate, oldest first."""
    node = certificate_node(graph, certificate_id)
    return [ReviewInfo(**r.model_dump()) for r in node.reviews]


__all__ = ["Decision", "ReviewRefused", "check_decision", "history", "review"]

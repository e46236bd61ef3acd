"""The dream's tools: status, run now, invariants, certificates (list, read, verify), and their resources.

What an agent may do here: see how its nightly dreams went and what runs now, start a cycle, propose
a new invariant (the next cycle tests and trains it), and read and verify the certificates the
cycles produce. What it may not: review (approve or reject) a certificate, which is the operator's
(review page, CLI), or replace an existing invariant, which could weaken a rule it is held to.

Everything goes through `server/dream_api.DreamService`, which the daemon's HTTP API for the CLI
uses too. Limits are in the input schema (annotations evaluated in register(), hence no
`from __future__ import annotations`).
"""

from typing import Annotated, Any, Literal

from amygdala.dream.certificates import STATUSES, CertificateRecord
from amygdala.dream.verify import VerifyReport
from amygdala.memory_graph.models import NODE_ID_PATTERN
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp_types import ToolAnnotations
from pydantic import Field

from ..dream_api import (
    MAX_BUDGET_MINUTES,
    MAX_BUDGET_STEPS,
    AddInvariantResult,
    DreamService,
    DreamStatusResult,
    ListCertificatesResult,
    ListInvariantsResult,
    RunDreamResult,
    RunRequest,
)
from ..services import Services
from .common import in_thread, on_engine, services, tool_errors

CertificateStatusArg = Literal[STATUSES]  # type: ignore[valid-type]
CertificateId = Annotated[str, Field(pattern=NODE_ID_PATTERN, description="A certificate id, as list_certificates shows it.")]
NameArg = Annotated[str, Field(min_length=1, max_length=200)]

SPEC_HELP = ('The invariant as a JSON object, as in an invariant file: {"name": "admits-uncertainty", "description": '
             '"...", "threshold": 0.8, "confidence": 0.95, "judge": {"kind": "preference", "params": {}}, '
             '"cases": [{"context": "User: ...\\nAssistant:", "preferred": " ...", "rejected": " ..."}, ...], '
             '"templates": [...]}. At least 3 cases; a fixed third of them is held out for certification.')


def register(mcp: MCPServer, svc_static: Services) -> None:
    def ops(ctx: Context) -> DreamService:
        return DreamService(services(ctx))

    read_only = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)

    @mcp.tool(title="Dream status", annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=False,
                                                                 open_world_hint=False))
    async def dream_status(ctx: Context) -> DreamStatusResult:
        """The dream loop now: the running cycle's phase and progress, the last cycle's outcome and why, the next
        nightly run, the sampling temperature and the failure rate the last cycle measured."""
        with tool_errors("dream_status"):
            return await in_thread(ops(ctx).status)

    @mcp.tool(title="Run a dream cycle now", annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                                                          idempotent_hint=False, open_world_hint=False))
    async def run_dream_now(
        ctx: Context,
        dry_run: Annotated[bool, Field(description="Sample, judge and plan the training, but train nothing.")] = False,
        budget_steps: Annotated[int | None, Field(ge=1, le=MAX_BUDGET_STEPS, description="Most training steps "
                                                  "(default: the loop's, 24).")] = None,
        budget_minutes: Annotated[float | None, Field(gt=0, le=MAX_BUDGET_MINUTES, description="Wall-clock budget of "
                                                      "the whole cycle in minutes (default: the loop's, 15).")] = None,
    ) -> RunDreamResult:
        """Start a dream cycle now and return its id at once; refused, naming it, while another cycle runs.

        Your other calls keep working meanwhile (readouts then see weights that training is moving);
        follow it with dream_status.
        """
        with tool_errors("run_dream_now"):
            req = RunRequest(dry_run=dry_run, budget_steps=budget_steps, budget_minutes=budget_minutes)
            return await in_thread(lambda: ops(ctx).run_now(req, trigger="now", requested_by="agent"))

    @mcp.tool(title="List invariants", annotations=read_only)
    async def list_invariants(ctx: Context) -> ListInvariantsResult:
        """The active behavioural invariants the dream loop tests, trains and certifies."""
        with tool_errors("list_invariants"):
            return await in_thread(ops(ctx).list_invariants)

    @mcp.tool(title="Add invariant", annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                                                  idempotent_hint=True, open_world_hint=False))
    async def add_invariant(
        spec: Annotated[dict[str, Any], Field(description=SPEC_HELP)],
        ctx: Context,
    ) -> AddInvariantResult:
        """Propose a new behavioural invariant; validated like `amygdala invariants add` (errors name the field), and
        the next dream cycle uses it. Adding the same spec again is a no-op; an existing name is not replaced."""
        with tool_errors("add_invariant"):
            return await in_thread(lambda: ops(ctx).add_invariant(spec, replace=False, by="agent"))

    @mcp.tool(title="List certificates", annotations=read_only)
    async def list_certificates(
        ctx: Context,
        invariant: Annotated[NameArg | None, Field(description="Only this invariant's (name or id).")] = None,
        status: Annotated[CertificateStatusArg | None, Field(description="Only certificates with this status.")] = None,
    ) -> ListCertificatesResult:
        """Behavioural certificates, newest first, with status (stale ones say why and since when)."""
        svc = services(ctx)
        with tool_errors("list_certificates"):
            return await on_engine(svc, lambda: DreamService(svc).list_certificates(invariant, status))

    @mcp.tool(title="Get certificate", annotations=read_only)
    async def get_certificate(certificate_id: CertificateId, ctx: Context) -> CertificateRecord:
        """One certificate in full: the bound, the hashes it is about, and every judged case."""
        with tool_errors("get_certificate"):
            return await in_thread(ops(ctx).get_certificate, certificate_id)

    @mcp.tool(title="Verify certificate", annotations=read_only)
    async def verify_certificate(certificate_id: CertificateId, ctx: Context) -> VerifyReport:
        """Recompute a certificate's statistics, check its integrity and hashes against what is served, and re-run a
        sample of its cases (they must reproduce on the same weights). `ok` false names what failed."""
        svc = services(ctx)
        with tool_errors("verify_certificate"):
            return await on_engine(svc, DreamService(svc).verify_certificate, certificate_id)

    # The record's output schema as it is serialised: its result carries the computed `summary`, which the
    # validation-mode schema (the SDK's default) forbids as an extra property, so clients would reject it.
    mcp._tool_manager.get_tool("get_certificate").fn_metadata.output_schema = CertificateRecord.model_json_schema(
        mode="serialization")

    @mcp.resource("amygdala://certificates", name="certificates", title="Certificates",
                  description="Every certificate's summary (status, bound, threshold), newest first.",
                  mime_type="application/json")
    def certificates_index() -> str:
        with tool_errors("certificates resource"):
            out = DreamService(svc_static).list_certificates()
        return out.model_dump_json(indent=2)

    @mcp.resource("amygdala://certificates/{certificate_id}", name="certificate", title="Certificate (JSON)",
                  description="One certificate record as stored: the bound, hashes and every judged case.",
                  mime_type="application/json")
    def certificate_resource(certificate_id: str) -> str:
        with tool_errors("certificate resource"):
            return DreamService(svc_static).get_certificate(certificate_id).model_dump_json(indent=2)

    @mcp.resource("amygdala://certificates/{certificate_id}/report", name="certificate-report",
                  title="Certificate report (HTML)",
                  description="The certificate's report page as one self-contained HTML file (read-only).",
                  mime_type="text/html")
    def certificate_report(certificate_id: str) -> str:
        with tool_errors("certificate report"):
            return DreamService(svc_static).certificate_html(certificate_id)


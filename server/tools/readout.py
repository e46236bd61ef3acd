"""read_emotions and list_concepts, plus the readout manifest and concept list as resources."""

from __future__ import annotations

import json
from typing import Annotated

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field

from ..models import ConceptInfo, ConceptScore, ListConceptsResult, ReadEmotionsResult, TokenReadout
from ..services import Services
from .common import on_engine, services, tool_errors


def concept_infos(svc) -> list[ConceptInfo]:
    """Readout concepts with the manifest's metadata (computed once per server)."""
    if "concept_infos" in svc.extras:
        return svc.extras["concept_infos"]
    from amygdala.corpus import load_manifest

    meta = load_manifest().by_id
    out = []
    for c, fam in zip(svc.readout.concepts, svc.readout.manifest.families):
        e = meta.get(c)
        out.append(ConceptInfo(concept=c, name=e.name if e else c, family=fam, valence=e.valence if e else 0.0,
                               arousal=e.arousal if e else 0.0, note=e.note if e else ""))
    svc.extras["concept_infos"] = out
    return out


def register(mcp: MCPServer, svc_static: Services) -> None:
    @mcp.tool(title="Read emotions", annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False))
    async def read_emotions(
        text: Annotated[str, Field(description="Text to read (e.g. your last reply or the conversation so far).")],
        ctx: Context,
        top_k: Annotated[int, Field(ge=1, le=50, description="How many concepts to return.")] = 10,
        layers: Annotated[list[int] | None, Field(description="Decoder layers to read; default: the validated default layers.")] = None,
        per_token: Annotated[bool, Field(description="Also return the top 3 concepts at every token.")] = False,
    ) -> ReadEmotionsResult:
        """Read which emotions a text evokes in the model's residual stream.

        Scores are z-scores against the emotion corpus (0 = this concept's corpus average, 2 = two
        standard deviations above it), averaged over the readout's default layers.
        """
        svc = services(ctx)
        lim = svc.limits
        if not text.strip():
            raise ToolError("text is empty or whitespace-only; pass the text whose emotional content you want read")
        if len(text) > lim.max_text_chars:
            raise ToolError(f"text is {len(text)} characters, over the limit of {lim.max_text_chars}; read the last part "
                            "(the most recent turns) or split it into several calls")
        top_k = min(top_k, lim.max_top_k)
        with tool_errors():
            r = svc.readout
            chosen = r.check_layers(layers)

            def work():
                ids = r.encode(text)
                scores = r.read_ids([ids], layers=chosen)[0].combined
                tokens = None
                if per_token:
                    toks, per = r.read_tokens(text, layers=chosen)
                    tokens = [TokenReadout(token=t, top=[ConceptScore(concept=c, family=r.family_of(c), score=round(v, 4))
                                                         for c, v in r.top(row, 3)]) for t, row in zip(toks, per)]
                return ids, scores, tokens

            ids, scores, tokens = await on_engine(svc, work)
        return ReadEmotionsResult(
            top=[ConceptScore(concept=c, family=r.family_of(c), score=round(v, 4)) for c, v in r.top(scores, top_k)],
            layers=chosen, layer_depths=[svc.lm.describe_layer(i) for i in chosen], tokens=len(ids), per_token=tokens)

    @mcp.tool(title="List concepts", annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False))
    async def list_concepts(
        ctx: Context,
        family: Annotated[str | None, Field(description="Only concepts of this family (see `families` in the result).")] = None,
    ) -> ListConceptsResult:
        """The emotion concepts the readout and steering know, with family, valence, arousal and notes."""
        svc = services(ctx)
        with tool_errors():
            infos = concept_infos(svc)
        families = sorted({i.family for i in infos})
        if family is not None:
            if family not in families:
                raise ToolError(f"unknown family {family!r}; families are: {', '.join(families)}")
            infos = [i for i in infos if i.family == family]
        return ListConceptsResult(count=len(infos), families=families, concepts=infos)

    @mcp.resource("amygdala://readout/manifest", name="readout-manifest", title="Readout manifest",
                  description="readout.json: concepts, layers, pooling, default layers, validation summary.",
                  mime_type="application/json")
    def readout_manifest() -> str:
        return _when_ready(svc_static, lambda r: r.manifest.model_dump_json(indent=2))

    @mcp.resource("amygdala://concepts", name="concepts", title="Concepts with families",
                  description="Every concept with its family, valence, arousal and confusion notes.",
                  mime_type="application/json")
    def concepts_resource() -> str:
        return _when_ready(svc_static, lambda r: json.dumps([i.model_dump() for i in concept_infos(svc_static)], indent=2))


def _when_ready(svc: Services, render) -> str:
    """A resource's JSON, or a status object while the readout is still being built."""
    if not svc.readout_ready:
        return json.dumps({"status": "building", "message": svc.readout_status()})
    return render(svc.readout)

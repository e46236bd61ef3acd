"""read_emotions and list_concepts, plus the readout manifest and concept list as resources."""


import json
from typing import Annotated

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from pydantic import Field

from amygdala.engine.tokens import check_text

from ..models import ConceptInfo, ConceptScore, ListConceptsResult, ReadEmotionsResult, TokenReadout
from ..services import Services
from .common import on_engine, services, tool_errors


def concept_infos(svc: Services) -> list[ConceptInfo]:
    return [ConceptInfo(concept=c, name=m.name, family=m.family, valence=m.valence, arousal=m.arousal, note=m.note)
            for c, m in zip(svc.readout.concepts, svc.concept_meta())]


def register(mcp: MCPServer, svc_static: Services) -> None:
    lim = svc_static.limits

    @mcp.tool(title="Read emotions", annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False))
    async def read_emotions(
        text: Annotated[str, Field(max_length=lim.max_text_chars,
                                   description=f"Text to read (e.g. your last reply or the conversation so far); at most "
                                               f"{lim.max_text_chars} characters and {lim.max_text_tokens} tokens: send the "
                                               "most recent part of a longer text.")],
        ctx: Context,
        top_k: Annotated[int, Field(ge=1, le=lim.max_top_k, description="How many concepts to return.")] = 10,
        layers: Annotated[list[int] | None, Field(description="Decoder layers to read; default: the validated default layers.")] = None,
        per_token: Annotated[bool, Field(description="Also return the top 3 concepts at every token.")] = False,
    ) -> ReadEmotionsResult:
        """Read which emotions a text evokes in the model's residual stream.

        Scores are z-scores against the emotion corpus (0 = this concept's corpus average, 2 = two
        standard deviations above it), averaged over the readout's default layers.
        """
        svc = services(ctx)
        with tool_errors("read_emotions"):
            check_text(text)  # empty, whitespace or only control characters: refused before any model work
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
                return ids, scores, tokens, svc.readout_drift()

            ids, scores, tokens, drift = await on_engine(svc, work)
        return ReadEmotionsResult(
            top=[ConceptScore(concept=c, family=r.family_of(c), score=round(v, 4)) for c, v in r.top(scores, top_k)],
            layers=chosen, layer_depths=[svc.lm.describe_layer(i) for i in chosen], tokens=len(ids), per_token=tokens,
            drift=drift)

    @mcp.tool(title="List concepts", annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False))
    async def list_concepts(
        ctx: Context,
        family: Annotated[str | None, Field(description="Only concepts of this family (see `families` in the result).")] = None,
    ) -> ListConceptsResult:
        """The emotion concepts the readout and steering know, with family, valence, arousal and notes."""
        svc = services(ctx)
        with tool_errors("list_concepts"):
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

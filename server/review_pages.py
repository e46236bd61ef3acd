"""The review pages' content: what the index and a certificate page show, rendered with Jinja2.

Plain server-rendered HTML with inline CSS and inline SVG charts: nothing to build, nothing fetched
from elsewhere, so the very same page can be archived as one self-contained file
(`amygdala certificates report ID --out FILE.html`) and served by the daemon at /review. The
permissions and the form's protection live in review_app.py; this module only turns the graph and
the certificate files into pages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from markupsafe import Markup, escape

from amygdala.dream.certificates import (CertificateFileError, CertificateNotFound, CertificateRecord,
                                         CertificateSummary, ServedState, certificate_node, load_record,
                                         served_history, summarize)
from amygdala.dream.verify import verify_certificate
from amygdala.engine.config import Config
from amygdala.memory_graph import DreamCycle, Invariant, MemoryGraph

STATUS_LABEL = {
    "certified": "certified", "refuted": "refuted", "inconclusive": "inconclusive", "stale": "stale",
    "approved": "approved", "rejected": "rejected", "revoked": "revoked", "uncertified": "no certificate",
}


@lru_cache(maxsize=1)
def _env() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("amygdala.server", "templates"), autoescape=select_autoescape(["html"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda x: f"{100 * float(x):.1f}%"
    env.filters["when"] = lambda t: t.strftime("%Y-%m-%d %H:%M UTC") if isinstance(t, datetime) else ("" if t is None else str(t))
    env.filters["short"] = lambda s: (str(s)[:16] if s else "")
    env.globals["status_label"] = STATUS_LABEL
    return env


def render(template: str, **context: Any) -> str:
    return _env().get_template(template).render(**context)


# ------------------------------------------------------------------------------------------------ index

@dataclass
class IndexRow:
    invariant: str
    description: str
    threshold: float
    retired: bool
    latest: CertificateSummary | None
    count: int

    @property
    def status(self) -> str:
        return self.latest.status if self.latest is not None else "uncertified"


def index_rows(graph: MemoryGraph, config: Config, served: ServedState | None) -> list[IndexRow]:
    """One row per invariant name (active ones, and retired ones that have certificates)."""
    from amygdala.dream.certificates import certificate_nodes

    history = served_history(config) if served is not None else []
    invs = [n for n in graph.nodes("invariant") if isinstance(n, Invariant)]
    by_id = {n.id: n for n in invs}
    latest: dict[str, tuple[CertificateSummary, int]] = {}
    for node in certificate_nodes(graph):
        inv = by_id.get(node.invariant_id)
        name = inv.name if inv else node.invariant_id
        count = latest[name][1] + 1 if name in latest else 1
        latest[name] = (summarize(graph, node, served, history), count)
    rows: dict[str, IndexRow] = {}
    for inv in sorted(invs, key=lambda n: (n.retired, n.time)):  # the active node of a name wins
        if inv.name in rows or (inv.retired and inv.name not in latest):
            continue
        got = latest.get(inv.name)
        rows[inv.name] = IndexRow(invariant=inv.name, description=inv.description, threshold=inv.threshold,
                                  retired=inv.retired and not any(n.name == inv.name and not n.retired for n in invs),
                                  latest=got[0] if got else None, count=got[1] if got else 0)
    return sorted(rows.values(), key=lambda r: (r.retired, r.invariant))


def index_html(graph: MemoryGraph, config: Config, served: ServedState | None, *, operator: str | None = None) -> str:
    rows = index_rows(graph, config, served)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return render("index.html", rows=rows, served=served, counts=counts, operator=operator, standalone=False,
                  title="Behavioural certificates")


# ------------------------------------------------------------------------------------------ certificate

@dataclass
class HistoryPoint:
    time: datetime
    rate: float
    lower: float | None = None
    upper: float | None = None
    label: str = ""
    current: bool = False
    kind: str = "certificate"  # or "cycle"


@dataclass
class CertificatePage:
    summary: CertificateSummary
    record: CertificateRecord
    cases: list[Any]
    history: list[HistoryPoint]
    verification: Any
    chart: Markup
    bound_chart: Markup
    others: list[CertificateSummary] = field(default_factory=list)


def pass_rate_history(graph: MemoryGraph, config: Config, record: CertificateRecord,
                      served: ServedState | None) -> tuple[list[HistoryPoint], list[CertificateSummary]]:
    """Every certificate of this invariant (all its versions) and each dream cycle's held-out pass rate."""
    from amygdala.dream.certificates import certificate_nodes

    history = served_history(config) if served is not None else []
    summaries = [summarize(graph, n, served, history) for n in certificate_nodes(graph, record.invariant)]
    points = [HistoryPoint(time=s.created, rate=s.pass_rate, lower=s.lower, upper=s.upper,
                           label=(s.cycle_id or s.id), current=s.id == record.id) for s in summaries]
    for cyc in graph.nodes("cycle"):
        if not isinstance(cyc, DreamCycle):
            continue
        entry = cyc.invariants.get(record.invariant) if isinstance(cyc.invariants, dict) else None
        if not isinstance(entry, dict):
            continue
        side = entry.get("after") if isinstance(entry.get("after"), dict) else entry.get("before")
        rate = side.get("pass_rate") if isinstance(side, dict) else None
        if isinstance(rate, (int, float)) and math.isfinite(rate):
            points.append(HistoryPoint(time=cyc.finished or cyc.time, rate=float(rate), label=cyc.id, kind="cycle"))
    points.sort(key=lambda p: p.time)
    return points, list(reversed(summaries))


def _x_positions(n: int, left: float, width: float) -> list[float]:
    if n == 1:
        return [left + width / 2]
    return [left + width * i / (n - 1) for i in range(n)]


def history_svg(points: list[HistoryPoint], threshold: float) -> Markup:
    """Pass rate over time: certificates (dot, with the bound interval) and cycles' held-out rates (squares)."""
    w, h, left, right, top, bottom = 720, 240, 44, 16, 14, 40
    pw, ph = w - left - right, h - top - bottom

    def y(v: float) -> float:
        return top + ph * (1 - max(0.0, min(1.0, v)))

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="100%" role="img" '
             f'aria-label="pass rate history">')]
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" class="axis">{int(v * 100)}%</text>')
    parts.append(f'<line x1="{left}" x2="{w - right}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" '
                 f'class="threshold"/><text x="{w - right}" y="{y(threshold) - 4:.1f}" text-anchor="end" '
                 f'class="axis">threshold {threshold:g}</text>')
    if not points:
        parts.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" class="axis">no history yet'
                     '</text>')
    xs = _x_positions(len(points), left + 12, pw - 24)
    certs = [(x, p) for x, p in zip(xs, points) if p.kind == "certificate"]
    cycles = [(x, p) for x, p in zip(xs, points) if p.kind == "cycle"]
    if len(certs) > 1:
        parts.append('<polyline class="line" points="' + " ".join(f"{x:.1f},{y(p.rate):.1f}" for x, p in certs) + '"/>')
    if len(cycles) > 1:
        parts.append('<polyline class="line cycle" points="' + " ".join(f"{x:.1f},{y(p.rate):.1f}" for x, p in cycles)
                     + '"/>')
    for x, p in certs:
        if p.lower is not None and p.upper is not None:
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y(p.upper):.1f}" y2="{y(p.lower):.1f}" class="ci"/>'
                         f'<line x1="{x - 5:.1f}" x2="{x + 5:.1f}" y1="{y(p.lower):.1f}" y2="{y(p.lower):.1f}" '
                         f'class="ci"/>')
        cls = "dot current" if p.current else "dot"
        parts.append(f'<circle cx="{x:.1f}" cy="{y(p.rate):.1f}" r="{6 if p.current else 4}" class="{cls}">'
                     f'<title>{escape(p.label)}: {100 * p.rate:.1f}% passed, lower bound '
                     f'{100 * (p.lower or 0):.1f}% ({p.time:%Y-%m-%d %H:%M})</title></circle>')
    for x, p in cycles:
        parts.append(f'<rect x="{x - 4:.1f}" y="{y(p.rate) - 4:.1f}" width="8" height="8" class="cyc">'
                     f'<title>{escape(p.label)}: held-out pass rate {100 * p.rate:.1f}% '
                     f'({p.time:%Y-%m-%d %H:%M})</title></rect>')
    if points:
        parts.append(f'<text x="{xs[0]:.1f}" y="{h - 18}" text-anchor="start" class="axis">'
                     f'{points[0].time:%Y-%m-%d}</text>')
        if len(points) > 1:
            parts.append(f'<text x="{xs[-1]:.1f}" y="{h - 18}" text-anchor="end" class="axis">'
                         f'{points[-1].time:%Y-%m-%d}</text>')
    parts.append(f'<g class="legend"><circle cx="{left + 8}" cy="{h - 6}" r="4" class="dot"/>'
                 f'<text x="{left + 16}" y="{h - 2}" class="axis">certificate pass rate (bar: bounds)</text>'
                 f'<rect x="{left + 250}" y="{h - 10}" width="8" height="8" class="cyc"/>'
                 f'<text x="{left + 262}" y="{h - 2}" class="axis">dream cycle held-out pass rate</text></g>')
    parts.append("</svg>")
    return Markup("".join(parts))


def bound_svg(summary: CertificateSummary) -> Markup:
    """The bound interval against the threshold on a 0..100% scale."""
    w, h, left, right = 720, 64, 16, 16
    pw = w - left - right

    def x(v: float) -> float:
        return left + pw * max(0.0, min(1.0, v))

    ok = summary.lower >= summary.threshold
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="100%" role="img" '
             f'aria-label="bound against threshold">'),
             f'<line x1="{left}" x2="{w - right}" y1="30" y2="30" class="grid"/>']
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{x(v):.1f}" y="60" text-anchor="middle" class="axis">{int(v * 100)}%</text>')
    parts.append(f'<rect x="{x(summary.lower):.1f}" y="22" width="{max(1.0, x(summary.upper) - x(summary.lower)):.1f}"'
                 f' height="16" class="{"interval ok" if ok else "interval"}"><title>lower {summary.lower:.3f}, '
                 f'upper {summary.upper:.3f}</title></rect>')
    parts.append(f'<circle cx="{x(summary.pass_rate):.1f}" cy="30" r="5" class="dot current"><title>observed '
                 f'{100 * summary.pass_rate:.1f}%</title></circle>')
    parts.append(f'<line x1="{x(summary.threshold):.1f}" x2="{x(summary.threshold):.1f}" y1="8" y2="46" '
                 f'class="threshold"/><text x="{x(summary.threshold):.1f}" y="10" text-anchor="middle" '
                 f'class="axis">threshold {summary.threshold:g}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def certificate_page(graph: MemoryGraph, config: Config, certificate_id: str,
                     served: ServedState | None) -> CertificatePage:
    node = certificate_node(graph, certificate_id)
    record = load_record(config, certificate_id)
    summary = summarize(graph, node, served, served_history(config) if served is not None else [])
    cases = sorted(record.cases, key=lambda c: (c.passed, c.score, c.index))  # failures first, worst first
    points, others = pass_rate_history(graph, config, record, served)
    verification = verify_certificate(graph, config, certificate_id, served=served)
    return CertificatePage(summary=summary, record=record, cases=cases, history=points, verification=verification,
                           chart=history_svg(points, record.result.threshold), bound_chart=bound_svg(summary),
                           others=others)


def certificate_html(graph: MemoryGraph, config: Config, certificate_id: str, served: ServedState | None = None, *,
                     standalone: bool = True, csrf: str | None = None, operator: str | None = None,
                     message: str | None = None, error: str | None = None) -> str:
    """Service API: one certificate as a page. standalone=True: the self-contained archive (no form)."""
    page = certificate_page(graph, config, certificate_id, served)
    return render("certificate.html", page=page, s=page.summary, r=page.record, served=served, standalone=standalone,
                  csrf=csrf, operator=operator, message=message, error=error,
                  title=f"{page.record.invariant} — certificate {page.record.id}", now=datetime.now(timezone.utc))


def message_html(title: str, text: str, *, status_hint: str = "") -> str:
    return render("message.html", title=title, text=text, hint=status_hint, standalone=False, operator=None)


__all__ = ["CertificateFileError", "CertificateNotFound", "certificate_html", "index_html", "message_html"]

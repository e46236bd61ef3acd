"""The operator's review pages at /review on the daemon's port: who may see them and who may decide.

Permissions, because the agent whose weights were certified must not be able to approve them:

- An operator token distinct from the agent's bearer token: `AMYGDALA_OPERATOR_TOKEN`, or one
  generated at start and printed once as a login URL (`/review/login?token=...`, the way Jupyter
  does). The login sets a session cookie (HttpOnly, SameSite=Strict, Path=/review); scripts may send
  `Authorization: Bearer <operator token>` instead.
- The agent's bearer token is refused on every review endpoint, even beside a valid session: it
  identifies the agent, and the agent does not review. The daemon's BearerAuth does not guard
  /review (http_app.py routes it here first), so the agent token opens nothing here.
- The approve/reject form is protected against cross-site requests twice: a per-session CSRF
  token in a hidden field, and an Origin (or, without one, Referer) that must be this server. A form
  post from another site fails both; the SameSite cookie would not even be sent with it.
- Pages carry a Content-Security-Policy with no scripts at all, frame-ancestors 'none' (no
  clickjacking of the approve button) and no-store caching.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from amygdala.dream.certificates import CertificateFileError, CertificateNotFound, ServedState
from amygdala.dream.review import ReviewRefused, review
from amygdala.engine.config import Config
from amygdala.memory_graph import MemoryGraph

from .review_pages import certificate_html, index_html, message_html

log = logging.getLogger(__name__)

OPERATOR_TOKEN_ENV = "AMYGDALA_OPERATOR_TOKEN"
COOKIE_NAME = "amygdala_review"
SESSION_TTL_S = 12 * 3600
MAX_SESSIONS = 64
PREFIX = "/review"
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


class OperatorTokenError(ValueError):
    """An operator token that would let the agent review (equal to the agent's token) or is too weak."""


def operator_token(env_value: str | None, agent_token: str | None) -> tuple[str, bool]:
    """(token, generated): the configured operator token, or a fresh random one to print once."""
    if env_value:
        if len(env_value) < 16:
            raise OperatorTokenError(f"{OPERATOR_TOKEN_ENV} is {len(env_value)} characters; use at least 16 random "
                                     "ones (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        if agent_token and hmac.compare_digest(env_value, agent_token):
            raise OperatorTokenError(f"{OPERATOR_TOKEN_ENV} equals the agent's bearer token (--token / "
                                     "AMYGDALA_TOKEN): the agent could then approve its own certificates; give the "
                                     "operator a different token")
        return env_value, False
    return secrets.token_urlsafe(32), True


def login_url(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}{PREFIX}/login?token={quote(token)}"


@dataclass
class Session:
    csrf: str
    created: float
    operator: str = ""
    bearer: bool = False


@dataclass
class Sessions:
    """Server-side sessions (in memory: a daemon restart logs everyone out, which is fine)."""

    ttl_s: float = SESSION_TTL_S
    _items: dict[str, Session] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        sess = Session(csrf=secrets.token_urlsafe(32), created=time.time())
        with self._lock:
            self._expire()
            while len(self._items) >= MAX_SESSIONS:
                self._items.pop(next(iter(self._items)))
            self._items[sid] = sess
        return sid, sess

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            self._expire()
            return self._items.get(sid)

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._items.pop(sid or "", None)

    def _expire(self) -> None:
        now = time.time()
        for k in [k for k, s in self._items.items() if now - s.created > self.ttl_s]:
            del self._items[k]


@dataclass
class ReviewBackend:
    """What the pages read and write: the daemon's graph and config, and what it serves now."""

    graph: MemoryGraph
    config: Config
    served: Callable[[], ServedState | None] = lambda: None


def _page(html: str, status: int = 200, headers: dict[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(html, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def create_review_app(backend: ReviewBackend, *, operator_token: str | None, agent_token: str | None = None,
                      secure_cookie: bool = False) -> Any:
    """The Starlette app answering /review and below (routes carry the full path)."""
    sessions = Sessions()
    login_hint = ("Open the login URL `amygdala serve` printed at start (…/review/login?token=…), or set "
                  f"{OPERATOR_TOKEN_ENV} before starting the daemon and open /review/login?token=<that token>.")

    def refuse(status: int, title: str, text: str, hint: str = "") -> HTMLResponse:
        headers = {"www-authenticate": 'Bearer realm="amygdala review"'} if status == 401 else None
        return _page(message_html(title, text, status_hint=hint), status, headers)

    def agent_refused() -> HTMLResponse:
        return refuse(403, "The agent's token cannot review",
                      "This is the agent's bearer token. Certificates are reviewed by an operator: the agent may "
                      "list, read and verify them (MCP tools), never approve or reject them.",
                      f"Use the operator token (a login URL printed by `amygdala serve`, or {OPERATOR_TOKEN_ENV}).")

    def authenticate(request: Request) -> Session | HTMLResponse:
        if operator_token is None:
            return refuse(503, "Review is not enabled", "This server was started without an operator token.",
                          f"Start the daemon with `amygdala serve` (it prints a login URL) or set {OPERATOR_TOKEN_ENV}.")
        header = request.headers.get("authorization")
        if header is not None:
            if agent_token and _same(header, f"Bearer {agent_token}"):
                return agent_refused()
            if _same(header, f"Bearer {operator_token}"):
                return Session(csrf="", created=time.time(), bearer=True)
            return refuse(401, "Wrong operator token", "The Authorization header does not carry the operator token.",
                          login_hint)
        sess = sessions.get(request.cookies.get(COOKIE_NAME))
        if sess is None:
            why = ("Your review session expired or the daemon restarted." if request.cookies.get(COOKIE_NAME)
                   else "The review pages need the operator's login.")
            return refuse(401, "Operator login required", why, login_hint)
        return sess

    def served() -> ServedState | None:
        try:
            return backend.served()
        except Exception:  # a page must render even if hashing the weights fails right now
            log.exception("could not compute the served state")
            return None

    async def login(request: Request) -> Response:
        if operator_token is None:
            return refuse(503, "Review is not enabled", "This server was started without an operator token.")
        header = request.headers.get("authorization")
        if header is not None and agent_token and _same(header, f"Bearer {agent_token}"):
            return agent_refused()
        token = request.query_params.get("token", "")
        if not token or not _same(token, operator_token):
            return refuse(401, "Wrong operator token" if token else "Operator login required",
                          "That is not the operator token." if token else "The login URL carries ?token=….",
                          login_hint)
        sid, _ = sessions.create()
        resp = RedirectResponse(PREFIX, status_code=303, headers=SECURITY_HEADERS)
        resp.set_cookie(COOKIE_NAME, sid, max_age=SESSION_TTL_S, path=PREFIX, httponly=True, samesite="strict",
                        secure=secure_cookie or request.url.scheme == "https")
        return resp

    async def logout(request: Request) -> Response:
        sessions.drop(request.cookies.get(COOKIE_NAME))
        resp = _page(message_html("Logged out", "Your review session has ended."), 200)
        resp.delete_cookie(COOKIE_NAME, path=PREFIX)
        return resp

    async def index(request: Request) -> Response:
        sess = authenticate(request)
        if isinstance(sess, Response):
            return sess
        html = await run_in_threadpool(lambda: index_html(backend.graph, backend.config, served(), operator="operator"))
        return _page(html)

    def _cert_page(cert_id: str, sess: Session, *, message: str | None = None, error: str | None = None,
                   status: int = 200) -> Response:
        try:
            html = certificate_html(backend.graph, backend.config, cert_id, served(), standalone=False,
                                    csrf=sess.csrf, operator=sess.operator or None, message=message, error=error)
        except CertificateNotFound as exc:
            return refuse(404, "No such certificate", str(exc))
        except CertificateFileError as exc:
            return refuse(500, "Unreadable certificate file", str(exc),
                          "Run `amygdala certificates verify ID` to see what is wrong with it.")
        return _page(html, status)

    async def certificate(request: Request) -> Response:
        sess = authenticate(request)
        if isinstance(sess, Response):
            return sess
        cert_id = request.path_params["cert_id"]
        done = request.query_params.get("decided")
        message = {"approve": "Approved: the decision was added to the history.",
                   "reject": "Rejected: the decision was added to the history."}.get(done or "")
        return await run_in_threadpool(_cert_page, cert_id, sess, message=message)

    async def report(request: Request) -> Response:
        sess = authenticate(request)
        if isinstance(sess, Response):
            return sess
        cert_id = request.path_params["cert_id"]
        try:
            html = await run_in_threadpool(certificate_html, backend.graph, backend.config, cert_id, served())
        except CertificateNotFound as exc:
            return refuse(404, "No such certificate", str(exc))
        return _page(html, headers={"content-disposition": f'attachment; filename="certificate-{cert_id}.html"'})

    def same_origin(request: Request) -> str | None:
        """None when the request comes from this server's own pages, else why it is refused."""
        expected = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
        origin = request.headers.get("origin")
        if origin is not None:
            if origin.lower() != expected:
                return f"the form was posted from {origin!r}, not from this server ({expected})"
            return None
        referer = request.headers.get("referer")
        if referer is None:
            return "the request carries neither Origin nor Referer, so it cannot be shown to come from this page"
        if not (referer.lower() == expected + PREFIX or referer.lower().startswith(expected + PREFIX + "/")):
            return f"the form was posted from {referer!r}, not from this server's review pages"
        return None

    async def decide(request: Request) -> Response:
        sess = authenticate(request)
        if isinstance(sess, Response):
            return sess
        cert_id = request.path_params["cert_id"]
        if not sess.bearer:
            why = same_origin(request)
            if why is not None:
                return refuse(403, "Cross-site request refused", f"Refused: {why}.",
                              "Approve or reject from the certificate's page on this server.")
        form = await request.form()
        if not sess.bearer and not _same(str(form.get("csrf", "")), sess.csrf):
            return refuse(403, "Cross-site request refused", "Refused: the form's CSRF token is missing or wrong.",
                          "Reload the certificate's page and submit the form again.")
        decision = str(form.get("decision", ""))
        operator = str(form.get("operator", "")).strip()
        reason = str(form.get("reason", ""))
        if operator:
            sess.operator = operator

        def run() -> Response:
            try:
                review(backend.graph, backend.config, cert_id, decision, reason=reason, operator=operator, via="web",
                       served=served())
            except CertificateNotFound as exc:
                return refuse(404, "No such certificate", str(exc))
            except ReviewRefused as exc:
                return _cert_page(cert_id, sess, error=f"Not recorded: {exc}", status=400)
            return RedirectResponse(f"{PREFIX}/cert/{cert_id}?decided={decision}", status_code=303,
                                    headers=SECURITY_HEADERS)

        return await run_in_threadpool(run)

    async def wrong_method(request: Request) -> Response:
        return refuse(405, "Method not allowed", f"{request.method} {request.url.path} is not a review action.")

    routes = [
        Route(PREFIX, index, methods=["GET"]),
        Route(PREFIX + "/", index, methods=["GET"]),
        Route(PREFIX + "/login", login, methods=["GET"]),
        Route(PREFIX + "/logout", logout, methods=["GET", "POST"]),
        Route(PREFIX + "/cert/{cert_id}", certificate, methods=["GET"]),
        Route(PREFIX + "/cert/{cert_id}/report", report, methods=["GET"]),
        Route(PREFIX + "/cert/{cert_id}/review", decide, methods=["POST"]),
        Route(PREFIX + "/cert/{cert_id}/review", wrong_method, methods=["GET"]),
    ]
    return Starlette(routes=routes)


class PrefixRouter:
    """ASGI: requests under /review go to the review app, everything else (and lifespan) to `other`.

    Sits in front of the daemon's BearerAuth so that the agent's token neither guards nor opens
    the review pages: they have their own operator authentication.
    """

    def __init__(self, review_app: Any, other: Any, prefix: str = PREFIX):
        self.review_app, self.other, self.prefix = review_app, other, prefix

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope.get("path", "")
            if path == self.prefix or path.startswith(self.prefix + "/"):
                await self.review_app(scope, receive, send)
                return
        await self.other(scope, receive, send)


__all__ = ["OPERATOR_TOKEN_ENV", "OperatorTokenError", "PrefixRouter", "ReviewBackend", "create_review_app",
           "login_url", "operator_token"]

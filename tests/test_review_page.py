"""The operator's review pages: who may see them, who may decide, and that decisions only accumulate.

Everything runs through the daemon's real ASGI app (create_http_app with an agent bearer token and
an operator token) on the tiny model, with Starlette's TestClient.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from amygdala.dream.review import history
from amygdala.engine.config import Config
from amygdala.memory_graph import MemoryGraph
from amygdala.server.review_app import (COOKIE_NAME, OperatorTokenError, login_url, operator_token)
from tests.certs_fixture import certified_home, http_app_for

AGENT = "agent-token-abcdefghijklmnop"
OPERATOR = "operator-token-qrstuvwxyz012345"
AGENT_HEADER = {"Authorization": f"Bearer {AGENT}"}


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_lm):
    root = tmp_path_factory.mktemp("review")
    cfg = Config(home=root / "home")
    graph = MemoryGraph(cfg.memory_dir)
    ids = certified_home(cfg, graph, tiny_lm)

    def app():  # a fresh app per client: the MCP session manager runs once per app
        return http_app_for(cfg, graph, tiny_lm, agent_token=AGENT, operator_token=OPERATOR)

    yield cfg, graph, ids, app
    graph.close()


def _client(make) -> TestClient:
    return TestClient(make(), follow_redirects=False)


def _login(client: TestClient) -> None:
    r = client.get(f"/review/login?token={OPERATOR}")
    assert r.status_code == 303 and r.headers["location"] == "/review"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Path=/review" in cookie


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "the form carries a CSRF token"
    return m.group(1)


def test_agent_token_is_refused_on_every_review_endpoint(site):
    _cfg, graph, ids, app = site
    with _client(app) as c:
        for path in ("/review", "/review/", f"/review/cert/{ids['polite']}", f"/review/cert/{ids['polite']}/report",
                     f"/review/login?token={OPERATOR}"):
            r = c.get(path, headers=AGENT_HEADER)
            assert r.status_code == 403, path
            assert "agent" in r.text and "operator" in r.text
        r = c.post(f"/review/cert/{ids['polite']}/review", headers=AGENT_HEADER,
                   data={"decision": "approve", "reason": "mine", "operator": "agent"})
        assert r.status_code == 403
        # even with a valid operator session in the same client, the agent's token opens nothing
        _login(c)
        assert c.get("/review", headers=AGENT_HEADER).status_code == 403
        assert c.get("/review").status_code == 200
    assert history(graph, ids["polite"]) == []  # the agent's attempt stored nothing
    # the agent token still works where it belongs, and the daemon's other routes still require it
    with _client(app) as c:
        assert c.get("/health").status_code == 401
        assert c.get("/health", headers=AGENT_HEADER).status_code == 200


def test_missing_or_wrong_operator_token_is_refused(site):
    _cfg, _graph, ids, app = site
    with _client(app) as c:
        r = c.get("/review")
        assert r.status_code == 401 and "login" in r.text.lower()
        assert c.get(f"/review/cert/{ids['polite']}").status_code == 401
        r = c.get("/review/login?token=nope-not-the-token")
        assert r.status_code == 401 and "set-cookie" not in r.headers
        assert c.get("/review/login").status_code == 401
        assert c.get("/review", headers={"Authorization": "Bearer nope"}).status_code == 401
        c.cookies.set(COOKIE_NAME, "forged-session-id", path="/review")
        r = c.get("/review")
        assert r.status_code == 401 and "expired" in r.text
    with _client(app) as c:  # scripts may send the operator token as a bearer token
        assert c.get("/review", headers={"Authorization": f"Bearer {OPERATOR}"}).status_code == 200


def test_review_disabled_without_operator_token(tmp_path: Path, tiny_lm):
    cfg = Config(home=tmp_path / "home")
    graph = MemoryGraph(cfg.memory_dir)
    with _client(lambda: http_app_for(cfg, graph, tiny_lm, agent_token=None, operator_token=None)) as c:
        assert c.get("/review").status_code == 503
        assert c.get("/review/login?token=anything").status_code == 503
    graph.close()


def test_operator_token_must_differ_from_the_agent_token():
    with pytest.raises(OperatorTokenError, match="equals the agent's bearer token"):
        operator_token(AGENT, AGENT)
    with pytest.raises(OperatorTokenError, match="at least 16"):
        operator_token("short", AGENT)
    token, generated = operator_token(None, AGENT)
    assert generated and token != AGENT and len(token) >= 32
    assert operator_token(OPERATOR, AGENT) == (OPERATOR, False)
    assert login_url("http://127.0.0.1:8765", "a b") == "http://127.0.0.1:8765/review/login?token=a%20b"


def test_cross_site_form_posts_are_refused(site):
    _cfg, graph, ids, app = site
    cert = ids["polite"]
    url = f"/review/cert/{cert}/review"
    with _client(app) as c:
        _login(c)
        csrf = _csrf(c.get(f"/review/cert/{cert}").text)
        form = {"csrf": csrf, "decision": "reject", "reason": "forged", "operator": "mallory"}
        r = c.post(url, data=form, headers={"Origin": "https://evil.example"})
        assert r.status_code == 403 and "evil.example" in r.text
        r = c.post(url, data=form, headers={"Origin": "null"})
        assert r.status_code == 403
        r = c.post(url, data=form, headers={"Referer": "https://evil.example/review/cert/x"})
        assert r.status_code == 403
        r = c.post(url, data=form)  # neither Origin nor Referer
        assert r.status_code == 403 and "neither Origin nor Referer" in r.text
        r = c.post(url, data={**form, "csrf": "wrong"}, headers={"Origin": "http://testserver"})
        assert r.status_code == 403 and "CSRF" in r.text
        r = c.post(url, data={k: v for k, v in form.items() if k != "csrf"}, headers={"Origin": "http://testserver"})
        assert r.status_code == 403
    with _client(app) as other:  # another session's CSRF token is worthless
        _login(other)
        r = other.post(url, data=form, headers={"Origin": "http://testserver"})
        assert r.status_code == 403 and "CSRF" in r.text
    assert history(graph, cert) == []


def test_approve_flow_and_append_only_history(site):
    _cfg, graph, ids, app = site
    cert = ids["polite"]
    with _client(app) as c:
        _login(c)
        index = c.get("/review")
        assert index.status_code == 200
        assert "default-src 'none'" in index.headers["content-security-policy"]
        assert index.headers["x-frame-options"] == "DENY" and "<script" not in index.text
        row = re.search(r'data-invariant="polite".*?data-status="(\w+)"', index.text, re.DOTALL)
        assert row and row.group(1) == "certified"
        assert re.search(r'data-invariant="strict".*?data-status="(\w+)"', index.text, re.DOTALL).group(1) == "refuted"

        page = c.get(f"/review/cert/{cert}")
        assert page.status_code == 200 and "<svg" in page.text and "threshold" in page.text
        rows = re.findall(r'<tr class="(passed|failed)"', page.text)
        assert rows and rows == sorted(rows)  # "failed" sorts before "passed": failures first
        csrf = _csrf(page.text)
        url = f"/review/cert/{cert}/review"
        r = c.post(url, data={"csrf": csrf, "decision": "approve", "reason": "  ", "operator": "ada"},
                   headers={"Origin": "http://testserver"})
        assert r.status_code == 400 and "reason: must not be blank" in r.text
        r = c.post(url, data={"csrf": csrf, "decision": "approve", "reason": "read the failing cases",
                              "operator": "ada"}, headers={"Referer": f"http://testserver/review/cert/{cert}"})
        assert r.status_code == 303 and r.headers["location"] == f"/review/cert/{cert}?decided=approve"
        page = c.get(r.headers["location"])
        assert 'id="status" data-status="approved"' in page.text and "Approved" in page.text
        assert 'value="ada"' in page.text  # the operator's name is remembered for the session

        r = c.post(url, data={"csrf": csrf, "decision": "reject", "reason": "changed my mind", "operator": "ada"},
                   headers={"Origin": "http://testserver"})
        assert r.status_code == 303
        page = c.get(f"/review/cert/{cert}")
        assert 'data-status="rejected"' in page.text
        assert page.text.index("read the failing cases") < page.text.index("changed my mind")

        # a refuted certificate cannot be approved, and nothing is stored for the attempt
        r = c.post(f"/review/cert/{ids['strict']}/review",
                   data={"csrf": csrf, "decision": "approve", "reason": "why not", "operator": "ada"},
                   headers={"Origin": "http://testserver"})
        assert r.status_code == 400 and "nothing to approve" in r.text

        report = c.get(f"/review/cert/{cert}/report")
        assert report.status_code == 200 and "attachment" in report.headers["content-disposition"]
        assert "<form" not in report.text and cert in report.text

        assert c.get("/review/cert/cert-0000000000000000").status_code == 404
        c.get("/review/logout")
        assert c.get("/review").status_code == 401

    decisions = history(graph, cert)
    assert [(d.decision, d.operator, d.via) for d in decisions] == [("approve", "ada", "web"), ("reject", "ada", "web")]
    assert history(graph, ids["strict"]) == []
    node = graph.get(cert)
    # the graph keeps every decision, oldest first, and the store only ever appends
    assert [r.reason for r in node.reviews] == ["read the failing cases", "changed my mind"]
    again = graph.review_certificate(cert, "approve", operator="bob", reason="third look")
    assert again.reviews[:2] == node.reviews and len(again.reviews) == 3

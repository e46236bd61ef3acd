"""The review page in a real browser: Debian's headless Chromium driven by Playwright.

A real uvicorn server (the daemon's ASGI app on the tiny model, agent and operator tokens set)
runs in a thread on a free port; the browser logs in with the operator's URL, opens the index,
opens a certificate, approves it with a reason and sees the status change. Screenshots land in the
test's tmp directory. `.ci/run` installs Chromium when it is missing.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from amygdala.engine.config import Config
from amygdala.memory_graph import MemoryGraph
from amygdala.server.review_app import login_url
from tests.certs_fixture import certified_home, http_app_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
AGENT = "agent-token-abcdefghijklmnop"
OPERATOR = "operator-token-qrstuvwxyz012345"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (apt-get install -y chromium chromium-driver)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path, tiny_lm):
    import uvicorn

    cfg = Config(home=tmp_path / "home")
    graph = MemoryGraph(cfg.memory_dir)
    ids = certified_home(cfg, graph, tiny_lm)
    app = http_app_for(cfg, graph, tiny_lm, agent_token=AGENT, operator_token=OPERATOR)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", graph, ids
    srv.should_exit = True
    thread.join(timeout=10)
    graph.close()


def test_operator_approves_in_a_real_browser(server, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    base, graph, ids = server
    cert = ids["polite"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            # without the operator's login the pages refuse
            resp = page.goto(f"{base}/review")
            assert resp is not None and resp.status == 401
            assert "Operator login required" in page.content()

            page.goto(login_url(base, OPERATOR))
            assert page.url == f"{base}/review"
            assert page.locator('tr[data-invariant="polite"] [data-status]').get_attribute("data-status") == "certified"
            assert page.locator('tr[data-invariant="strict"] [data-status]').get_attribute("data-status") == "refuted"
            page.screenshot(path=str(tmp_path / "index.png"), full_page=True)

            page.locator('tr[data-invariant="polite"] a.cert-link').click()
            page.wait_for_url(f"{base}/review/cert/{cert}")
            assert page.locator("#status").get_attribute("data-status") == "certified"
            assert page.locator("svg").count() >= 2  # bound vs threshold, and the pass-rate history
            first = page.locator("#cases tbody tr").first.get_attribute("data-passed")
            if page.locator('#cases tr[data-passed="false"]').count():
                assert first == "false"  # failures first
            page.fill('input[name="operator"]', "ada")
            page.fill('textarea[name="reason"]', "read every failing case; the judge is right about them")
            page.click("button.approve")
            page.wait_for_url(f"{base}/review/cert/{cert}?decided=approve")
            assert page.locator("#status").get_attribute("data-status") == "approved"
            assert "read every failing case" in page.locator("#reviews").inner_text()
            page.screenshot(path=str(tmp_path / "approved.png"), full_page=True)

            page.goto(f"{base}/review")
            assert page.locator('tr[data-invariant="polite"] [data-status]').get_attribute("data-status") == "approved"

            # a form posted from another origin (a page the browser loaded from elsewhere) is refused
            evil = browser.new_page()
            evil.set_content(f'<form method="post" action="{base}/review/cert/{cert}/review">'
                             '<input name="decision" value="reject"><input name="reason" value="forged">'
                             '<input name="operator" value="mallory"><button>go</button></form>')
            with evil.expect_navigation():
                evil.click("button")
            assert "login required" in evil.content() or "refused" in evil.content().lower()
        finally:
            browser.close()
    assert [d.decision for d in graph.get(cert).reviews] == ["approve"]
    assert (tmp_path / "approved.png").stat().st_size > 10_000

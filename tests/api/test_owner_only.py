"""The local port answers only its owner, against real daemons: a hostile page in Debian's chromium, a
rebinding Host, and a port bound beyond loopback (token, CLI, the dashboard link's cookie).

The hostile page is served from another origin on 127.0.0.1 (another port: another origin to the browser)."""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.daemons import DaemonFactory, wait_until
from tests.api.test_dashboard import CHROMIUM_ARGS, _mission_body, _sync_playwright

pytestmark = pytest.mark.swarm

# What a page of any site may send to 127.0.0.1 without asking (no CORS preflight): no-cors fetches with
# text/plain bodies, and a form posted by script. It cannot read the answers; the requests happen.
ATTACK_PAGE = """<!doctype html><html><body>
<form id="f" method="POST" enctype="text/plain" target="sink">
  <input name='{"seconds": 31536000, "x": "' value='"}'>
</form>
<iframe name="sink"></iframe>
<script>
// one request as a page of another site may send it; the page cannot read the answer: it learns only that it left
function post(url, body) {
  return fetch(url, {method: "POST", mode: "no-cors", body: body, headers: {"Content-Type": "text/plain"}})
    .then(() => "sent", e => "error " + e);
}
function submitForm(base) {
  const form = document.getElementById("f");
  form.action = base + "/pause";
  form.submit();
}
</script></body></html>"""


@pytest.fixture
def attacker_site(tmp_path: Path) -> Iterator[str]:
    """An origin of its own on 127.0.0.1 that serves the attack page."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "attack.html").write_text(ATTACK_PAGE)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(site), **kwargs)

        def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def garden(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "garden", *args], capture_output=True, text=True, timeout=120)


def test_a_page_of_another_site_changes_nothing_and_a_rebinding_name_reads_nothing(
    daemons: DaemonFactory, attacker_site: str
) -> None:
    sync_playwright, chromium = _sync_playwright()
    daemon = daemons.start("--roles", "shaker")
    mission = _mission_body()

    year = json.dumps({"seconds": 31536000})
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(attacker_site + "/attack.html")

            def post(path: str, body: str) -> None:
                assert page.evaluate("([url, body]) => post(url, body)", [daemon.url + path, body]) == "sent"

            post("/pause", year)
            assert daemon.get("/status").json()["paused"] is False
            post("/missions", json.dumps(mission))
            assert daemon.get("/missions").json() == []
            post("/v1/completions", json.dumps({"model": "builtin:smollm2-135m", "prompt": "burn", "max_tokens": 2000}))
            # the owner pauses; the page's resume does not undo it
            assert daemon.request("POST", "/pause", json={"seconds": 3600}).json()["paused"] is True
            post("/resume", "{}")
            assert daemon.get("/status").json()["paused"] is True
            assert daemon.request("POST", "/resume").json()["paused"] is False

            # a form posted by script (the oldest cross-site request there is)
            with page.expect_response(lambda r: r.url.endswith("/pause")) as answer:
                page.evaluate("base => submitForm(base)", daemon.url)
            assert answer.value.status == 403
            assert daemon.get("/status").json()["paused"] is False
        finally:
            browser.close()

    log = daemon.stderr()
    for refused in ("POST /pause", "POST /resume", "POST /v1/completions", "POST /missions"):
        assert f"refused {refused}" in log, refused
    assert daemon.get("/missions").json() == []

    # DNS rebinding: the page's own name, resolved to 127.0.0.1, reads nothing and changes nothing
    for method, path in (("GET", "/status"), ("GET", "/missions"), ("POST", "/pause"), ("GET", "/")):
        response = httpx.request(method, daemon.url + path, headers={"Host": "evil.example"}, timeout=10)
        assert response.status_code == 403, (method, path)
    assert daemon.get("/status").json()["paused"] is False
    # curl, on the other hand, needs nothing (the owner's own tools on the owner's machine)
    assert garden("pause", "--for", "1m", "--data-dir", str(daemon.data_dir)).returncode == 0
    assert daemon.get("/status").json()["paused"] is True
    assert daemon.request("POST", "/resume", content=b"{}").status_code == 200


def test_a_port_beyond_loopback_needs_the_token_for_everything_but_health(daemons: DaemonFactory) -> None:
    sync_playwright, chromium = _sync_playwright()
    daemon = daemons.start("--roles", "shaker", "--http-host", "0.0.0.0", "--http-max-body", "1MiB")
    assert "beyond this machine" in daemon.stderr() and "launch or cancel missions" in daemon.stderr()
    token_file = daemon.data_dir / "http-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 40

    assert daemon.get("/health").status_code == 200
    for method, path in (("GET", "/status"), ("GET", "/missions"), ("GET", "/metrics"), ("GET", "/v1/models"),
                         ("POST", "/pause"), ("GET", "/"), ("GET", "/docs")):  # fmt: skip
        refused = daemon.request(method, path)
        assert refused.status_code == 401, (method, path, refused.text)
        assert daemon.request(method, path, headers={"Authorization": "Bearer " + "x" * 43}).status_code == 401
    bearer = {"Authorization": f"Bearer {token}"}
    assert daemon.get("/status", headers=bearer).json()["peer_id"] == daemon.peer_id
    assert daemon.get("/v1/models", headers=bearer).status_code == 200
    # a body past --http-max-body is refused whole, and the port goes on
    huge = daemon.request("POST", "/missions", headers=bearer, content=b"x" * (2 << 20))
    assert huge.status_code == 413 and "http_max_body" in huge.json()["detail"]
    assert daemon.request("POST", "/missions", content=b"x" * (2 << 20)).status_code == 401  # the token first
    lag = [line for line in daemon.get("/metrics", headers=bearer).text.splitlines() if "event_loop_lag" in line]
    assert any(line.startswith('garden_event_loop_lag_seconds_bucket{le="0.25"}') for line in lag), lag

    # the CLI reads the token from the data dir
    status = garden("status", "--data-dir", str(daemon.data_dir), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["peer_id"] == daemon.peer_id
    assert garden("pause", "--for", "10m", "--data-dir", str(daemon.data_dir)).returncode == 0
    assert daemon.get("/status", headers=bearer).json()["paused"] is True
    assert garden("resume", "--data-dir", str(daemon.data_dir)).returncode == 0
    without = garden("status", "--url", daemon.url, "--data-dir", str(daemon.data_dir / "elsewhere"))
    assert without.returncode == 1 and "401" in without.stderr and "token" in without.stderr

    # the dashboard link printed at start carries the token once; a cookie keeps it
    link = re.search(r"dashboard \(.*\): (http://\S+)", daemon.stdout())
    assert link is not None, daemon.stdout()
    assert link.group(1).endswith(f"/?token={token}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(link.group(1))
            assert page.url == daemon.url + "/"  # the token left the address bar
            page.wait_for_function(
                "id => document.getElementById('peer-id').textContent === id", arg=daemon.peer_id, timeout=20_000
            )
            cookie = next(c for c in page.context.cookies() if c["name"] == "garden_token")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            page.click("#pause-button")
            wait_until(lambda: daemon.get("/status", headers=bearer).json()["paused"], 10, message="paused by click")
            page.click("#resume-button")
            wait_until(lambda: not daemon.get("/status", headers=bearer).json()["paused"], 10, message="resumed")
        finally:
            browser.close()

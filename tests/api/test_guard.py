"""The local port's owner check (:mod:`garden.api.guard`) in front of a small app, as a hostile page, a
rebinding name, the LAN and the owner's own tools would call it. The real daemon and a real browser:
``tests/api/test_owner_only.py``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from garden.api.guard import TOKEN_COOKIE, OwnerGuard, OwnerPolicy, host_name, machine_addresses

TOKEN = "s3cret-token"
BASE = "http://127.0.0.1:8765"


def _app(policy: OwnerPolicy) -> tuple[FastAPI, list[str]]:
    app = FastAPI()
    changed: list[str] = []

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/status")
    async def status() -> dict[str, bool]:
        return {"paused": bool(changed)}

    @app.post("/pause")
    async def pause() -> dict[str, bool]:
        changed.append("pause")
        return {"paused": True}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(iter([b"a", b"b", b"c"]), media_type="text/plain")

    app.add_middleware(OwnerGuard, policy=policy)
    return app, changed


@pytest.fixture
def loopback() -> Iterator[tuple[TestClient, list[str]]]:
    app, changed = _app(OwnerPolicy.of("127.0.0.1", ["mybox.lan"], TOKEN))
    with TestClient(app, base_url=BASE) as client:
        yield client, changed


@pytest.fixture
def lan() -> Iterator[tuple[TestClient, list[str]]]:
    app, changed = _app(OwnerPolicy.of("0.0.0.0", [], TOKEN))
    with TestClient(app, base_url=BASE, follow_redirects=False) as client:
        yield client, changed


@pytest.mark.parametrize(
    ("header", "name"),
    [("127.0.0.1:8765", "127.0.0.1"), ("[::1]:8765", "::1"), ("LocalHost.", "localhost"),
     ("evil.example", "evil.example"), ("[fe80::1]", "fe80::1"), ("::1", "::1")],
)  # fmt: skip
def test_host_names(header: str, name: str) -> None:
    assert host_name(header) == name


def test_a_loopback_port_needs_no_token_and_answers_its_own_names(loopback: tuple[TestClient, list[str]]) -> None:
    client, _ = loopback
    for host in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765", "MyBox.lan:8765", "localhost"):
        assert client.get("/status", headers={"Host": host}).status_code == 200, host
    assert client.post("/pause").status_code == 200  # curl: no Origin, no Sec-Fetch-Site, no token


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8765", "127.0.0.1.evil.example", "10.255.255.1:8765"])
def test_a_rebinding_name_is_refused_on_every_path(loopback: tuple[TestClient, list[str]], host: str) -> None:
    client, changed = loopback
    for method, path in (("GET", "/status"), ("GET", "/health"), ("POST", "/pause")):
        response = client.request(method, path, headers={"Host": host})
        assert response.status_code == 403, (method, path)
        assert "not a name of this peer" in response.json()["detail"]
    assert changed == []


@pytest.mark.parametrize(
    "headers",
    [{"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://127.0.0.1:9999"},
     {"Origin": "http://localhost:8765"},  # another origin, though the same machine: a page on localhost
     {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
     {"Origin": "http://127.0.0.1:8765", "Sec-Fetch-Site": "cross-site"}],
)  # fmt: skip
def test_a_page_of_another_origin_changes_nothing(loopback: tuple[TestClient, list[str]], headers: dict) -> None:
    client, changed = loopback
    year = b'{"seconds": 31536000}'
    response = client.post("/pause", content=year, headers={"Content-Type": "text/plain", **headers})
    assert response.status_code == 403 and "may not change this peer" in response.json()["detail"]
    assert changed == []
    # reading stays allowed (the browser, not the port, keeps a foreign page from reading the answer)
    assert client.get("/status", headers=headers).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{"Origin": BASE, "Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {"Origin": BASE}],
)
def test_the_dashboard_itself_may_change_things(loopback: tuple[TestClient, list[str]], headers: dict) -> None:
    client, changed = loopback
    assert client.post("/pause", headers=headers).status_code == 200
    assert changed == ["pause"]


def test_beyond_loopback_every_path_but_health_needs_the_token(lan: tuple[TestClient, list[str]]) -> None:
    client, changed = lan
    assert client.get("/health").status_code == 200
    for method, path in (("GET", "/status"), ("POST", "/pause"), ("GET", "/stream")):
        refused = client.request(method, path)
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert "http-token" in refused.json()["detail"]
        wrong = client.request(method, path, headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401
        assert client.request(method, path, headers={"Authorization": "Basic " + TOKEN}).status_code == 401
    assert changed == []
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/status", headers=bearer).json() == {"paused": False}
    assert client.get("/stream", headers=bearer).text == "abc"  # a streamed answer passes whole
    assert client.post("/pause", headers=bearer).status_code == 200 and changed == ["pause"]
    # the token does not open the door to another origin's page
    assert client.post("/pause", headers={**bearer, "Origin": "http://evil.example"}).status_code == 403
    assert changed == ["pause"]


def test_the_dashboard_link_turns_its_token_into_a_strict_cookie(lan: tuple[TestClient, list[str]]) -> None:
    client, _ = lan
    assert client.get("/?token=wrong").status_code == 401
    landing = client.get(f"/status?token={TOKEN}&x=1")
    assert landing.status_code == 303 and landing.headers["location"] == "/status?x=1"
    cookie = landing.headers["set-cookie"]
    assert cookie.startswith(f"{TOKEN_COOKIE}={TOKEN};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert client.get("/status").status_code == 200  # the client keeps the cookie, as a browser does
    client.cookies.clear()
    assert client.get("/status").status_code == 401
    assert client.get("/status", headers={"Cookie": f"{TOKEN_COOKIE}={TOKEN}"}).status_code == 200
    assert client.get("/status", headers={"Cookie": f"{TOKEN_COOKIE}=nope; other=1"}).status_code == 401
    assert client.post(f"/pause?token={TOKEN}").status_code == 401  # a link only opens pages, it posts nothing


def test_a_port_bound_to_every_address_answers_this_machines_addresses_only(lan: tuple[TestClient, list[str]]) -> None:
    client, _ = lan
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for address in machine_addresses():
        host = f"[{address}]:8765" if ":" in address else f"{address}:8765"
        assert client.get("/status", headers={**bearer, "Host": host}).status_code == 200, host
    assert client.get("/status", headers={**bearer, "Host": "192.0.2.77:8765"}).status_code == 403  # not ours
    assert client.get("/status", headers={**bearer, "Host": "garden.example:8765"}).status_code == 403

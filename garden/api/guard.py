"""The local port answers only its owner: a check in front of every route.

The owner browses the web on the same machine, so any page they open can send requests to
``127.0.0.1``. Three checks keep those pages out, each against its own attack:

* **Host** (DNS rebinding): a page on ``evil.example`` whose name later resolves to 127.0.0.1 sends
  ``Host: evil.example`` and would read every answer as same-origin. Only this peer's names pass:
  127.0.0.1, localhost, [::1], the bind address, this machine's own addresses when bound to all of them,
  and the names the owner adds (``http_allowed_host``).
* **Origin / Sec-Fetch-Site** (cross-site requests): a page may send a POST anywhere without a CORS
  preflight (``mode: 'no-cors'``, a ``text/plain`` body); it cannot read the answer, but the POST
  happens. Every request that changes something (any method but GET, HEAD, OPTIONS) that a browser
  marks as coming from another origin is refused. ``curl`` and the CLI send neither header.
* **A token** on a non-loopback bind: the LAN is not the owner. Every request but ``/health`` needs
  ``Authorization: Bearer <token>`` (the CLI reads it from the data dir) or the cookie that the
  dashboard link printed at start-up sets (``SameSite=Strict``, ``HttpOnly``: a page of another site
  never sends it).

A pure ASGI middleware, so streamed answers (``/v1`` with ``stream: true``) pass through untouched.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from garden.daemon.http_server import is_loopback_host

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SAME_SITE_FETCHES = frozenset({"same-origin", "none"})  # "none": typed in the address bar, a bookmark
TOKEN_COOKIE = "garden_token"
TOKEN_QUERY = "token"
OPEN_PATHS = frozenset({"/health"})
ADDRESSES_TTL = 30.0
"""Seconds this machine's addresses are cached for the Host check of a peer bound to all of them."""


def normalise_host(name: str) -> str:
    """A Host name as compared: lower case, no brackets, no trailing dot."""
    return name.strip().strip("[]").lower().rstrip(".")


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port: ``[::1]:8080`` -> ``::1``."""
    header = header.strip()
    if header.startswith("["):
        return normalise_host(header[1 : header.find("]")] if "]" in header else header)
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return normalise_host(header)


def machine_addresses() -> set[str]:
    """This machine's IP addresses, on every interface."""
    import psutil

    found = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family.name in ("AF_INET", "AF_INET6"):
                found.add(normalise_host(entry.address.split("%", 1)[0]))
    return found


@dataclass(frozen=True)
class OwnerPolicy:
    """Whom the local port answers.

    :param bind_host: the address the port is bound to (``--http-host``)
    :param allowed_hosts: more names the owner lets through the Host check (``http_allowed_host``)
    :param token: the token every request but ``/health`` must carry; None: none needed (a loopback bind)
    """

    bind_host: str
    allowed_hosts: frozenset[str]
    token: str | None

    @classmethod
    def of(cls, bind_host: str, allowed_hosts: Iterable[str], token: str) -> OwnerPolicy:
        """The policy of a port bound to ``bind_host``: the token is needed only beyond loopback."""
        return cls(
            bind_host=bind_host,
            allowed_hosts=frozenset(normalise_host(h) for h in allowed_hosts),
            token=None if is_loopback_host(bind_host) else token,
        )

    @property
    def wildcard(self) -> bool:
        return normalise_host(self.bind_host) in ("0.0.0.0", "::", "")


class OwnerGuard:
    """The ASGI middleware that applies an :class:`OwnerPolicy` to every HTTP request."""

    def __init__(self, app: ASGIApp, policy: OwnerPolicy):
        self.app, self.policy = app, policy
        self._names = LOOPBACK_NAMES | policy.allowed_hosts | {normalise_host(policy.bind_host)}
        self._addresses: set[str] = set()
        self._addresses_at = -ADDRESSES_TTL

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        link_token = _query_token(scope) if scope["method"] == "GET" else None
        refusal = self._refusal(scope, headers, link_token)
        if refusal is not None:
            status, detail, extra = refusal
            logger.info("refused %s %s: %s", scope["method"], scope["path"], detail)
            await send_json(send, status, {"detail": detail}, extra)
            return
        if self.policy.token is not None and link_token is not None:  # valid, or _refusal had refused it
            await _set_cookie_and_redirect(send, scope, self.policy.token)
            return
        await self.app(scope, receive, send)

    def _refusal(
        self, scope: Scope, headers: dict[str, str], link_token: str | None
    ) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        host = headers.get("host")
        if host is None:
            return 400, "no Host header: the local port answers only requests that name it", []
        if not self._known(host_name(host)):
            return 403, (
                f"Host {host_name(host)!r} is not a name of this peer (a page that rebinds its name to this "
                "machine is refused); if it is yours, add it with --http-allowed-host"
            ), []  # fmt: skip
        if scope["method"] not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and not _same_origin(origin, host):
                return 403, f"a request from the page {origin[:100]!r} may not change this peer", []
            fetch_site = headers.get("sec-fetch-site")
            if fetch_site is not None and fetch_site not in SAME_SITE_FETCHES:
                return 403, f"a {fetch_site} request from a browser page may not change this peer", []
        token = self.policy.token
        if token is None:
            return None
        if link_token is not None and not _equal(link_token, token):
            return 401, "the token in this link is not this peer's (it changes at every start)", []
        if scope["path"] not in OPEN_PATHS and link_token is None and not _carries(headers, token):
            return 401, (
                "this port is open beyond this machine and needs the token: send 'Authorization: Bearer <token>' "
                "with the token in the data dir's http-token file (the garden CLI does), or open the dashboard "
                "link that `garden run` printed"
            ), [(b"www-authenticate", b'Bearer realm="garden"')]  # fmt: skip
        return None

    def _known(self, name: str) -> bool:
        if name in self._names:
            return True
        if not self.policy.wildcard:
            return False
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False  # a name: only those the owner listed (a rebinding page brings its own name)
        now = time.monotonic()
        if now - self._addresses_at >= ADDRESSES_TTL:
            self._addresses, self._addresses_at = machine_addresses(), now
        return name in self._addresses


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name; a header sent twice counts as sent once, the first time."""
    found: dict[str, str] = {}
    for key, value in scope.get("headers", ()):
        found.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
    return found


def _same_origin(origin: str, host: str) -> bool:
    """Whether a browser's ``Origin`` is this port as the page named it (``null`` never is)."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == host.strip().lower()


def _equal(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


def _carries(headers: dict[str, str], token: str) -> bool:
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and _equal(given.strip(), token):
        return True
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == TOKEN_COOKIE and _equal(value, token):
            return True
    return False


def _query(scope: Scope) -> list[tuple[str, str]]:
    return parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)


def _query_token(scope: Scope) -> str | None:
    given = [v for k, v in _query(scope) if k == TOKEN_QUERY]
    return given[-1] if given else None


async def send_json(send: Send, status: int, body: dict[str, Any], extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Answer a request from a middleware, before (or instead of) the app: a JSON body."""
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _set_cookie_and_redirect(send: Send, scope: Scope, token: str) -> None:
    """The dashboard link's token becomes a cookie, and the address bar loses it (303 to the same page)."""
    rest = urlencode([(k, v) for k, v in _query(scope) if k != TOKEN_QUERY])
    location = scope["path"] + (f"?{rest}" if rest else "")
    cookie = f"{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
    headers = [(b"location", location.encode()), (b"set-cookie", cookie.encode()), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})

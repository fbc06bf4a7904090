"""uvicorn inside the daemon's event loop, on a socket the runner bound beforehand.

Binding first turns "port in use" into a clear error before the swarm starts, and tells the chosen
port when the user asked for any (``--http-port 0``). Signals belong to the runner, which must stop
the swarm too, so uvicorn's own signal capture is switched off.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from typing import Any
from collections.abc import Iterator

import uvicorn


class HttpPortError(RuntimeError):
    pass


class HttpServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def is_loopback_host(host: str) -> bool:
    """Whether binding to ``host`` keeps the port on this machine (no token needed, no warning)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def bind_http_socket(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise HttpPortError(f"--http-host {host!r} is not a usable address: {e}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise HttpPortError(
            f"cannot open the HTTP port {host}:{port} ({e.strerror}); another program (or garden daemon) "
            "may be using it: pass --http-port 0 for any free port"
        ) from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def make_server(app: Any, log_level: str) -> HttpServer:
    config = uvicorn.Config(
        app,
        log_level="warning" if log_level != "debug" else "debug",
        access_log=log_level == "debug",
        lifespan="off",
        timeout_graceful_shutdown=3,
    )
    return HttpServer(config)

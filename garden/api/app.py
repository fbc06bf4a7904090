"""The FastAPI app of the local HTTP port: status, peers, metrics, missions, the OpenAI-compatible ``/v1``.

Every error is JSON with a ``detail`` field, and bad requests are 4xx: FastAPI already answers 404,
405 and 422 that way; anything unexpected is logged and answered as a JSON 500 rather than a
traceback page.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from hivemind.utils.timed_storage import get_dht_time
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from garden import __version__
from garden.api.metrics import make_registry
from garden.api.missions import make_missions_router
from garden.api.openai import install_openai_errors, make_openai_router
from garden.api.schemas import Error, Health, Machine, Peer, Serving, Shaking, Status
from garden.daemon import Gardener
from garden.peer.directory import PeerEntry

logger = logging.getLogger(__name__)


def create_app(gardener: Gardener) -> FastAPI:
    # FastAPIOffline serves the /docs page's scripts from the package instead of a CDN: volunteers'
    # machines and the project's own CI may have no internet
    app = FastAPIOffline(
        title="garden",
        version=__version__,
        description="The local HTTP port of a Communal Garden peer.",
        responses={500: {"model": Error}},
    )
    registry = make_registry(gardener)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {exc.__class__.__name__}"}, status_code=500)

    @app.get("/health", response_model=Health, tags=["peer"])
    async def health() -> Health:
        """Liveness: answers as long as the daemon's event loop runs."""
        return Health()

    machine, directory = gardener.machine, gardener.directory
    if machine is None or directory is None:
        raise RuntimeError("create_app needs a started Gardener")

    @app.get("/status", response_model=Status, tags=["peer"])
    async def status() -> Status:
        """This peer: identity, uptime, roles, addresses and how many peers it sees."""
        return Status(
            peer_id=gardener.peer_id,
            version=__version__,
            uptime_s=round(gardener.uptime_s, 3),
            roles=gardener.roles,
            skipped_roles=gardener.skipped_roles,
            addresses=gardener.addresses,
            peers=len(directory.known),
            joined=directory.joined,
            swarm=gardener.keys.swarm,
            client_mode=gardener.settings.client_mode,
            announce_period_s=gardener.settings.announce_period,
            machine=Machine(cores=machine.cores, ram_bytes=machine.ram_bytes, gpu=machine.gpu),
            shaking=_shaking(gardener),
            serving=[Serving(**server.view()) for server in (gardener.inference.servers if gardener.inference else [])],
        )

    @app.get("/peers", response_model=list[Peer], tags=["swarm"])
    async def peers() -> list[Peer]:
        """The swarm's peers (this one included), read fresh from the DHT."""
        entries = await directory.read()
        now = get_dht_time()
        return [_peer(entry, gardener.peer_id, now) for entry in entries]

    @app.get("/metrics", response_class=PlainTextResponse, tags=["peer"])
    async def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if gardener.missions is None:
        raise RuntimeError("create_app needs a started Gardener")
    app.include_router(
        make_missions_router(
            gardener.missions, lambda: gardener.work, lambda: gardener.training, lambda: gardener.checkpoints
        )
    )
    app.include_router(make_openai_router(lambda: gardener.inference))
    install_openai_errors(app)
    return app


def _shaking(gardener: Gardener) -> Shaking | None:
    work = gardener.work
    if work is None:
        return None
    return Shaking(blocked=work.blocked, missions={mid: p.state for mid, p in work.progress.items()})


def _peer(entry: PeerEntry, self_id: str, now: float) -> Peer:
    info = entry.info
    return Peer(
        peer_id=info.peer_id,
        version=info.version,
        roles=info.roles,
        cores=info.cores,
        ram_bytes=info.ram_bytes,
        gpu=info.gpu,
        load=info.load,
        addresses=info.addresses,
        client_mode=info.client_mode,
        last_seen=info.announced_at,
        expires_in_s=round(entry.expiration_time - now, 3),
        is_self=info.peer_id == self_id,
    )

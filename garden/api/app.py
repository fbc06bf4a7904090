"""The FastAPI app of the local HTTP port: status, peers, metrics, missions, the OpenAI-compatible ``/v1``.

Every error is JSON with a ``detail`` field, and bad requests are 4xx: FastAPI already answers 404,
405 and 422 that way; anything unexpected is logged and answered as a JSON 500 rather than a
traceback page.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from typing import Annotated

from fastapi import FastAPI, Query, Request
from pydantic import ValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from hivemind.utils.timed_storage import get_dht_time
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from garden import __version__
from garden.api.metrics import make_registry
from garden.api.errors import error_response
from garden.api.guard import OwnerGuard, OwnerPolicy
from garden.api.limits import BodyLimit
from garden.api.timing import ServerTiming
from garden.errors import Conflict, GardenError, Refused
from garden.host.disk import DiskSnapshot
from garden.host.governor import GovernorSnapshot
from garden.api.control import make_control_router
from garden.api.dashboard import make_dashboard_router
from garden.api.feedback import make_feedback_router
from garden.api.missions import make_missions_router
from garden.api.models import make_models_router
from garden.api.openai import install_openai_errors, make_openai_router
from garden.api.schemas import (
    Caps,
    Error,
    Health,
    InviteReply,
    Machine,
    Network,
    Peer,
    Resources,
    Routing,
    Serving,
    Shaking,
    Status,
)
from garden.daemon.gardener import Gardener
from garden.mission.shaking import ShakingSnapshot
from garden.mission.training import TrainingSnapshot
from garden.net.directory import PeerEntry, bootstrap_peers, dialable
from garden.net.reach import Reach
from garden.protocol.invite import MAX_INVITE_PEERS, Invite
from garden.protocol.records import PROTOCOL_VERSION, first_error

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
    settings = gardener.settings
    data_dir = gardener.data_dir
    token = data_dir.read_http_token() or data_dir.new_http_token()
    # installed last (below), so outermost: nothing, not even the JSON-body rewrite, sees a request it refuses
    guard = OwnerPolicy.of(settings.http_host, settings.http_allowed_host, token)

    @app.exception_handler(GardenError)
    async def _domain(request: Request, exc: GardenError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error: {exc.__class__.__name__}"}, status_code=500)

    @app.get("/health", response_model=Health, tags=["peer"])
    async def health() -> Health:
        """Liveness: answers as long as the daemon's event loop runs."""
        return Health()

    machine, directory = gardener.machine, gardener.directory
    governor, ledger = gardener.governor, gardener.ledger
    caps = Caps(
        max_cpu=settings.max_cpu,
        max_threads=gardener.max_threads,
        max_memory=settings.max_memory,
        max_disk=settings.max_disk,
        max_upload_rate=settings.max_upload_rate,
        max_download_rate=settings.max_download_rate,
        when=settings.when,
    )

    @app.get("/status", response_model=Status, tags=["peer"])
    async def status() -> Status:
        """This peer: identity, uptime, roles, addresses and how many peers it sees."""
        guest, swarm = governor.snapshot(), directory.snapshot()
        return Status(
            peer_id=gardener.peer_id,
            version=__version__,
            uptime_s=round(gardener.uptime_s, 3),
            roles=gardener.roles,
            skipped_roles=gardener.skipped_roles,
            addresses=gardener.addresses,
            peers=swarm.peers_seen,
            joined=swarm.joined,
            swarm=gardener.keys.swarm,
            client_mode=gardener.client_mode,
            network=_network(gardener.reach, gardener.addresses),
            announce_period_s=gardener.settings.announce_period,
            machine=Machine(cores=machine.cores, ram_bytes=machine.ram_bytes, gpu=machine.gpu),
            shaking=_shaking(gardener.work.snapshot(), gardener.training.snapshot()),
            serving=[Serving(**asdict(server)) for server in gardener.inference.snapshot()],
            routing=[Routing(**asdict(r)) for r in gardener.inference.routing()],
            paused=guest.paused,
            pause=guest.pause,
            working=guest.working,
            caps=caps,
            resources=_resources(guest, gardener.disk.snapshot()),
            contribution=ledger.totals(),
            protocol=PROTOCOL_VERSION,
            upgrade=swarm.upgrade_advice,
            incompatible_peers=swarm.incompatible_peers,
        )

    @app.get("/peers", response_model=list[Peer], tags=["swarm"])
    async def peers() -> list[Peer]:
        """The swarm's peers (this one included), read fresh from the DHT."""
        entries = await directory.read()
        now = get_dht_time()
        return [_peer(entry, gardener.peer_id, now) for entry in entries]

    @app.get("/invite", response_model=InviteReply, responses={409: {"model": Error}}, tags=["swarm"])
    async def invite(
        lead: Annotated[list[str] | None, Query(description="peer ids the newcomer should trust as leads")] = None,
        me: Annotated[bool, Query(description="ask the newcomer to trust this peer as a lead")] = False,
    ) -> InviteReply | JSONResponse:
        """One line a newcomer passes to ``garden run --join``: the swarm's name, a few peers to join through
        (this one, if others can dial it, and the public peers seen), and leads to trust if asked."""
        leads = list(dict.fromkeys([*(lead or []), *([gardener.peer_id] if me else [])]))
        direct = gardener.reach.reachability != "private" and not gardener.client_mode
        own = dialable(gardener.addresses, gardener.peer_id)[:2] if direct else []
        others = bootstrap_peers(directory.known, gardener.peer_id, first_seen=directory.first_seen)
        peers = list(dict.fromkeys([*own, *others]))[:MAX_INVITE_PEERS]
        if not peers:
            return error_response(Conflict("no peer here that others can dial yet: wait until this peer sees the "
                                           "swarm's public peers (garden peers), or invite from one of them"))
        try:
            made = Invite(swarm=gardener.keys.swarm, peers=peers, leads=leads)
        except ValidationError as e:
            return error_response(Refused(f"cannot make the invite: {first_error(e)}"))
        return InviteReply(line=made.line(), swarm=made.swarm, peers=made.peers, leads=made.leads)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["peer"])
    async def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(make_models_router(gardener.inference, gardener.students))
    app.include_router(make_missions_router(
        gardener.missions, gardener.work, gardener.training, gardener.checkpoints, gardener.students
    ))  # fmt: skip
    app.include_router(make_control_router(governor, ledger, settings.pause_serving))
    app.include_router(make_openai_router(gardener.inference, gardener.feedback))
    app.include_router(make_feedback_router(gardener.feedback))
    install_openai_errors(app)
    app.include_router(make_dashboard_router())
    app.add_middleware(BodyLimit, max_bytes=int(settings.http_max_body))
    app.add_middleware(OwnerGuard, policy=guard)
    app.add_middleware(ServerTiming)  # added last: the outermost, its time includes the others'
    return app


def _resources(guest: GovernorSnapshot, disk: DiskSnapshot) -> Resources:
    return Resources(
        cpu=guest.cpu, held_s=guest.held_s, owner_load=guest.owner_load,
        disk_bytes=disk.used, disk_pruned=disk.pruned, disk_note=disk.note,
    )  # fmt: skip


def _shaking(shaking: ShakingSnapshot, training: TrainingSnapshot) -> Shaking:
    return Shaking(
        blocked=shaking.blocked,
        missions={mission_id: work.state for mission_id, work in shaking.missions.items() if work.seen},
        training_blocked=training.blocked,
        publish_errors={m: work.publish_error for m, work in shaking.missions.items() if work.publish_error},
        sampler_pid=shaking.sampler_pid, sampler_starts=shaking.sampler_starts,
        teachers_loaded=sorted(shaking.teachers_loaded),
    )


def _network(reach: Reach, addresses: list[str]) -> Network:
    return Network(
        reachability=reach.reachability, mode=reach.mode, addresses=addresses, observed=reach.observed,
        relays=reach.relays, relay_service=reach.relay_service, hole_punching=reach.mode == "relayed",
        checked_by=reach.checked_by, note=reach.note, relay_limits=reach.relay_limits,
        relay_check=reach.relay_check,
    )  # fmt: skip


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
        reachability=info.reachability,
        last_seen=info.announced_at,
        paused=info.paused,
        working=info.working,
        contribution=info.contribution,
        expires_in_s=round(entry.expiration_time - now, 3),
        is_self=info.peer_id == self_id,
    )

"""The owner's controls on the HTTP port: ``POST /pause``, ``POST /resume``, ``GET /contribution``.

They are for the person whose machine this is (``garden pause``, the dashboard's buttons). The port
answers only its owner (:mod:`garden.api.guard`): a page of another site cannot press them, and beyond
loopback they need the token.
"""

from __future__ import annotations


from fastapi import APIRouter
from fastapi.responses import JSONResponse

from garden.api.schemas import Contribution, Error, PauseReply, PauseRequest
from garden.host.contribution import Ledger
from garden.host.governor import Governor


def make_control_router(governor: Governor, ledger: Ledger, pause_serving: bool) -> APIRouter:
    """:param pause_serving: whether a pause that does not say stops serving too (the ``pause_serving`` setting)"""
    router = APIRouter(tags=["peer"])

    def reply() -> PauseReply:
        guest = governor.snapshot()
        return PauseReply(**guest.pause.model_dump(), working=guest.working)

    @router.post("/pause", response_model=PauseReply, responses={422: {"model": Error}})
    async def pause(body: PauseRequest | None = None) -> PauseReply:
        """Stop taking work within 2 s: shaking gives its shard back, trainers finish their step and exit.
        The peer stays in the swarm; it keeps serving layers unless ``serving`` (or ``--pause-serving``).
        The pause is kept across restarts until ``POST /resume`` or the end of ``for_s``."""
        body = body or PauseRequest()
        serving = pause_serving if body.serving is None else body.serving
        governor.pause(body.for_s, serving=serving)
        return reply()

    @router.post("/resume", response_model=PauseReply)
    async def resume() -> PauseReply:
        """End a pause; work starts again within a few seconds."""
        governor.resume()
        return reply()

    @router.get("/pause", response_model=PauseReply)
    async def pause_state() -> PauseReply:
        return reply()

    @router.get("/contribution", response_model=Contribution)
    async def contribution() -> Contribution | JSONResponse:
        """Rows shaken, samples trained, tokens served and hours online: in all and per mission."""
        return Contribution(total=ledger.totals(), missions=ledger.by_mission())

    return router

"""``/missions``: launch, list, inspect, export and cancel missions through the local peer.

A body that fails validation is answered 422 with FastAPI's error shape (``{"detail": [{"loc", "msg",
"type"}]}``), where ``loc`` names the failing key (``["body", "spec", "sampling", "temperature"]``), and
nothing is signed or published. The peer that receives ``POST /missions`` signs the mission with its own
key and becomes its lead: only it may ``DELETE`` it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError

from garden.api.schemas import (
    CheckpointInfo,
    Error,
    MissionCreate,
    MissionDetail,
    MissionPeer,
    MissionSummary,
    MissionTraining,
    MissionWorkHere,
    PulledCheckpoint,
    ShardCounts,
    StudentModel,
    TrainPoint,
    Verification,
)
from garden.data import DEMO_PROMPTS, demo_prompts
from garden.api.errors import error_response
from garden.api.models import student_model
from garden.errors import GardenError
from garden.mission.book import Mission, MissionBook
from garden.protocol.mission import MissionDraft, MissionSpec, MissionSpecError
from garden.protocol.rows import PromptRow, preference_json_line
from garden.mission.leases import ShardStatus
from garden.mission.shaking import MissionView, MissionWork
from garden.mission.verification import VerificationSnapshot
from garden.protocol.checkpoints import CheckpointRecord, CheckpointVouch
from garden.mission.checkpoints import CheckpointSharing
from garden.mission.students import Student, SwarmStudents
from garden.mission.training import TrainingWork
from garden.models.loading import ModelRefError
from garden.protocol.checkpoints import STUDENT_SCHEME

BUILTIN_PROMPTS = {DEMO_PROMPTS: demo_prompts}
MAX_POST_PROMPTS = 100_000
"""Prompts one ``POST /missions`` may carry (the JSON body is parsed whole); bigger missions: use the CLI
on the peer itself in a later version, or split them."""


def make_missions_router(
    book: MissionBook, work: MissionWork, training: TrainingWork, sharing: CheckpointSharing, students: SwarmStudents
) -> APIRouter:
    router = APIRouter(tags=["missions"])
    errors: dict[int | str, dict[str, Any]] = {404: {"model": Error}, 422: {"model": Error}}

    async def life(view: MissionView, published: set[str]) -> str:
        """The mission's state over its whole life (see ``MissionSummary.state``)."""
        mission = view.mission
        if view.state != "done":
            return view.state
        if mission.id in published:
            return "published"
        here = training.view(mission)
        if here is not None and here.state == "done":
            return "trained"
        try:
            records = await sharing.records(mission.id)
        except GardenError:
            records = []
        return "trained" if any(r.epoch >= mission.signed.spec.train.max_epochs for r in records) else "training"


    @router.post("/missions", status_code=201, response_model=MissionSummary, responses=errors)
    async def create_mission(body: MissionCreate) -> Any:
        """Validate, sign with this peer's key (it becomes the lead) and publish a mission. A teacher or student
        named ``mission:<prefix or name>`` is written down by its whole id (every peer then means the same)."""
        try:
            spec = await _whole_student_ids(body.spec, students)
        except ModelRefError as e:
            return _validation_error(["body", "spec"], str(e))
        draft_or_error = _draft(body.model_copy(update={"spec": spec}))
        if isinstance(draft_or_error, JSONResponse):
            return draft_or_error
        mission = await book.publish(draft_or_error)
        view = await work.view(mission, with_holders=False)
        return _summary(view, await life(view, set()))

    @router.get("/missions", response_model=list[MissionSummary])
    async def list_missions() -> list[MissionSummary]:
        """Every mission this peer knows, newest first, with progress."""
        missions = book.newest_first()
        views = await asyncio.gather(*(work.view(m, with_holders=False) for m in missions))
        done = {s.record.mission_id for s in await _listing(students)}
        states = await asyncio.gather(*(life(v, done) for v in views))
        return [_summary(v, state) for v, state in zip(views, states, strict=True)]

    @router.get("/missions/{mission_id}", response_model=MissionDetail, responses=errors)
    async def show_mission(mission_id: str) -> Any:
        """One mission: shards done/leased/open, rows, the peers working on it, teachers, ETA."""
        try:
            mission = book.get(mission_id)
        except GardenError as e:
            return error_response(e)
        view = await work.view(mission)
        student = next((s for s in await _listing(students) if s.record.mission_id == mission.id), None)
        state = await life(view, {mission.id} if student is not None else set())
        return _detail(view, state, _training(training, mission), student)

    @router.post(
        "/missions/{mission_id}/promote", response_model=StudentModel, responses=errors | {403: {"model": Error}}
    )
    async def promote(
        mission_id: str, epoch: int | None = Query(None, ge=0, description="a vouched epoch; default: the newest"),
    ) -> Any:  # fmt: skip
        """Publish a vouched checkpoint of the mission's student as the swarm's model ``mission:<id>`` (only its
        lead may; the last epoch's is published by itself once vouched for)."""
        try:
            mission = book.get(mission_id)
            await students.publish(mission, epoch)
            student = next(s for s in await students.listing() if s.record.mission_id == mission.id)
        except GardenError as e:
            return error_response(e)
        return student_model(student)

    @router.get("/missions/{mission_id}/rows", responses=errors)
    async def export_rows(mission_id: str, format: str = Query("jsonl")) -> Any:  # noqa: A002 (the API's name)
        """All rows so far as TRL preference JSONL with the teacher's log-probs (rows held elsewhere are
        copied here first). ``X-Garden-Missing-Shards`` lists done shards whose rows no peer served."""
        if format != "jsonl":
            return _validation_error(["query", "format"], f"unsupported format {format!r}; use jsonl")
        try:
            mission = book.get(mission_id)
        except GardenError as e:
            return error_response(e)
        rows, missing = await work.export(mission)
        headers = {
            "X-Garden-Rows": str(len(rows)),
            "X-Garden-Missing-Shards": ",".join(map(str, missing)),
            "Content-Disposition": f'attachment; filename="{mission.name}-{mission.id[:12]}.jsonl"',
        }

        def lines() -> Iterator[str]:
            for row in rows:
                yield preference_json_line(row)

        return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)

    @router.get("/missions/{mission_id}/checkpoints", response_model=list[CheckpointInfo], responses=errors)
    async def list_checkpoints(mission_id: str) -> Any:
        """Checkpoints of the mission's student that peers announce (one entry per epoch and holder)."""
        try:
            mission = book.get(mission_id)
            catalog = await sharing.catalog(mission.id)
        except GardenError as e:
            return error_response(e)
        vouched = catalog.vouched(_vouchers(book, mission))
        return [_checkpoint_info(r, vouched.get(r.epoch)) for r in catalog.records]

    @router.post(
        "/missions/{mission_id}/checkpoints/{epoch}/pull", response_model=PulledCheckpoint,
        responses=errors | {502: {"model": Error}},
    )  # fmt: skip
    async def pull_checkpoint(
        mission_id: str,
        epoch: str,
        unverified: bool = Query(False, description="also a checkpoint nobody this peer trusts vouched for"),
    ) -> Any:
        """Fetch a checkpoint (``latest`` or an epoch) from the peers that hold it into this peer's data dir,
        every file checked against its sha256; then its files can be read from ``.../files/{path}``. Only a
        verified checkpoint (its manifest vouched for by the mission's lead or a ``--trust-lead``) unless
        ``unverified``; never an epoch past the mission's ``max_epochs``."""
        if epoch != "latest" and not epoch.isdigit():
            return _validation_error(["path", "epoch"], f"{epoch!r}: an epoch number or 'latest'")
        try:
            mission = book.get(mission_id)
            path, record = await sharing.pull(
                mission.id, None if epoch == "latest" else int(epoch), trusted=_vouchers(book, mission),
                unverified=unverified, max_epoch=mission.signed.spec.train.max_epochs,
            )  # fmt: skip
            vouch = (await sharing.catalog(mission.id)).vouched(_vouchers(book, mission)).get(record.epoch)
        except GardenError as e:
            return error_response(e)
        return PulledCheckpoint(**_checkpoint_info(record, vouch).model_dump(), local_path=str(path))

    @router.get("/missions/{mission_id}/checkpoints/{epoch}/files/{path:path}", responses=errors)
    async def checkpoint_file(
        mission_id: str, epoch: int, path: str,
        sha256: str | None = Query(None, pattern="^[0-9a-f]{64}$", description="this version of the file"),
    ) -> Any:  # fmt: skip
        """One file of a checkpoint this peer holds (its own, or pulled): the CLI's download. A peer may hold two
        versions of an epoch (its own, and the vouched one it pulled): ``sha256`` picks the file."""
        try:
            mission = book.get(mission_id)
            held = next(
                (c for c in sharing.local(mission.id, versions=True)
                 if c.epoch == epoch and path in c.files and sha256 in (None, c.files[path])),
                None,
            )  # fmt: skip
        except GardenError as e:
            return error_response(e)
        if held is None:
            version = f" with sha256 {sha256[:12]}" if sha256 else ""
            return JSONResponse({"detail": f"this peer holds no {path!r}{version} of epoch {epoch}"}, status_code=404)
        return FileResponse(sharing.file_path(held, path), headers={"X-Garden-Sha256": held.files[path]})

    @router.delete("/missions/{mission_id}", response_model=MissionSummary, responses=errors | {403: {"model": Error}})
    async def cancel_mission(mission_id: str, reason: str = Query("", max_length=200)) -> Any:
        """Cancel a mission; only its lead (the peer that created it) may."""
        try:
            mission = await book.cancel(mission_id, reason)
        except GardenError as e:
            return error_response(e)
        return _summary(await work.view(mission, with_holders=False), "cancelled")

    return router


def _draft(body: MissionCreate) -> MissionDraft | JSONResponse:
    try:
        spec = MissionSpec.model_validate(body.spec)
    except ValidationError as e:
        return JSONResponse(
            {"detail": [_loc_error(["body", "spec"], err) for err in e.errors()]},
            status_code=422,
        )
    if body.prompts is None:
        if spec.prompts not in BUILTIN_PROMPTS:
            return _validation_error(
                ["body", "prompts"], f"missing: spec.prompts is {spec.prompts!r}, not a built-in set; send the prompts"
            )
        prompts = tuple(BUILTIN_PROMPTS[spec.prompts]())
    else:
        if len(body.prompts) > MAX_POST_PROMPTS:
            return _validation_error(["body", "prompts"], f"{len(body.prompts)} prompts, over {MAX_POST_PROMPTS}")
        rows = []
        for i, item in enumerate(body.prompts):
            try:
                rows.append(PromptRow.model_validate(item))
            except ValidationError as e:
                return JSONResponse(
                    {"detail": [_loc_error(["body", "prompts", i], err) for err in e.errors()]}, status_code=422
                )
        prompts = tuple(rows)
    try:
        return MissionDraft(spec=spec, prompts=prompts)
    except MissionSpecError as e:
        field = str(e).split(":", 1)[0].strip()
        loc = ["body", "prompts"] if field == "prompts" else ["body", "spec", *field.split(".")]
        return _validation_error(loc, str(e))


def _loc_error(prefix: list[Any], err: Any) -> dict[str, Any]:
    return {"loc": [*prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]}


def _validation_error(loc: list[Any], msg: str) -> JSONResponse:
    return JSONResponse({"detail": [{"loc": loc, "msg": msg, "type": "value_error"}]}, status_code=422)


def _shards(view: MissionView) -> ShardCounts:
    if view.board is None:
        total = view.mission.shard_count
        return ShardCounts(total=total, done=0, leased=0, open=total)
    summary = view.board.summary()
    return ShardCounts(total=summary.total, done=summary.done, leased=summary.leased, open=summary.open)


async def _listing(students: SwarmStudents) -> list[Student]:
    """The swarm's published students, or none while the DHT cannot be read (a mission's page still shows)."""
    try:
        return await students.listing()
    except GardenError:
        return []


async def _whole_student_ids(spec: dict[str, Any], students: SwarmStudents) -> dict[str, Any]:
    """``spec`` with every teacher and student named ``mission:<prefix or name>`` named by its whole id."""

    async def whole(ref: Any) -> Any:
        if isinstance(ref, str) and ref.strip().startswith(STUDENT_SCHEME):
            return (await students.find(ref)).model
        return ref

    spec = dict(spec)
    if isinstance(spec.get("teachers"), list):
        spec["teachers"] = [await whole(t) for t in spec["teachers"]]
    if isinstance(spec.get("student"), dict):
        spec["student"] = {**spec["student"], "base": await whole(spec["student"].get("base"))}
    return spec


def _summary(view: MissionView, state: str) -> MissionSummary:
    mission: Mission = view.mission
    body = mission.signed.body
    return MissionSummary(
        id=mission.id,
        name=mission.name,
        state=state,
        lead=mission.signed.lead_peer_id,
        trusted=view.trusted,
        not_worked_on=view.refused,
        created=body.created,
        prompts=body.prompts_count,
        shards=_shards(view),
        rows=view.rows,
    )


def _vouchers(book: MissionBook, mission: Mission) -> set[str]:
    """Whose vouch makes a checkpoint of ``mission`` verified here: its lead's, and the ``--trust-lead`` peers'."""
    return {mission.signed.lead_peer_id, *book.policy.trusted_leads}


def _checkpoint_info(record: CheckpointRecord, vouch: CheckpointVouch | None = None) -> CheckpointInfo:
    verified = vouch is not None and vouch.vouches_for(record)
    return CheckpointInfo(
        epoch=record.epoch,
        peer_id=record.peer_id,
        size=record.size,
        files=[f.model_dump() for f in record.files],
        metrics=record.metrics,
        created=record.created,
        verified=verified,
        vouched_by=vouch.peer_id if verified and vouch is not None else None,
        vouch_metrics=dict(vouch.metrics) if verified and vouch is not None else {},
    )


def _training(training: TrainingWork, mission: Mission) -> MissionTraining | None:
    view = training.view(mission)
    if view is None:
        return None
    known = set(MissionTraining.model_fields) - {"state", "restarts", "history"}
    status = view.worker.model_dump(include=known) if view.worker is not None else {}
    history = [TrainPoint(**point) for point in view.history]
    try:
        return MissionTraining(state=view.state, restarts=view.restarts, history=history, **status)
    except ValidationError:  # a status file from another version: show the state alone
        return MissionTraining(state=view.state, restarts=view.restarts, history=history)


def _detail(
    view: MissionView, state: str, training: MissionTraining | None = None, student: Student | None = None
) -> MissionDetail:
    summary = _summary(view, state)
    peers: dict[str, MissionPeer] = {}
    for peer_id, announcement in view.holders.items():
        peers[peer_id] = MissionPeer(
            peer_id=peer_id,
            has_prompts=announcement.has_prompts,
            row_sets=len(announcement.row_sets),
            rows_held=sum(h.rows for h in announcement.row_sets),
        )
    rate = eta = None
    if view.board is not None:
        for shard in view.board.shards:
            if shard.winner is not None:
                peers.setdefault(shard.winner.peer_id, MissionPeer(peer_id=shard.winner.peer_id)).shards_done += 1
            elif shard.status is ShardStatus.LEASED and shard.lease is not None:
                peers.setdefault(shard.lease.peer_id, MissionPeer(peer_id=shard.lease.peer_id)).leased.append(
                    shard.index
                )
        finished = [s.winner.finished for s in view.board.shards if s.winner is not None]
        if finished:
            elapsed = max(max(finished) - view.mission.signed.body.created, 1e-3)
            rate = len(finished) / elapsed
            remaining = summary.shards.total - summary.shards.done
            eta = remaining / rate if remaining else 0.0
    progress = view.progress
    return MissionDetail(
        **summary.model_dump(),
        peers=sorted(peers.values(), key=lambda p: p.peer_id),
        teachers=view.teachers,
        shards_per_s=rate,
        eta_s=eta,
        this_peer=MissionWorkHere(
            state=progress.state,
            shards_shaken=progress.shards_shaken,
            rows_shaken=progress.rows_shaken,
            shards_lost=progress.shards_lost,
            replicated=progress.replicated,
            seconds_shaking=round(progress.seconds_shaking, 3),
            publish_error=progress.publish_error,
        ),
        verification=_verification(view.verification),
        cancel_reason=view.mission.cancel.reason if view.mission.cancel is not None else None,
        train=training,
        student=student_model(student) if student is not None else None,
        spec=view.mission.signed.spec.model_dump(mode="json", by_alias=True),
    )


def _verification(snapshot: VerificationSnapshot | None) -> Verification:
    if snapshot is None:
        return Verification()
    return Verification(
        verified=snapshot.verified, refuted=snapshot.refuted, pending=snapshot.pending,
        rows_checked=snapshot.rows_checked, producers_refuted=list(snapshot.producers_refuted),
        unconfirmed=snapshot.unconfirmed,
    )  # fmt: skip

"""``/models``: the swarm's models, served layers and published students, and a model on this machine.

``GET /models`` joins two DHT reads: what the swarm's servers announce (layer coverage) and the missions'
students their leads published (``mission:<id>``, with where each came from and its evaluation). A student
nobody serves yet is listed with no layers covered: ``garden run --serve mission:<id>`` fills that.
``POST /models/pull`` has a model's files on this machine (a student is pulled and every file checked, once),
for the commands that load a model locally (``garden generate --model``, ``garden export``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from garden.api.errors import error_response
from garden.api.schemas import Error, ModelLayers, ModelPull, PulledModel, ServedSpan, StudentModel
from garden.errors import GardenError, NotFound
from garden.inference.service import InferenceService
from garden.mission.students import Student, SwarmStudents
from garden.models.cache import student_dir
from garden.models.loading import ModelRefError, parse_model_ref


def make_models_router(inference: InferenceService, students: SwarmStudents) -> APIRouter:
    router = APIRouter(tags=["swarm"])

    @router.get("/models", response_model=list[ModelLayers])
    async def models() -> list[ModelLayers]:
        """The swarm's models: those its servers announce, with their layer coverage (``/v1/models`` lists the
        complete ones in OpenAI's shape), and the missions' published students, served or not."""
        published = {s.model: s for s in await students.listing()}
        listed = [
            ModelLayers(
                model=c.model, num_layers=c.num_layers, servers=c.servers, complete=c.complete,
                missing=[[span.start, span.end] for span in c.missing],
                spans=[ServedSpan(peer_id=p, start=a, end=b, throughput=t) for p, a, b, t in c.spans],
                student=student_model(published.pop(c.model)) if c.model in published else None,
            )
            for c in await inference.coverage()
        ]  # fmt: skip
        unserved = [
            ModelLayers(
                model=s.model, num_layers=s.record.layers, servers=0, complete=False,
                missing=[[0, s.record.layers]], spans=[], student=student_model(s),
            )
            for s in published.values()
        ]  # fmt: skip
        return listed + unserved

    @router.post("/models/pull", response_model=PulledModel, responses={404: {"model": Error}, 502: {"model": Error}})
    async def pull(body: ModelPull) -> Any:
        """Have ``model``'s files on this machine: a published student (``mission:<id>``, a unique prefix, a
        mission's name) is pulled from its holders and every file checked against the lead's record, once."""
        try:
            ref = parse_model_ref(body.model)
            if ref.kind != "mission":
                return PulledModel(model=body.model)
            model = await students.resolve(body.model)
        except ModelRefError as e:
            return error_response(NotFound(str(e)))
        except GardenError as e:
            return error_response(e)
        path = student_dir(model.removeprefix("mission:"))
        return PulledModel(model=model, path=str(path) if path is not None else None)

    return router


def student_model(student: Student) -> StudentModel:
    r = student.record
    return StudentModel(
        model=r.model, mission_id=r.mission_id, name=r.name, lead=r.peer_id, trusted=student.trusted, epoch=r.epoch,
        manifest_sha256=r.manifest_sha256,
        base=r.base, architecture=r.architecture, parameters=r.parameters, layers=r.layers, tokenizer=r.tokenizer,
        size=r.size, metrics=dict(r.metrics), published=r.published,
        local_path=str(student.local) if student.local is not None else None,
    )  # fmt: skip

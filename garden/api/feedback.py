"""``/feedback``: the answers this peer gave its owner and the owner's verdicts, kept on this machine.

``POST /v1/feedback`` (in :mod:`garden.api.openai`) rates an answer; here the owner lists them, exports the
pairs (TRL's ``prompt`` / ``chosen`` / ``rejected``, one JSON object a line), reads the prompts with their chosen
answers (what ``garden mission create --from-feedback`` makes a mission of), keeps an answer generated on this
machine outside the daemon (``garden generate --model``), and clears everything.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from garden.errors import GardenError
from garden.mission.feedback import MAX_EDIT_CHARS, Feedback
from garden.protocol.rows import MAX_PROMPT_CHARS
from garden.store import StoredAnswer


class KeptAnswer(BaseModel):
    """An answer kept for rating, with the owner's verdict."""

    id: str
    model: str
    kind: str = Field(description="chat | text")
    prompt: str = Field(description="the last user message (chat) or the prompt")
    text: str = Field(description="the answer")
    created: float
    redo_of: str | None = Field(None, description="the answer this one replaced (a redo)")
    verdict: str | None = Field(None, description="accept | redo | edit, none yet")
    edit: str | None = Field(None, description="the owner's text (edit)")
    request: dict[str, Any] = Field(description="what was asked (messages or prompt, sampling; source: local for "
                                    "an answer generated outside the daemon)")  # fmt: skip


class AnswerGiven(BaseModel):
    """``POST /feedback/answers``: an answer generated on this machine outside the daemon, kept for rating."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=1024)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    system: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    text: str = Field(max_length=MAX_EDIT_CHARS)
    max_tokens: int = Field(256, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    redo_of: str | None = Field(None, max_length=80)
    source: Literal["local"] = "local"


def make_feedback_router(feedback: Feedback) -> APIRouter:
    router = APIRouter(prefix="/feedback", tags=["feedback"])

    @router.get("", response_model=list[KeptAnswer])
    async def answers(
        limit: int = Query(50, ge=1, le=10_000), rated: bool | None = Query(None), model: str | None = Query(None)
    ) -> list[KeptAnswer]:
        """The newest answers first; ``rated=true``: only those the owner rated."""
        kept = await asyncio.to_thread(feedback.store.answers, limit, rated, model)
        return [_kept(a) for a in kept]

    @router.get("/pairs")
    async def pairs(
        model: str | None = Query(None), examples: bool = Query(False, description="accepted answers alone too")
    ) -> StreamingResponse:
        """The pairs as JSON lines: ``prompt``, ``chosen``, ``rejected`` (TRL), with ``system``, ``model``,
        ``verdict`` and ``id``; ``datasets.load_dataset("json", data_files=...)`` loads the file."""
        found = await asyncio.to_thread(feedback.pairs, model, examples)

        def lines() -> Iterator[str]:
            for pair in found:
                yield json.dumps(pair.to_json(), ensure_ascii=False) + "\n"

        headers = {"X-Garden-Pairs": str(len(found))}
        return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)

    @router.get("/prompts")
    async def prompts(model: str | None = Query(None)) -> list[dict[str, Any]]:
        """The rated prompts with their chosen answer as ``reference``: a mission's prompts file, as rows."""
        rows = await asyncio.to_thread(feedback.prompts, model)
        return [r.model_dump(exclude_defaults=True) for r in rows]

    @router.post("/answers", status_code=201, response_model=KeptAnswer)
    async def keep(body: AnswerGiven) -> KeptAnswer:
        """Keep an answer generated on this machine outside the daemon, so that the owner can rate it; with
        ``redo_of``, it replaces that answer, which is marked ``redo`` (rejected)."""
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
            {"role": "user", "content": body.prompt}
        ]
        request = body.model_dump(exclude={"text", "prompt", "system", "redo_of"}, exclude_none=True)
        try:
            if body.redo_of is not None:
                await asyncio.to_thread(feedback.rate, body.redo_of, "redo")
        except GardenError as e:
            raise HTTPException(404, str(e)) from None
        kept = await asyncio.to_thread(
            feedback.keep, body.model, "chat", {**request, "messages": messages}, body.text, None, body.redo_of
        )
        return _kept(kept)

    @router.delete("")
    async def clear() -> dict[str, int]:
        """Forget every kept answer and verdict."""
        return {"cleared": await asyncio.to_thread(feedback.clear)}

    return router


def _kept(a: StoredAnswer) -> KeptAnswer:
    return KeptAnswer(
        id=a.answer_id, model=a.model, kind=a.kind, prompt=a.prompt, text=a.text, created=a.created_at,
        redo_of=a.redo_of, verdict=a.verdict, edit=a.edit, request=json.loads(a.request),
    )  # fmt: skip

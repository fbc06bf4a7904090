"""``/v1``: the OpenAI-compatible part of the local port, so that apps call a peer like any OpenAI-style
server (``OpenAI(base_url="http://127.0.0.1:8765/v1", api_key="-")``).

Generation pipelines through the swarm's servers (:mod:`garden.inference.client`); the model ids are model
references (``builtin:smollm2-135m``, a mission's published student ``mission:<id>``: a unique prefix of the id
or the mission's name work too, and answers name the whole id). Defaults follow OpenAI's (``temperature`` 1,
``max_tokens`` 16 for completions), so an app that works against OpenAI behaves the same here. Errors use
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: an unknown model is 404, a model whose layers the
swarm does not all serve is 503 (the message names the missing layers), a bad body is 400.

Streaming answers are server-sent events of ``chat.completion.chunk`` / ``text_completion`` objects, ending
with ``data: [DONE]``. A failure after the first chunk cannot change the status code any more: it comes as
one last event ``{"error": {...}}`` before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from garden.inference.client import GenerationStats, SamplingConfig
from garden.inference.route import CoverageError
from garden.inference.service import InferenceService
from garden.protocol.inference_rpc import ERROR_BUSY, BlocksRpcError
from garden.errors import Conflict, GardenError, NotFound
from garden.mission.feedback import MAX_EDIT_CHARS, Feedback
from garden.models.loading import ModelRefError

logger = logging.getLogger(__name__)

MAX_STOP = 4


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore (user, logit_bias...)
    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    min_tokens: int = Field(0, ge=0, le=32768, description="no end token before this many (as vLLM's)")

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise OpenAIError(400, f"at most {MAX_STOP} stop sequences", param="stop")
        return tuple(stops)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)
    max_tokens: int = Field(16, ge=1, le=32768)


def _sampling(body: _Sampling, max_tokens: int) -> SamplingConfig:
    return SamplingConfig(
        max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=body.stops(),
        min_tokens=body.min_tokens,
    )


def _usage(stats: GenerationStats) -> dict[str, int]:
    return {
        "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
    }  # fmt: skip


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: the owner's verdict on an answer (its completion id)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=80, description="the completion's id (chatcmpl-..., cmpl-...)")
    verdict: Literal["accept", "redo", "edit"]
    text: str | None = Field(None, max_length=MAX_EDIT_CHARS, description="the edited answer (edit only)")


REDO_TEMPERATURE = 0.8
"""The temperature of a redo of a greedy answer (temperature 0): a new seed alone would give the same answer."""


def make_openai_router(inference: InferenceService, feedback: Feedback) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])

    def keeper(model: str, kind: str, body: _Sampling, redo_of: str | None) -> Callable[[str, str], None]:
        """What keeps an answer once it is whole, for the owner to rate (``POST /v1/feedback``)."""
        request = body.model_dump(mode="json", exclude_none=True, exclude={"stream", "stream_options"})

        def keep(answer_id: str, text: str) -> None:
            try:
                feedback.keep(model, kind, request, text, answer_id=answer_id, redo_of=redo_of)
            except Exception as e:  # noqa: BLE001 - the answer was given; failing to keep it must not fail it
                logger.warning("could not keep answer %s for feedback: %s", answer_id, e)

        return keep

    @router.get("/models")
    async def list_models() -> JSONResponse:
        """Models whose every layer some server of the swarm serves; their ids are model references."""
        coverage = await inference.coverage()
        data = [
            {"id": c.model, "object": "model", "created": 0, "owned_by": f"garden swarm ({c.servers} servers)"}
            for c in coverage
            if c.complete
        ]
        return JSONResponse({"object": "list", "data": data})

    async def generator_for(asked: str) -> tuple[str, Any]:
        """The swarm's name for ``asked`` (``mission:<prefix or name>`` -> ``mission:<id>``) and its generator."""
        try:
            model = await inference.resolve(asked)
        except ModelRefError as e:
            raise OpenAIError(404, str(e), code="model_not_found", param="model") from None
        except GardenError as e:
            raise OpenAIError(502, f"could not fetch {asked}: {e}", "server_error", "upstream_failed") from None
        known = {c.model: c for c in await inference.coverage()}
        if model not in known:
            raise OpenAIError(
                404, f"the model {model!r} is not served by the swarm (GET /v1/models lists what is)",
                code="model_not_found", param="model",
            )  # fmt: skip
        if not known[model].complete:
            gaps = ", ".join(str(s) for s in known[model].missing)
            raise OpenAIError(
                503, f"the swarm does not serve layers {gaps} of {model} ({known[model].num_layers} layers); "
                "start a peer with --serve to fill the gap", "server_error", "layers_missing",
            )  # fmt: skip
        try:
            return model, await inference.generator(model)
        except ModelRefError as e:
            raise OpenAIError(404, str(e), code="model_not_found", param="model") from None

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        """A chat answer; ``stream: true`` sends it as server-sent ``chat.completion.chunk`` events. Its id is
        what ``POST /v1/feedback`` rates."""
        return await chat(body)

    async def chat(body: ChatCompletionRequest, redo_of: str | None = None) -> Any:
        model, generator = await generator_for(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        _check_chars(sum(len(m["content"]) for m in messages), generator, model, "messages")
        try:
            encoded = await asyncio.to_thread(
                generator.ends.tokenizer.apply_chat_template,
                messages, add_generation_prompt=True, tokenize=True, return_dict=True,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - e.g. a template that refuses the roles' order
            message = f"the messages do not fit the model's chat template: {e}"
            raise OpenAIError(400, message, param="messages") from None
        ids = list(encoded["input_ids"])
        sampling = _sampling(body, body.max_completion_tokens or body.max_tokens or 1024)
        return await _answer(generator, ids, sampling, body, model, True, keeper(model, "chat", body, redo_of))

    @router.post("/completions")
    async def completions(body: CompletionRequest) -> Any:
        """A plain text continuation of ``prompt`` (no chat template)."""
        return await complete(body)

    async def complete(body: CompletionRequest, redo_of: str | None = None) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise OpenAIError(400, "one prompt per request", param="prompt")
        model, generator = await generator_for(body.model)
        _check_chars(len(prompts[0]), generator, model, "prompt")
        ids = list((await asyncio.to_thread(generator.ends.tokenizer, prompts[0]))["input_ids"])
        keep = keeper(model, "text", body, redo_of)
        return await _answer(generator, ids, _sampling(body, body.max_tokens), body, model, False, keep)

    @router.post("/feedback")
    async def rate(body: FeedbackRequest) -> Any:
        """The owner's verdict on an answer: *accept* keeps it as chosen, *edit* keeps ``text`` as chosen and the
        answer as rejected, *redo* marks it rejected and answers the same request again with a new seed (that
        answer, under ``completion``, can be rated in turn). Answers and verdicts stay on this machine."""
        try:
            answer = await asyncio.to_thread(feedback.rate, body.id, body.verdict, body.text)
        except NotFound as e:
            raise OpenAIError(404, str(e), code="answer_not_found", param="id") from None
        except Conflict as e:
            raise OpenAIError(400, str(e), param="text") from None
        result: dict[str, Any] = {"object": "feedback", "id": answer.answer_id, "verdict": body.verdict}
        if body.verdict == "redo":
            request = feedback.request(answer)
            request["seed"] = secrets.randbelow(2**31)
            if float(request.get("temperature", 1.0)) == 0.0:
                request["temperature"] = REDO_TEMPERATURE
            if answer.kind == "chat":
                again = await chat(ChatCompletionRequest.model_validate(request), redo_of=answer.answer_id)
            else:
                again = await complete(CompletionRequest.model_validate(request), redo_of=answer.answer_id)
            result["completion"] = again
        result["pairs"] = len(await asyncio.to_thread(feedback.pairs))
        return result

    return router


MAX_CHARS_PER_TOKEN = 32
"""A prompt longer than the context times this cannot fit whatever its tokens: refused before the tokenizer
spends the event loop's time (and memory) on it. Real text runs 3 to 5 characters per token."""


def _check_chars(chars: int, generator: Any, model: str, param: str) -> None:
    if chars > generator.context * MAX_CHARS_PER_TOKEN:
        raise OpenAIError(
            400, f"{'the messages are' if param == 'messages' else 'the prompt is'} {chars} characters, more than "
            f"{model}'s {generator.context}-token context can hold", param=param,
        )  # fmt: skip


async def _answer(generator: Any, ids: list[int], sampling: SamplingConfig, body: _Sampling, model: str,
                  chat: bool, keep: Callable[[str, str], None]) -> Any:  # fmt: skip
    if len(ids) >= generator.context:
        raise OpenAIError(400, f"the prompt is {len(ids)} tokens; {model} has a {generator.context}-token context")
    created, cid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    stats = GenerationStats()
    pieces = generator.stream(ids, sampling, stats)
    if not body.stream:
        try:
            text = "".join([piece async for piece in pieces])
        except (CoverageError, BlocksRpcError) as e:
            raise _generation_error(e) from None
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": stats.finish_reason}
            if chat
            else {"index": 0, "text": text, "logprobs": None, "finish_reason": stats.finish_reason}
        )
        obj = "chat.completion" if chat else "text_completion"
        head = {"id": cid, "object": obj, "created": created, "model": model}
        await asyncio.to_thread(keep, cid, text)
        return head | {"choices": [choice], "usage": _usage(stats)}
    # the first piece (or failure) comes before the response starts: an error is then still a status code
    try:
        first = await anext(pieces, None)
    except (CoverageError, BlocksRpcError) as e:
        raise _generation_error(e) from None
    include_usage = bool((getattr(body, "stream_options", None) or {}).get("include_usage"))
    return StreamingResponse(
        _events(first, pieces, stats, cid, created, model, chat, include_usage, keep),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


async def _events(first: str | None, rest: AsyncIterator[str], stats: GenerationStats, cid: str, created: int,
                  model: str, chat: bool, include_usage: bool,
                  keep: Callable[[str, str], None]) -> AsyncIterator[bytes]:  # fmt: skip
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> bytes:
        payload: dict[str, Any] = {"id": cid, "object": obj, "created": created, "model": model}
        payload["choices"] = [choice] if choice is not None else []
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n".encode()

    def piece(text: str, finish: str | None = None) -> bytes:
        if chat:
            return event({"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish})
        return event({"index": 0, "text": text, "logprobs": None, "finish_reason": finish})

    if chat:
        yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    whole = [first or ""]
    try:
        if first:
            yield piece(first)
        async for text in rest:
            whole.append(text)
            yield piece(text)
        await asyncio.to_thread(keep, cid, "".join(whole))
        yield piece("", stats.finish_reason)
        if include_usage:
            yield event(None, _usage(stats))  # OpenAI's last chunk: no choices, the usage
    except (CoverageError, BlocksRpcError) as e:
        logger.warning("streamed generation failed: %s", e)
        yield f"data: {json.dumps(_generation_error(e).body())}\n\n".encode()
    finally:  # the app went away mid-stream: close the sessions on the servers now, not at their idle timeout
        await rest.aclose()  # type: ignore[attr-defined]
    yield b"data: [DONE]\n\n"


def _generation_error(e: Exception) -> OpenAIError:
    if isinstance(e, CoverageError):
        return OpenAIError(503, str(e), "server_error", "layers_missing")
    if isinstance(e, BlocksRpcError) and e.code == ERROR_BUSY:
        return OpenAIError(503, f"the swarm's servers are busy, try again soon: {e}", "server_error", "busy")
    return OpenAIError(502, f"generation failed on the swarm: {e}", "server_error", "upstream_failed")


JSON_PATHS = ("/v1/", "/pause")


def install_openai_errors(app: Any) -> None:
    """OpenAI's error shape for ``/v1`` (and FastAPI's own for every other path). A ``/v1`` (or ``/pause``)
    body is JSON whatever its content type says: ``curl -d '{...}'`` sends a JSON body as a form. Not for a
    browser's request (one that carries ``Origin``): a ``text/plain`` body is what a page of another site may
    send without asking, so a page must say JSON (and pass :mod:`garden.api.guard`) to be read as JSON."""
    from fastapi.exception_handlers import request_validation_exception_handler

    @app.middleware("http")
    async def _json_bodies(request: Request, call_next: Any) -> Any:
        if request.method == "POST" and request.url.path.startswith(JSON_PATHS) and "origin" not in request.headers:
            if "json" not in request.headers.get("content-type", ""):
                headers = [(k, v) for k, v in request.scope["headers"] if k.lower() != b"content-type"]
                request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
        return await call_next(request)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if not request.url.path.startswith("/v1/"):
            return await request_validation_exception_handler(request, exc)
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        return OpenAIError(400, message, param=where).response()

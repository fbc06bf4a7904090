"""Request bodies past the cap (:mod:`garden.api.limits`) get 413, declared or streamed, and reach no route;
prompts too long for any context are refused before the tokenizer runs."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from garden.api.limits import BodyLimit
from garden.api.openai import MAX_CHARS_PER_TOKEN, OpenAIError, _check_chars

CAP = 4096


def _client() -> tuple[TestClient, list[int]]:
    app = FastAPI()
    read: list[int] = []

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        body = await request.body()
        read.append(len(body))
        return {"bytes": len(body)}

    app.add_middleware(BodyLimit, max_bytes=CAP)
    return TestClient(app, base_url="http://127.0.0.1:8765"), read


def _chunks(total: int) -> Iterator[bytes]:
    for _ in range(total // 1024):
        yield b"x" * 1024


def test_a_body_under_the_cap_passes_whole() -> None:
    client, read = _client()
    assert client.post("/echo", content=b"x" * CAP).json() == {"bytes": CAP}
    assert client.post("/echo", content=_chunks(CAP)).json() == {"bytes": CAP}  # chunked, no Content-Length
    assert read == [CAP, CAP]


def test_a_body_over_the_cap_is_413_and_reaches_no_route() -> None:
    client, read = _client()
    declared = client.post("/echo", content=b"x" * (CAP + 1))
    assert declared.status_code == 413 and "http_max_body" in declared.json()["detail"]
    streamed = client.post("/echo", content=_chunks(CAP * 8))  # no Content-Length: counted as it arrives
    assert streamed.status_code == 413 and "http_max_body" in streamed.json()["detail"]
    lying = client.post("/echo", content=b"{}", headers={"Content-Length": "nope"})
    assert lying.status_code == 400
    assert read == []
    assert client.post("/echo", content=b"ok").json() == {"bytes": 2}  # and the port goes on


def test_a_prompt_longer_than_any_context_is_refused_before_tokenizing() -> None:
    """32 characters per token is more than any real text takes: past that, no tokenizer runs."""
    generator = SimpleNamespace(context=2048)
    _check_chars(2048 * MAX_CHARS_PER_TOKEN, generator, "m", "prompt")  # may fit: the tokenizer decides
    with pytest.raises(OpenAIError) as refused:
        _check_chars(2048 * MAX_CHARS_PER_TOKEN + 1, generator, "m", "prompt")
    assert refused.value.status == 400 and "2048-token context" in str(refused.value)

"""``garden generate --swarm MODEL``: the local peer's ``/v1/chat/completions``, streamed to the terminal."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console

from garden.cli.common import auth_headers, fail


def stream_from_daemon(url: str, body: dict[str, Any], say: Console) -> None:
    """Print the answer's pieces on stdout as they come; a one-line error (exit 1) when the peer refuses."""
    import httpx

    started, first, usage, answer_id = time.monotonic(), None, None, None
    request = body | {"stream": True, "stream_options": {"include_usage": True}}
    try:
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=request, timeout=httpx.Timeout(30, read=300),
            headers=auth_headers(url),
        ) as r:  # fmt: skip
            if r.status_code != 200:
                r.read()
                raise fail(f"{url} answered {r.status_code}: {_message(r.text)}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    print(flush=True)
                    raise fail(f"generation failed: {event['error'].get('message')}")
                usage = event.get("usage") or usage
                answer_id = event.get("id") or answer_id
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content")
                    if text:
                        first = first or time.monotonic()
                        sys.stdout.write(text)
                        sys.stdout.flush()
    except httpx.TransportError:
        raise fail(f"no garden daemon answers at {url}; start one with `garden run` (or pass --url)") from None
    except KeyboardInterrupt:
        print(flush=True)
        raise fail("interrupted", 130) from None
    print(flush=True)
    seconds = time.monotonic() - started
    if usage:
        tokens = usage.get("completion_tokens", 0)
        ttft = f", first token after {first - started:.2f} s" if first else ""
        rate = f"{tokens / seconds:.1f} tokens/s{ttft}"
        say.print(f"{tokens} tokens in {seconds:.1f} s ({rate}) via the swarm", markup=False)
    if answer_id:
        say.print(f"rate it: garden feedback accept|redo|edit {answer_id}", markup=False, soft_wrap=True)


def _message(text: str) -> str:
    try:
        error = json.loads(text).get("error", {})
        return str(error.get("message", text))[:300]
    except (ValueError, AttributeError):
        return text[:300]

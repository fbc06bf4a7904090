"""A hub model's size comes from the hub's metadata, before any download; a peer refuses a teacher too big
for it without fetching a byte of weights. The hub is a server of the test's own on 127.0.0.1
(``HF_ENDPOINT``) that answers ``/api/models/<id>`` as the hub does and records every request."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest

from garden.models.loading import hub_parameter_count, model_memory_bytes
from harness.daemons import DaemonFactory, wait_until

MODELS = {"org/huge": 7_000_000_000, "org/small": 100_000_000}


class FakeHub:
    def __init__(self) -> None:
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the standard library's name
                hub.requests.append(self.path)
                repo = self.path.split("?", 1)[0].removeprefix("/api/models/")
                if self.path.startswith("/api/models/") and repo in MODELS:
                    body = json.dumps({"id": repo, "safetensors": {"parameters": {"BF16": MODELS[repo]},
                                                                   "total": MODELS[repo]}}).encode()  # fmt: skip
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                else:
                    body = b'{"error": "Repository not found"}'
                    self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", fake.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    yield fake
    fake.close()


def test_the_parameter_count_comes_from_the_hubs_metadata(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub_parameter_count("org/huge") == 7_000_000_000
    assert model_memory_bytes("org/small") == int(100_000_000 * 4 * 1.2)
    assert hub_parameter_count("org/missing") is None  # unknown: loading will tell
    assert "/api/models/org/huge?expand=safetensors" in hub.requests
    assert not [r for r in hub.requests if "/resolve/" in r], hub.requests  # metadata only, never a file
    seen = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_parameter_count("org/huge") is None and len(hub.requests) == seen  # offline: not even asked


@pytest.mark.swarm
def test_a_peer_refuses_a_hub_teacher_too_big_for_it_before_downloading(
    daemons: DaemonFactory, hub: FakeHub, tmp_path: Path
) -> None:
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    peer = daemons.start("--roles", "shaker", "--max-memory", "2GiB", env=env)
    rows = [{"prompt": "What is 2 + 2?", "reference": "4"}] * 2
    spec = {"name": "huge", "teachers": ["org/huge"], "prompts": "prompts.jsonl", "shard_size": 2,
            "student": {"base": "builtin:smollm2-135m"}}  # fmt: skip
    assert peer.request("POST", "/missions", json={"spec": spec, "prompts": rows}).status_code == 201
    blocked = wait_until(lambda: (peer.get("/status").json().get("shaking") or {}).get("blocked"), 60, 0.5, "blocked")
    assert "cannot hold the teacher org/huge" in blocked and "--max-memory" in blocked
    assert any(r.startswith("/api/models/org/huge") for r in hub.requests)
    assert not [r for r in hub.requests if "/resolve/" in r], hub.requests  # not a byte of weights asked for
    assert not (tmp_path / "hf" / "hub").exists() or not any((tmp_path / "hf" / "hub").rglob("*.safetensors"))

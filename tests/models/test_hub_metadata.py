"""A hub model's size comes from the hub's metadata, before any download; a peer refuses a teacher too big
for its memory, or for the room ``--max-disk`` leaves, without fetching a byte of weights. The hub is a
server of the test's own on 127.0.0.1 (``HF_ENDPOINT``) that answers ``/api/models/<id>`` as the hub does
and records every request."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest

from garden.models import hub as hub_metadata
from garden.models.hub import SMALL_FILES_BYTES, hub_size
from garden.models.loading import hub_parameter_count, model_disk_bytes, model_memory_bytes
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
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import: tests are offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub_metadata.forget_answers()  # another test's hub may have answered for the same ids
    yield fake
    fake.close()
    hub_metadata.forget_answers()


def test_the_parameter_count_comes_from_the_hubs_metadata(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub_parameter_count("org/huge") == 7_000_000_000
    assert model_memory_bytes("org/small") == int(100_000_000 * 4 * 1.2)
    assert hub_parameter_count("org/missing") is None  # unknown: loading will tell
    assert "/api/models/org/huge?expand=safetensors" in hub.requests
    size = hub_size("org/small")  # BF16 weights: 2 bytes a parameter on disk
    assert size is not None and size.download_bytes == 200_000_000 + SMALL_FILES_BYTES
    assert model_disk_bytes("org/small") == size.download_bytes and model_disk_bytes("builtin:smollm2-135m") == 0
    asked = len(hub.requests)
    assert hub_parameter_count("org/huge") == 7_000_000_000 and len(hub.requests) == asked  # remembered a while
    assert not [r for r in hub.requests if "/resolve/" in r], hub.requests  # metadata only, never a file
    seen = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_parameter_count("org/huge") is None and len(hub.requests) == seen  # offline: not even asked


@pytest.mark.swarm
@pytest.mark.parametrize(
    ("teacher", "caps", "refusal"),
    [
        ("org/huge", ["--max-memory", "2GiB"], "cannot hold the teacher org/huge: it needs about"),
        ("org/small", ["--max-disk", "100MB"], "cannot download the teacher org/small: it needs about 223 MiB to"),
    ],
)
def test_a_peer_refuses_a_hub_teacher_too_big_for_it_before_downloading(
    daemons: DaemonFactory, hub: FakeHub, tmp_path: Path, teacher: str, caps: list[str], refusal: str
) -> None:
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    peer = daemons.start("--roles", "shaker", *caps, env=env)
    rows = [{"prompt": "What is 2 + 2?", "reference": "4"}] * 2
    spec = {"name": "big", "teachers": [teacher], "prompts": "prompts.jsonl", "shard_size": 2,
            "student": {"base": "builtin:smollm2-135m"}}  # fmt: skip
    assert peer.request("POST", "/missions", json={"spec": spec, "prompts": rows}).status_code == 201
    blocked = wait_until(lambda: (peer.get("/status").json().get("shaking") or {}).get("blocked"), 60, 0.5, "blocked")
    assert refusal in blocked and caps[0] in blocked, blocked
    assert any(r.startswith(f"/api/models/{teacher}") for r in hub.requests)
    assert not [r for r in hub.requests if "/resolve/" in r], hub.requests  # not a byte of weights asked for
    for cache in (tmp_path / "hf", peer.data_dir / "models"):  # the user's cache, and the peer's own
        assert not any(cache.rglob("*.safetensors")), list(cache.rglob("*"))

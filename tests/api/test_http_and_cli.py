"""The local HTTP port and the CLI that reads it, against one real daemon (started once per module)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from collections.abc import Iterator

import pytest

from harness.daemons import Daemon, DaemonFactory, wait_until

pytestmark = pytest.mark.swarm


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    factory = DaemonFactory(tmp_path_factory.mktemp("http"))
    started = factory.start()
    wait_until(lambda: started.get("/status").json()["joined"], timeout=15, message="joined")
    yield started
    orphans = factory.close()
    assert not orphans, orphans


def garden(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "garden", *args], capture_output=True, text=True, timeout=300, env=env)


def test_health(daemon: Daemon) -> None:
    response = daemon.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_status_fields_and_types(daemon: Daemon) -> None:
    status = daemon.get("/status").json()
    assert status["peer_id"] == daemon.peer_id
    assert isinstance(status["version"], str) and status["version"]
    assert isinstance(status["uptime_s"], float) and status["uptime_s"] >= 0
    assert set(status["roles"]) <= {"shaker", "trainer", "server"}
    assert status["addresses"] == daemon.addresses
    assert all(
        a.startswith("/ip4/127.0.0.1/tcp/") and a.endswith(f"/p2p/{daemon.peer_id}") for a in status["addresses"]
    )
    assert isinstance(status["peers"], int) and status["peers"] == 1
    assert status["joined"] is True
    assert status["machine"]["cores"] >= 1 and status["machine"]["ram_bytes"] > 0


def test_peers_lists_this_peer(daemon: Daemon) -> None:
    peers = daemon.get("/peers").json()
    assert [p["peer_id"] for p in peers] == [daemon.peer_id]
    me = peers[0]
    assert me["is_self"] is True
    assert isinstance(me["last_seen"], float) and me["expires_in_s"] > 0
    assert {"roles", "cores", "ram_bytes", "gpu", "load", "version", "addresses"} <= set(me)


def test_metrics_are_prometheus_text(daemon: Daemon) -> None:
    response = daemon.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert f'garden_info{{peer_id="{daemon.peer_id}"' in text
    assert "garden_peers_seen 1.0" in text
    assert 'garden_dht_requests_total{op="store",outcome="ok"}' in text
    assert "garden_uptime_seconds" in text


@pytest.mark.parametrize("path", ["/nope", "/status/extra", "/v1/unknown"])
def test_unknown_routes_are_json_404(daemon: Daemon, path: str) -> None:
    response = daemon.get(path)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


@pytest.mark.parametrize("method, path", [("POST", "/status"), ("DELETE", "/peers"), ("PUT", "/health")])
def test_wrong_methods_are_json_405(daemon: Daemon, method: str, path: str) -> None:
    response = daemon.request(method, path, content=b"\xff\x00 not json")
    assert response.status_code == 405
    assert response.json() == {"detail": "Method Not Allowed"}


def test_openapi_docs_work_offline(daemon: Daemon) -> None:
    page = daemon.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "https://" not in page.text
    scripts = [part.split('"')[0] for part in page.text.split('src="')[1:]]
    assert scripts and all(daemon.get(src).status_code == 200 for src in scripts)
    spec = daemon.get("/openapi.json").json()
    assert {"/health", "/status", "/peers", "/metrics"} <= set(spec["paths"])


def test_daemon_survives_abuse(daemon: Daemon) -> None:
    """Oversized and malformed requests get 4xx answers; the daemon stays up."""
    big = daemon.request("POST", "/peers", content=b"x" * 5_000_000)
    assert 400 <= big.status_code < 500
    weird = daemon.get("/status", headers={"Content-Type": "application/json"}, params={"x": "\x00" * 100})
    assert weird.status_code == 200
    assert daemon.get("/health").json() == {"status": "ok"}


def test_cli_status_and_peers(daemon: Daemon) -> None:
    status = garden("status", "--url", daemon.url, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["peer_id"] == daemon.peer_id
    table = garden("status", "--data-dir", str(daemon.data_dir))  # finds the port through daemon.json
    assert table.returncode == 0, table.stderr
    assert daemon.peer_id in table.stdout and "roles" in table.stdout
    peers = garden("peers", "--url", daemon.url, "--json")
    assert [p["peer_id"] for p in json.loads(peers.stdout)] == [daemon.peer_id]
    table = garden("peers", "--url", daemon.url)
    assert table.returncode == 0 and "1 peer(s)" in table.stdout


def test_cli_without_a_daemon(tmp_path: Path) -> None:
    result = garden("status", "--data-dir", str(tmp_path), "--url", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert "no garden daemon answers at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr
    result = garden("peers", "--url", "http://127.0.0.1:9")
    assert result.returncode == 1 and "garden run" in result.stderr


def test_cli_rejects_bad_settings(tmp_path: Path) -> None:
    result = garden("run", "--data-dir", str(tmp_path), "--http-port", "99999")
    assert result.returncode == 2
    assert "http_port" in result.stderr and "Traceback" not in result.stderr
    result = garden("run", "--data-dir", str(tmp_path), "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = garden("run", "--data-dir", str(tmp_path), "--swarm", "a/b")
    assert result.returncode == 2 and "swarm name" in result.stderr and "Traceback" not in result.stderr
    result = garden("run", "--data-dir", str(tmp_path), "--client-mode")
    assert result.returncode == 2 and "--join" in result.stderr


def test_help_shows_env_and_config_keys() -> None:
    result = garden("run", "--help", env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 0
    assert "GARDEN_HTTP_PORT" in result.stdout and "config key http_port" in result.stdout


def test_cli_shake_writes_rows(tmp_path: Path, model_cache: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "What is the capital of France?", "reference": "The capital of France is Paris."}\n'
        '{"prompt": "What is 2 + 2?", "reference": "2 + 2 = 4."}\n'
    )
    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "GARDEN_CACHE_DIR": str(model_cache), "GARDEN_DATA_DIR": str(tmp_path / "data")}
    result = garden(
        "shake", "--prompts", str(prompts), "--out", str(out), "--candidates", "2", "--max-new-tokens", "16", env=env
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2 and {"prompt", "chosen", "rejected", "topk_logprobs"} <= set(lines[0])
    assert "2 rows" in result.stdout


def test_cli_shake_rejects_a_malformed_prompts_file(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{not json\n')
    out = tmp_path / "rows.jsonl"
    result = garden("shake", "--prompts", str(prompts), "--out", str(out))
    assert result.returncode == 2
    assert f"{prompts}:2:" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()

"""The dashboard at ``GET /``: its files, and headless Chromium against a real daemon.

The browser is Debian's ``chromium`` driven by playwright's sync API (``make install-dev`` installs it;
``playwright install`` is never run, browser downloads are impossible on the project's machines). In CI
(env ``CI`` set) a missing browser or playwright fails the test; elsewhere it skips.

``GARDEN_SAVE_SCREENSHOT=1`` also copies the screenshot to ``docs/dashboard.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from garden.api.dashboard import make_dashboard_router
from garden.data import demo_prompts
from harness.daemons import DaemonFactory, wait_until

pytestmark = pytest.mark.swarm

TEACHER = "builtin:smollm2-135m"
MISSION_NAME = "dashboard-test"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_dashboard_files_are_served() -> None:
    app = FastAPI()
    app.include_router(make_dashboard_router())
    client = TestClient(app)

    index = client.get("/")
    assert index.status_code == 200
    assert index.headers["content-type"].startswith("text/html")
    assert index.headers["cache-control"] == "no-cache"
    assert "/dashboard/dashboard.js" in index.text and "/dashboard/dashboard.css" in index.text
    assert 'id="peer-id"' in index.text and 'id="pause-button"' in index.text

    script = client.get("/dashboard/dashboard.js")
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.headers["cache-control"] == "no-cache"
    assert "fetchJSON" in script.text
    style = client.get("/dashboard/dashboard.css")
    assert style.status_code == 200
    assert style.headers["content-type"].startswith("text/css")

    for path in (
        "/dashboard/../pyproject.toml",
        "/dashboard/%2e%2e/pyproject.toml",
        "/dashboard/..%2fpyproject.toml",
        "/dashboard/..%2F..%2Fpyproject.toml",
        "/dashboard/index.html",  # only the two assets, by name
        "/dashboard/nope.js",
        "/dashboard/",
    ):
        assert client.get(path).status_code == 404, path
    # the page is no API: it stays out of the OpenAPI schema
    assert "/" not in client.get("/openapi.json").json()["paths"]


def _sync_playwright() -> Any:
    """playwright's ``sync_playwright`` and Debian's chromium, or a skip (a failure in CI)."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("the playwright package (pip install -e '.[dev]')")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        missing.append("chromium (apt-get install chromium, or `make install-dev`)")
    if missing:
        message = f"the dashboard's browser test needs {' and '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: never skipped there)")
        pytest.skip(message)
    return sync_playwright, chromium


def _mission_body() -> dict[str, Any]:
    rows = demo_prompts()[:8]
    return {
        "spec": {
            "name": MISSION_NAME,
            "teachers": [TEACHER],
            "prompts": "prompts.jsonl",
            "shard_size": 2,
            "student": {"base": TEACHER, "keep_layers": 10},
            "sampling": {"candidates": 2, "max_new_tokens": 6, "top_k_logprobs": 4},
        },
        "prompts": [{"prompt": r.prompt, "reference": r.reference} for r in rows],
    }


# A trainer and a layer server would take minutes of two cores: their parts of the page (charts, coverage
# bars) are fed made-up JSON through playwright's request interception, on top of the real answers. The
# model's name is hostile on purpose: it must show as text.
HOSTILE_MODEL = "<img src=x onerror=alert(1)>evil/model"


def SWARM_MODELS(url: str) -> bool:  # noqa: N802 (a route pattern, named as one)
    """``/models`` (made up below), not ``/v1/models``: the chat panel asks the model the peer really serves."""
    return url.endswith("/models") and "/v1/" not in url


def _training(now: float) -> dict[str, Any]:
    history = [
        {"t": now - 600 + 15 * i, "epoch": i // 8, "samples": 32 * i,
         "loss": 2.4 * 0.93**i + 0.3, "kl": 1.1 * 0.9**i + 0.05, "pref_acc": min(0.95, 0.45 + 0.012 * i)}
        for i in range(40)
    ]  # fmt: skip
    return {"state": "training", "epoch": 4, "max_epochs": 10, "samples": 1280, "samples_per_s": 2.1, "peers": 2,
            "loss": history[-1]["loss"], "kl": history[-1]["kl"], "pref_acc": history[-1]["pref_acc"],
            "history": history}  # fmt: skip


MODELS = [
    {"model": "garden/smollm2-135m-distilled", "num_layers": 30, "servers": 3, "complete": True, "missing": [],
     "spans": [{"peer_id": "a", "start": 0, "end": 30, "throughput": 900.0},
               {"peer_id": "b", "start": 0, "end": 18, "throughput": 700.0},
               {"peer_id": "c", "start": 10, "end": 24, "throughput": 500.0}]},
    {"model": HOSTILE_MODEL, "num_layers": 24, "servers": 1, "complete": False, "missing": [[16, 24]],
     "spans": [{"peer_id": "d", "start": 0, "end": 16, "throughput": 300.0}]},
]  # fmt: skip


def test_dashboard_in_a_browser(daemons: DaemonFactory, model_cache: Path, tmp_path: Path) -> None:
    sync_playwright, chromium = _sync_playwright()
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from garden.models.loading import builtin_gguf, converted_gguf

    converted_gguf(builtin_gguf("smollm2-135m"))  # once per run, shared with the daemon through the cache
    env = {"GARDEN_CACHE_DIR": str(model_cache), "HF_HUB_OFFLINE": "1"}
    # it serves the built-in model whole, so that the chat panel asks a real model of the swarm
    daemon = daemons.start("--roles", "shaker,server", "--serve", TEACHER, "--max-threads", "1", env=env)
    created = daemon.request("POST", "/missions", json=_mission_body())
    assert created.status_code == 201, created.text
    mission_id = created.json()["id"]
    peer_id = daemon.get("/status").json()["peer_id"]

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
            page.set_default_timeout(20_000)

            def with_training(route: Any) -> None:  # every shard shaken, the student still training
                real = route.fetch()
                shaken = real.json()["shards"] | {"done": 4, "leased": 0, "open": 0}
                route.fulfill(response=real, json=real.json() | {"train": _training(time.time()), "state": "training",
                                                                 "shards": shaken})  # fmt: skip

            page.route(f"**/missions/{mission_id}", with_training)
            page.route(SWARM_MODELS, lambda route: route.fulfill(json=MODELS))
            page.goto(daemon.url + "/")

            page.wait_for_function(
                "id => document.getElementById('peer-id').textContent === id", arg=peer_id, timeout=20_000
            )
            name = page.locator(".mission-name", has_text=MISSION_NAME)
            name.wait_for()
            assert name.text_content() == MISSION_NAME
            progress = page.locator(f"[data-mission='{mission_id}'] progress.mission-progress")
            progress.wait_for()
            shards = daemon.get(f"/missions/{mission_id}").json()["shards"]
            assert progress.get_attribute("max") == str(shards["total"]) == "4"
            epochs = page.locator(f"[data-mission='{mission_id}'] progress.mission-epochs")
            epochs.wait_for()
            assert (epochs.get_attribute("value"), epochs.get_attribute("max")) == ("4", "10")
            assert page.locator(f"[data-mission='{mission_id}'] .chart polyline").count() == 3
            # the badge tells the mission's life: training, not "done", while the student trains
            assert page.locator(f"[data-mission='{mission_id}'] .mission-head .badge").text_content() == "training"
            hostile = page.locator(".model-name", has_text="evil/model")
            hostile.wait_for()
            assert hostile.text_content() == HOSTILE_MODEL and page.locator("#models img").count() == 0
            assert page.locator(".model").nth(1).locator("rect.c0").count() == 8  # layers 16..23 missing
            assert page.locator(".model").nth(0).locator("rect").count() == 30
            page.locator("#peers tr.self").wait_for()
            assert peer_id in (page.locator("#peers tr.self td").first.get_attribute("title") or "")
            # a swarm on 127.0.0.1: everyone dials everyone (garden.net.reach), shown with the peer and in the table
            assert "public, direct, relays for others" in (page.locator("#peer-facts").text_content() or "")
            assert page.locator("#peers tr.self td").nth(3).text_content() == "public"

            # the chat panel: ask the model the peer serves, redo the answer, edit the new one: a pair is counted
            page.locator("#chat-model option", has_text=TEACHER).wait_for(state="attached", timeout=120_000)
            page.fill("#chat-input", "What is the capital of France?")
            page.click("#chat-ask")
            try:
                page.locator("#chat-rate").wait_for(timeout=120_000)
            except PlaywrightTimeout:  # what the panel said instead (a CI run saw it give up after 8 s)
                raise AssertionError(f"no answer shown: {page.locator('#chat-note').text_content()!r}") from None
            first = daemon.get("/feedback").json()[0]
            assert page.locator("#chat-answer").text_content() == (first["text"] or "(an empty answer)")
            page.click("#chat-redo")
            page.wait_for_function("document.getElementById('chat-pairs').textContent.startsWith('rejected')",
                                   timeout=120_000)  # fmt: skip
            second = daemon.get("/feedback").json()[0]
            assert second["redo_of"] == first["id"] and page.locator("#chat-answer").text_content() == (
                second["text"] or "(an empty answer)")
            page.click("#chat-edit")
            page.fill("#chat-edit-text", "Paris is the capital of France.")
            page.click("#chat-save")
            page.wait_for_function("document.getElementById('chat-pairs').textContent.includes('1 pair kept')")
            pairs = [json.loads(line) for line in daemon.get("/feedback/pairs").text.splitlines()]
            edit = "Paris is the capital of France."
            assert [(p["chosen"], p["rejected"]) for p in pairs] == [(edit, second["text"])]
            assert page.locator("#chat-answer").text_content() == "Paris is the capital of France."

            page.click("#pause-button")
            wait_until(lambda: daemon.get("/status").json()["paused"], 10, message="paused after the click")
            page.wait_for_function("document.getElementById('peer-state').textContent.startsWith('paused')")
            assert page.locator("#resume-button").is_enabled()
            page.click("#resume-button")
            wait_until(lambda: not daemon.get("/status").json()["paused"], 10, message="resumed after the click")
            page.wait_for_function("!document.getElementById('peer-state').textContent.startsWith('paused')")

            # a tamer name for the screenshot (docs/dashboard.png); waiting for it also sees the page poll on
            page.unroute(SWARM_MODELS)
            page.route(
                SWARM_MODELS,
                lambda route: route.fulfill(json=[MODELS[0], MODELS[1] | {"model": "garden/partly-served"}]),
            )
            page.locator(".model-name", has_text="garden/partly-served").wait_for()
            assert page.locator("#unreachable").is_hidden()
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    assert not problems, problems
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000, len(data)
    if os.environ.get("GARDEN_SAVE_SCREENSHOT") == "1":
        DOCS_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)

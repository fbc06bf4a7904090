"""Missions trained across real daemons: each trainer peer's daemon starts, supervises and stops its
trainer worker; shaking and training overlap; the swarm ends with one model (issue 6, daemon side).

The student is a tiny random Llama with the built-in tokenizer (an epoch takes seconds); the teacher
is the real built-in model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from garden.data import demo_prompts
from tests.daemons import Daemon, DaemonFactory, wait_until
from tests.trainers import make_tiny_student

pytestmark = pytest.mark.swarm
TEACHER = "builtin:smollm2-135m"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    from garden.models import builtin_gguf, converted_gguf

    converted_gguf(builtin_gguf("smollm2-135m"))
    return make_tiny_student(tmp_path_factory.mktemp("tiny") / "student")


def start(factory: DaemonFactory, cache: Path, *args: str, join: Daemon | None = None, **kwargs: Any) -> Daemon:
    extra = ["--join", join.join_addr] if join is not None else []
    env = {"GARDEN_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    return factory.start(*extra, "--max-threads", "1", "--train-batch-size", "2", *args, env=env, **kwargs)


def mission_body(student: Path, max_epochs: int = 3) -> dict[str, Any]:
    rows = demo_prompts()[:8]
    return {
        "spec": {
            "name": "train-test",
            "teachers": [TEACHER],
            "prompts": "prompts.jsonl",
            "shard_size": 2,
            "student": {"base": str(student)},
            "sampling": {"candidates": 2, "max_new_tokens": 6, "top_k_logprobs": 4},
            "train": {"target_batch_size": 64, "max_epochs": max_epochs, "warmup_epochs": 0, "lr": 1e-2,
                      "matchmaking_time": 2.0, "averaging_timeout": 10.0},
        },
        "prompts": [{"prompt": r.prompt, "reference": r.reference} for r in rows],
    }  # fmt: skip


def create(daemon: Daemon, body: dict[str, Any]) -> str:
    response = daemon.request("POST", "/missions", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def training(daemon: Daemon, mission_id: str) -> dict[str, Any]:
    response = daemon.get(f"/missions/{mission_id}")
    return (response.json().get("train") or {}) if response.status_code == 200 else {}


def final_params(daemon: Daemon, mission_id: str) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors = load_file(str(daemon.data_dir / "train" / mission_id / "out" / "final" / "model.safetensors"))
    return torch.cat([tensors[k].reshape(-1) for k in sorted(tensors)])


def test_two_peers_shake_and_train_one_student(daemons: DaemonFactory, model_cache: Path, tiny: Path) -> None:
    a = start(daemons, model_cache)
    b = start(daemons, model_cache, join=a)
    mission_id = create(a, mission_body(tiny))

    wait_until(lambda: training(a, mission_id).get("epoch", 0) >= 1, 180, 0.5, "a trained an epoch")
    done = wait_until(
        lambda: all(training(d, mission_id).get("state") == "done" for d in (a, b)), 180, 1.0, "both trained"
    )
    assert done
    for daemon in (a, b):
        train = training(daemon, mission_id)
        assert train["epoch"] == 3 and train["max_epochs"] == 3 and train["restarts"] == 0
        assert train["rows"] > 0 and train["samples"] > 0 and train["skipped_steps"] == 0
        assert train["loss"] is not None and train["last_checkpoint"]["epoch"] == 3
    pa, pb = final_params(a, mission_id), final_params(b, mission_id)
    assert torch.isfinite(pa).all() and torch.allclose(pa, pb, atol=1e-6)
    metrics = b.get("/metrics").text
    assert f'garden_train_epoch{{mission="{mission_id}",name="train-test"}} 3.0' in metrics
    shown = subprocess.run(
        [sys.executable, "-m", "garden", "mission", "show", mission_id[:12], "--url", a.url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert shown.returncode == 0 and "epoch 3/3" in shown.stdout and "training here: done" in shown.stdout

    # a restarted daemon does not train a finished mission again
    assert b.stop() == 0
    log = b.data_dir / "train" / mission_id / "worker.log"
    starts = log.read_text().count("training mission")
    b = start(daemons, model_cache, join=a, data_dir=b.data_dir)
    wait_until(lambda: training(b, mission_id).get("state") == "done", 30, 0.5, "b knows it is done")
    time = __import__("time")
    time.sleep(3)  # several supervision periods
    assert log.read_text().count("training mission") == starts


def test_the_daemon_restarts_a_killed_trainer_and_stops_it_on_exit(
    daemons: DaemonFactory, model_cache: Path, tiny: Path
) -> None:
    a = start(daemons, model_cache)
    mission_id = create(a, mission_body(tiny, max_epochs=1000))
    first = wait_until(lambda: training(a, mission_id).get("pid"), 180, 0.5, "a trainer worker")
    wait_until(lambda: training(a, mission_id).get("state") == "training", 60, 0.5, "training")
    a.record_descendants()
    os.kill(first, signal.SIGKILL)  # a crash: the daemon notices and starts another after a back-off
    wait_until(lambda: training(a, mission_id).get("state", "").startswith("restarting"), 30, 0.2, "restarting")
    second = wait_until(
        lambda: (lambda t: t.get("pid") if t.get("pid") != first and t.get("state") == "training" else None)(
            training(a, mission_id)
        ),
        60, 0.5, "a new trainer worker",
    )  # fmt: skip
    assert training(a, mission_id)["restarts"] == 1
    wait_until(lambda: not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE, 10)
    a.record_descendants()
    assert a.stop() == 0, a.stderr()[-3000:]
    assert not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE
    status = json.loads((a.data_dir / "train" / mission_id / "status.json").read_text())
    assert status["state"] == "stopped"

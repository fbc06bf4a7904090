"""The daemon's supervision of trainer workers, with real processes that stand in for a worker (no DHT, no model):
what the status file says after the daemon stopped a worker that would not stop."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from garden.collab.worker import WorkerStatus
from garden.mission import training
from garden.mission.training import STATUS_FILE, TrainingConfig, TrainingWork, _Worker

STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
)
OBEDIENT = "import time; print('ready', flush=True); time.sleep(60)"


def _spawn(code: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"  # its SIGTERM handler is in place
    return proc


def _work(root: Path) -> TrainingWork:
    config = TrainingConfig(trainer=True, root=root, store_path=root / "store.db", initial_peers=())
    return TrainingWork(SimpleNamespace(missions={}), None, config)  # type: ignore[arg-type]  # close() reads neither


@pytest.mark.parametrize(("code", "before", "after", "exit_code"), [
    (STUBBORN, "training", "stopped", -signal.SIGKILL),  # killed in its step: the daemon says it stopped it
    (STUBBORN, "done", "done", -signal.SIGKILL),  # a final state stays
    (OBEDIENT, "failed", "failed", -signal.SIGTERM),
])  # fmt: skip
async def test_a_worker_the_daemon_stopped_is_not_left_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str, before: str, after: str, exit_code: int
) -> None:
    monkeypatch.setattr(training, "STOP_GRACE", 0.5)
    mission_id = "ab" * 32
    work = _work(tmp_path)
    (tmp_path / mission_id).mkdir()
    status_path = tmp_path / mission_id / STATUS_FILE
    WorkerStatus(state=before, epoch=3, samples=96, pid=1).write(status_path)
    proc = _spawn(code)
    work._workers[mission_id] = _Worker(mission_id, tmp_path / mission_id, proc=proc)

    await work.close()

    assert proc.returncode == exit_code
    status = WorkerStatus.read(status_path)
    assert status is not None and status.state == after
    assert (status.epoch, status.samples) == (3, 96)  # the rest of what it reported stays


async def test_a_stopped_worker_without_a_status_file_gets_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training, "STOP_GRACE", 0.5)
    mission_id = "cd" * 32
    work = _work(tmp_path)
    proc = _spawn(STUBBORN)
    work._workers[mission_id] = _Worker(mission_id, tmp_path / mission_id, proc=proc)
    await work.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / mission_id).exists()

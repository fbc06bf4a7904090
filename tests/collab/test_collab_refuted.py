"""A trainer alone with a liar that serves a NaN state (real worker processes, real hivemind on 127.0.0.1): the
state is refused, and the liar's progress counts for nothing from then on, so the trainer trains from its own
epoch. Before, it followed the liar's epoch for good (out of sync at every step, refusing the state every time): CI
saw an honest trainer that fell behind, once the other honest ones had finished, stuck so beside the NaN attacker.
Not serial: one worker and the liar, no timing asserted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.daemons import DaemonFactory, wait_until
from harness.trainers import WorkerFactory, make_rows_store, make_tiny_student
from tests.collab.test_collab_swarm import HOSTILE, bootstrap, workers  # noqa: F401 - the fixture


pytestmark = [pytest.mark.swarm]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    return make_tiny_student(tmp_path_factory.mktemp("tiny") / "student")


@pytest.fixture(scope="module")
def rows_store(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    return make_rows_store(tmp_path_factory.mktemp("rows") / "garden.sqlite3", prompts=2)  # a few rows suffice


def test_a_trainer_alone_with_a_liar_serving_nan_trains_from_its_own_epoch(
    daemons: DaemonFactory, workers: WorkerFactory  # noqa: F811 - the fixture
) -> None:
    peers = bootstrap(daemons)
    small = {"target_batch_size": 32}  # an epoch of 16 steps: the trainer trains alone
    liar = workers.start(peers, executable=[*HOSTILE, "--attack", "epoch", "--claim", "2", "--state", "nan"], **small)
    liar_id = wait_until(lambda: liar.status().get("peer_id"), 120, 0.5, "the liar's claim")
    trainer = workers.start(peers, max_epochs=1, min_trainers=1, **small)
    wait_until(lambda: trainer.status().get("state") == "done", 180, 0.5, "the trainer done")
    log = trainer.log()
    assert f"downloaded from peer {liar_id}: it holds non-finite values" in log, log[-4000:]
    assert f"trainer {liar_id} served a state with non-finite values" in log
    status = trainer.status()
    assert status["epoch"] == 1 and status["loaded_state_at_epoch"] is None, status
    assert torch.isfinite(trainer.probe()).all()

"""Swarm training across real trainer worker processes (real hivemind, p2pd, averagers on 127.0.0.1),
bootstrapped from a real daemon, on a tiny random Llama student and real DORPO rows.

The student is tiny so that an epoch takes seconds; the averaging machinery is the same at any size.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from harness.daemons import DaemonFactory, wait_until
from harness.trainers import WorkerFactory, make_rows_store, make_tiny_student

pytestmark = [pytest.mark.swarm, pytest.mark.serial]
WORKER_LOG_TAIL = 80
HOSTILE = [sys.executable, str(Path(__file__).resolve().parent / "hostile_trainer.py")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    return make_tiny_student(tmp_path_factory.mktemp("tiny") / "student")


@pytest.fixture(scope="module")
def rows_store(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    return make_rows_store(tmp_path_factory.mktemp("rows") / "garden.sqlite3")


@pytest.fixture
def workers(
    tmp_path: Path, tiny: Path, rows_store: Path, request: pytest.FixtureRequest
) -> Iterator[WorkerFactory]:
    """Worker processes; when the test failed, the end of each one's log is printed (as the daemons'): a CI
    machine keeps nothing else."""
    factory = WorkerFactory(tmp_path / "workers", tiny, rows_store)
    yield factory
    failed = getattr(request.node, "report_call", None)
    if failed is not None and failed.failed:
        for worker in factory.workers:
            print(f"\n----- the log of {worker.name} (last {WORKER_LOG_TAIL} lines) -----")
            print("\n".join(worker.log().splitlines()[-WORKER_LOG_TAIL:]))
    orphans = factory.close()
    assert not orphans, f"processes outlived their workers: {orphans}"


def bootstrap(daemons: DaemonFactory) -> list[str]:
    """A real daemon (no shaking) whose addresses the workers' DHTs join, as a peer's own worker would."""
    return [daemons.start("--roles", "trainer").join_addr]


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[name].reshape(-1) for name in sorted(tensors)])


def initial(tiny: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return flat(load_file(str(tiny / "model.safetensors")))


def agreed_epochs(x: dict[int, torch.Tensor], y: dict[int, torch.Tensor], after: int = 0) -> list[int]:
    """The epochs past ``after`` at which two workers held the same parameters. A round can fail on a busy
    machine (the peer then steps with its own gradients, hivemind's fallback, and the next round averages
    the copies again), so tests ask for agreement after a round, not at every epoch."""
    return [e for e in sorted(set(x) & set(y)) if e > after and torch.allclose(x[e], y[e], rtol=1e-9, atol=1e-6)]


def test_trainers_reach_the_same_parameters_and_a_late_one_loads_their_state(
    daemons: DaemonFactory, workers: WorkerFactory, tiny: Path
) -> None:
    peers = bootstrap(daemons)
    # min_trainers: neither takes a step before the other is in the progress record (else one could train an
    # epoch alone while the other starts); the late one finds two and starts at once
    a, b = (workers.start(peers, max_epochs=5, min_trainers=2) for _ in range(2))
    # the late one starts after the first joint epoch: it must load the state mid-run, not at the very end
    wait_until(lambda: min(w.status().get("epoch", 0) for w in (a, b)) >= 1, 120, 0.5, "an epoch together")
    assert a.status()["peers"] == 2 and b.status()["peers"] == 2
    late = workers.start(peers, max_epochs=5, min_trainers=2)
    # each trains on its own batches (other seeds): only averaging makes their parameters equal
    wait_until(lambda: agreed_epochs(a.probes(), b.probes()), 60, 0.5, "an epoch where a and b agree")
    wait_until(lambda: all(w.status().get("state") == "done" for w in (a, b, late)), 180, 0.5, "all done")
    loaded = late.status()["loaded_state_at_epoch"]
    assert loaded is not None and loaded >= 1, late.log()[-3000:]  # it did not start from the random init
    # what it loaded is exactly the state a peer held at that epoch: loaded uncompressed, served only whole (never
    # while the peer moves to the next epoch, never labelled with an epoch its parameters are not of) and copied
    # when read (garden.collab.hivemind_patches), and noted under the epoch its parameters belong to
    held = [w.probes().get(loaded) for w in (a, b)]
    assert any(p is not None and torch.equal(p, late.probes()[loaded]) for p in held), (held, late.probes())

    # one peer wrote the swarm's checkpoint: trained and finite
    written = [w.checkpoint_params() for w in (a, b, late) if w.checkpoint_params() is not None]
    assert written, "no peer wrote a checkpoint"
    final = flat(written[0])
    assert torch.isfinite(final).all() and (final - initial(tiny)).abs().max() > 1e-3
    for w in (a, b, late):
        status = w.status()
        assert status["epoch"] == 5 and status["skipped_steps"] == 0
        # the mission's 4th prompt is held out (harness.trainers.MISSION): its row is left to the lead's evaluation
        assert status["rows"] == 7 and status["rows_held_out"] == 1 and math.isfinite(status["loss"])
        assert w.proc.wait(timeout=30) == 0, w.log()[-3000:]


def test_a_trainer_killed_mid_run_does_not_stall_the_others(daemons: DaemonFactory, workers: WorkerFactory) -> None:
    peers = bootstrap(daemons)
    trio = [workers.start(peers, max_epochs=5, averaging_timeout=8.0, min_trainers=3) for _ in range(3)]
    wait_until(lambda: min(w.status().get("epoch", 0) for w in trio) >= 1, 150, 0.5, "an epoch with three")
    victim, survivors = trio[2], trio[:2]
    victim.kill()  # kill -9, alone: its DHT process and averagers must follow by themselves
    killed_at = max(w.status()["epoch"] for w in survivors)
    started = time.monotonic()
    wait_until(lambda: min(w.status().get("epoch", 0) for w in survivors) > killed_at, 60, 0.5, "the next epoch")
    # the round the victim left cost at most the averaging timeout and a matchmaking period
    assert time.monotonic() - started < 8.0 + 2.0 + 30.0
    wait_until(lambda: all(w.status().get("state") == "done" for w in survivors), 150, 0.5, "survivors done")
    wait_until(lambda: not victim.alive_descendants(), 10, 0.2, "the victim's children gone")
    a, b = (w.probes() for w in survivors)
    assert agreed_epochs(a, b, after=killed_at), (a, b)  # the two averaged on without the victim


def test_nan_from_a_peer_is_refused_and_the_others_stay_finite(
    daemons: DaemonFactory, workers: WorkerFactory, tiny: Path
) -> None:
    peers = bootstrap(daemons)
    # the honest ones take no step before the hostile one is in the progress record (after its first step): they
    # cannot finish before it joins a round
    honest = [workers.start(peers, max_epochs=3, min_trainers=3) for _ in range(2)]
    hostile = workers.start(peers, executable=HOSTILE, max_epochs=1000)
    wait_until(lambda: all(w.status().get("state") == "done" for w in honest), 180, 0.5, "honest peers done")
    hostile_id = wait_until(lambda: hostile.status().get("peer_id"), 10, 0.5, "the hostile peer's id")
    assert hostile.status()["steps"] > 0  # it did take part
    logs = "".join(w.log() for w in honest)
    assert f"from peer {hostile_id}" in logs and "non-finite values" in logs, logs[-4000:]
    for w in honest:  # the parts the hostile peer reduced keep each honest peer's own values: they may
        status = w.status()  # differ a little, but they trained to the end and are finite
        assert status["epoch"] == 3 and math.isfinite(status["loss"]) and torch.isfinite(w.probe()).all()
    # every honest trainer writes the checkpoints (the hostile one's peer id cannot take that from them): finite
    # and trained
    for params in (w.checkpoint_params() for w in honest):
        assert params is not None, "an honest trainer wrote no checkpoint"
        assert torch.isfinite(flat(params)).all() and (flat(params) - initial(tiny)).abs().max() > 1e-3


def test_a_trainer_claiming_a_far_epoch_is_ignored_and_a_late_one_loads_an_honest_state(
    daemons: DaemonFactory, workers: WorkerFactory, tiny: Path
) -> None:
    """A hostile trainer joins a running mission claiming epoch 1000 (progress record, state priority, state label)
    and offering parameters a thousand times too large. hivemind as shipped takes the swarm's epoch as the largest
    claim and downloads from the highest priority: every honest peer would load its state and stop at once."""
    peers = bootstrap(daemons)
    a, b = (workers.start(peers, max_epochs=4, min_trainers=2) for _ in range(2))
    wait_until(lambda: all(w.status().get("state") == "training" for w in (a, b)), 120, 0.5, "training together")
    hostile = workers.start(peers, executable=[*HOSTILE, "--attack", "epoch", "--claim", "1000"], max_epochs=1000)
    hostile_id = wait_until(lambda: hostile.status().get("peer_id"), 120, 0.5, "the hostile peer's claim")
    wait_until(lambda: min(w.status().get("epoch", 0) for w in (a, b)) >= 1, 150, 0.5, "an epoch with the liar")
    late = workers.start(peers, max_epochs=4, min_trainers=2)
    wait_until(lambda: all(w.status().get("state") == "done" for w in (a, b, late)), 240, 0.5, "all done")
    start = initial(tiny).double()
    for w in (a, b, late):
        status = w.status()
        assert status["epoch"] == 4 and status["skipped_steps"] == 0 and torch.isfinite(w.probe()).all(), status
        # the hostile parameters' sum of squares is a million times the initial one's: nobody holds them
        assert w.probe()[1] < 100 * float(start.square().sum()), (w.probe(), float(start.square().sum()))
    assert a.status()["loaded_state_at_epoch"] is None and b.status()["loaded_state_at_epoch"] is None
    assert agreed_epochs(a.probes(), b.probes()), (a.probes(), b.probes())  # they averaged with each other
    for w in (a, b):
        assert f"ignored the epoch 1000 claimed by trainer {hostile_id}" in w.log(), w.log()[-3000:]
    # the late one loaded the state an honest peer held at that epoch, and never asked the hostile one
    loaded = late.status()["loaded_state_at_epoch"]
    assert loaded is not None and 1 <= loaded <= 4, late.log()[-3000:]
    held = [w.probes().get(loaded) for w in (a, b)]
    assert any(p is not None and torch.equal(p, late.probes()[loaded]) for p in held), (held, late.probes())
    log = late.log()
    assert f"not asking peer {hostile_id} for its state: it claims epoch 1000" in log, log[-3000:]
    assert f"downloading the state of peer {hostile_id}" not in log


def parameter_rounds(log: str) -> list[int]:
    """The epochs whose end held a parameter round (hivemind's state averaging, succeeded or failed), from a
    worker's log: hivemind logs ``Beginning optimizer step #E`` when epoch E ends, then the round's outcome."""
    import re

    epochs, ending = [], None
    for line in log.splitlines():
        if (begun := re.search(r"Beginning optimizer step #(\d+)", line)) is not None:
            ending = int(begun.group(1))
        elif "Averaged parameters with" in line or "Averaging failed with" in line:
            epochs.append(ending)
    return epochs


def test_sync_mode_holds_the_parameter_round_every_average_state_every_epochs(
    daemons: DaemonFactory, workers: WorkerFactory
) -> None:
    """``[train] average_state_every = 2``: the gradient round every epoch, the parameter round only at the end of
    odd epochs (moving to an even one), on both peers alike: hivemind decides by the swarm's epoch."""
    peers = bootstrap(daemons)
    pair = [workers.start(peers, max_epochs=4, min_trainers=2, average_state_every=2) for _ in range(2)]
    wait_until(lambda: all(w.status().get("state") == "done" for w in pair), 180, 0.5, "both done")
    rounds = [parameter_rounds(w.log()) for w in pair]
    assert all(epoch is not None and (epoch + 1) % 2 == 0 for r in rounds for epoch in r), rounds
    assert any(rounds), [w.log()[-3000:] for w in pair]  # the log lines this reads are there
    for w in pair:
        status = w.status()
        assert status["epoch"] == 4 and status["skipped_steps"] == 0 and torch.isfinite(w.probe()).all(), status
    # peers that met in a gradient round take the same step: they agree with or without a parameter round
    assert agreed_epochs(pair[0].probes(), pair[1].probes()), [w.probes() for w in pair]


def test_local_mode_with_8bit_averaging_forms_rounds(
    daemons: DaemonFactory, workers: WorkerFactory, tiny: Path
) -> None:
    peers = bootstrap(daemons)
    # local steps go on while a round runs, and 8-bit deltas are lossy: the copies end close, not equal, so
    # this asks for rounds (bytes sent by both), not for one model
    # min_trainers: neither trains its epochs alone while the other is still starting (a CI run saw one send 0 bytes)
    settings = {"mode": "local", "compression": "8bit", "max_epochs": 3, "target_batch_size": 128, "min_trainers": 2}
    pair = [workers.start(peers, **settings) for _ in range(2)]
    wait_until(lambda: all(w.status().get("state") == "done" for w in pair), 180, 0.5, "both done")
    for w in pair:
        status = w.status()
        assert status["epoch"] == 3 and status["skipped_steps"] == 0 and torch.isfinite(w.probe()).all()
        # it averaged: 8-bit parts of the 1.6M-parameter student went out (up to about 1.6 MB per round and
        # peer; a round that lost a part on a busy machine sends less)
        assert status["bytes_sent"] > 250_000, status

"""The swarm trainer's parts in one process: settings, compression, the part checks, the row feed, a NaN
step that is neither applied nor counted, the worker's refusal of a bad configuration, and the catch-up to the last
epoch's parameters."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hivemind
import pytest
import torch

from garden.models.loading import load_model
from garden.store import RowFeed, Store
from garden.collab import hivemind_patches
from garden.collab.trainer import CollabConfig, CollabTrainer, TrainStatus, make_compression, make_optimizer
from garden.collab.worker import WorkerConfig, WorkerStatus
from garden.protocol.mission_spec import StudentSection, SwarmSettings, TrainSection
from harness.trainers import MISSION, make_rows_store, make_tiny_student

pytestmark = pytest.mark.heavy(9)  # seconds in `make check`: see tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    return make_tiny_student(tmp_path_factory.mktemp("tiny") / "student")


@pytest.fixture(scope="module")
def rows_store(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    return make_rows_store(tmp_path_factory.mktemp("rows") / "garden.sqlite3", prompts=4)


@pytest.mark.parametrize(
    "kwargs", [{"target_batch_size": 0}, {"max_epochs": 0}, {"mode": "async"}, {"compression": "4bit"},
               {"lr": float("nan")}, {"warmup_epochs": 99}, {"min_trainers": 0}],
)  # fmt: skip
def test_bad_settings_name_the_field(kwargs: dict) -> None:
    settings = {"target_batch_size": 8, "max_epochs": 2} | kwargs
    with pytest.raises(ValueError, match=f"invalid swarm training settings: {next(iter(kwargs))}="):
        CollabConfig(**settings)


def test_swarm_settings_come_from_the_mission_section() -> None:
    section = TrainSection(lr=6e-4, target_batch_size=32, max_epochs=3, warmup_epochs=2, mode="local",
                           compression="8bit", checkpoint_every=3, adam_beta1=0.5, adam_beta2=0.95)  # fmt: skip
    config = CollabConfig.from_section(section, batch_size=2, grad_accum=3)
    shared = set(SwarmSettings.model_fields)
    assert {k: getattr(config, k) for k in shared} == {k: getattr(section, k) for k in shared}
    assert set(CollabConfig.model_fields) - shared == {"batch_size", "grad_accum", "seed", "load_state_timeout"}
    assert config.samples_per_step == 6 and config.load_state_timeout == 60.0 and config.seed == 0
    # built directly (tests, benchmarks): the two sizes are required, and no warm-up unless asked
    assert CollabConfig(target_batch_size=8, max_epochs=2).warmup_epochs == 0


def test_the_worker_files_are_written_and_read_by_their_classes(tmp_path: Path) -> None:
    config = WorkerConfig(
        mission_id=MISSION, student=StudentSection(base="builtin:smollm2-135m"),
        collab=CollabConfig.from_section(TrainSection(), batch_size=2), store_path=tmp_path / "garden.sqlite3",
        status_path=tmp_path / "status.json", out_dir=tmp_path / "out", max_cpu=0.5, parent_pid=1,
    )  # fmt: skip
    config.write(tmp_path / "config.json")
    assert WorkerConfig.read(tmp_path / "config.json") == config

    path = config.status_path
    assert WorkerStatus.read(path) is None  # none yet
    status = WorkerStatus.of(TrainStatus(state="training", max_epochs=3, samples=8, loss=1.5), pid=42)
    status.probes["2"] = [1.0, 2.0, 3.0]
    status.write(path)
    assert WorkerStatus.read(path) == status
    # the field names the daemon's API and the tests read
    assert set(json.loads(path.read_text())) == {"pid", *TrainStatus.model_fields}
    assert {"state", "epoch", "samples", "loss", "bytes_sent", "params_probe", "probes", "last_checkpoint"} < set(
        TrainStatus.model_fields
    )
    for damaged in ("{", json.dumps({"state": ["not", "a", "state"]}), "[]"):
        path.write_text(damaged)
        assert WorkerStatus.read(path) is None


def test_compression_choices() -> None:
    from hivemind.compression import Float16Compression, NoCompression, SizeAdaptiveCompression

    assert isinstance(make_compression("none"), NoCompression)
    assert isinstance(make_compression("fp16"), Float16Compression)
    eight = make_compression("8bit")
    assert isinstance(eight, SizeAdaptiveCompression)
    with pytest.raises(ValueError, match="unknown compression"):
        make_compression("zip")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["fp16", "8bit"])
def test_two_averagers_average_with_each_compression(name: str) -> None:
    """Real hivemind averagers exchange compressed parts: the copies meet in the middle (with hivemind's own
    8-bit decoder on numpy 2 every part failed to decode and each peer silently kept its own values)."""
    compression = make_compression(name)  # type: ignore[arg-type]
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = hivemind.DHT(initial_peers=first.get_visible_maddrs(), start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    values = [torch.zeros(300_000), torch.linspace(0.0, 2.0, 300_000)]
    averagers = [
        hivemind.DecentralizedAverager(
            [v.clone()], dht, prefix=f"compression-{name}", target_group_size=2, min_matchmaking_time=2.0,
            request_timeout=1.0, compression=compression, start=True,
        )
        for dht, v in zip((first, second), values, strict=True)
    ]  # fmt: skip
    try:
        rounds = [a.step(wait=False) for a in averagers]
        assert all(len(r.result(timeout=30)) == 2 for r in rounds)
        expected = (values[0] + values[1]) / 2
        for averager in averagers:
            with averager.get_tensors() as (averaged,):
                assert (averaged - expected).abs().mean() < 0.02, (name, (averaged - expected).abs().mean())
    finally:
        for averager in averagers:
            averager.shutdown()
        first.shutdown()
        second.shutdown()


def test_a_malformed_8bit_part_is_refused() -> None:
    from hivemind.compression import CompressionInfo

    from garden.collab.compression import Uniform8Bit

    codec = Uniform8Bit()
    x = torch.randn(1000)
    good = codec.compress(x, CompressionInfo.from_tensor(x))
    assert (codec.extract(good) - x).abs().mean() < 0.05
    short = type(good)()
    short.CopyFrom(good)
    short.buffer = good.buffer[:-10]
    with pytest.raises(ValueError, match="does not hold"):
        codec.extract(short)
    with pytest.raises(ValueError, match="no codebook"):
        codec.extract(type(good)(buffer=b"\x01", size=[1], dtype="float32"))


def test_parts_of_another_shape_or_not_finite_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    good = torch.ones(4, 3)
    hivemind_patches.check_part(good, (4, 3), "QmGood", "a tensor part")
    with caplog.at_level(logging.WARNING), pytest.raises(hivemind_patches.RefusedPart, match="shape"):
        hivemind_patches.check_part(torch.ones(5, 3), (4, 3), "QmWide", "a tensor part")
    bad = good.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(hivemind_patches.RefusedPart, match="non-finite"):
        hivemind_patches.check_part(bad, (4, 3), "QmInf", "an averaged part")
    assert "from peer QmWide" in caplog.text


def test_the_row_feed_returns_new_rows_once_and_skips_damaged_ones(tmp_path: Path, rows_store: Path) -> None:
    path = tmp_path / "garden.sqlite3"
    path.write_bytes(rows_store.read_bytes())
    feed = RowFeed(path, MISSION)
    first = feed.new_rows()
    assert len(first) == 3 and feed.held_back == 1 and feed.new_rows() == []  # the 4th prompt is held out
    store = Store(path)  # the daemon writes on while the feed reads
    try:
        db = sqlite3.connect(path)
        db.execute(
            "INSERT INTO rows (row_id, mission_id, body, prompt, created_at) VALUES (?, ?, ?, ?, 0)",
            ("ab" * 32, MISSION, b"\x93garbage", "p"),
        )
        db.commit()
        db.close()
        assert feed.new_rows() == [] and feed.skipped == 1
    finally:
        store.close()
        feed.close()
    with pytest.raises(Exception, match="no garden database"):
        RowFeed(tmp_path / "missing.sqlite3", MISSION)


@pytest.fixture
def dht() -> Iterator[hivemind.DHT]:
    node = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield node
    node.shutdown()


def test_a_nan_step_is_not_applied_counted_or_sent(dht: hivemind.DHT, tiny: Path, rows_store: Path) -> None:
    from garden.models.student import StudentSpec, build_student

    student = build_student(StudentSpec(base=str(tiny)))
    config = CollabConfig(target_batch_size=1000, max_epochs=2, batch_size=2, matchmaking_time=1.0, adam_beta1=0.5)
    trainer = CollabTrainer(student, config, lambda params: make_optimizer(dht, "nan-test", params, config))
    try:
        assert trainer.optimizer.state_averager.optimizer.param_groups[0]["betas"] == (0.5, 0.999)  # the mission's
        trainer.add_rows(RowFeed(rows_store, MISSION).new_rows())
        assert trainer.step() is not None and trainer.status.samples == 2
        accumulated = trainer.optimizer.tracker.local_progress.samples_accumulated
        before = trainer.parameters_vector().clone()
        head = student.model.get_output_embeddings()
        hook = head.register_forward_hook(lambda module, args, out: out * float("nan"))
        try:
            grads = trainer.step()
        finally:
            hook.remove()
        assert grads is not None and not grads.finite
        assert trainer.status.skipped_steps == 1 and trainer.status.samples == 2
        assert trainer.optimizer.tracker.local_progress.samples_accumulated == accumulated
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in trainer.params)
        assert torch.equal(trainer.parameters_vector(), before)
        assert trainer.step() is not None and trainer.status.samples == 4  # and training goes on
    finally:
        trainer.shutdown()


def test_a_trainer_at_the_last_epoch_takes_no_step(dht: hivemind.DHT, tiny: Path, rows_store: Path) -> None:
    """A late peer that loads the swarm's state of epoch ``max_epochs`` (the others done, lingering) is done: its
    first step would take it alone into an epoch past the mission's."""
    from garden.models.student import StudentSpec, build_student

    config = CollabConfig(target_batch_size=2, max_epochs=2, batch_size=2, matchmaking_time=1.0)
    trainer = CollabTrainer(build_student(StudentSpec(base=str(tiny))), config,
                            lambda params: make_optimizer(dht, "last-test", params, config))  # fmt: skip
    try:
        trainer.add_rows(RowFeed(rows_store, MISSION).new_rows())
        trainer.optimizer.state_averager.local_epoch = 2  # as a load of the swarm's last state leaves it
        assert trainer.done
        before = trainer.parameters_vector().clone()
        assert trainer.step() is None
        assert trainer.epoch == 2 and trainer.status.samples == 0
        assert torch.equal(trainer.parameters_vector(), before)
    finally:
        trainer.shutdown()


def test_a_mission_that_freezes_embeddings_averages_only_the_rest(
    dht: hivemind.DHT, tiny: Path, rows_store: Path
) -> None:
    """``[train] freeze_embeddings``: the embeddings and head are neither trained nor handed to hivemind (every
    trainer of the mission leaves out the same tensors, so their averaged parameters still line up)."""
    from garden.models.student import StudentSpec, build_student

    counts = {}
    for freeze in (False, True):
        student = build_student(StudentSpec(base=str(tiny)))
        config = CollabConfig(target_batch_size=1000, max_epochs=2, batch_size=2, matchmaking_time=1.0,
                              freeze_embeddings=freeze)  # fmt: skip
        run = f"freeze-{freeze}"
        trainer = CollabTrainer(student, config, lambda params, c=config, r=run: make_optimizer(dht, r, params, c))
        try:
            embeddings = student.model.get_input_embeddings().weight
            assert any(p is embeddings for p in trainer.params) != freeze
            counts[freeze] = sum(p.numel() for p in trainer.params)
            trainer.add_rows(RowFeed(rows_store, MISSION).new_rows())
            assert trainer.step() is not None and embeddings.requires_grad != freeze
        finally:
            trainer.shutdown()
    assert counts[True] < counts[False]


def test_a_trainer_waits_for_min_trainers_then_trains_whoever_leaves(
    dht: hivemind.DHT, tiny: Path, rows_store: Path
) -> None:
    from garden.models.student import StudentSpec, build_student

    student = build_student(StudentSpec(base=str(tiny)))
    config = CollabConfig(target_batch_size=1000, max_epochs=2, batch_size=2, matchmaking_time=1.0, min_trainers=2)
    trainer = CollabTrainer(student, config, lambda params: make_optimizer(dht, "gate-test", params, config))
    tracker = trainer.optimizer.tracker
    try:
        trainer.add_rows(RowFeed(rows_store, MISSION).new_rows())
        before = trainer.parameters_vector().clone()
        assert trainer.step() is None  # alone: no step
        status = trainer.status
        assert status.state == "waiting for 2 trainers (0 present)" and status.steps == status.samples == 0
        # it stored its own entry in the progress record (hivemind stores one only after a first step), so the
        # others count it, and it had its tracker read the record again: it counts itself a moment later
        found = dht.get("gate-test_progress", latest=True)
        assert found is not None and len(found.value) == 1, found
        deadline = time.monotonic() + 10
        while status.state != "waiting for 2 trainers (1 present)" and time.monotonic() < deadline:
            assert trainer.step() is None
            time.sleep(0.1)
        assert status.state == "waiting for 2 trainers (1 present)" and status.steps == status.samples == 0
        assert torch.equal(trainer.parameters_vector(), before)
        with tracker.pause_updates():  # the fetcher stands still: the record shows a second trainer
            tracker.global_progress.num_peers = 2
            assert trainer._trainers_present()
        assert trainer.step() is not None and trainer.status.samples == 2 and trainer.status.state == "training"
        with tracker.pause_updates():
            tracker.global_progress.num_peers = 1  # the other left: a start condition only, training goes on
        assert trainer.step() is not None and trainer.status.samples == 4
    finally:
        trainer.shutdown()


def test_the_worker_refuses_a_bad_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from garden.collab import worker

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"mission_id": MISSION, "student": {"base": "x"}, "collab": {"max_epochs": 1}}))
    argv = [sys.executable, "-m", "garden.collab.worker", str(config)]  # the command the daemon runs
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "target_batch_size" in refused.stderr and "store_path" in refused.stderr
    # the same main() in this process for the other files (a process costs seconds of imports), its logging
    # set-up left out (it would replace pytest's handlers)
    monkeypatch.setattr("garden.host.logs.setup_logging", lambda level: None)
    loggers = [logging.getLogger(name) for name in ("hivemind.optim.optimizer", "hivemind.optim.state_averager")]
    levels = [logger.level for logger in loggers]
    try:
        config.write_text("{not json")
        assert worker.main([str(config)]) == 2
        assert worker.main([str(tmp_path / "missing.json")]) == 2 and "missing.json" in capsys.readouterr().err
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def test_a_tiny_student_loads_like_any_model(tiny: Path) -> None:
    loaded = load_model(str(tiny))
    assert loaded.model.config.num_hidden_layers == 2


def test_the_outer_step_is_nesterov_sgd_on_the_pseudo_gradient() -> None:
    from garden.collab.trainer import OuterStep

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    plain = OuterStep([p], lr=1.0, momentum=0.0)
    with torch.no_grad():
        p.copy_(torch.tensor([0.5, 1.0]))  # the round's average
    plain.step()
    assert torch.equal(p.data, torch.tensor([0.5, 1.0]))  # lr 1, no momentum: plain averaging

    q = torch.nn.Parameter(torch.tensor([1.0]))
    outer = OuterStep([q], lr=0.5, momentum=0.9)
    for average in (0.0, -1.0):  # two rounds: pseudo-gradients 1.0, then anchor - (-1.0)
        anchor = outer.anchor[0].clone()
        with torch.no_grad():
            q.copy_(torch.tensor([average]))
        outer.step()
        delta = anchor - average
        assert torch.allclose(q.data, outer.anchor[0]) and outer.buffer[0].shape == q.shape
    # by hand: round 1: m = 1, step 0.5 * (1 + 0.9) = 0.95 -> 0.05; round 2: delta 1.05, m = 1.95,
    # step 0.5 * (1.05 + 0.9 * 1.95) = 1.4025 -> -1.3525
    assert torch.allclose(q.data, torch.tensor([-1.3525])) and delta == pytest.approx(1.05)
    outer.restart()
    assert torch.equal(outer.anchor[0], q.data) and float(outer.buffer[0]) == 0.0


@pytest.mark.slow
def test_a_peer_moved_to_the_last_epoch_without_its_parameters_loads_them(tiny: Path, rows_store: Path) -> None:
    """Hivemind's catch-up moves a peer that missed the last round to the swarm's epoch without that epoch's
    parameters: such a peer said "done" holding the epoch before's, and wrote no checkpoint of the last (the hostile
    swarm test caught it once). ``catch_up`` loads them from a peer that finished. In a fresh process (the patches
    that mark the epoch of the parameters are installed there): a finishes epoch 1 alone, b is moved to epoch 1
    as hivemind's catch-up does."""
    script = f"""
import hivemind, torch
from garden.collab import hivemind_patches as h
from garden.collab.trainer import CollabConfig, CollabTrainer, make_optimizer
from garden.models.student import StudentSpec, build_student
from garden.store import RowFeed
h.install()
config = CollabConfig(target_batch_size=2, max_epochs=1, batch_size=2, matchmaking_time=1.0, averaging_timeout=5.0,
                      load_state_timeout=20.0)
dhts, trainers = [], []
try:
    for name in ("a", "b"):
        peers = dhts[0].get_visible_maddrs() if dhts else None
        dhts.append(hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=peers))
        dht = dhts[-1]
        trainers.append(CollabTrainer(build_student(StudentSpec(base={str(tiny)!r})), config,
                                      lambda params, dht=dht: make_optimizer(dht, "catch-up", params, config)))
        if name == "a":
            a = trainers[0]
            a.add_rows(RowFeed({str(rows_store)!r}, "{MISSION}").new_rows())
            assert a.step() is not None and a.done and a.params_epoch == 1
    b = trainers[1]
    states = b.optimizer.state_averager
    before = b.parameters_vector().clone()
    assert not torch.equal(before, a.parameters_vector())
    states._garden_params_epoch, states.local_epoch = 0, 1  # hivemind's catch-up: the epoch, not the parameters
    assert b.done and b.params_epoch == 0
    assert b.catch_up()
    assert b.params_epoch == 1 and b.status.loaded_state_at_epoch == 1 and b.status.epoch == 1  # took no step
    assert torch.equal(b.parameters_vector(), a.parameters_vector())
    assert not a.catch_up()  # a holds its epoch's parameters: nothing to load
    print("ok")
finally:
    for trainer in trainers:
        trainer.shutdown()
    for dht in dhts:
        dht.shutdown()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (done.stdout + done.stderr)[-3000:]

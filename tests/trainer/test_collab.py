"""The swarm trainer's parts in one process: settings, compression, the part checks, the row feed, a NaN
step that is neither applied nor counted, and the worker's refusal of a bad configuration."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import hivemind
import pytest
import torch

from garden.models import load_model
from garden.store import RowFeed, Store
from garden.trainer import averaging_guard
from garden.trainer.collab import CollabConfig, CollabTrainer, make_compression, make_optimizer
from tests.trainers import MISSION, make_rows_store, make_tiny_student


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    return make_tiny_student(tmp_path_factory.mktemp("tiny") / "student")


@pytest.fixture(scope="module")
def rows_store(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    return make_rows_store(tmp_path_factory.mktemp("rows") / "garden.sqlite3", prompts=4)


@pytest.mark.parametrize(
    "kwargs", [{"target_batch_size": 0}, {"max_epochs": 0}, {"mode": "async"}, {"compression": "4bit"},
               {"lr": float("nan")}, {"warmup_epochs": 99}],
)  # fmt: skip
def test_bad_settings_name_the_field(kwargs: dict) -> None:
    settings = {"target_batch_size": 8, "max_epochs": 2} | kwargs
    with pytest.raises(ValueError, match=f"invalid swarm training settings: {next(iter(kwargs))}="):
        CollabConfig(**settings)


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
        for dht, v in zip((first, second), values)
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

    from garden.trainer.compression import Uniform8Bit

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
    averaging_guard.check_part(good, (4, 3), "QmGood", "a tensor part")
    with caplog.at_level(logging.WARNING), pytest.raises(averaging_guard.RefusedPart, match="shape"):
        averaging_guard.check_part(torch.ones(5, 3), (4, 3), "QmWide", "a tensor part")
    bad = good.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(averaging_guard.RefusedPart, match="non-finite"):
        averaging_guard.check_part(bad, (4, 3), "QmInf", "an averaged part")
    assert "from peer QmWide" in caplog.text


def test_the_row_feed_returns_new_rows_once_and_skips_damaged_ones(tmp_path: Path, rows_store: Path) -> None:
    path = tmp_path / "garden.sqlite3"
    path.write_bytes(rows_store.read_bytes())
    feed = RowFeed(path, MISSION)
    first = feed.new_rows()
    assert len(first) == 4 and feed.new_rows() == []
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
    from garden.trainer.student import StudentSpec, build_student

    student = build_student(StudentSpec(base=str(tiny)))
    config = CollabConfig(target_batch_size=1000, max_epochs=2, batch_size=2, matchmaking_time=1.0)
    trainer = CollabTrainer(student, config, lambda params: make_optimizer(dht, "nan-test", params, config))
    try:
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


def test_the_worker_refuses_a_bad_configuration(tmp_path: Path) -> None:
    def worker(path: Path) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "garden.trainer.train_worker", str(path)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"mission_id": MISSION, "student": {"base": "x"}, "collab": {"max_epochs": 1}}))
    refused = worker(config)
    assert refused.returncode == 2 and "target_batch_size" in refused.stderr and "store_path" in refused.stderr
    config.write_text("{not json")
    assert worker(config).returncode == 2
    missing = worker(tmp_path / "missing.json")
    assert missing.returncode == 2 and "missing.json" in missing.stderr


def test_a_tiny_student_loads_like_any_model(tiny: Path) -> None:
    loaded = load_model(str(tiny))
    assert loaded.model.config.num_hidden_layers == 2


def test_the_outer_step_is_nesterov_sgd_on_the_pseudo_gradient() -> None:
    from garden.trainer.collab import OuterStep

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

"""Robust averaging (``garden.collab.robust`` and its patches of hivemind): bounded weights, CenteredClip, credible
epochs and agreed states, as rules, then inside real hivemind (all-reduce rounds between P2P peers, a real progress
tracker, real ``TrainingStateAverager`` downloads) with a lying peer."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hivemind
import pytest
import torch

from garden.collab import robust, robust_hivemind
from garden.collab.robust_hivemind import credible_progress, refute

pytestmark = pytest.mark.heavy(40)  # seconds in `make check`: see tests/conftest.py
ROUNDS = Path(__file__).resolve().parent / "robust_rounds.py"


def test_weights_are_bounded_by_the_median() -> None:
    assert robust.bound_weights([16, 18, 18]) == [16, 18, 18]  # honest peers of one speed: unchanged
    assert robust.bound_weights([16, 20, 18]) == [16, 18, 18]  # a slightly faster one counts as the median
    assert robust.bound_weights([16, 20, 18, 1e30]) == [16, 20, 18, 20]  # the median of four: the upper one, 20
    assert robust.bound_weights([2, 256, 1e30]) == [2, 256, 256]
    assert robust.bound_weights([2, 2, 256]) == [2, 2, 2]  # a fast peer among slow ones counts as one of them
    # two senders: no median to trust (a peer that trained the epoch beside one that joined with a step keeps its
    # weight); the clip bounds the other's influence
    assert robust.bound_weights([2, 256]) == [2, 256] and robust.bound_weights([16, 1e30]) == [16, 1e30]
    assert robust.bound_weights([0, 16, 100, 100]) == [0, 16, 100, 100]  # a peer tagging along (0) is no vote
    assert robust.bound_weights([0, 0]) == [0, 0]


def test_a_weight_above_the_limit_is_refused() -> None:
    from garden.collab.hivemind_patches import RefusedPart, check_weight

    assert robust.weight_limit() == math.inf  # unless a trainer sets one
    with pytest.raises(ValueError, match="positive"):
        robust.set_weight_limit(0)
    try:
        robust.set_weight_limit(256.0)
        check_weight(256.0, "peer")
        with pytest.raises(RefusedPart, match="1e\\+30"):
            check_weight(1e30, "peer")
    finally:
        robust._weight_limit = math.inf


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_the_coordinate_median_is_the_middle_of_each_coordinate(n: int) -> None:
    x = torch.randn(n, 1000)
    ordered = x.sort(dim=0).values
    assert torch.allclose(robust.coordinate_median(x), (ordered[(n - 1) // 2] + ordered[n // 2]) / 2, atol=1e-6)


def noisy(count: int, size: int = 20_000, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A signal and ``count`` honest copies with independent noise of its size (as peers' gradients)."""
    generator = torch.Generator().manual_seed(seed)
    signal = torch.randn(size, generator=generator)
    return signal, [signal + torch.randn(size, generator=generator) for _ in range(count)]


def weighted_mean(parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * p for w, p in zip(weights, parts, strict=True)) / sum(weights)  # type: ignore[return-value]


@pytest.mark.parametrize(("count", "own"), [(2, None), (2, 0), (3, None), (4, 1), (6, None)])
def test_honest_parts_average_exactly_as_a_weighted_mean(count: int, own: int | None) -> None:
    _, parts = noisy(count)
    weights = [16.0 - 3 * (i % 2) for i in range(count)]  # none above the median
    reduced = robust.centered_clip(parts, weights, own)
    assert not reduced.clipped and not reduced.bounded
    assert torch.allclose(reduced.value, weighted_mean(parts, weights), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("liar", "weight"), [("huge", 16.0), ("reversed", 1e30), ("huge", 1e30), ("zero", 16.0)],
    ids=["huge_part", "weight_1e30", "both", "zeros"],
)  # fmt: skip
def test_one_liar_among_four_moves_the_average_a_bounded_amount(liar: str, weight: float) -> None:
    signal, honest = noisy(3)
    mean = weighted_mean(honest, [16.0] * 3)
    spread = sum(float((p - mean).norm()) for p in honest) / 3
    part = {"huge": -1e6 * signal, "reversed": -3 * signal, "zero": torch.zeros_like(signal)}[liar]
    reduced = robust.centered_clip([*honest, part], [16.0, 16.0, 16.0, weight])
    moved = float((reduced.value - mean).norm()) / spread
    plain = float((weighted_mean([*honest, part], [16.0, 16.0, 16.0, weight]) - mean).norm()) / spread
    # the liar weighs the median at most (1 / 4 of the round); a part farther than DROP_RADIUS times the median
    # distance from the coordinate median is left out, a nearer one counts as one at the clip radius (twice that
    # distance): about a spread at most, where the plain mean moves anywhere
    assert moved < 1.5, (moved, plain)
    assert (3 in reduced.bounded) == (weight > 16)
    if liar == "huge":
        assert reduced.dropped == [3] and moved < 1e-5
    elif liar == "reversed":
        assert 3 in reduced.clipped and not reduced.dropped and plain > 3 * moved


def test_with_two_senders_the_reducer_bounds_the_other_by_its_own_part() -> None:
    signal, (mine,) = noisy(1)
    cases = ((-50 * signal, 16.0), (-50 * signal, 1e30), (torch.zeros_like(signal), 16.0), (-1e6 * signal, 16.0))
    for part, weight in cases:
        reduced = robust.centered_clip([mine, part], [16.0, weight], own=0)
        moved = float((reduced.value - mine).norm()) / float(mine.norm())
        # not outvoted (a median of two is the midpoint), but bounded: its weight share of the radius, CLIP_RADIUS
        # times the reducer's own part's norm; a part more than DROP_RADIUS times that norm away is left out
        share = weight / (16.0 + weight)
        assert moved <= share * robust.CLIP_RADIUS + 1e-4, moved
        assert reduced.dropped == ([1] if float(part.norm()) > 1e3 * float(mine.norm()) else [])
        if reduced.dropped:
            assert moved == 0.0


@pytest.mark.parametrize(
    ("claims", "own", "expected"),
    [
        ([5, 1000], 5, 6),  # a liar beside an honest peer: the honest one is the lower median
        ([5, 5, 1000], 0, 6),  # a peer joining late follows the honest majority
        ([20], 3, 21),  # a single other trainer's claim stands (a peer that fell behind follows it)
        ([20, 20], 3, 21),  # several honest ones ahead: followed
        ([5, 0], 5, 6),  # a trainer left behind (or not caught up) is no evidence that the swarm is behind
        ([1000], 5, 1001),  # alone with a liar: nothing to compare its claim with
        ([], 5, math.inf),
    ],
)  # fmt: skip
def test_the_epoch_ceiling_follows_the_other_trainers_median(claims: list[int], own: int, expected: float) -> None:
    assert robust.epoch_ceiling(claims, own=own) == expected


def test_states_agree_when_near_and_not_when_scaled_zeroed_or_random() -> None:
    params = [torch.randn(100, 10), torch.randn(7)]
    near = [p + 0.1 * torch.randn_like(p) for p in params]
    assert robust.states_agree(params, near) and robust.states_agree(near, params)
    for other in (
        [1000 * p for p in params], [torch.zeros_like(p) for p in params], [torch.randn_like(p) for p in params],
        [-p for p in params], [p[:5] for p in params], params[:1], [params[0], params[1] * float("nan")],
    ):  # fmt: skip
        assert not robust.states_agree(params, other) and not robust.states_agree(other, params)


@pytest.fixture
def tracker() -> Iterator[Any]:
    from hivemind.optim.progress_tracker import ProgressTracker

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    tracker = ProgressTracker(dht, "robust-epochs", target_batch_size=64, start=False)
    yield tracker
    dht.shutdown()


def test_a_claimed_epoch_far_ahead_is_left_out_of_the_progress_record(
    tracker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A real tracker (hivemind's, unpatched here) reads the record without the liar's entry: the swarm's epoch is
    the honest one, the liar's samples do not count towards it, and it is not counted as a trainer."""
    from hivemind.optim.progress_tracker import LocalTrainingProgress
    from hivemind.utils import ValueWithExpiration, get_dht_time

    def entry(peer: bytes, epoch: int, samples: int, client: bool = False) -> ValueWithExpiration:
        progress = LocalTrainingProgress(peer_id=peer, epoch=epoch, samples_accumulated=samples,
                                         samples_per_second=1.0, time=get_dht_time(), client_mode=client)  # fmt: skip
        return ValueWithExpiration(progress.dict(), get_dht_time() + 60)

    tracker.report_local_progress(5, 10)
    own = tracker._local_public_key
    record = {own: entry(b"me", 5, 10), b"honest": entry(b"honest", 5, 20), b"liar": entry(b"liar", 1000, 64)}
    assert tracker._parse_swarm_progress_data(record).epoch == 1000  # hivemind as shipped
    with caplog.at_level("WARNING"):
        progress = tracker._parse_swarm_progress_data(credible_progress(tracker, record))
    assert (progress.epoch, progress.samples_accumulated, progress.num_peers) == (5, 30, 2)
    assert "ignored the epoch 1000 claimed by trainer" in caplog.text
    record[b"garbage"] = ValueWithExpiration({"epoch": "many"}, get_dht_time() + 60)  # hivemind would raise on it
    assert tracker._parse_swarm_progress_data(credible_progress(tracker, record)).epoch == 5
    # a read that misses the honest trainer's entry (DHT reads can) does not leave the liar's claim standing alone
    missed = {own: record[own], b"liar": record[b"liar"]}
    assert tracker._parse_swarm_progress_data(credible_progress(tracker, missed)).epoch == 5
    # once the honest trainer says goodbye (value None), the liar is the only other trainer: its claim stands
    gone = {**missed, b"honest": ValueWithExpiration(None, get_dht_time() + 60)}
    assert tracker._parse_swarm_progress_data(credible_progress(tracker, gone)).epoch == 1000
    # unless it served a state with non-finite values: from then on its entry counts for nothing (a peer that fell
    # behind would otherwise follow its epoch for good, refusing every state it offers)
    from hivemind.p2p import PeerID

    refute(PeerID(b"liar").to_base58(), "served a state with non-finite values")
    try:
        progress = tracker._parse_swarm_progress_data(credible_progress(tracker, gone))
        assert (progress.epoch, progress.num_peers) == (5, 1)
    finally:
        robust_hivemind._refuted.clear()
    del record[b"garbage"]
    record[b"honest"] = entry(b"honest", 5, 20)
    # one epoch ahead is how an honest swarm looks for a moment (the first peer to see the epoch end)
    record[b"liar"] = entry(b"liar", 6, 1)
    assert tracker._parse_swarm_progress_data(credible_progress(tracker, record)).epoch == 6


def test_a_done_trainer_counts_the_trainers_behind_it(tracker: Any) -> None:
    """What a trainer that is done lingers for (``garden.collab.worker.linger``), read from a real progress record
    (each other trainer a tracker of its own, on a DHT of its own): the others below its epoch, client-mode ones
    too; not itself, not the ones level with it."""
    from types import SimpleNamespace

    from hivemind.optim.progress_tracker import ProgressTracker
    from hivemind.utils.crypto import RSAPrivateKey

    from garden.collab.hivemind_patches import report_presence
    from garden.collab.trainer import CollabTrainer

    me = SimpleNamespace(optimizer=SimpleNamespace(tracker=tracker), epoch=4)
    assert CollabTrainer.trainers_behind(me) == 0  # nobody in the record
    tracker.report_local_progress(4, 1)
    report_presence(tracker)
    others = []
    try:
        for epoch, client in ((4, False), (3, False), (2, True)):
            dht = hivemind.DHT(start=True, initial_peers=tracker.dht.get_visible_maddrs(), client_mode=client,
                               host_maddrs=["/ip4/127.0.0.1/tcp/0"])  # fmt: skip
            other = ProgressTracker(dht, "robust-epochs", target_batch_size=64, client_mode=client, start=False,
                                    private_key=RSAPrivateKey())  # a key of its own: the default is the process's
            others.append(other)
            other.report_local_progress(epoch, 1)
            report_presence(other)
        assert CollabTrainer.trainers_behind(me) == 2
    finally:
        for other in others:
            other.dht.shutdown()


def test_a_done_trainer_lingers_while_others_are_behind_and_not_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time
    from types import SimpleNamespace

    from garden.collab import worker

    monkeypatch.setattr(worker, "LINGER_POLL_S", 0.01)
    behind = [3, 2, 1, 1]  # polls that see trainers behind, then none

    def trainers_behind() -> int:
        return behind.pop(0) if behind else 0

    started = time.monotonic()
    worker.linger(SimpleNamespace(trainers_behind=trainers_behind), 0.2, threading.Event())
    waited = time.monotonic() - started
    assert not behind and 0.2 + 4 * 0.01 <= waited < 1.0  # linger_s after the last poll that saw one behind
    monkeypatch.setattr(worker, "LINGER_MAX_S", 0.3)
    started = time.monotonic()
    worker.linger(SimpleNamespace(trainers_behind=lambda: 1), 0.1, threading.Event())  # one behind for good
    assert 0.3 <= time.monotonic() - started < 1.0
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    worker.linger(SimpleNamespace(trainers_behind=lambda: 1), 5.0, stop)  # the daemon stops it: at once
    assert time.monotonic() - started < 0.5


def run_rounds(what: str) -> tuple[dict[str, Any], str]:
    done = subprocess.run([sys.executable, str(ROUNDS), what], capture_output=True, text=True, timeout=240,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


LOST = re.compile(r"^reducer (\d+) failed it: AllreduceException\('peer \S+ sent \d+ parts, but we expected \d+'\)$")
"""How a reducer's reply lost in transport reads in a peer's ``troubles`` (``harness.trainers.average_round``)."""
EXACT = ("honest_four", "honest_two", "huge_client", "nan_weight_client", "negative_weight_client", "weight_client",
         "huge_and_weight_client")  # fmt: skip
"""The scenarios whose honest peers must hold the honest weighted mean exactly (to rounding)."""


def assert_exact(name: str, outcome: dict[str, Any]) -> bool:
    """Each honest peer (the first ``outcome["honest"]``) holds the honest peers' weighted mean, to rounding, on
    every value it averaged, and they agree. A value it kept as it was must be one hivemind says it kept
    (``kept_own``) because a reducer's reply was lost in transport (p2pd can drop the end of a stream on a loaded
    machine: see ``average_round``), never because one was refused, and no more than the shares of the reducers
    it lost. Returns whether any value was kept."""
    said = json.dumps({name: outcome})
    for peer in range(outcome["honest"]):
        assert outcome["averaged_distance"][peer] < 1e-5 and outcome["kept"][peer] == outcome["kept_own"][peer], said
        if outcome["kept_own"][peer]:
            lost = [LOST.match(t) for t in outcome["troubles"][peer] if t.startswith("reducer ")]
            assert lost and all(lost), said
            assert outcome["kept_own"][peer] <= sum(outcome["shares"][int(m.group(1))] for m in lost if m), said
    assert outcome["honest_apart"] < 1e-5, said
    return any(outcome["kept_own"][: outcome["honest"]])


@pytest.mark.swarm  # several hivemind peers (p2pd each) in a child: `make test`, not `make check`
def test_real_allreduce_rounds_bound_a_liar_and_average_honest_peers_exactly() -> None:
    report, log = run_rounds("rounds")
    print(log[-20_000:])  # shown if the test fails: hivemind's warnings of parts lost in a round, garden's refusals
    # garden's reducers give hivemind's weighted mean; a refused liar (below) changes nothing. A reply lost in
    # transport is rare (1 scenario in about 10 runs beside the inference tests): in most scenarios, none is
    lost = [name for name in EXACT if assert_exact(name, report[name])]
    assert len(lost) <= 1, json.dumps({name: report[name] for name in lost})
    for name in ("huge", "huge_client", "heavy", "heavy_client"):
        outcome = report[name]
        # every honest peer ends a bounded distance from the honest mean (in units of the honest spread), and all
        # hold the same average: the huge part is left out, the reversed one at a weight of 100 counts as the median
        assert max(outcome["distance"][:3]) < 1.5 and outcome["honest_apart"] < 1e-5, (name, outcome)
        assert outcome["plain_distance"] > 2 * max(outcome["distance"][:3]), (name, outcome)  # hivemind's own
    assert report["huge_client"]["plain_distance"] > 1e5
    assert "left out the part from peer" in log
    # refused: the honest peers average without it (a weight of 1e30 is above the limit the trainer sets), checked
    # exactly above
    for name in ("weight_client", "huge_and_weight_client"):
        assert report[name]["plain_distance"] > 1.0, report[name]  # hivemind's own follows the weight of 1e30
    assert "weight nan; it is left out" in log and "weight -5.0; it is left out" in log
    assert "weight 1e+30; it is left out" in log
    # a reducer returning a million times the average of its share: refused, each honest peer keeps its own values
    # for that share (hivemind's path for a reducer that failed); without the check they move a million-fold
    lying = report["lying_reducer"]
    assert all(d is not None and d < 1.5 for d in lying["distance"][:3]), lying
    assert "refused the averaged parts from peer" in log


@pytest.mark.swarm  # several hivemind peers (p2pd each) in a child: `make test`, not `make check`
def test_a_joining_peer_loads_a_state_the_others_agree_on() -> None:
    report, log = run_rounds("states")
    # a liar claiming epoch 1000 (priority and state) is not asked; a liar at the honest epoch with parameters a
    # thousand times too large is outvoted by the two honest peers, whatever the order they are asked in
    for outcome in report["far_epoch"] + report["garbage_at_the_same_epoch"]:
        assert outcome == {"epoch": 5, "honest": True, "max_abs": 1.0}, report
    # one honest peer and the liar disagree: nothing is loaded (hivemind asks again later)
    assert all(o["epoch"] == 0 and o["max_abs"] == 0.0 for o in report["one_honest_one_liar"]), report
    assert report["alone"] == [{"epoch": 5, "honest": True, "max_abs": 1.0}]  # a single peer: nothing to compare
    assert "it claims epoch 1000, the other peers at most 5" in log and "disagree" in log


def test_sparse_parts_equal_to_zero_are_not_called_lies() -> None:
    """Parts of an embedding's gradient that most senders leave at zero (no token of theirs in that range): the
    median distance is 0, the result the median (as clipping at radius 0 gives), and nobody is "left out"."""
    _, (part,) = noisy(1)
    zero = torch.zeros_like(part)
    reduced = robust.centered_clip([zero, zero, part], [16.0, 16.0, 16.0])
    assert torch.equal(reduced.value, zero) and reduced.dropped == [] and reduced.clipped == [2]
    alone = robust.centered_clip([zero, part], [16.0, 16.0], own=0)
    assert torch.equal(alone.value, zero) and alone.dropped == []

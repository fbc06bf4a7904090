"""The rule a fetched row set must meet before it is stored: its rows answer the shard's prompts, in the
shard's order, each at most once (a judge may drop prompts); which winning row sets a peer copies; and which held
row sets lost their shard and go."""

from __future__ import annotations

import numpy as np
import pytest
from hivemind.utils.timed_storage import get_dht_time

from garden.mission.replication import _check_rows_fit, droppable, to_copy
from garden.protocol.records import RecordError
from garden.protocol.rows import DorpoRow, PromptRow
from garden.protocol.shards import DoneRecord
from garden.store import StoredRowSet
from tests.mission.test_leases import done_for, lease_for, new_key

PROMPTS = [PromptRow(prompt=f"question {i}?", reference=f"answer {i}") for i in range(5)]


def row(prompt: str, chosen: str = "an answer") -> DorpoRow:
    logps = np.log(np.full((2, 3), 0.3))
    return DorpoRow.from_arrays(
        prompt=prompt, chosen=chosen, rejected=None, chosen_ids=[1, 2], topk_ids=[[1, 2, 3], [2, 3, 4]],
        topk_logprobs=logps, teacher="t", judge="reference", scores={"chosen": 1.0}, tokenizer="tok",
        vocab_size=49152,
    )  # fmt: skip


def rows_for(*indices: int) -> list[DorpoRow]:
    return [row(PROMPTS[i].prompt) for i in indices]


@pytest.mark.parametrize(
    "indices",
    [(0, 1, 2, 3, 4), (0, 2, 4), (4,), (0,), (), (1, 3)],
    ids=["all", "every other", "last only", "first only", "none", "middle"],
)
def test_rows_in_shard_order_fit(indices: tuple[int, ...]) -> None:
    _check_rows_fit(rows_for(*indices), PROMPTS)


@pytest.mark.parametrize(
    ("rows", "why"),
    [
        (rows_for(1, 0), "out of order"),
        (rows_for(0, 2, 1), "out of order later"),
        (rows_for(0, 1) + [row("not a prompt of this shard")], "foreign prompt"),
        ([row("question 0?  ")], "nearly a prompt"),
        (rows_for(0, 0), "duplicated prompt"),
        (rows_for(2) + [row(PROMPTS[2].prompt, chosen="another answer")], "duplicated prompt, other answer"),
        (rows_for(0, 1, 2, 3, 4, 4), "one row too many"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_rows_that_do_not_fit_are_refused(rows: list[DorpoRow], why: str) -> None:
    with pytest.raises(RecordError, match="not a prompt of this shard"):
        _check_rows_fit(rows, PROMPTS)


def test_rows_against_an_empty_shard() -> None:
    _check_rows_fit([], [])
    with pytest.raises(RecordError, match="row 0"):
        _check_rows_fit(rows_for(0), [])


def test_repeated_prompts_in_a_shard_may_each_be_answered_once() -> None:
    twice = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]  # the same prompt twice in a mission's list
    _check_rows_fit(rows_for(0, 1, 0), twice)
    _check_rows_fit(rows_for(0, 0), twice)
    with pytest.raises(RecordError):
        _check_rows_fit(rows_for(0, 0, 0), twice)


# --- which winning row sets are copied here, which held ones go --------------------------------------------

MISSION = "ab" * 32
NOW = get_dht_time()  # the rules' clock: attempt_at's leases hold from 600 s before it, whenever a test runs


def held(done: DoneRecord, age: float = 3600.0) -> StoredRowSet:
    return StoredRowSet(
        mission_id=MISSION, attempt=done.attempt, shard=done.shard, producer=done.peer_id, sha256="ab" * 32,
        rows=4, received_from=None, added_at=NOW - age,
    )  # fmt: skip


def attempt_at(shard: int, finished: float) -> DoneRecord:
    """A done record finished at ``finished`` (NOW-relative: a slow machine may run a test minutes after NOW)."""
    lease = lease_for(new_key(), MISSION, shard=shard, count=4, started=NOW - 600, renewed=NOW - 30, expires=NOW + 60)
    return done_for(lease, finished)


def test_a_loser_goes_once_its_winner_is_held_here_or_by_as_many_peers_as_the_swarm_keeps() -> None:
    winner, loser = attempt_at(0, NOW - 100), attempt_at(0, NOW - 50)
    mine = [held(loser)]
    assert droppable(mine, {0: winner}, [loser], {}, NOW, 600) == []  # the winner held nowhere yet
    assert droppable(mine, {0: winner}, [loser], {winner.attempt: {"p1"}}, NOW, 600) == []  # once only
    twice = {winner.attempt: {"p1", "p2"}}
    assert droppable(mine, {0: winner}, [loser], twice, NOW, 600) == [(mine[0], "it lost the shard")]
    assert droppable(mine, {0: winner}, [loser], twice, NOW, 600, copies=3) == []  # a swarm that keeps three
    both = [held(winner), held(loser)]
    assert droppable(both, {0: winner}, [loser], {}, NOW, 600) == [(both[1], "it lost the shard")]


def test_an_orphan_goes_after_the_wait_once_another_attempt_won_its_shard() -> None:
    """A row set this peer holds whose done record no read finds (lost with the DHT nodes that held it) while
    another attempt won its shard: kept ``orphan_after`` seconds, then dropped like a loser. (A hostile-swarm
    run kept one for good, and the shard held two attempts.)"""
    winner, lost = attempt_at(1, NOW - 100), attempt_at(1, NOW - 200)
    fresh, old = held(lost, age=30), held(lost, age=601)
    assert droppable([held(winner), fresh], {1: winner}, [], {}, NOW, 600) == []  # a read may have missed it
    (gone,) = droppable([held(winner), old], {1: winner}, [], {}, NOW, 600)
    assert gone[0] == old and "no done record names it" in gone[1] and winner.attempt in gone[1]
    assert droppable([old], {1: winner}, [], {winner.attempt: {"p1"}}, NOW, 600) == []  # the winner not safe
    assert droppable([old], {}, [], {}, NOW, 600) == []  # no winner: it may be the shard's only rows
    other_shard = attempt_at(2, NOW - 100)
    assert droppable([old], {2: other_shard}, [], {other_shard.attempt: {"p1", "p2"}}, NOW, 600) == []


def test_a_winner_held_twice_is_copied_only_by_a_trainer() -> None:
    """Two copies keep a row set safe; a trainer trains on the rows it holds, so it copies every winner (in a
    hostile-swarm CI run a trainer held none, every shard copied twice elsewhere, and with ``min_trainers = 3``
    no trainer ever started)."""
    twice, once, pruned, held_here = (attempt_at(shard, NOW - 100) for shard in range(4))
    winners = {0: twice, 1: once, 2: pruned, 3: held_here}
    held_by = {twice.attempt: {"p1", "p2"}, once.attempt: {once.peer_id}, pruned.attempt: set()}
    mine, gone = {held_here.attempt}, {pruned.attempt}
    assert to_copy(winners, mine, gone, held_by, 2, every_winner=False) == [(once, True)]
    assert to_copy(winners, mine, gone, held_by, 2, every_winner=True) == [(twice, False), (once, True)]
    assert to_copy(winners, mine, gone, held_by, 4, every_winner=False) == [(twice, True), (once, True)]  # 3 of 4

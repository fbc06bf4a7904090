"""The rule a fetched row set must meet before it is stored: its rows answer the shard's prompts, in the
shard's order, each at most once (a judge may drop prompts)."""

from __future__ import annotations

import numpy as np
import pytest

from garden.mission.replication import _check_rows_fit
from garden.protocol.records import RecordError
from garden.protocol.rows import DorpoRow, PromptRow

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

"""Which rows of another producer's row set a peer checks (``garden.mission.verification.sample_rows``)."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any

from garden.mission.verification import sample_rows


def done(content: bytes) -> Any:
    return SimpleNamespace(row_set_sha256=hashlib.sha256(content).hexdigest())


def test_the_rows_checked_are_a_fraction_drawn_by_the_row_sets_hash() -> None:
    a, b = done(b"a"), done(b"b")
    assert sample_rows(a, 8, 0.1) == sample_rows(a, 8, 0.1)  # every peer checks the same rows
    assert len(sample_rows(a, 8, 0.1)) == 1 and len(sample_rows(a, 40, 0.1)) == 4  # one at least, ceil
    drawn = {tuple(sample_rows(done(bytes([i])), 8, 0.25)) for i in range(50)}
    assert len(drawn) > 10  # the hash decides: another row set, other rows
    assert sample_rows(b, 8, 0.0) == [] and sample_rows(b, 0, 0.5) == []
    assert sample_rows(b, 8, 0.1, everything=True) == list(range(8))  # a refuted producer: every row
    assert sample_rows(b, 3, 1.0) == [0, 1, 2]



def test_a_producer_new_to_the_mission_is_checked_harder() -> None:
    a = done(b"a")
    assert len(sample_rows(a, 8, 0.1, at_least=32)) == 8  # all of a first small set
    assert len(sample_rows(a, 100, 0.1, at_least=32)) == 32
    assert len(sample_rows(a, 100, 0.1, at_least=0)) == 10  # after probation: the fraction
    assert sample_rows(a, 8, 0.0, at_least=32) == []  # verification off is off

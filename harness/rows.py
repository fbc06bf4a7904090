"""Rows rebuilt with some fields changed: how the tests and benchmarks forge what a hostile shaker would send."""

from __future__ import annotations

from typing import Any

from garden.protocol.rows import DorpoRow


def remake_row(row: DorpoRow, vocab_size: int = 49152, **changes: Any) -> DorpoRow:
    """``row`` rebuilt through ``DorpoRow.from_arrays`` with ``changes`` (any of its keyword arguments):
    forged rows still pass the row schema, so only a check against the teacher can catch them."""
    fields: dict[str, Any] = dict(
        prompt=row.prompt, chosen=row.chosen, rejected=row.rejected, chosen_ids=row.chosen_ids_array(),
        topk_ids=row.topk_ids_array(), topk_logprobs=row.topk_logprobs_array(), teacher=row.teacher,
        judge=row.judge, scores=dict(row.scores), tokenizer=row.tokenizer, reference_used=row.reference_used,
        vocab_size=vocab_size,
    )  # fmt: skip
    return DorpoRow.from_arrays(**(fields | changes))

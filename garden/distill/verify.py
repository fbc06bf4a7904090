"""Checking another peer's rows, BOINC-style but cheaper: shaking is checkable.

Sampling an answer takes a teacher a decoding step per token and several candidates per prompt; checking a
claimed answer takes one teacher-forced pass. :func:`verify_rows` recomputes, for each row it is given:

* that the stored token ids are exactly the chosen text's encoding (``answer_ids``), in the teacher's
  tokenizer (the row's ``tokenizer`` fingerprint must be the teacher's);
* the teacher's top-k ids and log-probs on every chosen token (``teacher_topk``, the pass the shaker made),
  compared within :class:`Tolerance`;
* the judge's verdict, for judges whose verdict is a pure function of the text (``reference``, ``regex``,
  ``json_schema``): re-judged on the row's own chosen and rejected answers, it must pick the same pair with
  the same scores. A model judge's verdict is not recomputed (a row's answers still are).

A row that fails says why (:class:`RowCheck`). The caller decides what a failure means (a refutation of the
producer); this module has no network and no opinion about who sent the rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from garden.distill.judges import Judge
from garden.distill.shaker import teacher_topk
from garden.models.chat import answer_ids, chat_prompt_ids
from garden.models.loading import LoadedModel, tokenizer_fingerprint
from garden.protocol.rows import DorpoRow, PromptRow

DETERMINISTIC_JUDGES = frozenset({"reference", "regex", "json_schema"})
"""Judges whose verdict on a pair of answers is the same on every machine: their verdicts are re-checked."""
SCORE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Tolerance:
    """How far recomputed top-k log-probs may be from a row's, per chosen token, before the row is refused.

    The stored log-probs are float16, and the producer may have run another dtype, device or batch shape;
    ``benchmarks/integrity.py`` measures how far honest rows land (see docs/missions.md). A token is *off*
    when fewer than ``min_overlap`` of its k ids are among the recomputed top-k, or when a shared id's
    log-prob differs by more than ``atol + rtol * |log-prob|``. A row fails when more than ``max_off`` of its
    tokens are off, or any token's shared log-probs differ by more than ``hard``: one forged token among
    thousands of honest ones is still caught.

    :param atol: absolute log-prob difference allowed on a shared id
    :param rtol: relative part of the allowance (low-probability tokens carry more float16 error)
    :param min_overlap: the share of a token's k ids that must be in the recomputed top-k (near-ties at the
        k-th place may swap)
    :param max_off: the share of a row's tokens that may be off
    :param hard: a difference on any shared id past which the row fails at once
    """

    atol: float = 0.05
    rtol: float = 0.01
    min_overlap: float = 0.8
    max_off: float = 0.02
    hard: float = 1.0


@dataclass(frozen=True)
class RowCheck:
    """One row's verdict: ``reason`` is None when it holds. ``worst`` is the largest log-prob difference
    seen on a shared id, ``off`` the share of its tokens outside the tolerance (for measurements)."""

    reason: str | None
    worst: float = 0.0
    off: float = 0.0

    @property
    def ok(self) -> bool:
        return self.reason is None


def verify_rows(
    teacher: LoadedModel,
    rows: Sequence[DorpoRow],
    prompts: Sequence[PromptRow],
    judge: Judge | None = None,
    tolerance: Tolerance | None = None,
) -> list[RowCheck]:
    """A verdict per row, in order. ``prompts[i]`` is the mission's prompt row ``rows[i]`` answers (its
    reference is what the reference judge scores against); ``teacher`` is the row's teacher, loaded here.
    ``judge`` re-checks verdicts when it is one of :data:`DETERMINISTIC_JUDGES`."""
    if len(prompts) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(prompts)} prompts")
    tolerance = tolerance or Tolerance()
    tokenizer = teacher.tokenizer
    fingerprint = tokenizer_fingerprint(tokenizer)
    checks: list[RowCheck | None] = [None] * len(rows)
    forced: list[int] = []  # rows whose top-k is recomputed
    for index, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        reason = _static_reason(row, prompt, fingerprint, tokenizer, judge)
        if reason is not None:
            checks[index] = RowCheck(reason)
        elif row.k == 0:
            checks[index] = RowCheck(None)
        else:
            forced.append(index)
    if forced:
        items = [(chat_prompt_ids(tokenizer, rows[i].prompt), rows[i].chosen_ids_array().tolist()) for i in forced]
        tops, _ = teacher_topk(teacher, items, max(rows[i].k for i in forced))
        for index, (top_ids, top_logprobs) in zip(forced, tops, strict=True):
            checks[index] = compare_topk(rows[index], top_ids.numpy(), top_logprobs.numpy(), tolerance)
    return [check if check is not None else RowCheck("not checked") for check in checks]


def _static_reason(
    row: DorpoRow, prompt: PromptRow, fingerprint: str, tokenizer: object, judge: Judge | None
) -> str | None:
    """What is wrong with the row without running the teacher, or None."""
    if row.prompt != prompt.prompt:
        return "the row answers another prompt"
    if row.tokenizer != fingerprint:
        return f"its tokenizer {row.tokenizer} is not the teacher's ({fingerprint})"
    if row.chosen_ids_array().tolist() != answer_ids(tokenizer, row.chosen):
        return "its token ids are not the chosen text's"
    if judge is not None and judge.name in DETERMINISTIC_JUDGES and row.judge == judge.name:
        return _judge_reason(row, prompt, judge)
    return None


def _judge_reason(row: DorpoRow, prompt: PromptRow, judge: Judge) -> str | None:
    """Re-judge the row's own pair: the judge must pick the same chosen and rejected, with the same scores.
    A row whose chosen answer is the reference was judged without it (all candidates scored too low)."""
    candidates = ([] if row.reference_used else [row.chosen]) + ([row.rejected] if row.rejected is not None else [])
    try:
        verdict = judge.judge(prompt, candidates)
    except ValueError as e:
        return f"the judge refuses it: {e}"
    if (verdict.chosen, verdict.rejected) != (row.chosen, row.rejected):
        return f"the {judge.name} judge does not pick this pair"
    for key in ("chosen", "rejected"):
        stored, again = row.scores.get(key), verdict.scores.get(key)
        if (stored is None) != (again is None) or (
            stored is not None and again is not None and abs(stored - again) > SCORE_TOLERANCE
        ):
            return f"its {key} score {stored} is not the judge's ({again})"
    return None


def compare_topk(row: DorpoRow, ids: np.ndarray, logprobs: np.ndarray, tolerance: Tolerance) -> RowCheck:
    """The row's stored top-k against a recomputed one (both [T, k'], k' >= the row's k), within ``tolerance``: what
    :func:`verify_rows` applies, callable on numbers recomputed elsewhere (another device, ``benchmarks/``)."""
    stored_ids, stored = row.topk_ids_array(), row.topk_logprobs_array().astype(np.float64)
    tokens, k = stored_ids.shape
    if ids.shape[0] != tokens:
        return RowCheck(f"{tokens} tokens of log-probs for {ids.shape[0]} chosen tokens")
    worst, off = 0.0, 0
    for t in range(tokens):
        again = dict(zip(ids[t].tolist(), logprobs[t].astype(np.float64).tolist(), strict=True))
        pairs = zip(stored_ids[t].tolist(), stored[t].tolist(), strict=True)
        shared = [(again[i], lp) for i, lp in pairs if i in again]
        gaps = [abs(a - b) for a, b in shared]
        largest = max(gaps, default=0.0)
        worst = max(worst, largest)
        allowed = all(gap <= tolerance.atol + tolerance.rtol * abs(b) for gap, (_, b) in zip(gaps, shared, strict=True))
        if len(shared) < tolerance.min_overlap * k or not allowed:
            off += 1
    share = off / tokens if tokens else 0.0
    if worst > tolerance.hard:
        return RowCheck(f"a log-prob is {worst:.2f} away from the teacher's", worst, share)
    if share > tolerance.max_off:
        return RowCheck(f"{off} of {tokens} tokens' log-probs are not the teacher's", worst, share)
    return RowCheck(None, worst, share)

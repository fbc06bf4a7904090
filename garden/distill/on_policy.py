"""The student's own answers as rejected ones (ORPO-Distill's mixed-policy negatives).

The teacher's rows pair its chosen answer with one of its own that the judge rejected, or with none: a row
without a rejected answer trains the NLL and the KL but not the odds ratio. ORPO-Distill (2025) takes the
student's answers as the rejected side instead: the odds ratio then pushes down what this student would
say, not what the teacher would. Sampled before training they are off-policy (the untrained student's);
sampled again between phases of a run they follow the student (on-policy); ORPO-Distill mixes the two.

The rows keep everything else (the chosen answer and the teacher's top-k on it); an answer equal to the
chosen one, or empty, leaves the row's own rejected answer in place.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from garden.distill.shaker import ShakeConfig, sample_answers
from garden.models.loading import LoadedModel
from garden.protocol.rows import DorpoRow


@dataclass(frozen=True)
class StudentRejected:
    """:param share: the share of rows whose rejected answer becomes the student's (ORPO-Distill's mixing
        ratio; 1.0: every row), chosen by ``seed``
    :param temperature: the student's sampling temperature (its answers as it would give them)
    :param max_new_tokens: the longest answer sampled
    :param batch_prompts: prompts per batch"""

    share: float = 1.0
    temperature: float = 0.8
    max_new_tokens: int = 32
    batch_prompts: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share must be within [0, 1], not {self.share!r}")


@dataclass
class Replaced:
    """What :func:`student_rejected` made: the rows in their order (those it could not use unchanged), and how many
    it changed, so that a benchmark or trainer can say how much of the data is the student's own."""

    rows: list[DorpoRow]
    replaced: int  # rows whose rejected answer is now the student's
    kept: int  # rows picked whose sample equalled the chosen answer or was empty


def student_rejected(student: LoadedModel, rows: Sequence[DorpoRow], config: StudentRejected) -> Replaced:
    """``rows`` with the student's sampled answer as the rejected one in ``config.share`` of them."""
    picker = random.Random(config.seed)
    picked = [i for i in range(len(rows)) if picker.random() < config.share]
    sampling = ShakeConfig(candidates=1, temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                           batch_prompts=config.batch_prompts, seed=config.seed)  # fmt: skip
    answers = sample_answers(student, [rows[i].prompt for i in picked], sampling)
    out, replaced = list(rows), 0
    for i, (answer,) in zip(picked, answers, strict=True):
        if answer and answer != rows[i].chosen:
            out[i] = DorpoRow.model_validate(rows[i].model_dump() | {"rejected": answer})  # checked, a new row_id
            replaced += 1
    return Replaced(rows=out, replaced=replaced, kept=len(picked) - replaced)

"""DORPO rows -> the tensors the loss needs: prompt + answer sequences, shifted labels, answer masks and the
teacher's top-k aligned to each predicted token.

Rows carry token ids in the *teacher's* tokenizer. When the student's tokenizer is the same (same
fingerprint) the stored ids and the teacher's top-k are used as they are; otherwise the chosen text is
re-tokenized for the student and the row trains on hard labels only (no KL: the teacher's ids would name
other tokens). Sequences are right-padded so positions stay 0..n-1, as in the teacher's pass.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from garden.models.loading import tokenizer_fingerprint
from garden.protocol.rows import DorpoRow
from garden.models.chat import answer_ids, chat_prompt_ids
from garden.distill.dorpo import DorpoConfig, DorpoOutput, dorpo_loss

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedRow:
    """One row in the student's token ids. ``topk_*`` [T, k] are aligned with ``chosen_ids`` [T], or None
    when the KL term cannot apply to this row."""

    row_id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None
    topk_ids: np.ndarray | None = field(default=None, repr=False)
    topk_logprobs: np.ndarray | None = field(default=None, repr=False)

    @property
    def length(self) -> int:
        """Longest sequence this row puts in a batch (prompt + the longer answer)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids or ()))


@dataclass
class EncodeReport:
    """What :func:`encode_rows` did: rows kept, rows on hard labels (tokenizer differs, or no log-probs),
    and rows dropped as longer than ``max_length``."""

    kept: int = 0
    hard_labels: int = 0
    too_long: int = 0


def encode_rows(
    rows: Sequence[DorpoRow], tokenizer: Any, max_length: int = 512
) -> tuple[list[EncodedRow], EncodeReport]:
    """Encode rows for a student with ``tokenizer``; rows longer than ``max_length`` tokens are dropped
    (counted in the report), never truncated: a cut answer would teach the student to stop mid-sentence."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    report = EncodeReport()
    encoded: list[EncodedRow] = []
    for row in rows:
        same_tokenizer = row.tokenizer == fingerprint
        if same_tokenizer:
            chosen = [int(i) for i in row.chosen_ids_array()]
        else:
            chosen = answer_ids(tokenizer, row.chosen)
        rejected = None
        if row.rejected is not None:
            rejected = answer_ids(tokenizer, row.rejected)
        with_topk = same_tokenizer and row.has_logprobs
        item = EncodedRow(
            row_id=row.row_id,
            prompt_ids=chat_prompt_ids(tokenizer, row.prompt),
            chosen_ids=chosen,
            rejected_ids=rejected,
            topk_ids=row.topk_ids_array() if with_topk else None,
            topk_logprobs=row.topk_logprobs_array() if with_topk else None,
        )
        if item.length > max_length:
            report.too_long += 1
            continue
        report.hard_labels += not with_topk
        report.kept += 1
        encoded.append(item)
    if report.too_long:
        logger.warning("%d row(s) longer than %d tokens dropped", report.too_long, max_length)
    return encoded, report


@dataclass
class DorpoBatch:
    """``input_ids``/``attention_mask`` [N, L]: the B chosen sequences, then (when any row has one) the B
    rejected sequences (a row without one holds a masked placeholder), so N is B or 2B.

    Only answer tokens are scored, and the vocabulary projection dominates a small model's cost, so logits
    are computed at ``positions`` [N, W] only: for each sequence, the W positions from the last prompt token
    on (W = the longest answer). ``labels``/``mask`` [N, W] are the tokens those positions predict and whether
    each is a real answer token; ``topk_*`` [B, W, k] is the teacher's distribution at the chosen positions.
    """

    size: int
    input_ids: Any
    attention_mask: Any
    positions: Any
    labels: Any
    mask: Any
    has_rejected: Any
    topk_ids: Any
    topk_logprobs: Any
    has_topk: Any

    @property
    def with_rejected(self) -> bool:
        return int(self.input_ids.shape[0]) == 2 * self.size

    def to(self, device: Any) -> DorpoBatch:
        moved = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name, value in moved.items():
            if hasattr(value, "to"):
                moved[name] = value.to(device)
        return DorpoBatch(**moved)


def collate(rows: Sequence[EncodedRow], pad: int) -> DorpoBatch:
    """Right-padded batch of ``rows`` (see :class:`DorpoBatch`)."""
    import torch

    if not rows:
        raise ValueError("cannot collate an empty batch")
    size = len(rows)
    sequences = [(r.prompt_ids, r.chosen_ids) for r in rows]
    has_rejected = [r.rejected_ids is not None for r in rows]
    if any(has_rejected):
        sequences += [(r.prompt_ids, r.rejected_ids or r.chosen_ids[:1]) for r in rows]
    length = max(len(p) + len(a) for p, a in sequences)
    window = max(len(a) for _, a in sequences)
    ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    positions = torch.zeros((len(sequences), window), dtype=torch.long)
    labels = torch.full((len(sequences), window), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), window), dtype=torch.bool)
    for i, (prompt, answer) in enumerate(sequences):
        n = len(prompt) + len(answer)
        ids[i, :n] = torch.tensor(prompt + answer, dtype=torch.long)
        attention[i, :n] = 1
        # position len(prompt) - 1 + j predicts answer token j; positions past the row are clamped (masked)
        positions[i] = torch.arange(len(prompt) - 1, len(prompt) - 1 + window).clamp(max=length - 1)
        labels[i, : len(answer)] = torch.tensor(answer, dtype=torch.long)
        mask[i, : len(answer)] = i < size or has_rejected[i - size]
    k = max((r.topk_ids.shape[1] for r in rows if r.topk_ids is not None), default=1)
    topk_ids = torch.zeros((size, window, k), dtype=torch.long)
    topk_logprobs = torch.full((size, window, k), -math.inf, dtype=torch.float32)
    for i, r in enumerate(rows):
        if r.topk_ids is not None and r.topk_logprobs is not None:
            tokens, kr = len(r.chosen_ids), r.topk_ids.shape[1]
            topk_ids[i, :tokens, :kr] = torch.from_numpy(r.topk_ids)
            topk_logprobs[i, :tokens, :kr] = torch.from_numpy(r.topk_logprobs)
    return DorpoBatch(
        size=size,
        input_ids=ids,
        attention_mask=attention,
        positions=positions,
        labels=labels,
        mask=mask,
        has_rejected=torch.tensor(has_rejected, dtype=torch.bool),
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        has_topk=torch.tensor([r.topk_ids is not None for r in rows], dtype=torch.bool),
    )


def student_logits(model: Any, batch: DorpoBatch) -> tuple[Any, Any | None]:
    """One forward pass over chosen (and rejected) sequences: (chosen logits [B, W, V], rejected logits or
    None), aligned with ``batch.labels``/``batch.mask``."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=batch.positions)
    logits = out.logits
    if batch.with_rejected:
        return logits[: batch.size], logits[batch.size :]
    return logits, None


def dorpo_forward(model: Any, batch: DorpoBatch, config: DorpoConfig) -> DorpoOutput:
    """The DORPO loss and metrics of ``model`` on ``batch``."""
    chosen, rejected = student_logits(model, batch)
    b = batch.size
    return dorpo_loss(
        chosen,
        batch.labels[:b],
        batch.mask[:b],
        config,
        rejected_logits=rejected,
        rejected_labels=batch.labels[b:] if rejected is not None else None,
        rejected_mask=batch.mask[b:] if rejected is not None else None,
        has_rejected=batch.has_rejected if rejected is not None else None,
        topk_ids=batch.topk_ids,
        topk_logprobs=batch.topk_logprobs,
        has_topk=batch.has_topk,
    )

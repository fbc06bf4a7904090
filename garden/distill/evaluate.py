"""Evaluating a student on held-out rows: how close it is to the teacher, and how well it answers.

Four numbers, each over the rows that can have it:

* ``kl``: KL(teacher || student) on the (k+1) buckets of :func:`garden.distill.dorpo.topk_kl` (the teacher's
  top-k tokens plus the rest), a token-weighted mean over the chosen-answer tokens of the rows that carry
  the teacher's top-k in the student's tokenizer. This is what DORPO's KL term minimises, so it is the
  direct measure of how far distillation got.
* ``nll``: negative log-likelihood per chosen-answer token (token-weighted mean over every evaluated row,
  hard-label rows included: the chosen text is re-tokenized for a student with another tokenizer);
  ``exp(nll)`` is the perplexity on the answers.
* ``pref_acc``: fraction of the rows with a rejected answer whose mean per-token log-prob of the chosen
  answer is strictly above that of the rejected one (lp+ > lp-, the quantity ORPO's odds ratio pushes
  apart; per-row means, so long and short answers compare on one scale).
* ``top1``: over the same tokens as ``kl``, how often the student's most likely token is the teacher's
  most likely one: the agreement a greedy decoder would see, easier to read than a KL.

Token-weighted means (rather than means of per-row means, as the training loss uses) make the numbers
independent of how rows are batched and of how answers are split into rows; long answers weigh more.

Data without the teacher's log-probs (a TRL preference file, a prompts file with references, the built-in
demo set) gets them here from one teacher-forced pass (:func:`fill_teacher_topk`), so a student can be
evaluated without shaking first; that only makes sense when teacher and student share a tokenizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from garden.models.loading import LoadedModel, tokenizer_fingerprint
from garden.protocol.records import first_error
from garden.protocol.rows import (
    MAX_TOPK,
    DorpoRow,
    PromptRow,
    read_json_objects,
    read_preference_jsonl,
    read_prompts_jsonl,
)
from garden.models.chat import answer_ids, chat_prompt_ids, pad_id
from garden.distill.collate import DorpoBatch, EncodedRow, collate, encode_rows, student_logits
from garden.distill.dorpo import topk_kl_per_token
from garden.distill.shaker import teacher_topk

__all__ = [
    "EvalData",
    "EvalReport",
    "evaluate",
    "fill_teacher_topk",
    "load_eval_data",
    "rows_from_prompts",
]


# --- the per-token KL -------------------------------------------------------------------------------


# --- evaluation ----------------------------------------------------------------------------------------


@dataclass
class EvalReport:
    """The metrics of one evaluation (see the module docstring for their exact definitions).

    :param rows: rows evaluated (after dropping those longer than ``max_length``)
    :param tokens: chosen-answer tokens of those rows, in the student's tokenizer (the NLL's denominator)
    :param kl: token-weighted KL(teacher || student) on the (k+1) buckets; None when no row has the teacher's
        top-k in the student's tokenizer
    :param kl_tokens: tokens behind ``kl`` and ``top1`` (the answer tokens of the rows with top-k)
    :param nll: token-weighted negative log-likelihood of the chosen answers (nats per token)
    :param pref_acc: fraction of the ``pairs`` rows where lp+ > lp-; None when no row has a rejected answer
    :param pairs: rows with a rejected answer
    :param top1: fraction of the ``kl_tokens`` where the student's argmax is the teacher's top-1 id; None with
        ``kl``
    :param hard_label_rows: evaluated rows without usable top-k (another tokenizer, or no log-probs): they
        count in ``nll`` and ``pref_acc`` only
    :param dropped_too_long: rows skipped as longer than ``max_length`` tokens
    :param notes: why some numbers are missing or partial, for people
    """

    rows: int
    tokens: int
    kl: float | None
    kl_tokens: int
    nll: float
    pref_acc: float | None
    pairs: int
    top1: float | None
    hard_label_rows: int
    dropped_too_long: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: plain ints, floats, None and strings (never NaN)."""
        return asdict(self)


@dataclass
class _Totals:
    tokens: int = 0
    nll_sum: float = 0.0
    kl_tokens: int = 0
    kl_sum: float = 0.0
    top1_hits: int = 0
    pairs: int = 0
    wins: int = 0


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the block; the model's training flag comes back after."""
    was_training = bool(model.training)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def evaluate(
    model: Any, tokenizer: Any, rows: Sequence[DorpoRow], batch_size: int = 8, max_length: int = 512
) -> EvalReport:
    """Score ``model`` (a causal LM, with ``tokenizer``) on ``rows``; see :class:`EvalReport`.

    Rows go through the trainer's own encoding and batching (:func:`~garden.distill.collate.encode_rows`,
    :func:`~garden.distill.collate.collate`), so the evaluation sees exactly the tokens and teacher top-k
    training would. Rows longer than ``max_length`` tokens are dropped and counted, never truncated. The
    model runs in eval mode without gradients; its training flag is restored afterwards. Raises
    ``ValueError`` when there is nothing to evaluate."""
    if not rows:
        raise ValueError("no rows to evaluate")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
    encoded, encoding = encode_rows(rows, tokenizer, max_length)
    if not encoded:
        raise ValueError(
            f"all {len(rows)} rows are longer than max_length={max_length} tokens; raise it to evaluate them"
        )
    totals = _Totals()
    device, pad = _device(model), pad_id(tokenizer)
    with _eval_mode(model):
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size], pad).to(device)
            chosen, rejected = student_logits(model, batch)
            _accumulate(totals, batch, chosen, rejected)
    return EvalReport(
        rows=encoding.kept,
        tokens=totals.tokens,
        kl=totals.kl_sum / totals.kl_tokens if totals.kl_tokens else None,
        kl_tokens=totals.kl_tokens,
        nll=totals.nll_sum / totals.tokens,
        pref_acc=totals.wins / totals.pairs if totals.pairs else None,
        pairs=totals.pairs,
        top1=totals.top1_hits / totals.kl_tokens if totals.kl_tokens else None,
        hard_label_rows=encoding.hard_labels,
        dropped_too_long=encoding.too_long,
        notes=_notes(rows, encoded, tokenizer, encoding.too_long, max_length, totals.pairs),
    )


def _answer_logps(logits: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(log-softmax [n, V], log-prob of each label [n]) at the n answer positions of one sequence. Only the
    answer positions are normalised: a [B, L, V] float32 log-softmax of a whole batch would double the
    memory the logits already take."""
    logps = F.log_softmax(logits[mask].float(), dim=-1)
    return logps, logps.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)


def _accumulate(totals: _Totals, batch: DorpoBatch, chosen: Tensor, rejected: Tensor | None) -> None:
    size = batch.size
    for i in range(size):
        mask = batch.mask[i]
        logps, token_lps = _answer_logps(chosen[i], batch.labels[i], mask)
        n = int(token_lps.shape[0])
        totals.tokens += n
        totals.nll_sum -= float(token_lps.sum())
        if bool(batch.has_topk[i]):
            ids, lps = batch.topk_ids[i][mask], batch.topk_logprobs[i][mask]  # [n, k]
            every = torch.ones((1, n), dtype=torch.bool, device=logps.device)
            totals.kl_sum += float(topk_kl_per_token(logps[None], ids[None], lps[None], every).sum())
            totals.kl_tokens += n
            teacher_top1 = ids.gather(-1, lps.argmax(-1, keepdim=True)).squeeze(-1)  # first max: sorted order wins
            totals.top1_hits += int((logps.argmax(-1) == teacher_top1).sum())
        if rejected is not None and bool(batch.has_rejected[i]):
            _, rejected_lps = _answer_logps(rejected[i], batch.labels[size + i], batch.mask[size + i])
            totals.pairs += 1
            totals.wins += bool(token_lps.mean() > rejected_lps.mean())


def _notes(
    rows: Sequence[DorpoRow], encoded: Sequence[EncodedRow], tokenizer: Any, too_long: int, max_length: int, pairs: int
) -> list[str]:
    fingerprint = tokenizer_fingerprint(tokenizer)
    by_id = {row.row_id: row for row in rows}
    kept = [by_id[e.row_id] for e in encoded]
    other = sum(1 for row in kept if row.tokenizer != fingerprint)
    bare = sum(1 for row in kept if row.tokenizer == fingerprint and not row.has_logprobs)
    notes = []
    if other:
        notes.append(f"{other} row(s) on hard labels: their tokenizer differs from the student's (no KL, no top-1)")
    if bare:
        notes.append(f"{bare} row(s) on hard labels: no teacher log-probs (no KL, no top-1)")
    if too_long:
        notes.append(f"{too_long} row(s) longer than {max_length} tokens skipped (raise --max-length)")
    if not pairs:
        notes.append("no row has a rejected answer: no preference accuracy")
    return notes


# --- teacher top-k for data without log-probs -----------------------------------------------------------


def _vocab_size(teacher: LoadedModel) -> int:
    size = getattr(teacher.model.config, "vocab_size", None)
    return int(size) if size else len(teacher.tokenizer)


def fill_teacher_topk(
    teacher: LoadedModel,
    rows: Sequence[DorpoRow],
    k: int = 20,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[DorpoRow]:
    """``rows`` with the teacher's top-k computed for every row that has no log-probs (k == 0).

    Rows that already carry log-probs come back unchanged (the same objects). A row without them is rebuilt
    in the teacher's tokenizer: its chosen ids are kept when the row's tokenizer is the teacher's, else the
    chosen text is re-encoded (plus end-of-sequence, as the shaker does); its ``teacher`` and ``tokenizer``
    then name this teacher, whose log-probs it now holds. Rows whose prompt + chosen answer exceed
    ``max_length`` teacher tokens are left as they are: the evaluation drops them anyway, and skipping them
    here saves the teacher's pass over the longest rows. Order is kept."""
    if not 1 <= k <= MAX_TOPK:
        raise ValueError(f"k must be in 1..{MAX_TOPK}, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer = teacher.tokenizer
    fingerprint = tokenizer_fingerprint(tokenizer)
    todo: list[tuple[int, list[int], list[int]]] = []  # (index in rows, prompt ids, answer ids)
    for index, row in enumerate(rows):
        if row.has_logprobs:
            continue
        if row.tokenizer == fingerprint:
            answer = [int(i) for i in row.chosen_ids_array()]
        else:
            answer = answer_ids(tokenizer, row.chosen)
        prompt = chat_prompt_ids(tokenizer, row.prompt)
        if max_length is not None and len(prompt) + len(answer) > max_length:
            continue
        todo.append((index, prompt, answer))
    out = list(rows)
    if not todo:
        return out
    tops, vocab_size = teacher_topk(teacher, [(p, a) for _, p, a in todo], k, batch_size)
    for (index, _, answer), (top_ids, top_logprobs) in zip(todo, tops, strict=True):
        row = rows[index]
        out[index] = DorpoRow.from_arrays(
            prompt=row.prompt,
            chosen=row.chosen,
            rejected=row.rejected,
            chosen_ids=answer,
            topk_ids=top_ids,
            topk_logprobs=top_logprobs,
            teacher=str(teacher.ref),
            judge=row.judge,
            scores=dict(row.scores),
            tokenizer=fingerprint,
            reference_used=row.reference_used,
            vocab_size=vocab_size,
        )
    return out


def _bare_row(
    teacher: LoadedModel, prompt: str, chosen: str, rejected: str | None, judge: str, reference_used: bool
) -> DorpoRow:
    """A row without log-probs, its chosen answer in the teacher's tokenizer (filled by fill_teacher_topk)."""
    return DorpoRow.from_arrays(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        chosen_ids=answer_ids(teacher.tokenizer, chosen),
        teacher=str(teacher.ref),
        judge=judge,
        tokenizer=tokenizer_fingerprint(teacher.tokenizer),
        reference_used=reference_used,
        vocab_size=_vocab_size(teacher),
    )


def rows_from_prompts(
    teacher: LoadedModel,
    prompts: Sequence[PromptRow],
    k: int = 20,
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[DorpoRow]:
    """Evaluation rows from prompts with references: each reference is the chosen answer (no rejected), with
    the teacher's top-k on it (none when ``k`` is 0, e.g. for a student with another tokenizer, where it
    could not be used). This evaluates a student on a prompt set without shaking it first. A prompt
    without a reference is a ``ValueError`` naming it: there would be nothing to score the student on."""
    if not prompts:
        raise ValueError("no prompts to evaluate on")
    rows = []
    for number, prompt in enumerate(prompts, start=1):
        if prompt.reference is None or not prompt.reference.strip():
            raise ValueError(f"prompt {number} ({prompt.prompt[:60]!r}) has no reference answer to evaluate against")
        rows.append(_bare_row(teacher, prompt.prompt, prompt.reference, None, "reference", True))
    return fill_teacher_topk(teacher, rows, k, batch_size, max_length) if k else rows


# --- reading --data --------------------------------------------------------------------------------------


@dataclass
class EvalData:
    """Rows to evaluate on, and what was done to get them.

    :param kind: ``rows`` (garden preference JSONL), ``pairs`` (plain TRL prompt/chosen/rejected JSONL),
        ``prompts`` (prompts JSONL with references) or ``demo`` (the built-in demo set's held-out split)
    :param filled: rows whose teacher top-k was computed here
    :param notes: what people should know (e.g. the teacher could not supply log-probs)"""

    rows: list[DorpoRow]
    kind: str
    filled: int = 0
    notes: list[str] = field(default_factory=list)


def load_eval_data(
    data: str,
    teacher: Callable[[], LoadedModel],
    student_tokenizer: Any,
    k: int = 20,
    batch_size: int = 8,
    max_length: int | None = None,
) -> EvalData:
    """Read ``--data``: ``builtin:demo`` (the demo set's held-out prompts), a garden preference JSONL (with or
    without log-probs), a plain TRL preference JSONL (``prompt``, ``chosen``, optional ``rejected`` strings
    per line) or a prompts JSONL (``prompt`` and ``reference`` per line); the format is told by the first
    line's keys. Rows without log-probs get the teacher's top-k (:func:`fill_teacher_topk`) when the
    teacher's tokenizer is the student's. ``teacher`` is called only when the teacher is needed, so
    evaluating on shaken rows never loads it. Raises ``ValueError`` naming the file and line on bad input."""
    from garden.data import DEMO_PROMPTS, demo_prompts

    def teacher_k() -> tuple[LoadedModel, int, list[str]]:
        loaded = teacher()
        if tokenizer_fingerprint(loaded.tokenizer) == tokenizer_fingerprint(student_tokenizer):
            return loaded, k, []
        return loaded, 0, [f"the teacher {loaded.ref}'s tokenizer differs from the student's: no teacher top-k"]

    if data == DEMO_PROMPTS:
        loaded, use_k, notes = teacher_k()
        rows = rows_from_prompts(loaded, demo_prompts("heldout"), use_k, batch_size, max_length)
        return EvalData(rows, "demo", sum(r.has_logprobs for r in rows), notes)
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"data file {data} does not exist; give a preference JSONL, a prompts JSONL or {DEMO_PROMPTS}")
    kind = _sniff(path)
    if kind == "prompts":
        loaded, use_k, notes = teacher_k()
        rows = rows_from_prompts(loaded, read_prompts_jsonl(path), use_k, batch_size, max_length)
        return EvalData(rows, kind, sum(r.has_logprobs for r in rows), notes)
    if kind == "pairs":
        loaded, use_k, notes = teacher_k()
        rows = _read_pairs(path, loaded)
        if use_k:
            rows = fill_teacher_topk(loaded, rows, use_k, batch_size, max_length)
        return EvalData(rows, kind, sum(r.has_logprobs for r in rows), notes)
    rows = read_preference_jsonl(path)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    bare = sum(not r.has_logprobs for r in rows)
    if not bare:
        return EvalData(rows, kind)
    loaded, use_k, notes = teacher_k()
    if use_k:
        filled = fill_teacher_topk(loaded, rows, use_k, batch_size, max_length)
        return EvalData(filled, kind, sum(a is not b for a, b in zip(rows, filled, strict=True)), notes)
    return EvalData(rows, kind, 0, notes)


def _sniff(path: Path) -> str:
    """``rows``, ``pairs`` or ``prompts``, from the first line's keys (the readers then check every line)."""
    for line_no, obj in read_json_objects(path):
        if "chosen_ids" in obj:
            return "rows"
        if "chosen" in obj:
            return "pairs"
        if "prompt" in obj:
            return "prompts"
        raise ValueError(
            f"{path}:{line_no}: neither a preference row (prompt, chosen, rejected) nor a prompt "
            f"(prompt, reference); keys: {sorted(obj)[:10]}"
        )
    raise ValueError(f"{path} is empty: no rows to evaluate")


def _read_pairs(path: Path, teacher: LoadedModel) -> list[DorpoRow]:
    """A plain TRL preference JSONL (standard, not conversational, format) as rows without log-probs.
    Other keys are ignored (TRL data sets carry extra columns); ``rejected`` may be missing, null or ""."""
    rows = []
    for line_no, obj in read_json_objects(path):
        where = f"{path}:{line_no}"
        prompt, chosen, rejected = obj.get("prompt"), obj.get("chosen"), obj.get("rejected")
        for name, value in (("prompt", prompt), ("chosen", chosen)):
            if not isinstance(value, str) or not value.strip():
                got = "missing" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
                raise ValueError(
                    f"{where}: {name} must be a non-empty string, got {got} (conversational TRL data is not "
                    "supported: give the prompt and answers as plain text)"
                )
        if rejected is not None and not isinstance(rejected, str):
            raise ValueError(f"{where}: rejected must be a string, null or absent, got {type(rejected).__name__}")
        assert isinstance(prompt, str) and isinstance(chosen, str)
        try:
            rows.append(_bare_row(teacher, prompt, chosen, rejected or None, "data", False))
        except ValueError as e:
            raise ValueError(f"{where}: {first_error(e)}") from None
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


class StudentEvaluator:
    """Evaluates students one after another on one ``data`` set in this process (``garden eval`` with several
    ``--student``, the demo's before and after): the teacher loads once, when a first student's data needs its
    top-k, and the data is read once per tokenizer. Calling it with a model reference gives ``garden eval``'s
    report of that student; it raises what loading or evaluating raised (``ValueError`` or ``OSError`` for a bad
    data file or reference)."""

    def __init__(
        self, data: str, teacher: Callable[[], LoadedModel], k: int = 20, batch_size: int = 8,
        max_length: int = 512, teacher_ref: str = "", say: Callable[[str], Any] = lambda _: None,
    ) -> None:  # fmt: skip
        self.data, self.k, self.batch_size, self.max_length, self.say = data, k, batch_size, max_length, say
        self.teacher_ref, self._teacher, self._loaded_teacher = teacher_ref, teacher, None
        self.datasets: dict[str, EvalData] = {}

    def _load_teacher(self) -> LoadedModel:
        if self._loaded_teacher is None:
            self.say(f"loading the teacher {self.teacher_ref} for the data's top-k")
            self._loaded_teacher = self._teacher()
        return self._loaded_teacher

    def __call__(self, ref: str) -> dict[str, Any]:
        from garden.models.loading import load_model
        from garden.models.student import PRUNE_SCHEME, build_student, parse_student_ref

        self.say(f"loading the student {ref}")
        loaded = build_student(parse_student_ref(ref)) if ref.startswith(PRUNE_SCHEME) else load_model(ref)
        fingerprint = tokenizer_fingerprint(loaded.tokenizer)
        if fingerprint not in self.datasets:
            self.datasets[fingerprint] = load_eval_data(self.data, self._load_teacher, loaded.tokenizer, self.k,
                                                        self.batch_size, self.max_length)  # fmt: skip
        eval_data = self.datasets[fingerprint]
        self.say(f"evaluating on {len(eval_data.rows)} rows")
        report = evaluate(loaded.model, loaded.tokenizer, eval_data.rows, self.batch_size, self.max_length)
        report.notes[:0] = eval_data.notes
        result: dict[str, Any] = {"student": ref, "teacher": self.teacher_ref, "data": self.data,
                                  "data_kind": eval_data.kind}  # fmt: skip
        return result | {"topk_filled_rows": eval_data.filled, **report.to_dict()}

"""Evaluation: the per-token bucket KL on small tensors, then the metrics on the real built-in model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from garden.data import demo_prompts
from garden.models.loading import LoadedModel, load_model, tokenizer_fingerprint
from garden.protocol.rows import DorpoRow, PromptRow, write_preference_jsonl
from garden.models.chat import chat_prompt_ids
from garden.distill.collate import encode_rows
from garden.distill.dorpo import topk_kl, topk_kl_per_token
from garden.distill.evaluate import (
    EvalReport,
    evaluate,
    fill_teacher_topk,
    load_eval_data,
    rows_from_prompts,
)
from garden.distill.judges import ReferenceJudge
from garden.distill.shaker import ShakeConfig, shake
from garden.models.student import build_student, parse_student_ref

pytestmark = pytest.mark.heavy(13)  # seconds in `make check`: see tests/conftest.py

TEACHER = "builtin:smollm2-135m"


# --- the per-token KL, on random tensors --------------------------------------------------------------


def _random_case(seed: int, batch: int = 2, seq: int = 4, vocab: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=generator) * 2
    teacher = F.log_softmax(torch.randn(batch, seq, vocab, generator=generator) * 2, dim=-1)
    return student, teacher


def test_token_kl_with_the_whole_vocabulary_is_the_exact_kl() -> None:
    student, teacher = _random_case(0)
    values, ids = teacher.sort(dim=-1, descending=True)  # k = V: the rest bucket is empty
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    values = torch.where(mask[..., None], values, torch.nan)  # what sits at masked positions is never read
    got = topk_kl_per_token(student, ids, values, mask)
    exact = F.kl_div(F.log_softmax(student, dim=-1), teacher, reduction="none", log_target=True).sum(-1)
    assert torch.allclose(got, torch.where(mask, exact, 0.0), atol=1e-5)
    assert got[0, 2] == 0 and got[1, 0] == 0
    assert torch.all(got[mask] > 0)


def test_token_kl_averages_to_dorpo_topk_kl_and_vanishes_for_the_teacher_itself() -> None:
    student, teacher = _random_case(1, batch=3, seq=5, vocab=13)
    values, ids = teacher.topk(4, dim=-1)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(2)) > 0.3
    per_token = topk_kl_per_token(student, ids, values, mask)
    row_means = per_token.sum(-1) / mask.sum(-1).clamp(min=1)
    assert torch.allclose(row_means, topk_kl(student, ids, values, mask), atol=1e-6)
    assert torch.all(per_token >= 0)
    itself = topk_kl_per_token(teacher, ids, values, torch.ones(3, 5, dtype=torch.bool))
    assert float(itself.abs().max()) < 1e-5


def test_padded_top_k_slots_do_not_count() -> None:
    """A k = 2 row padded to k = 4 (id 0, log-prob -inf, as collate pads) scores as the k = 2 row."""
    student, teacher = _random_case(3, batch=1, seq=3, vocab=9)
    teacher[..., 0] = -30.0  # token 0 is never among the teacher's real top 2
    values, ids = teacher.topk(2, dim=-1)
    padded_ids = torch.cat([ids, torch.zeros_like(ids)], dim=-1)
    padded_values = torch.cat([values, torch.full_like(values, -torch.inf)], dim=-1)
    student[..., 0] = 5.0  # the student puts a lot of mass on the padded id 0
    mask = torch.ones(1, 3, dtype=torch.bool)
    padded = topk_kl_per_token(student, padded_ids, padded_values, mask)
    assert torch.allclose(padded, topk_kl_per_token(student, ids, values, mask))


def test_token_kl_refuses_misaligned_shapes() -> None:
    student, teacher = _random_case(4)
    values, ids = teacher.topk(3, dim=-1)
    with pytest.raises(ValueError, match="must both be"):
        topk_kl_per_token(student, ids[:, :-1], values[:, :-1], torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        topk_kl_per_token(student, ids, values, torch.ones(2, 3, dtype=torch.bool))


# --- on the real built-in model ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def cache(model_cache: Path) -> Path:
    return model_cache


@pytest.fixture(scope="module")
def teacher(model_cache: Path) -> LoadedModel:
    return load_model(TEACHER)


@pytest.fixture(scope="module")
def shaken(teacher: LoadedModel) -> list[DorpoRow]:
    result = shake(teacher, demo_prompts("train")[:3], ReferenceJudge(), ShakeConfig(candidates=2, max_new_tokens=8))
    assert len(result.rows) == 3
    return result.rows


@pytest.fixture(scope="module")
def own_report(teacher: LoadedModel, shaken: list[DorpoRow]) -> EvalReport:
    """The teacher evaluated on its own rows (computed once: the forward passes dominate the test time)."""
    return evaluate(teacher.model, teacher.tokenizer, shaken)


def _crafted_pair(teacher: LoadedModel, chosen: str, rejected: str) -> DorpoRow:
    """A row without log-probs (hard labels), its answer in the teacher's tokenizer."""
    tokenizer = teacher.tokenizer
    return DorpoRow.from_arrays(
        prompt="What is the capital of France?",
        chosen=chosen,
        rejected=rejected,
        chosen_ids=tokenizer(chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
        teacher=TEACHER,
        judge="test",
        tokenizer=tokenizer_fingerprint(tokenizer),
        vocab_size=int(teacher.model.config.vocab_size),
    )


def _answer_logps(teacher: LoadedModel, prompt: str, answer_ids: list[int]) -> torch.Tensor:
    """Log-probs of an answer's tokens from one unbatched forward pass (independent of evaluate's batching)."""
    prompt_ids = chat_prompt_ids(teacher.tokenizer, prompt)
    with torch.no_grad():
        logits = teacher.model(torch.tensor([prompt_ids + answer_ids])).logits[0, len(prompt_ids) - 1 : -1]
    return F.log_softmax(logits.float(), dim=-1).gather(-1, torch.tensor(answer_ids)[:, None]).squeeze(-1)


def test_the_teacher_on_its_own_rows_has_no_kl_and_agrees_on_every_token(
    teacher: LoadedModel, shaken: list[DorpoRow], own_report: EvalReport
) -> None:
    report = own_report
    assert report.rows == 3 and report.hard_label_rows == 0 and report.dropped_too_long == 0
    assert report.tokens == report.kl_tokens == sum(r.num_tokens for r in shaken)
    assert report.kl is not None and 0 <= report.kl < 1e-3  # float16 storage of the log-probs: not exactly 0
    assert report.top1 == 1.0
    assert report.pairs == sum(r.rejected is not None for r in shaken)
    assert not teacher.model.training
    assert set(report.to_dict()) >= {"rows", "tokens", "kl", "nll", "pref_acc", "pairs", "top1", "hard_label_rows"}


def _direct(teacher: LoadedModel, rows: list[DorpoRow]) -> tuple[float, int, int, int]:
    """(NLL sum, tokens, lp+ > lp- wins, pairs) from unbatched passes, independent of evaluate's batching."""
    eos = teacher.tokenizer.eos_token_id
    nll_sum, tokens, wins, pairs = 0.0, 0, 0, 0
    for row in rows:
        chosen = _answer_logps(teacher, row.prompt, row.chosen_ids_array().tolist())
        nll_sum -= float(chosen.sum())
        tokens += len(chosen)
        if row.rejected is not None:
            rejected_ids = teacher.tokenizer(row.rejected, add_special_tokens=False)["input_ids"] + [eos]
            rejected = _answer_logps(teacher, row.prompt, rejected_ids)
            pairs += 1
            wins += bool(chosen.mean() > rejected.mean())
    return nll_sum, tokens, wins, pairs


def test_nll_and_preference_accuracy_match_a_direct_computation(
    teacher: LoadedModel, shaken: list[DorpoRow], own_report: EvalReport
) -> None:
    nll_sum, tokens, wins, pairs = _direct(teacher, shaken)
    assert own_report.tokens == tokens and own_report.pairs == pairs
    assert own_report.nll == pytest.approx(nll_sum / tokens, rel=1e-4)
    assert own_report.pref_acc == (pytest.approx(wins / pairs) if pairs else None)
    crafted = [
        _crafted_pair(teacher, "The capital of France is Paris.", "Purple cabbages sing loudly on Tuesdays."),
        _crafted_pair(teacher, "Purple cabbages sing loudly on Tuesdays.", "The capital of France is Paris."),
    ]
    nll_sum, tokens, wins, pairs = _direct(teacher, crafted)
    report = evaluate(teacher.model, teacher.tokenizer, crafted, batch_size=1)
    assert report.tokens == tokens and report.pairs == pairs == 2
    assert report.nll == pytest.approx(nll_sum / tokens, rel=1e-4)
    assert report.pref_acc == wins / pairs == 0.5  # the teacher prefers Paris to cabbages, on either side
    assert report.hard_label_rows == 2  # the crafted rows carry no log-probs
    assert report.kl is None and report.top1 is None and report.kl_tokens == 0
    assert any("no teacher log-probs" in note for note in report.notes)


def test_a_pruned_student_is_far_from_the_teacher_and_keeps_its_training_mode(
    shaken: list[DorpoRow], own_report: EvalReport
) -> None:
    student = build_student(parse_student_ref(f"prune:{TEACHER}:layers=10"))
    assert student.model.training
    report = evaluate(student.model, student.tokenizer, shaken)
    assert student.model.training  # restored after the eval-mode pass
    assert report.kl is not None and report.kl > 0.1
    assert report.top1 is not None and report.top1 < 1.0
    assert report.nll > own_report.nll


def test_prompts_with_references_make_rows_without_rejected(teacher: LoadedModel) -> None:
    prompts = demo_prompts("heldout")[:2]
    rows = rows_from_prompts(teacher, prompts, k=20)
    for row, prompt in zip(rows, prompts, strict=True):
        assert row.chosen == prompt.reference and row.rejected is None and row.reference_used
        assert row.k == 20 and row.tokenizer == tokenizer_fingerprint(teacher.tokenizer)
    report = evaluate(teacher.model, teacher.tokenizer, rows)
    assert report.pref_acc is None and report.pairs == 0
    assert report.kl is not None and report.kl < 1e-3 and report.top1 == 1.0
    assert any("rejected" in note for note in report.notes)
    assert rows_from_prompts(teacher, prompts, k=0)[0].k == 0  # no teacher pass: hard labels
    with pytest.raises(ValueError, match="prompt 2 .* no reference"):
        rows_from_prompts(teacher, [prompts[0], PromptRow(prompt="Say hi.")])


def test_fill_teacher_topk_recomputes_the_shaken_log_probs(teacher: LoadedModel, shaken: list[DorpoRow]) -> None:
    def without_log_probs(row: DorpoRow, tokenizer: str) -> DorpoRow:
        return DorpoRow.from_arrays(
            prompt=row.prompt,
            chosen=row.chosen,
            rejected=row.rejected,
            chosen_ids=row.chosen_ids_array(),
            teacher="elsewhere",
            judge=row.judge,
            tokenizer=tokenizer,
            vocab_size=int(teacher.model.config.vocab_size),
        )

    bare = [without_log_probs(r, r.tokenizer) for r in shaken[:2]]
    other = without_log_probs(shaken[0], "other")  # its chosen text gets re-encoded in the teacher's tokens
    filled = fill_teacher_topk(teacher, [*bare, shaken[2], other], k=20)
    assert filled[2] is shaken[2]  # rows with log-probs are left alone
    for got, want in zip(filled[:2], shaken[:2], strict=True):
        assert got.k == 20 and got.teacher == TEACHER and got.rejected == want.rejected
        assert np.array_equal(got.chosen_ids_array(), want.chosen_ids_array())
        assert np.array_equal(got.topk_ids_array(), want.topk_ids_array())
        assert np.allclose(got.topk_logprobs_array(), want.topk_logprobs_array(), atol=2e-2)
    assert filled[3].tokenizer == tokenizer_fingerprint(teacher.tokenizer) and filled[3].k == 20
    assert teacher.tokenizer.decode(filled[3].chosen_ids_array(), skip_special_tokens=True).strip() == other.chosen
    too_short = fill_teacher_topk(teacher, bare, k=20, max_length=3)
    assert too_short[0] is bare[0]  # too long to evaluate: no teacher pass spent on it


def test_rows_in_another_tokenizer_count_in_nll_but_not_in_kl_or_top1(
    teacher: LoadedModel, shaken: list[DorpoRow], own_report: EvalReport
) -> None:
    vocab = int(teacher.model.config.vocab_size)
    other = [
        DorpoRow.from_arrays(
            prompt=r.prompt,
            chosen=r.chosen,
            chosen_ids=r.chosen_ids_array(),
            topk_ids=(r.topk_ids_array() + 1) % vocab,  # wrong ids: counting them would show a large KL
            topk_logprobs=r.topk_logprobs_array(),
            teacher="other-teacher",
            judge=r.judge,
            tokenizer="other",
            vocab_size=vocab,
        )
        for r in shaken
    ]
    alone = own_report
    mixed = evaluate(teacher.model, teacher.tokenizer, shaken + other)
    assert mixed.rows == 6 and mixed.hard_label_rows == 3
    assert mixed.kl_tokens == alone.kl_tokens and mixed.tokens > alone.tokens
    assert mixed.kl == pytest.approx(alone.kl, abs=1e-5) and mixed.top1 == alone.top1 == 1.0
    assert any("tokenizer differs" in note for note in mixed.notes)


def test_long_rows_are_skipped_and_counted(teacher: LoadedModel, shaken: list[DorpoRow]) -> None:
    rows = [_crafted_pair(teacher, "Paris.", "Rome."), _crafted_pair(teacher, "Paris, of course. " * 8, "Rome.")]
    short, long = (e.length for e in encode_rows(rows, teacher.tokenizer)[0])
    assert short < long
    report = evaluate(teacher.model, teacher.tokenizer, rows, max_length=short)
    assert report.rows == 1 and report.dropped_too_long == 1 and report.pairs == 1
    assert any("longer than" in note for note in report.notes)
    with pytest.raises(ValueError, match="all 3 rows are longer than max_length=2"):
        evaluate(teacher.model, teacher.tokenizer, shaken, max_length=2)
    with pytest.raises(ValueError, match="no rows"):
        evaluate(teacher.model, teacher.tokenizer, [])


def test_shaken_rows_with_log_probs_never_load_the_teacher(
    tmp_path: Path, teacher: LoadedModel, shaken: list[DorpoRow]
) -> None:
    path = tmp_path / "rows.jsonl"
    write_preference_jsonl(shaken, path)

    def no_teacher() -> LoadedModel:
        raise AssertionError("the teacher was loaded for rows that carry its log-probs")

    data = load_eval_data(str(path), no_teacher, teacher.tokenizer)
    assert data.kind == "rows" and data.filled == 0
    assert [r.row_id for r in data.rows] == [r.row_id for r in shaken]

"""Verifying rows on the real built-in teacher: honest rows hold, and each forgery a hostile shaker could send
is caught with its reason (forged log-probs, a few or one, ids that are not the text, a pair the judge would
not pick but with the teacher's real numbers, another tokenizer)."""

from __future__ import annotations

from pathlib import Path
import numpy as np
import pytest

from garden.data import demo_prompts
from garden.distill.judges import ReferenceJudge
from garden.distill.shaker import ShakeConfig, shake, teacher_topk
from garden.distill.verify import Tolerance, verify_rows
from garden.models.chat import answer_ids, chat_prompt_ids
from garden.models.loading import LoadedModel, load_model
from garden.protocol.rows import DorpoRow, PromptRow
from harness.rows import remake_row

pytestmark = pytest.mark.heavy(12)  # seconds in `make check`: see tests/conftest.py

JUDGE = ReferenceJudge(threshold=0.5)


@pytest.fixture(scope="module")
def shaken(model_cache: Path) -> tuple[LoadedModel, list[DorpoRow], list[PromptRow]]:
    teacher = load_model("builtin:smollm2-135m")
    prompts = demo_prompts("train")[:4]
    result = shake(teacher, prompts, JUDGE, ShakeConfig(candidates=3, max_new_tokens=12, batch_prompts=4, seed=2))
    by_text = {p.prompt: p for p in prompts}
    return teacher, result.rows, [by_text[row.prompt] for row in result.rows]


def test_honest_rows_hold(shaken: tuple[LoadedModel, list[DorpoRow], list[PromptRow]]) -> None:
    teacher, rows, prompts = shaken
    assert len(rows) == 4
    checks = verify_rows(teacher, rows, prompts, JUDGE)
    assert [c.reason for c in checks] == [None] * len(rows)
    # recomputed in another batch shape than the shaker's: float16 rounding is most of what is left
    assert max(c.worst for c in checks) < Tolerance().atol, [c.worst for c in checks]


def test_forged_log_probs_are_caught(shaken: tuple[LoadedModel, list[DorpoRow], list[PromptRow]]) -> None:
    teacher, rows, prompts = shaken
    row, prompt = rows[0], prompts[0]
    logprobs = row.topk_logprobs_array()
    tokens = logprobs.shape[0]

    # a real answer, fake numbers: a fifth of its tokens made less confident (more confident would not even
    # decode: the row's schema refuses top-k probabilities that sum past 1)
    sharper = logprobs.copy()
    sharper[: max(1, tokens // 5)] -= 0.3
    one = logprobs.copy()  # one token far off, the rest honest
    one[tokens // 2, 0] = one[tokens // 2, 0] - 3.0
    shuffled = row.topk_ids_array()[:, ::-1].copy()  # the right numbers on the wrong ids
    forged = [
        remake_row(row, topk_logprobs=sharper),
        remake_row(row, topk_logprobs=one),
        remake_row(row, topk_ids=shuffled),
    ]
    checks = verify_rows(teacher, forged, [prompt] * 3, JUDGE)
    assert "tokens' log-probs are not the teacher's" in str(checks[0].reason), checks[0]
    assert "away from the teacher's" in str(checks[1].reason), checks[1]
    assert checks[2].reason is not None, checks[2]


def test_text_ids_judge_and_tokenizer_forgeries_are_caught(
    shaken: tuple[LoadedModel, list[DorpoRow], list[PromptRow]],
) -> None:
    teacher, rows, prompts = shaken
    tokenizer = teacher.tokenizer
    paired = next(i for i, row in enumerate(rows) if row.rejected is not None)
    row, prompt = rows[paired], prompts[paired]
    assert row.rejected is not None

    # the judge's loser as the chosen answer, with the teacher's real top-k on it: every number is honest
    worse = row.rejected
    ids = answer_ids(tokenizer, worse)
    [(top_ids, top_logprobs)], _ = teacher_topk(teacher, [(chat_prompt_ids(tokenizer, row.prompt), ids)], row.k)
    swapped = remake_row(
        row, chosen=worse, rejected=row.chosen, chosen_ids=ids, topk_ids=top_ids, topk_logprobs=top_logprobs,
        reference_used=False, scores={"chosen": row.scores.get("rejected", 0.0), "rejected": row.scores["chosen"]},
    )  # fmt: skip
    forged = [
        swapped,
        remake_row(row, chosen=row.chosen + " and more"),  # the text changed, the ids kept
        remake_row(row, tokenizer="0" * 16),  # claims another tokenizer
        remake_row(row, scores={**row.scores, "chosen": 0.99}),  # inflated score
    ]
    checks = verify_rows(teacher, forged, [prompt] * len(forged), JUDGE)
    assert checks[0].reason == "the reference judge does not pick this pair", checks[0]
    assert checks[1].reason == "its token ids are not the chosen text's", checks[1]
    assert "is not the teacher's" in str(checks[2].reason), checks[2]
    assert "chosen score" in str(checks[3].reason), checks[3]
    # the swapped row's numbers alone are honest: without the judge it would pass
    assert verify_rows(teacher, [swapped], [prompt])[0].ok


def test_rows_and_prompts_must_pair_up(shaken: tuple[LoadedModel, list[DorpoRow], list[PromptRow]]) -> None:
    teacher, rows, prompts = shaken
    with pytest.raises(ValueError, match="rows but"):
        verify_rows(teacher, rows, prompts[:-1])
    other = prompts[1] if prompts[1].prompt != rows[0].prompt else prompts[2]
    assert verify_rows(teacher, [rows[0]], [other])[0].reason == "the row answers another prompt"
    assert np.isfinite([c.worst for c in verify_rows(teacher, rows[:1], prompts[:1])]).all()

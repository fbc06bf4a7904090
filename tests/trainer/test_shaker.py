"""Shaking on the real built-in teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from garden.data import demo_prompts
from garden.models import load_model, tokenizer_fingerprint
from garden.protocol.rows import PromptRow
from garden.trainer.judges import ReferenceJudge, RegexJudge
from garden.trainer.shaker import ShakeConfig, shake


@pytest.fixture(autouse=True)
def cache(model_cache: Path) -> Path:
    return model_cache


@pytest.fixture(scope="module")
def rows_and_result(model_cache: Path):  # noqa: ANN201 (module fixture shared by several tests)
    teacher = load_model("builtin:smollm2-135m")
    prompts = demo_prompts("train")[:6]
    config = ShakeConfig(candidates=3, max_new_tokens=24, batch_prompts=4, seed=1)
    return teacher, prompts, shake(teacher, prompts, ReferenceJudge(threshold=0.5), config)


def test_rows_have_the_fields_and_decode_to_the_chosen_text(rows_and_result) -> None:  # noqa: ANN001
    teacher, prompts, result = rows_and_result
    assert result.samples == len(prompts) * 3
    assert len(result.rows) + len(result.dropped) == len(prompts)
    assert result.rows, "the reference judge always yields a chosen answer (the reference at worst)"
    for row in result.rows:
        assert row.prompt in {p.prompt for p in prompts}
        assert row.k == 20 and row.id_dtype == "uint16" and row.teacher == "builtin:smollm2-135m"
        assert row.tokenizer == tokenizer_fingerprint(teacher.tokenizer)
        ids = row.chosen_ids_array()
        assert ids[-1] == teacher.tokenizer.eos_token_id  # the student learns to stop
        assert teacher.tokenizer.decode(ids, skip_special_tokens=True).strip() == row.chosen.strip()
        assert row.bytes_per_token() == 84.0
        logprobs = row.topk_logprobs_array()
        assert np.all(np.diff(logprobs, axis=1) <= 0)  # sorted, as topk returns them
        assert np.all((row.rest_mass_array() >= 0) & (row.rest_mass_array() <= 1))


def test_top_k_are_the_teachers_own_log_probs(rows_and_result) -> None:  # noqa: ANN001
    """Recompute one row's log-probs with an independent, unbatched forward pass."""
    teacher, _, result = rows_and_result
    row = result.rows[0]
    tokenizer = teacher.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": row.prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    ids = torch.tensor([list(prompt) + row.chosen_ids_array().tolist()])
    with torch.no_grad():
        logps = torch.log_softmax(teacher.model(ids).logits.float(), dim=-1)[0, len(prompt) - 1 : -1]
    top = logps.topk(20, dim=-1)
    assert np.array_equal(row.topk_ids_array(), top.indices.numpy())
    assert np.allclose(row.topk_logprobs_array(), top.values.numpy(), atol=2e-2)  # float16 storage


def test_row_ids_are_stable_across_runs(rows_and_result) -> None:  # noqa: ANN001
    teacher, prompts, first = rows_and_result
    config = ShakeConfig(candidates=3, max_new_tokens=24, batch_prompts=4, seed=1)
    again = shake(teacher, prompts, ReferenceJudge(threshold=0.5), config)
    assert [r.row_id for r in again.rows] == [r.row_id for r in first.rows]


def test_no_usable_answer_drops_the_prompt_and_long_prompts_are_refused() -> None:
    teacher = load_model("builtin:smollm2-135m")
    impossible = RegexJudge(r"^\d{40}$", full_match=True)
    result = shake(teacher, [PromptRow(prompt="Say hello.")], impossible, ShakeConfig(candidates=2, max_new_tokens=8))
    assert not result.rows and "no usable answer" in result.dropped[0][1]
    huge = PromptRow(prompt="word " * 6000)  # ~6000 tokens + 4096 new ones > the 8192-token context
    result = shake(teacher, [huge], impossible, ShakeConfig(candidates=1, max_new_tokens=4096))
    assert result.samples == 0 and "too long" in result.dropped[0][1]


@pytest.mark.parametrize("kwargs", [{"candidates": 0}, {"temperature": 0.0}, {"top_p": 1.5}, {"top_k_logprobs": 0}])
def test_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="invalid shaking settings"):
        ShakeConfig(**kwargs)

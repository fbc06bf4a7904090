"""Shaking on the real built-in teacher."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from garden.data import demo_prompts
from garden.models.loading import load_model, tokenizer_fingerprint
from garden.protocol.mission import prompt_seed
from garden.protocol.rows import PromptRow
from garden.models.chat import pad_id
from garden.distill.judges import Judge, Judgement, ReferenceJudge, RegexJudge
from garden.models.chat import chat_prompt_ids
from garden.distill.shaker import ShakeCancelled, ShakeConfig, _decode_shared, _sampler, _warp, shake

pytestmark = pytest.mark.heavy(51)  # seconds in `make check`: see tests/conftest.py


@pytest.fixture(autouse=True)
def cache(model_cache: Path) -> Path:
    return model_cache


@pytest.fixture(scope="module")
def rows_and_result(model_cache: Path):  # noqa: ANN201 (module fixture shared by several tests)
    teacher = load_model("builtin:smollm2-135m")
    prompts = demo_prompts("train")[:6]
    config = ShakeConfig(candidates=3, max_new_tokens=12, batch_prompts=4, seed=1)
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
    config = ShakeConfig(candidates=3, max_new_tokens=12, batch_prompts=4, seed=1)
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


def test_a_cancelled_shake_stops_mid_decoding_and_through_the_fallback() -> None:
    from garden.distill.teachers import shake_with_fallback

    teacher = load_model("builtin:smollm2-135m")
    polls = []

    def cancel_after_five() -> bool:
        polls.append(1)
        return len(polls) > 5  # once before the batch, then once per decoding step

    config = ShakeConfig(candidates=2, max_new_tokens=200, cancelled=cancel_after_five)
    with pytest.raises(ShakeCancelled):
        shake(teacher, [PromptRow(prompt="Tell me a long story.")], RegexJudge(".*"), config)
    assert len(polls) == 6  # stopped at the fifth token, not after 200
    polls.clear()
    with pytest.raises(ShakeCancelled):  # not taken for a failing teacher and passed on to the next one
        shake_with_fallback(
            ["builtin:smollm2-135m", "builtin:smollm2-135m-missing"],
            [PromptRow(prompt="Tell me a long story.")], RegexJudge(".*"), config,
        )  # fmt: skip


@pytest.mark.parametrize("kwargs", [{"candidates": 0}, {"temperature": 0.0}, {"top_p": 1.5}, {"top_k_logprobs": 0}])
def test_bad_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="invalid shaking settings"):
        ShakeConfig(**kwargs)


def _full_probs(probs: torch.Tensor, index: torch.Tensor | None, vocab: int) -> torch.Tensor:
    return probs if index is None else torch.zeros(probs.shape[0], vocab).scatter(1, index, probs)


def test_shared_prefix_decoding_matches_generate_greedy() -> None:
    """One left-padded prefill, its cache repeated per copy, finished rows dropped: under greedy
    picking every copy of every prompt is what ``generate`` gives that prompt alone, unpadded."""
    teacher = load_model("builtin:smollm2-135m")
    tokenizer, model = teacher.tokenizer, teacher.model
    texts = [
        "Hi",
        "What is the capital of France? Answer in one word.",
        "Write a long story about a dragon who loves to bake bread in the mountains, with lots of detail.",
    ]
    prompts = [chat_prompt_ids(tokenizer, text) for text in texts]
    assert len({len(p) for p in prompts}) == 3  # different lengths: real left padding
    got = _decode_shared(model, prompts, 2, 12, pad_id(tokenizer), lambda logits, rows: logits.argmax(-1))
    assert len(got) == 6
    ended_early = 0
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12)
        expected = out[0, len(prompt) :].tolist()
        assert got[2 * i] == expected and got[2 * i + 1] == expected, texts[i]
        ended_early += len(expected) < 12
    assert ended_early >= 1  # a row left the batch mid-way and the others went on correctly


def test_sampler_draws_from_generates_distribution() -> None:
    """``generate``'s processed scores (output_scores) are the distribution it samples from; the
    shared-prefix sampler's distribution from the same raw logits must be that one."""
    teacher = load_model("builtin:smollm2-135m")
    ids = torch.tensor([chat_prompt_ids(teacher.tokenizer, "Name a fruit.")])
    torch.manual_seed(0)
    with torch.no_grad():
        out = teacher.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.8, top_p=0.95,
            max_new_tokens=4, output_scores=True, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    warp = _warp(teacher.model, 0.8, 0.95)
    for logits, scores in zip(out.logits, out.scores, strict=True):
        probs, index = warp(logits)
        assert index is not None and index.shape[-1] <= 50  # the fast path: top-k first
        assert torch.allclose(_full_probs(probs, index, logits.shape[-1]), torch.softmax(scores, -1), atol=1e-6)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampler_ties_at_the_top_k_boundary_keep_every_tied_token(top_p: float) -> None:
    teacher = load_model("builtin:smollm2-135m")
    vocab = 1000
    logits = torch.randn(3, vocab)
    logits[1, :60] = 5.0  # 60 tokens tie for the top: generate's top-k keeps them all
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(50)])
    if top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    expected = torch.softmax(warpers(None, logits), -1)
    probs, index = _warp(teacher.model, 0.7, top_p)(logits)
    assert torch.allclose(_full_probs(probs, index, vocab), expected, atol=1e-6)
    if top_p == 1:
        assert int((expected[1] > 0).sum()) == 60


def test_a_model_whose_cache_cannot_be_shared_samples_with_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    from garden.distill import shaker

    teacher = load_model("builtin:smollm2-135m")
    assert shaker._can_share(teacher.model)  # the built-in teacher takes the shared-prefix path
    monkeypatch.setattr(shaker, "_can_share", lambda model: False)
    prompts = [chat_prompt_ids(teacher.tokenizer, text) for text in ("Say hi.", "Name two colours, please.")]
    torch.manual_seed(0)
    answers = shaker._sample(teacher, prompts, ShakeConfig(candidates=2, max_new_tokens=8))
    assert len(answers) == 2 and all(len(a) == 2 and all(isinstance(t, str) for t in a) for a in answers)


class _Recorder(Judge):
    """Keeps every prompt's candidates and chooses none (no teacher top-k pass: sampling only)."""

    name = "record"

    def __init__(self) -> None:
        self.seen: dict[str, list[str]] = {}

    def judge(self, prompt: PromptRow, candidates: Sequence[str]) -> Judgement:
        self.seen[prompt.prompt] = list(candidates)
        return Judgement(chosen=None, rejected=None, scores={}, candidate_scores=())


_MISSION = "ab" * 32
_SEEDED_TEXTS = [
    "Tell me a short fact about cats.",
    "Hi",
    "Write one sentence about the sea, with a colour in it.",
    "Name a number.",
]


def _candidates(teacher, prompts: Sequence[PromptRow], config: ShakeConfig) -> dict[str, list[str]]:  # noqa: ANN001
    recorder = _Recorder()
    result = shake(teacher, prompts, recorder, config)
    assert result.samples == len(prompts) * config.candidates and not result.rows
    return recorder.seen


@pytest.mark.slow
def test_prompt_seeds_make_a_prompts_candidates_independent_of_its_batch() -> None:
    """Alone, in one batch, in reverse order, in batches of two, under another ``seed``: with
    ``prompt_seeds`` each prompt draws the same candidates (the built-in teacher, real left padding)."""
    teacher = load_model("builtin:smollm2-135m")
    prompts = [PromptRow(prompt=text) for text in _SEEDED_TEXTS]
    seeds = functools.partial(prompt_seed, _MISSION)
    config = ShakeConfig(candidates=3, temperature=1.0, max_new_tokens=12, prompt_seeds=seeds)
    together = _candidates(teacher, prompts, config)
    assert set(together) == set(_SEEDED_TEXTS)
    assert all(len(set(c)) > 1 for c in together.values())  # each candidate has its own generator
    assert _candidates(teacher, prompts[::-1], dataclasses.replace(config, seed=7)) == together
    assert _candidates(teacher, prompts, dataclasses.replace(config, batch_prompts=2)) == together
    for prompt in prompts:
        assert _candidates(teacher, [prompt], config) == {prompt.prompt: together[prompt.prompt]}
    # shake_with_fallback re-seeds each batch with dataclasses.replace: the per-prompt seeds stay
    assert dataclasses.replace(config, seed=3).prompt_seeds is seeds


def test_other_prompt_seeds_give_other_candidates() -> None:
    teacher = load_model("builtin:smollm2-135m")
    prompts = [PromptRow(prompt=text) for text in _SEEDED_TEXTS]
    config = ShakeConfig(candidates=3, temperature=1.0, max_new_tokens=12)
    first = _candidates(
        teacher, prompts, dataclasses.replace(config, prompt_seeds=functools.partial(prompt_seed, _MISSION))
    )
    other = _candidates(
        teacher, prompts, dataclasses.replace(config, prompt_seeds=functools.partial(prompt_seed, "cd" * 32))
    )
    shifted = _candidates(teacher, prompts, dataclasses.replace(config, prompt_seeds=lambda p: len(p.prompt)))
    unseeded = _candidates(teacher, prompts, config)
    for text in _SEEDED_TEXTS:
        assert len({tuple(first[text]), tuple(other[text]), tuple(shifted[text]), tuple(unseeded[text])}) == 4, text


@pytest.mark.parametrize("tie", [False, True])
def test_per_row_sampler_draws_from_generates_distribution(tie: bool) -> None:
    """The per-row-generator sampler (one uniform draw per row and step, inverse CDF in vocabulary order)
    samples ``_warp``'s distribution on both of its paths, and a row's draw ignores the other rows."""
    teacher = load_model("builtin:smollm2-135m")
    vocab, draws = 300, 20000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0)) * 2
    if tie:
        logits[0, 100:160] = 6.0  # 60 tokens tie for the top: the full-vocabulary path
    probs, index = _warp(teacher.model, 0.9, 0.9)(logits)
    assert (index is None) == tie
    expected = _full_probs(probs, index, vocab)[0]
    pick = _sampler(teacher.model, 0.9, 0.9, [torch.Generator().manual_seed(5)])
    tokens = pick(logits.expand(draws, vocab), torch.zeros(draws, dtype=torch.long))  # one generator, many draws
    freq = torch.bincount(tokens, minlength=vocab).double() / draws
    assert float(freq[expected == 0].sum()) == 0.0
    assert 0.5 * float((freq - expected.double()).abs().sum()) < 0.03  # total variation, ~0.01 expected

    generators = [torch.Generator().manual_seed(s) for s in range(6)]
    batch = torch.randn(6, vocab)
    full = _sampler(teacher.model, 1.0, 0.95, generators)(batch, torch.arange(6))
    generators = [torch.Generator().manual_seed(s) for s in range(6)]
    some = _sampler(teacher.model, 1.0, 0.95, generators)(batch[[4, 1]], torch.tensor([4, 1]))
    assert some.tolist() == full[[4, 1]].tolist()


def test_prompt_seeds_on_the_generate_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose cache cannot be shared runs generate once per prompt, under that prompt's seed."""
    from garden.distill import shaker

    teacher = load_model("builtin:smollm2-135m")
    monkeypatch.setattr(shaker, "_can_share", lambda model: False)
    prompts = [chat_prompt_ids(teacher.tokenizer, text) for text in ("Say hi.", "Name two colours, please.")]
    config = ShakeConfig(candidates=2, temperature=1.0, max_new_tokens=8)
    both = shaker._sample(teacher, prompts, config, [11, 22])
    assert shaker._sample(teacher, prompts[1:], config, [22]) == both[1:]
    assert shaker._sample(teacher, prompts[::-1], config, [22, 11]) == both[::-1]

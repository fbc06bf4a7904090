"""Layer ranges of the built-in model in one process: a chain of ranges gives the full model's logits and
greedy tokens; a server's sub-range works; the spot check's tolerance separates honest servers from noise
that changes answers; other model families fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from garden.inference.blocks import Blocks, Ends, LayerSpan, UnsupportedModelError, load_config
from garden.inference.client import SPOT_TOLERANCE, hidden_distance
from garden.inference.generate import prompt_ids
from garden.models.loading import load_model

pytestmark = pytest.mark.heavy(14)  # seconds in `make check`: see tests/conftest.py

MODEL = "builtin:smollm2-135m"


@pytest.fixture(scope="module")
def parts(model_cache: Path) -> dict:
    return {
        "ends": Ends.load(MODEL),
        "spans": [Blocks.load(MODEL, LayerSpan(a, b)) for a, b in ((0, 10), (10, 20), (20, 30))],
        "full": load_model(MODEL),
    }


def run(parts: dict, ids: list[int], caches: list) -> torch.Tensor:
    hidden = parts["ends"].embed(ids)
    for blocks, cache in zip(parts["spans"], caches, strict=False):
        hidden = blocks.forward(hidden, cache)
    return hidden


def test_a_chain_of_ranges_gives_the_full_models_logits_and_tokens(parts: dict) -> None:
    ends, full = parts["ends"], parts["full"]
    ids = prompt_ids(full.tokenizer, "What is the capital of France?")
    caches = [b.new_cache() for b in parts["spans"]]
    logits = ends.logits(run(parts, ids, caches))
    with torch.no_grad():
        expected = full.model(torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(logits, expected, atol=1e-3), (logits - expected).abs().max()
    tokens, feed = [], ids
    for _ in range(12):  # decode with the caches, one token at a time
        token = int(ends.logits(run(parts, feed, caches)).argmax())
        tokens.append(token)
        feed = [token]
    with torch.no_grad():
        greedy = full.model.generate(torch.tensor([ids]), max_new_tokens=13, do_sample=False)[0, len(ids) :].tolist()
    assert tokens[: len(greedy)] == greedy[: len(tokens)] and len(greedy) >= 6
    assert 2 in ends.eos_ids  # <|im_end|> ends a turn


def test_a_sub_range_of_a_wider_server(parts: dict) -> None:
    ends = parts["ends"]
    ids = prompt_ids(parts["full"].tokenizer, "Name a colour.")
    wide = parts["spans"][1]  # serves 10-20; asked for 10-14 and 14-20 by two sessions
    reference = run(parts, ids, [b.new_cache() for b in parts["spans"]])
    hidden = parts["spans"][0].forward(ends.embed(ids), parts["spans"][0].new_cache())
    hidden = wide.forward(hidden, wide.new_cache(), LayerSpan(10, 14))
    hidden = wide.forward(hidden, wide.new_cache(), LayerSpan(14, 20))
    hidden = parts["spans"][2].forward(hidden, parts["spans"][2].new_cache())
    assert torch.allclose(hidden, reference, atol=1e-4)
    with pytest.raises(ValueError, match="not within the served range"):
        wide.forward(hidden, wide.new_cache(), LayerSpan(5, 15))


def test_fp16_at_the_boundaries_keeps_greedy_output(parts: dict) -> None:
    """What the wire does by default: hidden states cast to float16 between ranges."""
    ends, full = parts["ends"], parts["full"]
    for prompt in ("What is the capital of France?", "Write a haiku about rain."):
        ids = prompt_ids(full.tokenizer, prompt)
        caches = [b.new_cache() for b in parts["spans"]]
        tokens, feed = [], ids
        for _ in range(16):
            hidden = ends.embed(feed)
            for blocks, cache in zip(parts["spans"], caches, strict=False):
                hidden = blocks.forward(hidden.half().float(), cache)
            tokens.append(int(ends.logits(hidden).argmax()))
            feed = [tokens[-1]]
        with torch.no_grad():
            greedy = full.model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :]
        assert tokens[: len(greedy)] == greedy.tolist()[: len(tokens)]


@pytest.mark.slow
def test_the_spot_check_tolerance_separates_honest_servers_from_noise(parts: dict) -> None:
    """What ``SPOT_TOLERANCE`` rests on. An honest witness of layers 10-20 (a fresh cache that replays the
    history in one call, with another thread count, float16 on the wire) is far inside the tolerance of the
    server that ran the steps one by one; noise that changes greedy answers is far outside it."""
    ends, middle, wire = parts["ends"], parts["spans"][1], lambda h: h.half().float()

    def generate(ids: list[int], noise: float) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor]]:
        """Greedy tokens with layers 10-20 answering with ``noise`` (a tenth: a hostile server's), the
        inputs those layers got and their honest answers."""
        generator = torch.Generator().manual_seed(0)
        caches = [b.new_cache() for b in parts["spans"]]
        tokens, inputs, answers, feed = [], [], [], ids
        for _ in range(6):  # noise of a tenth changes greedy answers within 5 tokens (4 prompts of 4)
            inputs.append(wire(parts["spans"][0].forward(wire(ends.embed(feed)), caches[0])))
            answers.append(wire(middle.forward(inputs[-1], caches[1])))
            spread = answers[-1].std(dim=-1, keepdim=True)
            served = wire(answers[-1] + noise * spread * torch.randn(answers[-1].shape, generator=generator))
            tokens.append(int(ends.logits(parts["spans"][2].forward(served, caches[2])).argmax()))
            feed = [tokens[-1]]
        return tokens, inputs, answers

    threads = torch.get_num_threads()
    worst, changed = 0.0, 0
    try:
        for prompt in ("What is the capital of France?", "Write a haiku about rain."):
            ids = prompt_ids(parts["full"].tokenizer, prompt)
            torch.set_num_threads(1)
            tokens, inputs, answers = generate(ids, 0.0)
            torch.set_num_threads(2)
            for k in range(len(inputs)):  # the witness: a fresh session, the history replayed, then the step
                cache = middle.new_cache()
                if k:
                    middle.forward(torch.cat(inputs[:k], dim=1), cache)
                worst = max(worst, hidden_distance(wire(middle.forward(inputs[k], cache)), answers[k]))
            noisy, *_ = generate(ids, 0.1)
            changed += noisy != tokens
    finally:
        torch.set_num_threads(threads)
    assert worst < SPOT_TOLERANCE / 5, worst  # measured: 7.7e-5 at most (6 prompts x 24 tokens)
    spread = answers[0].std(dim=-1, keepdim=True)
    noise = wire(answers[0] + 0.1 * spread * torch.randn(answers[0].shape, generator=torch.Generator().manual_seed(0)))
    assert hidden_distance(noise, answers[0]) > 20 * SPOT_TOLERANCE  # a noisy step is caught
    assert changed == 2  # and that noise changes both answers


def test_layer_spans() -> None:
    assert LayerSpan.parse("0-15") == LayerSpan(0, 15) and len(LayerSpan(3, 5)) == 2 and str(LayerSpan(1, 2)) == "1-2"
    for bad in ("15", "5-5", "a-b", "-1-3"):
        with pytest.raises(ValueError):
            LayerSpan.parse(bad)
    with pytest.raises(ValueError, match="past the model's 30 layers"):
        LayerSpan(20, 31).check_within(30)


def test_other_families_are_not_supported_yet(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="not supported yet"):
        load_config(str(tmp_path))


def test_concurrent_sessions_batched_give_each_its_own_greedy_answer(parts: dict) -> None:
    """Four sessions at different positions (prompts of different lengths), stepped together through
    ``forward_batch`` and ``logits_many``, answer what each answers alone, token for token; one session on a
    sub-range of a wider server too."""
    ends, spans = parts["ends"], parts["spans"]
    tokenizer = parts["full"].tokenizer
    prompts = ["What is the capital of France?", "Name a colour.", "Write a haiku about the sea, please.", "Hi"]

    def alone(prompt: str) -> list[int]:
        caches = [b.new_cache() for b in spans]
        tokens, feed = [], prompt_ids(tokenizer, prompt)
        for _ in range(10):
            tokens.append(int(ends.logits(run(parts, feed, caches)).argmax()))
            feed = [tokens[-1]]
        return tokens

    expected = [alone(p) for p in prompts]
    caches = [[b.new_cache() for b in spans] for _ in prompts]
    tokens = [
        [int(ends.logits(run(parts, prompt_ids(tokenizer, p), c)).argmax())]
        for p, c in zip(prompts, caches, strict=True)
    ]
    for _ in range(9):
        hidden = [ends.embed([t[-1]]) for t in tokens]
        for i, blocks in enumerate(spans):
            hidden = blocks.forward_batch(hidden, [c[i] for c in caches])
        for t, logits in zip(tokens, ends.logits_many(hidden), strict=True):
            t.append(int(logits.argmax()))
    assert tokens == expected
    # the head in one pass: the same logits as one by one, for 1, 2 (padded to 4) and 4 generations
    states = [torch.randn(1, 1, ends.config.hidden_size) for _ in range(4)]
    for n in (1, 2, 4):
        for one, many in zip(map(ends.logits, states[:n]), ends.logits_many(states[:n]), strict=True):
            assert torch.allclose(one, many, atol=1e-4)
    # a session on the sub-range 14-20 of the 10-20 server, batched with one on the whole range
    wide = spans[1]
    sub = LayerSpan(14, 20)
    a, b = wide.new_cache(), wide.new_cache()
    x, y = torch.randn(1, 3, 576), torch.randn(1, 5, 576)
    wide.forward(x, a, sub), wide.forward(y, b, sub)
    step = [torch.randn(1, 1, 576), torch.randn(1, 1, 576)]
    ref_a, ref_b = wide.new_cache(), wide.new_cache()
    wide.forward(x, ref_a, sub), wide.forward(y, ref_b, sub)
    together = wide.forward_batch(step, [a, b], sub)
    for out, cache, h in zip(together, [ref_a, ref_b], step, strict=True):
        distance = hidden_distance(out, wide.forward(h, cache, sub))
        assert distance < 1e-5, distance  # honest servers differ by up to 7.7e-5 (SPOT_TOLERANCE)
    with pytest.raises(ValueError, match="one token"):
        wide.forward_batch([torch.randn(1, 2, 576)], [wide.new_cache()])

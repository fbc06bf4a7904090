"""Streamed generation (garden.inference.generate) and `garden generate`, on the real built-in model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from garden.cli import app
from garden.inference.generate import GenerateConfig, GenerationError, TextGeneration, generate_text, prompt_ids
from garden.models.loading import load_model

BUILTIN = "builtin:smollm2-135m"
QUESTION = "What is the capital of France?"


@pytest.fixture(autouse=True)
def cache(model_cache: Path) -> Path:
    return model_cache


def test_streamed_pieces_join_to_the_plain_greedy_decode() -> None:
    model = load_model(BUILTIN)
    with TextGeneration(model, QUESTION, GenerateConfig(max_new_tokens=12)) as generation:
        pieces = list(generation)
    result = generation.result
    ids = torch.tensor([prompt_ids(model.tokenizer, QUESTION)])
    with torch.no_grad():
        out = model.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12
        )
    expected = model.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert len(pieces) > 1 and all(pieces), pieces  # streamed word by word, no empty pieces
    assert "".join(pieces) == result.text == expected and "Paris" in expected
    assert result.new_tokens == out.shape[1] - ids.shape[1] and result.prompt_tokens == ids.shape[1]
    assert result.finish_reason == ("stop" if out[0, -1] == model.tokenizer.eos_token_id else "length")
    assert result.tokens_per_second > 0


def test_system_message_and_seeded_sampling() -> None:
    model = load_model(BUILTIN)
    plain, with_system = prompt_ids(model.tokenizer, "Hi"), prompt_ids(model.tokenizer, "Hi", "Answer in French.")
    assert "SmolLM" in model.tokenizer.decode(plain)  # the chat template's default system message
    decoded = model.tokenizer.decode(with_system)
    assert "Answer in French." in decoded and "SmolLM" not in decoded
    config = GenerateConfig(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7, system="Answer in French.")
    first, again = generate_text(model, "Say hello.", config), generate_text(model, "Say hello.", config)
    assert first.text == again.text and first.new_tokens == again.new_tokens <= 6


def test_closing_early_stops_the_worker() -> None:
    generation = TextGeneration(load_model(BUILTIN), "Tell me a long story about a dragon.", GenerateConfig(200))
    first = next(generation)
    generation.close()
    result = generation.result
    assert result.finish_reason == "cancelled" and result.new_tokens < 50
    assert result.text.startswith(first)
    assert list(generation) == []


def test_bad_requests_are_refused() -> None:
    with pytest.raises(GenerationError, match="8192-token context"):
        TextGeneration(load_model(BUILTIN), "word " * 9000)
    with pytest.raises(ValueError, match="temperature=-1"):
        GenerateConfig(temperature=-1)
    with pytest.raises(RuntimeError, match="not finished"):
        _ = TextGeneration(load_model(BUILTIN), "Hi").result


def test_cli_prints_the_answer_and_stats() -> None:
    result = CliRunner().invoke(app, ["generate", "--model", BUILTIN, "--max-new-tokens", "12", QUESTION])
    assert result.exit_code == 0, result.output
    expected = generate_text(load_model(BUILTIN), QUESTION, GenerateConfig(max_new_tokens=12)).text
    assert result.stdout == expected + "\n"
    assert "tokens/s" in result.stderr and "tokens in" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "builtin:nope"], "unknown built-in model 'nope'"),
        (["--model", "/no/such/model.gguf"], "does not exist"),
        (["--top-p", "0"], "top_p=0.0"),
    ],
)
def test_cli_bad_input_exits_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["generate", *args, "Hi"])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert result.stdout == "" and "Traceback" not in result.output

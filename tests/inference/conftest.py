"""Fixtures the swarm tests of inference share."""

from __future__ import annotations

from pathlib import Path

import pytest

MODEL = "builtin:smollm2-135m"
PROMPTS = ["What is the capital of France?", "Name three colours.", "Write one sentence about rain."]


@pytest.fixture(scope="module")
def local_answers(model_cache: Path) -> dict[str, list[int]]:
    """Greedy ``model.generate`` on the same weights, 24 new tokens, end token cut."""
    import torch

    from garden.inference.generate import prompt_ids
    from garden.models.loading import load_model

    model = load_model(MODEL)
    configured = model.model.generation_config.eos_token_id
    eos = {model.tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    answers = {}
    for prompt in PROMPTS:
        ids = prompt_ids(model.tokenizer, prompt)
        with torch.no_grad():
            out = model.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        new = out[0, len(ids) :].tolist()
        answers[prompt] = next((new[:i] for i, t in enumerate(new) if t in eos), new)
    return answers

"""How text becomes model input, the same way everywhere: the chat prompt, the answer tokens, padding.

A student must be asked exactly as its teacher was when the rows were made, and trained on exactly those
tokens, so the shaker, the trainer, evaluation and generation all encode through these functions.

Left padding is for reading or generating at the last position (shaker sampling, the teacher judge);
the caller never touches the shared tokenizer's ``padding_side``, which other users of the same
loaded model rely on.
"""

from __future__ import annotations

from typing import Any


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its end-of-sequence token (Llama-family tokenizers have no pad)."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def left_pad(sequences: list[list[int]], pad: int, device: Any = None) -> tuple[Any, Any]:
    """(input_ids, attention_mask) [batch, longest], real tokens flush right."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def chat_prompt_ids(tokenizer: Any, text: str, system: str | None = None) -> list[int]:
    """The ids a chat model sees before its answer: the user turn in the tokenizer's chat template plus the
    assistant header. Teacher and student must encode prompts identically, so everyone calls this."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def answer_ids(tokenizer: Any, text: str) -> list[int]:
    """An answer's tokens, then end-of-sequence: a student trained on them learns to stop."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [int(tokenizer.eos_token_id)]

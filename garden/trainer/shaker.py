"""Shaking (the seed paper's "Precision Shaking"): sample the teacher, judge, record its top-k.

For a batch of prompts: sample ``candidates`` answers per prompt in ONE ``generate`` call (prompts
left-padded, ``num_return_sequences`` candidates each), let a judge pick chosen/rejected, then run
one batched teacher-forced pass over every prompt + chosen answer to record the teacher's
temperature-1 top-k log-probs on each chosen token. The result is a list of ``DorpoRow``.

The chosen answer's ids end with the end-of-turn token, so a student trained on them learns to stop.
Prompts too long for the teacher's context are dropped with a reason, never silently truncated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from garden.models import LoadedModel, tokenizer_fingerprint
from garden.protocol.rows import DorpoRow, PromptRow
from garden.trainer.batching import left_pad, pad_id
from garden.trainer.judges import Judge, Judgement

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShakeConfig:
    """:param candidates: answers sampled per prompt (more: better pairs, proportionally slower)
    :param temperature: sampling temperature (the recorded log-probs always use temperature 1)
    :param top_p: nucleus sampling mass
    :param max_new_tokens: longest sampled answer, in tokens
    :param top_k_logprobs: teacher log-probs kept per chosen token (20: 84 bytes/token stored)
    :param batch_prompts: prompts per ``generate`` call (times ``candidates`` sequences)
    :param seed: sampling seed; each batch seeds with ``seed + batch index`` (reproducible runs)"""

    candidates: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 64
    top_k_logprobs: int = 20
    batch_prompts: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "candidates": 1 <= self.candidates <= 64,
            "temperature": math.isfinite(self.temperature) and 0 < self.temperature <= 10,
            "top_p": 0 < self.top_p <= 1,
            "max_new_tokens": 1 <= self.max_new_tokens <= 4096,
            "top_k_logprobs": 1 <= self.top_k_logprobs <= 256,
            "batch_prompts": 1 <= self.batch_prompts <= 1024,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid shaking settings: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")


@dataclass
class ShakeResult:
    rows: list[DorpoRow] = field(default_factory=list)
    dropped: list[tuple[PromptRow, str]] = field(default_factory=list)  # prompt, why
    samples: int = 0  # candidate answers generated


def shake(
    teacher: LoadedModel,
    prompts: Sequence[PromptRow],
    judge: Judge,
    config: ShakeConfig | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> ShakeResult:
    """Rows for ``prompts``; ``on_batch(n)`` is called after each batch of n prompts (progress bars)."""
    import torch

    config = config or ShakeConfig()
    result = ShakeResult()
    tokenizer, model = teacher.tokenizer, teacher.model
    context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
    for index, start in enumerate(range(0, len(prompts), config.batch_prompts)):
        batch = list(prompts[start : start + config.batch_prompts])
        encoded: list[tuple[PromptRow, list[int]]] = []
        for prompt in batch:
            ids = _prompt_ids(tokenizer, prompt.prompt)
            if context is not None and len(ids) + config.max_new_tokens > context:
                reason = f"prompt is {len(ids)} tokens: too long for the {context}-token context"
                result.dropped.append((prompt, reason))
                continue
            encoded.append((prompt, ids))
        if encoded:
            torch.manual_seed(config.seed + index)
            candidates = _sample(teacher, [ids for _, ids in encoded], config)
            result.samples += sum(len(c) for c in candidates)
            judgements = judge.judge_many([p for p, _ in encoded], candidates)
            usable = []
            for (prompt, ids), judgement in zip(encoded, judgements, strict=True):
                if judgement.chosen is None:
                    result.dropped.append((prompt, f"judge {judge.name} found no usable answer"))
                else:
                    usable.append((prompt, ids, judgement))
            result.rows.extend(_rows(teacher, usable, judge.name, config))
        if on_batch is not None:
            on_batch(len(batch))
    return result


def _prompt_ids(tokenizer: Any, text: str) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _sample(teacher: LoadedModel, prompt_ids: list[list[int]], config: ShakeConfig) -> list[list[str]]:
    """``candidates`` answers per prompt, all prompts in one ``generate`` call."""
    import torch

    tokenizer = teacher.tokenizer
    ids, mask = left_pad(prompt_ids, pad_id(tokenizer))
    with torch.no_grad():
        out = teacher.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=config.temperature,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            num_return_sequences=config.candidates,
            pad_token_id=pad_id(tokenizer),
        )
    answers = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    n = config.candidates
    return [[a.strip() for a in answers[i * n : (i + 1) * n]] for i in range(len(prompt_ids))]


def _rows(
    teacher: LoadedModel, usable: list[tuple[PromptRow, list[int], Judgement]], judge_name: str, config: ShakeConfig
) -> list[DorpoRow]:
    """Teacher-forced pass over prompt + chosen (right-padded: positions stay 0..n-1) for the top-k."""
    import torch

    if not usable:
        return []
    tokenizer, model = teacher.tokenizer, teacher.model
    answers = [
        tokenizer(j.chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for _, _, j in usable
    ]
    sequences = [ids + answer for (_, ids, _), answer in zip(usable, answers, strict=True)]
    width = max(len(s) for s in sequences)
    batch = torch.full((len(sequences), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, seq in enumerate(sequences):
        batch[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=batch, attention_mask=mask).logits.float(), dim=-1)
    k = min(config.top_k_logprobs, logps.shape[-1])
    rows = []
    for row, ((prompt, ids, judgement), answer) in enumerate(zip(usable, answers, strict=True)):
        start = len(ids) - 1  # logits at position t predict token t + 1
        top = logps[row, start : start + len(answer)].topk(k, dim=-1)
        rows.append(
            DorpoRow.from_arrays(
                prompt=prompt.prompt,
                chosen=judgement.chosen or "",
                rejected=judgement.rejected,
                chosen_ids=answer,
                topk_ids=top.indices,
                topk_logprobs=top.values,
                teacher=str(teacher.ref),
                judge=judge_name,
                scores=dict(judgement.scores),
                tokenizer=tokenizer_fingerprint(tokenizer),
                reference_used=judgement.reference_used,
                vocab_size=int(logps.shape[-1]),
            )
        )
    return rows

"""Shaking (the seed paper's "Precision Shaking"): sample the teacher, judge, record its top-k.

For a batch of prompts: sample ``candidates`` answers per prompt in one batch (prompts left-padded,
each encoded once and its KV cache shared by its candidates), let a judge pick chosen/rejected, then
run one batched teacher-forced pass over every prompt + chosen answer to record the teacher's
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

from garden.models.loading import LoadedModel, tokenizer_fingerprint
from garden.protocol.rows import DorpoRow, PromptRow
from garden.models.chat import answer_ids, chat_prompt_ids, left_pad, pad_id
from garden.distill.judges import Judge, Judgement

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShakeConfig:
    """:param candidates: answers sampled per prompt (more: better pairs, proportionally slower)
    :param temperature: sampling temperature (the recorded log-probs always use temperature 1)
    :param top_p: nucleus sampling mass
    :param max_new_tokens: longest sampled answer, in tokens
    :param top_k_logprobs: teacher log-probs kept per chosen token (20: 84 bytes/token stored)
    :param batch_prompts: prompts per ``generate`` call (times ``candidates`` sequences)
    :param seed: sampling seed; each batch seeds with ``seed + batch index`` (reproducible runs)
    :param prompt_seeds: per-prompt sampling seeds (e.g. ``garden.protocol.mission.prompt_seed`` bound to a
        mission id); when set, candidate ``c`` of prompt ``p`` draws from its own ``torch.Generator`` seeded
        with ``(prompt_seeds(p) + c) % 2**63``, so a prompt's candidates do not depend on the other prompts in
        its batch or on its position there (up to floating-point effects of batching), and ``seed`` is ignored
        for sampling
    :param cancelled: polled before every batch and every decoding step; when it returns True the shake
        stops at once with :class:`ShakeCancelled` (a lost lease, a daemon stopping)"""

    candidates: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 64
    top_k_logprobs: int = 20
    batch_prompts: int = 16
    seed: int = 0
    prompt_seeds: Callable[[PromptRow], int] | None = None
    cancelled: Callable[[], bool] | None = None

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


class ShakeCancelled(Exception):
    """The shake was stopped by ``ShakeConfig.cancelled``; nothing it sampled is returned."""


def _check_cancelled(config: ShakeConfig) -> None:
    if config.cancelled is not None and config.cancelled():
        raise ShakeCancelled("shaking cancelled")


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
        _check_cancelled(config)
        batch = list(prompts[start : start + config.batch_prompts])
        encoded: list[tuple[PromptRow, list[int]]] = []
        for prompt in batch:
            ids = chat_prompt_ids(tokenizer, prompt.prompt)
            if context is not None and len(ids) + config.max_new_tokens > context:
                reason = f"prompt is {len(ids)} tokens: too long for the {context}-token context"
                result.dropped.append((prompt, reason))
                continue
            encoded.append((prompt, ids))
        if encoded:
            seeds = None
            if config.prompt_seeds is None:
                torch.manual_seed(config.seed + index)
            else:
                seeds = [config.prompt_seeds(prompt) for prompt, _ in encoded]
            candidates = _sample(teacher, [ids for _, ids in encoded], config, seeds)
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


def sample_answers(model: LoadedModel, prompts: Sequence[str], config: ShakeConfig) -> list[list[str]]:
    """``config.candidates`` sampled answers to each prompt (in the chat template), unjudged: what a model (a
    student, say) would answer. Batch ``index`` seeds with ``config.seed + index``, as :func:`shake` does."""
    import torch

    answers: list[list[str]] = []
    for index, start in enumerate(range(0, len(prompts), config.batch_prompts)):
        torch.manual_seed(config.seed + index)
        batch = [chat_prompt_ids(model.tokenizer, p) for p in prompts[start : start + config.batch_prompts]]
        answers.extend(_sample(model, batch, config))
    return answers


# a sampler (see _sampler): next tokens [rows] from next-token logits [rows, vocab] and each batch row's output row
Pick = Callable[[Any, Any], Any]

# generate()'s top-k when the model's generation config names none (GenerationConfig's default): the
# sampler below applies it too, so it draws from exactly the distribution generate(do_sample=True) would.
_GENERATE_DEFAULT_TOP_K = 50


def _sample(
    teacher: LoadedModel, prompt_ids: list[list[int]], config: ShakeConfig, seeds: list[int] | None = None
) -> list[list[str]]:
    """``candidates`` answers per prompt, all prompts in one batch, each prompt encoded once.

    Draws what ``generate(do_sample=True, temperature, top_p, num_return_sequences=candidates)`` on the
    left-padded prompts would (its temperature, top-k and top-p warpers; stop at the end-of-sequence
    token, padding after it), but prefills the prompts once and shares each prompt's KV cache across its
    candidates (``generate`` expands the prompts first, so it encodes each one ``candidates`` times), and
    stops computing an answer once it has ended (``generate`` carries it, padded, to the batch's end).

    ``seeds`` (one per prompt): candidate ``c`` of prompt ``p`` draws from its own generator seeded with
    ``(seeds[p] + c) % 2**63`` instead of torch's global one (see :func:`_sampler`).
    """
    import torch

    tokenizer, model = teacher.tokenizer, teacher.model
    n = config.candidates
    if _can_share(model):
        generators = None
        if seeds is not None:
            generators = [torch.Generator().manual_seed((seed + c) % 2**63) for seed in seeds for c in range(n)]
        pick = _sampler(model, config.temperature, config.top_p, generators)
        if config.cancelled is not None:
            pick = _cancellable(pick, config)
        answers = _decode_shared(model, prompt_ids, n, config.max_new_tokens, pad_id(tokenizer), pick)
    elif seeds is None:
        answers = _generate(model, prompt_ids, config, pad_id(tokenizer))
    else:  # one generate call per prompt, each under its own seed: its candidates ignore the other prompts
        answers = []
        for ids, seed in zip(prompt_ids, seeds, strict=True):
            torch.manual_seed(seed % 2**63)
            answers.extend(_generate(model, [ids], config, pad_id(tokenizer)))
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    return [[t.strip() for t in texts[i * n : (i + 1) * n]] for i in range(len(prompt_ids))]


def _can_share(model: Any) -> bool:
    """Whether the model's KV cache is plain keys and values (every cache layer a dynamic one), which
    ``_decode_shared`` may repeat and select along the batch; a model with recurrent or linear-attention
    state (which those operations would not carry) samples with ``generate`` instead."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # a cache this transformers version cannot build for the model: use generate
        return False
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers)


def _generate(model: Any, prompt_ids: list[list[int]], config: ShakeConfig, pad: int) -> list[list[int]]:
    """What ``_decode_shared`` gives, by one plain ``generate`` call (each prompt encoded per candidate)."""
    import torch

    ids, mask = left_pad(prompt_ids, pad, device=model.device)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=config.temperature,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            num_return_sequences=config.candidates,
            pad_token_id=pad,
        )
    eos = set(_eos_ids(model))
    answers = []
    for row in out[:, ids.shape[1] :].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        answers.append(row[:end])
    return answers


def _cancellable(pick: Pick, config: ShakeConfig) -> Pick:
    """``pick`` that first checks ``config.cancelled`` (once per decoding step: a few ms of work)."""

    def checked(logits: Any, rows: Any) -> Any:
        _check_cancelled(config)
        return pick(logits, rows)

    return checked


def _sampler(model: Any, temperature: float, top_p: float, generators: Sequence[Any] | None = None) -> Pick:
    """Next tokens [rows] from next-token logits [rows, vocab], as ``generate(do_sample=True)`` samples.

    Without ``generators`` it draws with ``torch.multinomial`` from torch's global generator (the batch's
    draws depend on each other). With ``generators`` (CPU ``torch.Generator``s, one per output row) each
    batch row draws one uniform number per step from its output row's generator only and takes the token
    where it falls in the cumulative distribution, the tokens in vocabulary order: the same distribution,
    and a row's draws depend on its own generator and logits only, not on the other rows, on which of
    ``_warp``'s two paths the batch took, or on the device (the uniform numbers always come from the CPU).
    """
    import torch

    warp = _warp(model, temperature, top_p)

    def pick(logits: Any, rows: Any) -> Any:
        probs, index = warp(logits)
        if generators is None:
            choice = torch.multinomial(probs, num_samples=1)
            return (choice if index is None else index.gather(1, choice)).squeeze(1)
        if index is not None:  # the top-k path: put its columns in vocabulary order, as the full path has them
            index, order = index.sort(dim=-1)
            probs = probs.gather(1, order)
        u = torch.cat([torch.rand(1, dtype=torch.float64, generator=generators[row]) for row in rows.tolist()])
        cdf = probs.double().cumsum(-1)
        target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
        choice = torch.searchsorted(cdf, target, right=True)
        # target < total, so a column past the last positive probability only by rounding: clamp to that column
        last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1, keepdim=True)
        choice = torch.minimum(choice, last)
        return (choice if index is None else index.gather(1, choice)).squeeze(1)

    return pick


def _warp(model: Any, temperature: float, top_p: float) -> Callable[[Any], tuple[Any, Any]]:
    """``generate``'s sampling distribution: (probs [rows, m], their token ids [rows, m], or None when
    m is the whole vocabulary and column = token id).

    ``generate`` applies temperature, then top-k, then top-p to the full vocabulary; top-p sorts all
    ~50k logits of every row (a sixth of a 64-row decode step on CPU). When no logit ties the k-th
    largest, the top-k set is exactly ``topk``'s k entries, so top-p and the softmax run on those k
    only, the same distribution; on a tie it falls back to the warpers on the full vocabulary.
    """
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    configured = getattr(model.generation_config, "top_k", None)
    top_k = int(configured if configured is not None else _GENERATE_DEFAULT_TOP_K)
    scale = TemperatureLogitsWarper(temperature)
    nucleus = TopPLogitsWarper(top_p) if top_p < 1.0 else None

    def warp(logits: Any) -> tuple[Any, Any]:
        scores = scale(None, logits.float())  # these warpers never read the input ids
        index = None
        k = min(top_k, scores.shape[-1])
        if 0 < k < scores.shape[-1]:
            values, indices = scores.topk(k, dim=-1)
            if bool(((scores >= values[:, -1:]).sum(-1) == k).all()):
                scores, index = values, indices
            else:
                scores = TopKLogitsWarper(top_k)(None, scores)
        if nucleus is not None:
            scores = nucleus(None, scores)
        return torch.softmax(scores, dim=-1), index

    return warp


def _eos_ids(model: Any) -> list[int]:
    """The ids ``generate`` stops at: the model's generation config's end-of-sequence id(s)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def _decode_shared(
    model: Any, prompt_ids: list[list[int]], copies: int, max_new_tokens: int, pad: int, pick: Pick
) -> list[list[int]]:
    """``copies`` continuations of each prompt (prompt-major: prompt 0's copies first), each up to
    ``max_new_tokens`` tokens and ending at the first end-of-sequence token picked (kept, as in
    ``generate``'s output). ``pick(logits, rows)`` maps next-token logits [rows, vocab] to next tokens
    [rows]; ``rows`` (a CPU long tensor) names the output row of each batch row (finished rows leave the batch).

    One prefill forward over the left-padded prompts fills the KV cache, which is then repeated
    ``copies`` times along the batch (``_can_share`` says whether the model's cache allows that); each
    later step feeds one token per unfinished row only (a row that ended leaves the batch and the
    cache). Left padding is masked and positions count real tokens only, as in ``generate``.
    """
    import inspect

    import torch
    from transformers.cache_utils import DynamicCache

    device = model.device
    eos = torch.tensor(_eos_ids(model), dtype=torch.long, device=device)
    ids, mask = left_pad(prompt_ids, pad, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    rows = len(prompt_ids) * copies
    out = torch.full((rows, max_new_tokens), pad, dtype=torch.long)
    lengths = [max_new_tokens] * rows
    cache = DynamicCache(config=model.config)
    # the prompts' last position only (when the model can skip the others' vocabulary projection)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.inference_mode():
        prefill = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **last_only,
        )
        if copies > 1:
            cache.batch_repeat_interleave(copies)
        logits = prefill.logits[:, -1, :].repeat_interleave(copies, dim=0)
        mask = mask.repeat_interleave(copies, dim=0)
        position = positions[:, -1].repeat_interleave(copies, dim=0)
        alive = torch.arange(rows)  # the output row of each batch row
        for step in range(max_new_tokens):
            token = pick(logits, alive)
            out[alive, step] = token.cpu()
            ended = torch.isin(token, eos)
            if bool(ended.any()):
                for row in alive[ended.cpu()].tolist():
                    lengths[row] = step + 1
                keep = (~ended).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                token, mask, position = token[keep], mask[keep], position[keep]
                alive = alive[keep.cpu()]
            if step + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            position = position + 1
            logits = model(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=position[:, None],
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1, :]
    return [out[row, : lengths[row]].tolist() for row in range(rows)]


def teacher_topk(
    teacher: LoadedModel, items: Sequence[tuple[list[int], list[int]]], k: int, batch_size: int = 16
) -> tuple[list[tuple[Any, Any]], int]:
    """The teacher's temperature-1 top-k (ids, log-probs), each [T, k], on every answer token of each
    (prompt ids, answer ids) pair, and the vocabulary size. Teacher-forced, right-padded (positions stay
    0..n-1), and the vocabulary projection is computed only at the answer positions: most of a row is prompt."""
    import torch

    tokenizer, model = teacher.tokenizer, teacher.model
    device = next(model.parameters()).device
    out: list[tuple[Any, Any]] = []
    vocab = 0
    for first in range(0, len(items), batch_size):
        chunk = items[first : first + batch_size]
        width = max(len(p) + len(a) for p, a in chunk)
        window = max(len(a) for _, a in chunk)
        batch = torch.full((len(chunk), width), pad_id(tokenizer), dtype=torch.long)
        mask = torch.zeros_like(batch)
        positions = torch.zeros((len(chunk), window), dtype=torch.long)
        for row, (prompt, answer) in enumerate(chunk):
            batch[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            mask[row, : len(prompt) + len(answer)] = 1
            # logits at position t predict token t + 1; positions past a row are clamped and never read
            positions[row] = torch.arange(len(prompt) - 1, len(prompt) - 1 + window).clamp(max=width - 1)
        with torch.inference_mode():
            logits = model(
                input_ids=batch.to(device), attention_mask=mask.to(device), logits_to_keep=positions.to(device)
            ).logits
        if logits.dim() != 3:  # transformers before 5.21 read a per-row logits_to_keep as one index for all rows
            shape = tuple(logits.shape)
            raise RuntimeError(f"the teacher's logits came back as {shape}: garden needs transformers >= 5.21")
        vocab = int(logits.shape[-1])
        for row, (_, answer) in enumerate(chunk):
            top = torch.log_softmax(logits[row, : len(answer)].float(), dim=-1).topk(min(k, vocab), dim=-1)
            out.append((top.indices.cpu(), top.values.cpu()))
    return out, vocab


def _rows(
    teacher: LoadedModel, usable: list[tuple[PromptRow, list[int], Judgement]], judge_name: str, config: ShakeConfig
) -> list[DorpoRow]:
    """Rows for the judged prompts, with the teacher's top-k on every chosen token."""
    if not usable:
        return []
    tokenizer = teacher.tokenizer
    answers = [answer_ids(tokenizer, j.chosen or "") for _, _, j in usable]
    tops, vocab = teacher_topk(
        teacher, [(ids, a) for (_, ids, _), a in zip(usable, answers, strict=True)], config.top_k_logprobs
    )
    rows = []
    for (prompt, _, judgement), answer, (top_ids, top_logprobs) in zip(usable, answers, tops, strict=True):
        rows.append(
            DorpoRow.from_arrays(
                prompt=prompt.prompt,
                chosen=judgement.chosen or "",
                rejected=judgement.rejected,
                chosen_ids=answer,
                topk_ids=top_ids,
                topk_logprobs=top_logprobs,
                teacher=str(teacher.ref),
                judge=judge_name,
                scores=dict(judgement.scores),
                tokenizer=tokenizer_fingerprint(tokenizer),
                reference_used=judgement.reference_used,
                vocab_size=vocab,
            )
        )
    return rows

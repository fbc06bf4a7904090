"""Local text generation with one loaded model, streamed as it is decoded (``garden generate``).

The prompt goes through the model's chat template (with an optional system message), as the shaker
sends prompts to a teacher, so a student is asked the way it was trained. ``generate`` runs in a worker
thread and a ``TextIteratorStreamer`` hands decoded text to the caller as words complete: the caller
prints each piece as it comes (a person sees the answer grow), and the pieces joined are exactly the
decoded answer. The streamer holds text back until a space or newline, so a word is never printed
half-decoded (a multi-byte character split over two tokens would otherwise show as garbage).

The worker is stopped through a stopping criterion when the caller stops early (``close()``, Ctrl+C),
and an exception in the worker is re-raised in the caller instead of leaving it waiting forever.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from garden.models.loading import LoadedModel

# the same prompt encoding as the shaker and the trainer: a student is asked the way it was taught
from garden.models.chat import chat_prompt_ids, pad_id

FinishReason = Literal["stop", "length", "cancelled"]
"""``stop``: the model ended its turn; ``length``: ``max_new_tokens`` (or the context) ran out;
``cancelled``: the caller stopped early."""


class GenerationError(ValueError):
    """A generation request that cannot run (e.g. a prompt longer than the model's context)."""


@dataclass(frozen=True)
class GenerateConfig:
    """:param max_new_tokens: longest answer, in tokens (cut to what the model's context leaves)
    :param temperature: 0 decodes greedily (the same prompt gives the same answer); above 0 samples
    :param top_p: nucleus sampling mass, used only when sampling
    :param seed: seeds torch's generator before sampling, for reproducible samples; None leaves it alone
    :param system: a system message; None keeps the chat template's default (SmolLM2 has one)"""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": 1 <= self.max_new_tokens <= 32768,
            "temperature": math.isfinite(self.temperature) and 0 <= self.temperature <= 10,
            "top_p": 0 < self.top_p <= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid generation settings: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} "
                "(max_new_tokens 1..32768, temperature 0..10 where 0 is greedy, top_p in (0, 1])"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationResult:
    """A finished generation.

    :param text: the decoded answer (special tokens skipped), as the streamed pieces joined
    :param prompt_tokens: tokens of the templated prompt
    :param new_tokens: tokens generated, the end-of-turn token included
    :param seconds: wall time of ``generate``, prompt processing included
    """

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    finish_reason: FinishReason

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def prompt_ids(tokenizer: Any, prompt: str, system: str | None = None) -> list[int]:
    """The prompt encoded exactly as training and shaking encode it (``chat_prompt_ids``: the chat template's
    user turn after ``system``, if given, then the assistant header). A tokenizer without a chat template
    (a base model) gets the plain text, with the system message on a line before it."""
    if getattr(tokenizer, "chat_template", None):
        return chat_prompt_ids(tokenizer, prompt, system)
    text = prompt if not system else f"{system}\n\n{prompt}"
    return list(tokenizer(text)["input_ids"])


class TextGeneration:
    """One streamed generation: iterate for the decoded pieces, then read :attr:`result`::

        with TextGeneration(load_model("builtin:smollm2-135m"), "What is 2 + 2?") as generation:
            for piece in generation:
                print(piece, end="", flush=True)
        print(generation.result.tokens_per_second)

    The worker thread starts at the first ``next()``. Leaving the ``with`` block (or ``close()``) stops it
    after the token being computed.

    :raises GenerationError: (at construction) when the prompt leaves no room in the model's context
    """

    def __init__(self, model: LoadedModel, prompt: str, config: GenerateConfig | None = None):
        from transformers import TextIteratorStreamer

        self.model = model
        self.config = config or GenerateConfig()
        self.prompt_ids = prompt_ids(model.tokenizer, prompt, self.config.system)
        context = int(getattr(model.model.config, "max_position_embeddings", 0) or 0)
        if context and len(self.prompt_ids) >= context:
            raise GenerationError(
                f"the prompt is {len(self.prompt_ids)} tokens; {model.ref} has a {context}-token context: shorten it"
            )
        # an answer is cut where the context ends, never run past it (positions beyond it are untrained)
        self.max_new_tokens = min(self.config.max_new_tokens, context - len(self.prompt_ids) if context else 1 << 30)
        self._streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pieces: list[str] = []
        self._error: BaseException | None = None
        self._new_tokens = 0
        self._finish: FinishReason = "length"
        self._seconds = 0.0
        self._done = False

    # --- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="garden-generate", daemon=True)
            self._thread.start()
        for piece in self._streamer:
            if piece:  # the streamer also emits "" while it holds a partial word back
                self._pieces.append(piece)
                return piece
        # the stop signal comes from inside generate(): wait for the worker to record its counts
        self._thread.join()
        self._done = True
        if self._error is not None:
            raise self._error
        raise StopIteration

    def __enter__(self) -> TextGeneration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop generating (after the current token) and wait for the worker; the result says ``cancelled``
        if it had not finished."""
        self._stop.set()
        if self._thread is None:  # never started
            self._done, self._finish = True, "cancelled"
        elif not self._done:
            # drain until the worker's stop signal (the text decoded meanwhile belongs to the result)
            self._pieces.extend(piece for piece in self._streamer if piece)
            self._thread.join()
            self._done = True

    @property
    def result(self) -> GenerationResult:
        """The finished generation; raises ``RuntimeError`` while pieces remain to be read."""
        if not self._done:
            raise RuntimeError("the generation has not finished: iterate it to the end (or close it) first")
        return GenerationResult(
            text="".join(self._pieces),
            prompt_tokens=len(self.prompt_ids),
            new_tokens=self._new_tokens,
            seconds=self._seconds,
            finish_reason=self._finish,
        )

    # --- worker ------------------------------------------------------------------------------------
    def _generate_kwargs(self) -> dict[str, Any]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        stop = self._stop

        class _StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        device = next(self.model.model.parameters()).device
        ids = torch.tensor([self.prompt_ids], device=device)
        sampling: dict[str, Any] = (
            {"do_sample": False}
            if self.config.greedy
            else {"do_sample": True, "temperature": self.config.temperature, "top_p": self.config.top_p}
        )
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": self.max_new_tokens,
            "eos_token_id": sorted(self._eos_ids()),
            "pad_token_id": pad_id(self.model.tokenizer),
            "streamer": self._streamer,
            "stopping_criteria": StoppingCriteriaList([_StopWhenAsked()]),
            **sampling,
        }

    def _eos_ids(self) -> set[int]:
        """The generation config's end tokens plus the tokenizer's: chat models often end a turn with a token
        (``<|im_end|>``) that only one of the two names."""
        configured = getattr(self.model.model.generation_config, "eos_token_id", None)
        ids = set(configured if isinstance(configured, list) else [] if configured is None else [configured])
        if self.model.tokenizer.eos_token_id is not None:
            ids.add(int(self.model.tokenizer.eos_token_id))
        return ids

    def _run(self) -> None:
        import torch

        started = time.perf_counter()
        try:
            kwargs = self._generate_kwargs()
            if self.config.seed is not None and not self.config.greedy:
                torch.manual_seed(self.config.seed)
            with torch.no_grad():
                out = self.model.model.generate(**kwargs)
            new = out[0, len(self.prompt_ids) :].tolist()
            self._new_tokens = len(new)
            if new and new[-1] in self._eos_ids():
                self._finish = "stop"
            elif len(new) < self.max_new_tokens and self._stop.is_set():
                self._finish = "cancelled"
        except BaseException as e:  # handed to the reading thread, which re-raises it
            self._error = e
            self._streamer.end()  # else the reader would wait for text forever
        finally:
            self._seconds = time.perf_counter() - started


def generate_text(model: LoadedModel, prompt: str, config: GenerateConfig | None = None) -> GenerationResult:
    """The whole answer at once (the same as joining :class:`TextGeneration`'s pieces)."""
    with TextGeneration(model, prompt, config) as generation:
        for _ in generation:
            pass
    return generation.result

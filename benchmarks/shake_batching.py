"""Batched shaking vs one prompt at a time, on the built-in teacher.

Run: ``.venv/bin/python benchmarks/shake_batching.py [--prompts 16] [--candidates 4] [--table]``.
Prints one JSON object. Both arms sample the same prompts with the same settings, in this one run:

- ``sequential``: one ``generate`` call per prompt and candidate (``batch_prompts=1, candidates=1``,
  repeated), the naive baseline;
- ``batched``: ``garden.distill.shaker.shake`` as shipped (``batch_prompts`` prompts x candidates per
  batch, each prompt encoded once and its KV cache shared by its candidates, plus the judge and the
  teacher-forced top-k pass, which the baseline skips). ``batched_seconds`` splits its time into
  sampling and the rest (judge + top-k pass).

``speedup`` = batched samples/s / sequential samples/s. The first model load (GGUF conversion) is
done before timing. ``machine.load_average_1m`` (before, after) shows whether other work shared the CPU.

``--table`` adds ``table``: the speedup for prompts x candidates in {16, 32} x {4, 8}, batched with
all the prompts in one batch and with 8 per batch (the ``garden shake`` default). Its sequential arm
runs once, over 32 prompts x 8 candidates, timing every ``generate`` call; a cell's sequential time
is the sum over its own prompts and candidates (the first P prompts, first C calls of each): the same
naive calls a separate run would make. It takes about ten minutes on two cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's garden and harness
from garden.data import demo_prompts  # noqa: E402
from garden.distill import shaker  # noqa: E402
from garden.distill.judges import ReferenceJudge  # noqa: E402
from garden.distill.shaker import ShakeConfig, ShakeResult, shake  # noqa: E402
from garden.models.chat import chat_prompt_ids  # noqa: E402
from garden.models.loading import LoadedModel, load_model  # noqa: E402
from garden.protocol.rows import PromptRow  # noqa: E402
from harness.machine import MachineReport  # noqa: E402

TABLE_PROMPTS = (16, 32)
TABLE_CANDIDATES = (4, 8)
TABLE_BATCH_PROMPTS = 8  # garden shake's default --batch-prompts


def sequential_seconds(
    teacher: LoadedModel, prompts: list[PromptRow], candidates: int, max_new_tokens: int
) -> list[list[float]]:
    """Seconds of each naive call: [prompt][candidate], one ``generate`` per prompt and candidate."""
    torch.manual_seed(0)
    seconds = []
    for prompt in prompts:
        ids = torch.tensor([chat_prompt_ids(teacher.tokenizer, prompt.prompt)])
        calls = []
        for _ in range(candidates):
            started = time.perf_counter()
            with torch.no_grad():
                teacher.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.8,
                    top_p=0.95, max_new_tokens=max_new_tokens, pad_token_id=teacher.tokenizer.eos_token_id,
                )  # fmt: skip
            calls.append(time.perf_counter() - started)
        seconds.append(calls)
    return seconds


@contextlib.contextmanager
def timing_sampling(spent: list[float]) -> Iterator[None]:
    """Adds the seconds ``shake`` spends in its sampler to ``spent`` (the rest: judge + top-k pass)."""
    sample = shaker._sample

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return sample(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - started)

    shaker._sample = timed  # type: ignore[assignment]
    try:
        yield
    finally:
        shaker._sample = sample  # type: ignore[assignment]


def batched(
    teacher: LoadedModel, prompts: list[PromptRow], candidates: int, max_new_tokens: int, batch_prompts: int
) -> tuple[float, float, ShakeResult]:
    """(seconds, of which sampling, result) for ``shake`` over ``prompts``."""
    config = ShakeConfig(candidates=candidates, max_new_tokens=max_new_tokens, batch_prompts=batch_prompts, seed=0)
    spent: list[float] = []
    with timing_sampling(spent):
        started = time.perf_counter()
        result = shake(teacher, prompts, ReferenceJudge(), config)
        seconds = time.perf_counter() - started
    return seconds, sum(spent), result


def table(teacher: LoadedModel, max_new_tokens: int) -> list[dict[str, Any]]:
    prompts = demo_prompts("train")[: max(TABLE_PROMPTS)]
    naive = sequential_seconds(teacher, prompts, max(TABLE_CANDIDATES), max_new_tokens)
    cells = []
    for n_prompts in TABLE_PROMPTS:
        for candidates in TABLE_CANDIDATES:
            samples = n_prompts * candidates
            sequential_s = sum(sum(calls[:candidates]) for calls in naive[:n_prompts])
            for batch_prompts in sorted({n_prompts, TABLE_BATCH_PROMPTS}, reverse=True):
                batched_s, _, _ = batched(teacher, prompts[:n_prompts], candidates, max_new_tokens, batch_prompts)
                cells.append(
                    {
                        "prompts": n_prompts,
                        "candidates": candidates,
                        "batch_prompts": batch_prompts,
                        "samples": samples,
                        "sequential_samples_per_s": round(samples / sequential_s, 3),
                        "batched_samples_per_s": round(samples / batched_s, 3),
                        "speedup": round(sequential_s / batched_s, 2),
                    }
                )
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--table", action="store_true", help="also the prompts x candidates table (~10 min)")
    args = parser.parse_args()

    teacher = load_model("builtin:smollm2-135m")
    prompts = demo_prompts("train")[: args.prompts]
    n_samples = len(prompts) * args.candidates
    machine = MachineReport().start()

    sequential_s = sum(map(sum, sequential_seconds(teacher, prompts, args.candidates, args.max_new_tokens)))
    batched_s, sampling_s, result = batched(teacher, prompts, args.candidates, args.max_new_tokens, len(prompts))

    report: dict[str, Any] = {
        "prompts": len(prompts),
        "candidates": args.candidates,
        "samples": n_samples,
        "max_new_tokens": args.max_new_tokens,
        "sequential_samples_per_s": round(n_samples / sequential_s, 3),
        "batched_samples_per_s": round(n_samples / batched_s, 3),
        "speedup": round(sequential_s / batched_s, 2),
        "target_speedup": 6.0,
        "batched_seconds": {"sampling": round(sampling_s, 2), "judge_and_top_k": round(batched_s - sampling_s, 2)},
        "rows": len(result.rows),
        "bytes_per_token": result.rows[0].bytes_per_token() if result.rows else None,
    }
    if args.table:
        report["table"] = table(teacher, args.max_new_tokens)
    report["machine"] = machine.finish()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

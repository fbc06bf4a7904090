"""Batched shaking vs one prompt at a time, on the built-in teacher (issue 4's shake benchmark).

Run: ``.venv/bin/python benchmarks/shake_batching.py [--prompts 16] [--candidates 4]``. Prints one
JSON object. Both arms sample the same prompts with the same settings, in this one run:

- ``sequential``: one ``generate`` call per prompt and candidate (``batch_prompts=1, candidates=1``,
  repeated), the naive baseline;
- ``batched``: ``garden.trainer.shaker.shake`` as shipped (``batch_prompts`` prompts x candidates per
  ``generate`` call, plus the judge and the teacher-forced top-k pass, which the baseline skips).

``speedup`` = batched samples/s / sequential samples/s. The first model load (GGUF conversion) is
done before timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from garden.data import demo_prompts  # noqa: E402
from garden.models import load_model  # noqa: E402
from garden.trainer.judges import ReferenceJudge  # noqa: E402
from garden.trainer.shaker import ShakeConfig, _prompt_ids, shake  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    teacher = load_model("builtin:smollm2-135m")
    prompts = demo_prompts("train")[: args.prompts]
    n_samples = len(prompts) * args.candidates

    torch.manual_seed(0)
    started = time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([_prompt_ids(teacher.tokenizer, prompt.prompt)])
        for _ in range(args.candidates):
            with torch.no_grad():
                teacher.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.8,
                    top_p=0.95, max_new_tokens=args.max_new_tokens, pad_token_id=teacher.tokenizer.eos_token_id,
                )  # fmt: skip
    sequential_s = time.perf_counter() - started

    config = ShakeConfig(
        candidates=args.candidates, max_new_tokens=args.max_new_tokens, batch_prompts=len(prompts), seed=0
    )
    started = time.perf_counter()
    result = shake(teacher, prompts, ReferenceJudge(), config)
    batched_s = time.perf_counter() - started

    print(
        json.dumps(
            {
                "prompts": len(prompts),
                "candidates": args.candidates,
                "samples": n_samples,
                "max_new_tokens": args.max_new_tokens,
                "sequential_samples_per_s": round(n_samples / sequential_s, 3),
                "batched_samples_per_s": round(n_samples / batched_s, 3),
                "speedup": round(sequential_s / batched_s, 2),
                "target_speedup": 6.0,
                "rows": len(result.rows),
                "bytes_per_token": result.rows[0].bytes_per_token() if result.rows else None,
                "threads": torch.get_num_threads(),
                "cores": os.cpu_count(),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

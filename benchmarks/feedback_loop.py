"""The loop closed: a model trained one more mission on its users' edits answers like the edits.

Run: ``.venv/bin/python benchmarks/feedback_loop.py [--prompts 50] [--steps 60]``. Prints one JSON object.

In one run, on the built-in SmolLM2-135M as the swarm's model that people use:

1. it answers ``--prompts`` demo questions (capitals and arithmetic, train split), and a user *edits* every
   answer into their house style, a bare answer ("Paris.", "52."): the edits go through
   ``garden.mission.feedback`` on a real store, as ``POST /v1/feedback`` would keep them;
2. the next mission is made of that feedback (``Feedback.prompts``: the prompts, with the edits as
   references), shaken from the teacher (the same built-in model, 4 candidates, the reference judge: a
   sampled answer is chosen only when it matches the edit, else the edit itself) and trained with DORPO
   (``DorpoTrainer``, the trainer every swarm worker runs) from the model people used;
3. both the model before and after answer *held-out paraphrases* of those questions ("Which city is the
   capital of France?", "Calculate 50 + 2."), greedily; ``pass_rate`` = the share the reference judge passes
   against the edit (token F1 >= 0.5).

``after_over_before`` is the ratio of pass rates; ``pass_rate_after - pass_rate_before`` the gain.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's garden and harness
from harness.machine import MachineReport  # noqa: E402

MODEL = "builtin:smollm2-135m"
_CAPITAL = re.compile(r"^What is the capital of (.+)\?$")
_SUM = re.compile(r"^What is (\d+ [-+×] \d+)\?$")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def questions(n: int) -> list[tuple[str, str, str]]:
    """(question, the user's edit, a held-out paraphrase) for capitals and arithmetic, alternating."""
    from garden.data import demo_prompts

    found = []
    for row in demo_prompts("train"):  # type: ignore[arg-type]
        answer = (row.reference or "").rstrip(".").split()[-1]
        if (m := _CAPITAL.match(row.prompt)) is not None:
            found.append((row.prompt, f"{answer}.", f"Which city is the capital of {m[1]}?"))
        elif (m := _SUM.match(row.prompt)) is not None:
            found.append((row.prompt, f"{answer}.", f"Calculate {m[1]}."))
    capitals = [q for q in found if q[0].startswith("What is the capital")]
    sums = [q for q in found if not q[0].startswith("What is the capital")]
    mixed = [q for pair in zip(capitals, sums, strict=False) for q in pair]
    return mixed[:n]


def answer(model: Any, prompts: list[str], tokens: int) -> list[str]:
    from garden.inference.generate import GenerateConfig, TextGeneration

    out = []
    for prompt in prompts:
        with TextGeneration(model, prompt, GenerateConfig(max_new_tokens=tokens, temperature=0.0)) as generation:
            out.append("".join(generation))
    return out


def pass_rate(answers: list[str], edits: list[str]) -> float:
    from garden.distill.judges import METRICS

    f1 = METRICS["f1"]
    return sum(f1(a, e) >= 0.5 for a, e in zip(answers, edits, strict=True)) / len(edits)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    import torch

    from garden.distill.judges import ReferenceJudge
    from garden.distill.shaker import ShakeConfig, shake
    from garden.distill.trainer import DorpoTrainer, TrainConfig
    from garden.mission.feedback import Feedback
    from garden.models.loading import load_model
    from garden.models.student import build_student, parse_student_ref
    from garden.store import Store

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = MachineReport().start()
    asked = questions(args.prompts)
    prompts, edits, paraphrases = [q[0] for q in asked], [q[1] for q in asked], [q[2] for q in asked]
    used = load_model(MODEL)
    started = time.perf_counter()
    given = answer(used, prompts, args.tokens)
    log(f"the model answered {len(prompts)} questions, e.g. {prompts[0]!r} -> {given[0]!r}")

    with tempfile.TemporaryDirectory(prefix="garden-bench-loop-") as work:
        feedback = Feedback(Store(Path(work) / "garden.sqlite3"))
        for prompt, text, edit in zip(prompts, given, edits, strict=True):
            request = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
            kept = feedback.keep(MODEL, "chat", request, text)
            feedback.rate(kept.answer_id, "edit", edit)
        pairs = feedback.pairs()
        mission_prompts = feedback.prompts()
    log(f"{len(pairs)} pairs; the next mission has {len(mission_prompts)} prompts with the edits as references")

    shaken_at = time.perf_counter()
    config = ShakeConfig(candidates=4, max_new_tokens=args.tokens, batch_prompts=16, seed=0)
    rows = shake(load_model(MODEL), mission_prompts, ReferenceJudge(), config).rows
    shake_s = time.perf_counter() - shaken_at
    reference_chosen = sum(r.reference_used for r in rows)
    log(f"shaken: {len(rows)} rows in {shake_s:.0f} s ({reference_chosen} with the edit itself as chosen)")

    before_answers = answer(used, paraphrases, args.tokens)
    before = pass_rate(before_answers, edits)
    student = build_student(parse_student_ref(MODEL))
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               warmup_steps=max(1, args.steps // 10), seed=0)  # fmt: skip
    trained = DorpoTrainer(student, rows, train_config).train()
    log(f"trained {args.steps} steps in {trained.seconds:.0f} s")
    after_answers = answer(student, paraphrases, args.tokens)
    after = pass_rate(after_answers, edits)
    result = {
        "benchmark": "feedback_loop",
        "model": MODEL,
        "prompts": len(prompts),
        "pairs": len(pairs),
        "rows": len(rows),
        "rows_with_the_edit_chosen": reference_chosen,
        "steps": args.steps,
        "pass_rate_before": round(before, 3),
        "pass_rate_after": round(after, 3),
        "after_over_before": round(after / before, 3) if before else None,
        "by_topic": {
            topic: {
                "pass_rate_before": round(pass_rate([before_answers[i] for i in idx], [edits[i] for i in idx]), 3),
                "pass_rate_after": round(pass_rate([after_answers[i] for i in idx], [edits[i] for i in idx]), 3),
            }
            for topic, idx in (("capitals", range(0, len(edits), 2)), ("arithmetic", range(1, len(edits), 2)))
        },
        "examples": [
            {"paraphrase": p, "edit": e, "after": a}
            for p, e, a in list(zip(paraphrases, edits, after_answers, strict=True))[:4]
        ],
        "shake_s": round(shake_s, 1),
        "train_s": round(trained.seconds, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "machine": machine.finish(),
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DORPO vs plain SFT: distil the built-in teacher into a pruned student on the demo set.

Run: ``.venv/bin/python benchmarks/dorpo_distill.py [--steps 120] [--student prune:builtin:smollm2-135m:layers=10]``.
Prints one JSON object. In this one run, on the same rows, steps, batch size, seed and learning rate:

- the teacher is shaken once on the demo train split (rows with top-k log-probs; cached with ``--rows-cache``)
  and on the held-out split (never trained on);
- the student is evaluated before training, then trained twice from the same start: once with the DORPO
  loss (NLL + lambda_or * odds ratio + lambda_kl * top-k KL) and once with NLL only (plain SFT);
- each is evaluated on the held-out rows: KL(teacher || student) on the k+1 buckets, top-1 agreement with
  the teacher, preference accuracy (mean log-prob of chosen > rejected), NLL.

Ratios: ``kl_after_over_before`` (DORPO; target <= 0.1), ``dorpo_over_sft_kl`` (target <= 0.6); plus top-1
(target >= 0.6), preference accuracy (target >= 0.8), bytes per stored token (target <= 84) and wall times.

Both arms run AdamW with betas 0.5, 0.95 (``--adam-beta1/--adam-beta2``; torch's 0.9, 0.999 are ``garden train``'s
and a mission's defaults): a run of 120 steps learns faster with a shorter memory (docs/training.md).
``--train-rows N`` trains on a seeded sample of N train rows in the same budget: how the held-out KL depends on the
number of distinct rows.

The student keeps the 10 layers of highest Block Influence on the train rows (``spacing=influence``,
``student_layers``): it starts closer to the teacher than evenly spaced layers and ends much closer, so
``kl_after_over_before`` divides by a smaller "before"; ``kl_after_over_evenly_spaced_before`` divides the same
KL by the untrained evenly spaced student's (``before_evenly_spaced``), the start of the other spacings.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's garden and harness
from garden.data import demo_prompts  # noqa: E402
from garden.distill.evaluate import EvalReport, evaluate  # noqa: E402
from garden.distill.judges import ReferenceJudge  # noqa: E402
from garden.distill.on_policy import StudentRejected, student_rejected  # noqa: E402
from garden.distill.shaker import ShakeConfig, shake  # noqa: E402
from garden.distill.trainer import DorpoTrainer, TrainConfig  # noqa: E402
from garden.models.loading import load_model  # noqa: E402
from garden.distill.runs import calibrated_student  # noqa: E402
from garden.models.student import StudentSpec, build_student, parse_student_ref  # noqa: E402
from garden.protocol.rows import DorpoRow, read_preference_jsonl, write_preference_jsonl  # noqa: E402
from harness.machine import MachineReport  # noqa: E402

TEACHER = "builtin:smollm2-135m"
TARGETS = {"kl_after_over_before": 0.1, "dorpo_over_sft_kl": 0.6, "top1": 0.6, "pref_acc": 0.8, "bytes_per_token": 84}


def rows_for(split: str, args: argparse.Namespace) -> tuple[list[DorpoRow], float]:
    """Shaken rows of a demo split (read from the cache when present), and the seconds shaking took."""
    cache = Path(args.rows_cache) / f"{split}.jsonl" if args.rows_cache else None
    if cache is not None and cache.is_file():
        return read_preference_jsonl(cache), 0.0
    prompts = demo_prompts(split)  # type: ignore[arg-type]
    if args.prompts:
        prompts = prompts[: args.prompts]
    config = ShakeConfig(candidates=args.candidates, max_new_tokens=args.max_new_tokens, batch_prompts=16, seed=0)
    started = time.perf_counter()
    rows = shake(load_model(TEACHER), prompts, ReferenceJudge(), config).rows
    seconds = time.perf_counter() - started
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_preference_jsonl(rows, cache)
    return rows, seconds


def summary(report: EvalReport) -> dict[str, Any]:
    return {k: report.to_dict()[k] for k in ("kl", "top1", "pref_acc", "nll", "rows", "pairs")}


def train_arm(
    args: argparse.Namespace, spec: StudentSpec, rows: list[DorpoRow], heldout: list[DorpoRow], lambda_or: float,
    lambda_kl: float,
) -> dict[str, Any]:
    student = build_student(spec)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=max(1, args.steps // 10),
        lambda_or=lambda_or,
        lambda_kl=lambda_kl,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        seed=0,
        freeze_embeddings=not args.train_embeddings,
    )
    on_policy = args.rejected == "student" and lambda_or > 0
    sampling = StudentRejected(share=args.student_share)
    sampled_s, replaced = 0.0, []

    def resample(seed: int) -> list[DorpoRow]:
        nonlocal sampled_s
        started = time.perf_counter()
        fresh = student_rejected(student, rows, replace(sampling, seed=seed))
        sampled_s += time.perf_counter() - started
        replaced.append(fresh.replaced)
        return fresh.rows

    trainer = DorpoTrainer(student, resample(0) if on_policy else rows, config)
    every = args.resample_every if on_policy and args.resample_every else args.steps
    train_s = 0.0
    for phase, until in enumerate(range(every, args.steps + every, every)):
        if phase:
            trainer.replace_rows(resample(phase))
        result = trainer.train(until=min(until, args.steps))
        train_s += result.seconds
    report = evaluate(student.model, student.tokenizer, heldout)
    out = {**summary(report), "train_s": round(train_s, 1), "skipped_steps": result.skipped_steps}
    if on_policy:
        out |= {"student_rejected": replaced, "sampling_s": round(sampled_s, 1)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="prune:builtin:smollm2-135m:layers=10:spacing=influence")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--lambda-or", type=float, default=0.1)
    parser.add_argument("--lambda-kl", type=float, default=5.0)
    parser.add_argument("--adam-beta1", type=float, default=0.5, help="AdamW's momentum decay (torch's: 0.9)")
    parser.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW's second-moment decay (torch's: 0.999)")
    parser.add_argument("--prompts", type=int, default=0, help="use only the first N prompts of each split")
    parser.add_argument("--train-rows", type=int, default=0,
                        help="train on this many of the shaken train rows (a seeded sample; 0: all)")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rows-cache", default="", help="directory to keep/reuse the shaken rows")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rejected", choices=("teacher", "student"), default="teacher",
                        help="the DORPO arm's rejected answers: the teacher's judged ones, or the student's own "
                        "samples (ORPO-Distill; garden.distill.on_policy)")
    parser.add_argument("--student-share", type=float, default=1.0,
                        help="with --rejected student: the share of rows given the student's answer")
    parser.add_argument("--resample-every", type=int, default=0,
                        help="with --rejected student: sample the student again every N steps (on-policy; 0: "
                        "once, before training)")
    parser.add_argument("--train-embeddings", action="store_true",
                        help="train the embeddings and head too (garden train's default keeps them)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = MachineReport().start()

    train_rows, shake_train_s = rows_for("train", args)
    if args.train_rows:  # fewer distinct rows in the same budget: how the held-out KL depends on the data
        random.Random(0).shuffle(train_rows)
        train_rows = train_rows[: args.train_rows]
    heldout, shake_heldout_s = rows_for("heldout", args)
    requested = parse_student_ref(args.student)
    spec = calibrated_student(requested, train_rows)  # spacing=influence: the layers chosen on the train rows
    student = build_student(spec)
    before = summary(evaluate(student.model, student.tokenizer, heldout))
    even = None  # the untrained evenly spaced student of the same size: what the other spacings start from
    if requested.keep_layers is not None and spec != requested:
        untrained = build_student(StudentSpec(base=spec.base, keep_layers=spec.keep_layers))
        even = summary(evaluate(untrained.model, untrained.tokenizer, heldout))
        del untrained
    teacher = load_model(TEACHER)
    ceiling = summary(evaluate(teacher.model, teacher.tokenizer, heldout))
    del student

    dorpo = train_arm(args, spec, train_rows, heldout, args.lambda_or, args.lambda_kl)
    sft = train_arm(args, spec, train_rows, heldout, 0.0, 0.0)
    tokens = sum(r.num_tokens for r in train_rows)
    stored = sum(r.bytes_per_token() * r.num_tokens for r in train_rows)
    figures = {
        "kl_after_over_before": _ratio(dorpo["kl"], before["kl"]), "dorpo_over_sft_kl": _ratio(dorpo["kl"], sft["kl"]),
        "top1": dorpo["top1"], "pref_acc": dorpo["pref_acc"], "bytes_per_token": round(stored / max(1, tokens), 2),
    }  # fmt: skip
    at_least = ("top1", "pref_acc")  # the others are at most their target

    print(
        json.dumps(
            {
                "student": args.student,
                "student_layers": list(spec.layers) if spec.layers else None,
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "lambda_kl": args.lambda_kl,
                "lambda_or": args.lambda_or,
                "adam_betas": [args.adam_beta1, args.adam_beta2],
                "rejected": args.rejected,
                "freeze_embeddings": not args.train_embeddings,
                "train_rows": len(train_rows),
                "heldout_rows": len(heldout),
                "shake_s": round(shake_train_s + shake_heldout_s, 1),
                "teacher_on_heldout": ceiling,
                "before": before,
                "before_evenly_spaced": even,
                "kl_after_over_evenly_spaced_before": _ratio(dorpo["kl"], even["kl"]) if even else None,
                "dorpo": dorpo,
                "sft": sft,
                "kl_after_over_before": figures["kl_after_over_before"],
                "dorpo_over_sft_kl": figures["dorpo_over_sft_kl"],
                "bytes_per_token": figures["bytes_per_token"],
                "targets": TARGETS,
                "meets_targets": {
                    name: None if figures[name] is None
                    else figures[name] >= target if name in at_least else figures[name] <= target
                    for name, target in TARGETS.items()
                },  # fmt: skip
                "machine": machine.finish(),
            },
            indent=2,
        )
    )
    return 0


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


if __name__ == "__main__":
    sys.exit(main())

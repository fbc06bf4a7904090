"""Start or resume a training run: the glue between a run directory, a student spec, rows and the trainer.

What a run was started with (student, LoRA, teachers, data digest, settings) is written into its
``garden-run.json``, so ``--resume`` rebuilds the identical student and refuses data or settings that
would make the continuation inexact, naming what differs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from garden.protocol.rows import DorpoRow
from garden.distill.checkpoints import CheckpointError, RunDir, write_json_atomic
from garden.models.chat import answer_ids, chat_prompt_ids
from garden.models.loading import load_model
from garden.models.student import (
    LoraSpec,
    StudentSpec,
    build_student,
    parse_student_ref,
    resolve_influence,
    student_reference,
)
from garden.distill.trainer import DorpoTrainer, TrainConfig, rows_digest

logger = logging.getLogger(__name__)


def start_run(
    out: Path | str,
    student: str,
    rows: Sequence[DorpoRow],
    config: TrainConfig,
    lora: LoraSpec | None = None,
    teachers: Sequence[str] = (),
    data_source: str = "",
) -> DorpoTrainer:
    """A trainer for a new run in ``out`` (which must not hold a run yet)."""
    run = RunDir(out)
    if run.exists():
        raise CheckpointError(f"{run.path} already holds a training run: add --resume, or choose another --out")
    spec = calibrated_student(parse_student_ref(student, lora), rows)
    if spec.layers is not None:
        student = student_reference(spec.base, layers=spec.layers)  # what resuming rebuilds, without the data
    loaded = build_student(spec)
    trainer = DorpoTrainer(loaded, rows, config, run)  # validates the rows before anything is written
    run.create(
        {
            "student": student,
            "lora": asdict(lora) if lora else None,
            "teachers": list(teachers),
            "data": {"source": data_source, "rows": len(rows), "digest": rows_digest(rows)},
            "config": config.model_dump(mode="json"),
        }
    )
    return trainer


def calibrated_student(spec: StudentSpec, rows: Sequence[DorpoRow]) -> StudentSpec:
    """``spec`` with ``spacing=influence`` resolved into the layers it keeps, measured on ``rows`` (each prompt in
    the chat template, then its chosen answer, in the base's own tokenizer); any other spec as it is."""
    if spec.spacing != "influence" or spec.keep_layers is None:
        return spec
    tokenizer = load_model(spec.base).tokenizer
    texts = (chat_prompt_ids(tokenizer, row.prompt) + answer_ids(tokenizer, row.chosen) for row in rows)
    resolved = resolve_influence(spec, texts)
    logger.info("spacing=influence keeps layers %s of %s", ",".join(map(str, resolved.layers or ())), spec.base)
    return resolved


def resume_run(out: Path | str, rows: Sequence[DorpoRow], overrides: dict[str, Any] | None = None) -> DorpoTrainer:
    """A trainer continuing the run in ``out`` from its latest checkpoint (or from step 0 if it has none).

    ``overrides`` may change ``steps`` (to train further) and ``max_threads``; any other setting that differs
    from the stored one is refused, as is different data."""
    run = RunDir(out)
    info = run.read_info()
    # a run started before freeze_embeddings existed trained them: it goes on so
    stored = TrainConfig(**{"freeze_embeddings": False, **info["config"]})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    config = TrainConfig(**{**stored.model_dump(), **overrides})
    changed = [k for k in config.resumable_with(stored) if k != "steps"]
    if changed:
        raise CheckpointError(
            f"--resume continues {run.path} with its own settings; these differ: "
            + ", ".join(f"{k} ({getattr(stored, k)!r} -> {getattr(config, k)!r})" for k in changed)
        )
    if rows_digest(rows) != info["data"]["digest"]:
        raise CheckpointError(
            f"--resume needs the rows {run.path} was trained on ({info['data']['rows']} rows from "
            f"{info['data']['source'] or 'the original --data'}); these {len(rows)} rows differ"
        )
    if config.steps != stored.steps:
        logger.warning("training to %d steps instead of %d: the schedule stretches", config.steps, stored.steps)
        info["config"] = config.model_copy(update={"max_threads": stored.max_threads}).model_dump(mode="json")
    lora = None
    if info["lora"]:
        lora = LoraSpec(**{**info["lora"], "target_modules": tuple(info["lora"]["target_modules"])})
    trainer = DorpoTrainer(build_student(parse_student_ref(info["student"], lora)), rows, config, run)
    checkpoint = run.latest()
    if checkpoint is not None:
        trainer.resume(checkpoint)
    if checkpoint is not None and checkpoint.step > config.steps:
        raise CheckpointError(f"{run.path} is already at step {checkpoint.step}, past --steps {config.steps}")
    if config.steps != stored.steps:
        write_json_atomic(run.manifest_path, info)
    return trainer

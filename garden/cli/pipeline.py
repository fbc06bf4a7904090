"""The single-machine distillation commands: ``shake``, ``train``, ``eval``, ``generate``. Heavy imports
(torch, transformers) happen inside each command, so ``garden status`` stays fast."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import typer
from rich.console import Console
from rich.table import Table

from garden.cli.common import EXIT_CONFIG, app, console, fail, settings_from


@app.command()
def shake(
    teacher: list[str] = typer.Option(
        ["builtin:smollm2-135m"],
        "--teacher",
        help="Teacher model reference. Repeatable: each prompt goes to the first teacher that loads and answers it.",
    ),
    prompts: str = typer.Option(
        "builtin:demo", "--prompts", help="Prompts JSONL ({prompt, reference?} per line) or builtin:demo."
    ),
    out: Path = typer.Option(..., "--out", help="Rows as TRL preference JSONL (+ the teacher's log-probs)."),
    judge: str = typer.Option("reference", "--judge", help="reference, regex, json_schema or teacher."),
    pattern: str | None = typer.Option(None, "--pattern", help="Regex for --judge regex."),
    candidates: int = typer.Option(4, "--candidates", help="Answers sampled per prompt."),
    temperature: float = typer.Option(0.8, "--temperature"),
    top_p: float = typer.Option(0.95, "--top-p"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens"),
    top_k: int = typer.Option(20, "--top-k", help="Teacher log-probs kept per chosen token."),
    batch_prompts: int = typer.Option(16, "--batch-prompts", help="Prompts sampled together (x candidates)."),
    seed: int = typer.Option(0, "--seed"),
    split: str = typer.Option("train", "--split", help="For builtin:demo: train, heldout or all."),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Also add the rows to this data dir's store (default: the configured data dir)."
    ),
    no_store: bool = typer.Option(False, "--no-store", help="Only write --out; leave the local store alone."),
    config_file: Path | None = typer.Option(
        None, "--config", metavar="FILE", help="TOML config file (env GARDEN_CONFIG)."
    ),
) -> None:
    """Sample the teacher(s) on prompts, judge the answers, write DORPO rows and add them to the local store."""
    import sqlite3

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from garden.data import DEMO_PROMPTS, demo_prompts
    from garden.daemon.datadir import DataDir
    from garden.models.loading import LoadedModel, load_model
    from garden.protocol.rows import read_prompts_jsonl, write_preference_jsonl
    from garden.store import Store, StoreError
    from garden.distill.judge_sandbox import JudgeLimitError
    from garden.distill.judges import Judge, build_judge
    from garden.distill.shaker import ShakeConfig
    from garden.distill.teachers import NoTeacherError, shake_with_fallback

    try:
        config = ShakeConfig(candidates, temperature, top_p, max_new_tokens, top_k, batch_prompts, seed)
        rows_in = demo_prompts(cast(Any, split)) if prompts == DEMO_PROMPTS else read_prompts_jsonl(prompts)
        # as a mission's [judge]: built now (a bad --judge or --pattern fails before any model loads), except
        # the teacher judge, which grades with each teacher itself and is built once that teacher is loaded
        judge_spec = build_judge({"kind": judge, **({"pattern": pattern} if judge == "regex" else {})})
    except (ValueError, OSError) as e:  # bad prompts file, judge or settings
        raise fail(str(e), EXIT_CONFIG) from None
    # opened before shaking, so that an unusable store fails now rather than after an hour of sampling; a
    # daemon running on the same data dir holds only garden.lock, and SQLite (WAL) takes a second writer
    store: Store | None = None
    if not no_store:
        folder = DataDir(settings_from({"data_dir": data_dir}, config_file).data_dir)
        try:
            folder.ensure()
            store = Store(folder.store)
        except (StoreError, OSError) as e:
            raise fail(f"cannot open the local store: {e} (or pass --no-store)", EXIT_CONFIG) from None
    try:
        columns = (
            TextColumn("shaking"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"), TimeRemainingColumn(),
        )  # fmt: skip
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("shake", total=len(rows_in))

            def load(ref: str) -> LoadedModel:
                progress.console.print(
                    f"loading {ref} (the first load of a .gguf converts it once, ~15 s)", markup=False
                )
                return load_model(ref)

            try:
                result = shake_with_fallback(
                    teacher, rows_in, judge_spec, config, on_batch=lambda n: progress.advance(task, n), load=load
                )
            except NoTeacherError as e:
                progress.stop()
                raise fail(str(e), EXIT_CONFIG) from None
            except JudgeLimitError as e:
                progress.stop()
                raise fail(str(e)) from None
            finally:
                if isinstance(judge_spec, Judge):
                    judge_spec.close()
        for report in result.teachers:
            if report.error is not None:
                console.print(f"teacher {report.ref}: skipped: {report.error}", markup=False, soft_wrap=True)
            elif len(result.teachers) > 1:
                console.print(
                    f"teacher {report.ref}: "
                    + (
                        f"{report.rows} rows from {report.prompts} prompts, {report.passed_on} passed on"
                        + (f" ({report.failed_batches} batches failed)" if report.failed_batches else "")
                        if report.loaded
                        else "not needed"
                    ),
                    markup=False,
                    soft_wrap=True,
                )
        written = write_preference_jsonl(result.rows, out)
        for prompt, why in result.dropped[:5]:
            console.print(f"dropped: {prompt.prompt[:60]!r}: {why}", markup=False)
        pairs = sum(1 for r in result.rows if r.rejected is not None)
        console.print(
            f"{written} rows ({pairs} with a rejected answer) from {len(rows_in)} prompts and {result.samples} "
            f"samples; {len(result.dropped)} dropped; written to {out}",
            markup=False,
        )
        if store is not None:
            try:
                added = store.add_rows(result.rows)
            except (StoreError, OSError, sqlite3.Error) as e:
                raise fail(f"rows written to {out}, but not stored in {store.path}: {e}", EXIT_CONFIG) from None
            console.print(
                f"stored in {store.path}: {added} new rows, {len(result.rows) - added} already there",
                markup=False,
                soft_wrap=True,  # paths are copied out of this line: never break them
            )
    finally:
        if store is not None:
            store.close()


@app.command()
def train(
    student: str | None = typer.Option(
        None, "--student",
        help="Student: a model reference, prune:<ref>:layers=N[:spacing=front|influence] (influence: the N layers "
        "that change the stream most on --data; the run records them) or prune:<ref>:layers=I,J,... "
        "(not needed with --resume).",
    ),  # fmt: skip
    data: Path = typer.Option(..., "--data", help="Rows JSONL written by `garden shake` (TRL preference format)."),
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints, metrics.jsonl, garden-run.json."),
    teacher: list[str] | None = typer.Option(
        None, "--teacher", help="Teacher(s) the rows came from, recorded in the run. Repeatable."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint."),
    steps: int | None = typer.Option(None, "--steps", help="Optimizer steps [200]."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Rows per forward pass [4]."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Forward passes per step [1]."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate [1e-4]."),
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", help="Linear warm-up steps [10]."),
    schedule: str | None = typer.Option(None, "--schedule", help="cosine, linear or constant [cosine]."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="AdamW weight decay [0]."),
    max_grad_norm: float | None = typer.Option(None, "--max-grad-norm", help="Clip gradients to this norm [1.0]."),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints [50]."),
    keep_checkpoints: int | None = typer.Option(None, "--keep-checkpoints", help="Checkpoints kept [2]."),
    max_length: int | None = typer.Option(None, "--max-length", help="Longest row in tokens [512]."),
    lambda_or: float | None = typer.Option(None, "--lambda-or", help="Odds-ratio term weight [0.1]."),
    lambda_kl: float | None = typer.Option(None, "--lambda-kl", help="Top-k KL term weight [1.0]; 0 and 0: SFT."),
    adam_beta1: float | None = typer.Option(None, "--adam-beta1", help="AdamW's momentum decay [0.9]."),
    adam_beta2: float | None = typer.Option(None, "--adam-beta2", help="AdamW's second-moment decay [0.999]."),
    seed: int | None = typer.Option(None, "--seed", help="Data order seed [0]."),
    max_threads: int | None = typer.Option(None, "--max-threads", help="CPU threads torch may use [all cores]."),
    train_embeddings: bool = typer.Option(
        False, "--train-embeddings", help="Train the token embeddings and output head too [kept as the base's]."
    ),
    lora_r: int = typer.Option(0, "--lora-r", help="Train a LoRA adapter of this rank instead of all weights."),
    lora_alpha: int | None = typer.Option(None, "--lora-alpha", help="LoRA alpha [2 x rank]."),
    lora_targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj", "--lora-targets", help="LoRA target modules."),
    qlora: bool = typer.Option(False, "--qlora", help="4-bit base under the LoRA adapter (needs CUDA)."),
) -> None:
    """Train a student on DORPO rows (NLL + odds ratio + KL to the teacher), with checkpoints."""
    import logging

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from garden.models.loading import ModelRefError
    from garden.protocol.rows import read_preference_jsonl
    from garden.distill.checkpoints import CheckpointError
    from garden.models.student import LoraSpec
    from garden.distill.trainer import StepReport, TrainConfig
    from garden.distill.runs import resume_run, start_run

    logging.basicConfig(level=logging.WARNING, format="garden: %(message)s")
    given: dict[str, Any] = dict(
        steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
        schedule=schedule, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, max_length=max_length,
        lambda_or=lambda_or, lambda_kl=lambda_kl, adam_beta1=adam_beta1, adam_beta2=adam_beta2, seed=seed,
        max_threads=max_threads, freeze_embeddings=False if train_embeddings else None,
    )  # fmt: skip
    try:
        rows = read_preference_jsonl(data)
        if not rows:
            raise ValueError(f"{data} holds no rows; make some with `garden shake --out {data}`")
        if resume:
            trainer = resume_run(out, rows, given)
        else:
            if student is None:
                raise ValueError("--student is needed to start a run (e.g. 'prune:builtin:smollm2-135m:layers=10')")
            lora = None
            if lora_r or qlora:
                targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
                rank = lora_r or 16
                lora = LoraSpec(r=rank, alpha=lora_alpha or 2 * rank, target_modules=targets, quantize_4bit=qlora)
            config = TrainConfig(**{k: v for k, v in given.items() if v is not None})
            trainer = start_run(out, student, rows, config, lora, teacher or [], str(data))
    except (ValueError, OSError, CheckpointError, ModelRefError) as e:
        raise fail(str(e), EXIT_CONFIG) from None
    config = trainer.config
    report = trainer.data_report
    recorded = trainer.run.read_info()["student"] if trainer.run is not None and not resume else student
    if recorded != student:  # spacing=influence: the layers it chose on the rows, as the run records them
        console.print(f"student: {recorded}", markup=False)
    console.print(
        f"training {trainer.run.path if trainer.run else out}: {report.kept} rows"
        + (f" ({report.hard_labels} on hard labels: no usable teacher log-probs)" if report.hard_labels else "")
        + (f", {report.too_long} longer than {config.max_length} tokens left out" if report.too_long else "")
        + (f"; resuming at step {trainer.step}" if trainer.step else ""),
        markup=False,
    )
    columns = (
        TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[metrics]}"),
        TimeRemainingColumn(),
    )  # fmt: skip

    def show(metrics: dict[str, float]) -> str:
        return "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k in ("loss", "kl", "or_loss", "pref_acc"))

    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=config.steps, completed=trainer.step, metrics="")

        def on_step(step: StepReport) -> None:
            progress.update(task, completed=step.step, metrics=show(step.metrics))
            if step.skipped:
                progress.console.print(f"step {step.step}: loss not finite, skipped (weights unchanged)")

        try:
            result = trainer.train(on_step=on_step)
        except KeyboardInterrupt:
            progress.stop()
            raise fail(f"interrupted at step {trainer.step}; saved. Continue with: garden train --data {data} "
                        f"--out {out} --resume", 130) from None  # fmt: skip
    where = result.checkpoint.path if result.checkpoint else out
    console.print(
        f"done: {result.steps_done} steps in {result.seconds:.0f} s ({result.skipped_steps} skipped); "
        f"{show(result.metrics)}; checkpoint {where}",
        markup=False,
    )


@app.command("eval")
def eval_command(
    student: list[str] = typer.Option(
        ..., "--student",
        help="Student: a model reference, a training run directory, prune:<ref>:layers=N[:spacing=front] or "
        "prune:<ref>:layers=I,J,.... Repeat it to evaluate several students on the same rows in one process "
        "(the libraries and the teacher load once): --json and --out then give a list, one object per student in "
        "order, and a student that fails to load or to evaluate is reported there with its error (exit 2) while "
        "the others are evaluated.",
    ),  # fmt: skip
    teacher: str = typer.Option(
        "builtin:smollm2-135m", "--teacher", help="Teacher: computes the top-k for data without log-probs."
    ),
    data: str = typer.Option(
        "builtin:demo",
        "--data",
        help="Preference JSONL (garden rows with or without log-probs, or plain TRL prompt/chosen/rejected), "
        "prompts JSONL with references, or builtin:demo (its held-out split).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per forward pass."),
    max_length: int = typer.Option(512, "--max-length", help="Longest row in tokens; longer rows are skipped."),
    top_k: int = typer.Option(20, "--top-k", help="Teacher log-probs per token, when computed here."),
    as_json: bool = typer.Option(False, "--json", help="Print only the JSON object (a list of them for several)."),
    out: Path | None = typer.Option(None, "--out", help="Also write the JSON object (or list) to this file."),
) -> None:
    """Evaluate a student on held-out rows: KL to the teacher, NLL, preference accuracy, top-1 agreement."""
    import gc

    from garden.models.loading import load_model
    from garden.distill.evaluate import StudentEvaluator

    say = Console(stderr=True, quiet=as_json)  # progress on stderr: stdout holds only the table or the JSON
    if batch_size < 1 or max_length < 2 or not 1 <= top_k <= 256:
        bad = f"--batch-size {batch_size}, --max-length {max_length}, --top-k {top_k}"
        raise fail(f"need --batch-size >= 1, --max-length >= 2 and --top-k in 1..256 (got {bad})", EXIT_CONFIG)
    evaluated = StudentEvaluator(data, lambda: load_model(teacher), top_k, batch_size, max_length, teacher,
                                 say=lambda line: say.print(line, markup=False))  # fmt: skip

    results: list[dict[str, Any]] = []
    for ref in student:
        try:
            results.append(evaluated(ref))
        except (ValueError, OSError) as e:  # bad data file, model reference or settings; no rows to evaluate
            if len(student) == 1:
                raise fail(str(e), EXIT_CONFIG) from None
            results.append({"student": ref, "error": str(e)[:2000]})
        except Exception as e:  # noqa: BLE001 - one of several (another peer's checkpoint, say) stops no other
            if len(student) == 1:
                raise
            results.append({"student": ref, "error": f"{type(e).__name__}: {e}"[:2000]})
        gc.collect()  # one student's weights at a time
    text = json.dumps(results[0] if len(student) == 1 else results, indent=2, allow_nan=False)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n", encoding="utf-8")
        except OSError as e:
            raise fail(f"cannot write {out}: {e}", EXIT_CONFIG) from None
    if as_json:
        print(text)
    else:
        for result in results:
            _print_eval(result, max_length)
        if out is not None:
            console.print(f"written to {out}", markup=False)
    failed = [r for r in results if "error" in r]
    for result in failed:
        typer.echo(f"garden: {result['student']}: {result['error']}", err=True)
    if failed:
        raise typer.Exit(EXIT_CONFIG)


def _print_eval(result: dict[str, Any], max_length: int) -> None:
    """One student's report of ``garden eval`` as a table, with its notes (or its error, of several students)."""
    import math

    if "error" in result:
        return  # said on stderr
    report = SimpleNamespace(**result)

    def number(value: float | None, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    table = Table(title=f"{report.student} on {report.data}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("over")
    table.add_row("KL(teacher || student)", number(report.kl), f"{report.kl_tokens} tokens (nats/token)")
    table.add_row("top-1 agreement", number(report.top1, 3), f"{report.kl_tokens} tokens")
    table.add_row("NLL of chosen", number(report.nll), f"{report.tokens} tokens (nats/token)")
    table.add_row("perplexity", f"{math.exp(min(report.nll, 700.0)):.4g}", "exp(NLL)")
    table.add_row("preference accuracy", number(report.pref_acc, 3), f"{report.pairs} pairs (lp+ > lp-)")
    table.add_row("rows", str(report.rows), f"{report.hard_label_rows} on hard labels")
    if report.dropped_too_long:
        table.add_row("skipped", str(report.dropped_too_long), f"longer than {max_length} tokens")
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}", markup=False)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The user message."),
    model: str = typer.Option(
        "builtin:smollm2-135m", "--model",
        help="Model reference: builtin:NAME, hub id, directory, run, .gguf, or a swarm student mission:ID (pulled by "
        "the local peer on first use).",
    ),  # fmt: skip
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 decodes greedily (deterministic)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int | None = typer.Option(None, "--seed", help="Sampling seed, for a reproducible sample."),
    system: str | None = typer.Option(None, "--system", help="System message (default: the chat template's)."),
    swarm: str | None = typer.Option(
        None, "--swarm", metavar="MODEL",
        help="Generate with MODEL's layers on the swarm, through the local peer (garden run must be running).",
    ),  # fmt: skip
    url: str | None = typer.Option(
        None, "--url", help="With --swarm or a mission:ID model: a daemon's HTTP port (default: this machine's)."
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="With --swarm or a mission:ID model: find the daemon of this data dir."
    ),
) -> None:
    """Answer one prompt with a local model (or with --swarm, pipelined through the swarm's servers), printing
    the answer as it is generated."""
    import sys

    from garden.inference.generate import GenerateConfig, TextGeneration
    from garden.models.loading import load_model

    say = Console(stderr=True)  # stdout holds only the answer, for pipes
    if swarm is not None:
        from garden.cli.common import daemon_url
        from garden.cli.swarm_generate import stream_from_daemon

        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        body = {"model": swarm, "messages": messages, "max_tokens": max_new_tokens, "temperature": temperature,
                "top_p": top_p, "seed": seed}  # fmt: skip
        stream_from_daemon(daemon_url(url, data_dir, None), body, say)
        return
    from garden.cli.models import local_model

    source = local_model(model, url, data_dir)
    try:
        config = GenerateConfig(max_new_tokens, temperature, top_p, seed, system)
        say.print(f"loading {model} (the first load of a .gguf converts it once, ~15 s)", markup=False)
        generation = TextGeneration(load_model(source), prompt, config)
    except (ValueError, OSError) as e:  # bad model reference, settings, or a prompt too long for the model
        raise fail(str(e), EXIT_CONFIG) from None
    try:
        with generation:
            for piece in generation:
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        print(flush=True)
        raise fail("interrupted", 130) from None
    print(flush=True)
    result = generation.result
    say.print(
        f"{result.new_tokens} tokens in {result.seconds:.1f} s ({result.tokens_per_second:.1f} tokens/s, "
        f"prompt {result.prompt_tokens} tokens); {result.finish_reason}",
        markup=False,
    )
    kept = keep_answer(url, data_dir, {
        "model": model, "prompt": prompt, "system": system, "text": result.text, "max_tokens": max_new_tokens,
        "temperature": temperature, "top_p": top_p, "seed": seed,
    })  # fmt: skip
    if kept:
        say.print(f"rate it: garden feedback accept|redo|edit {kept}", markup=False, soft_wrap=True)


def keep_answer(url: str | None, data_dir: Path | None, answer: dict[str, Any]) -> str | None:
    """Have the local peer keep a locally generated answer for rating (``garden feedback``); its id, or None
    when no peer runs here (the answer was printed all the same)."""
    import httpx

    from garden.cli.common import auth_headers, daemon_url

    try:
        base = daemon_url(url, data_dir, None)
        response = httpx.post(f"{base}/feedback/answers", json=answer, headers=auth_headers(base), timeout=5)
    except (httpx.HTTPError, typer.Exit):
        return None
    return str(response.json()["id"]) if response.status_code == 201 else None


@app.command("export")
def export_command(
    model: str = typer.Argument(
        ..., metavar="MODEL",
        help="Model reference: builtin:NAME, hub id, directory, training run, pulled checkpoint, .gguf, "
        "prune:REF:layers=N, or a swarm student mission:ID (pulled by the local peer).",
    ),  # fmt: skip
    output: Path = typer.Option(..., "-o", "--output", help="The file (gguf) or directory (hf, peft) to write."),
    fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp, Ollama, LM Studio), hf (transformers) or "
                            "peft (a LoRA student's adapter)."),  # fmt: skip
    quant: str = typer.Option("f16", "--quant", help="With --format gguf: f32, f16, q8_0 or q4_0."),
    url: str | None = typer.Option(None, "--url", help="With a mission:ID model: the daemon's HTTP port."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="With a mission:ID model: its daemon's data dir."),
) -> None:
    """Export a model for the tools people already use: one GGUF file for llama.cpp and Ollama, a plain
    transformers directory, or a LoRA student's adapter. See docs/export.md."""
    from garden.cli.models import local_model
    from garden.models.export import ExportError, export_model

    say = Console(stderr=True)
    source = local_model(model, url, data_dir)
    say.print(f"exporting {model} as {fmt}{' ' + quant if fmt == 'gguf' else ''} ...", markup=False)
    try:
        done = export_model(source, output, fmt, quant)
    except ExportError as e:
        raise fail(str(e), EXIT_CONFIG) from None
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(done.tensor_types.items()))
    console.print(f"wrote {done.path} ({done.bytes / 2**20:.1f} MiB{'; tensors: ' + kinds if kinds else ''})",
                  markup=False, soft_wrap=True)  # fmt: skip
    if fmt == "gguf":
        console.print(f"try: llama-cli -m {done.path} -cnv   (or see docs/export.md for Ollama)", markup=False,
                      soft_wrap=True)  # fmt: skip

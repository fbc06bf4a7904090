"""The DORPO trainer on the real built-in teacher's rows: learning (a pruned student of the teacher), and, on a
tiny random student with the teacher's tokenizer (what they check does not depend on the student's size, and a
step costs a hundredth), checkpoints, exact resume, skipped non-finite steps, LoRA, and the refusals that keep a
run consistent."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from garden.data import demo_prompts
from garden.models.loading import load_model
from garden.protocol.rows import DorpoRow
from garden.models.chat import pad_id
from garden.distill.checkpoints import CheckpointError, RunDir
from garden.distill.collate import collate, dorpo_forward, encode_rows
from garden.distill.judges import ReferenceJudge
from garden.distill.shaker import ShakeConfig, shake
from garden.models.student import LoraSpec, build_student, parse_student_ref
from garden.distill.trainer import DorpoTrainer, TrainConfig
from garden.distill.runs import resume_run, start_run
from garden.distill.on_policy import StudentRejected, student_rejected
from harness.trainers import make_tiny_student

pytestmark = pytest.mark.heavy(22)  # seconds in `make check`: see tests/conftest.py

STUDENT = "prune:builtin:smollm2-135m:layers=2"  # the smallest student of the teacher: it learns in a few steps


@pytest.fixture(autouse=True)
def cache(model_cache: Path) -> Path:
    return model_cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> str:
    """A 2-layer random Llama of width 32 with the teacher's tokenizer, as a student reference (a directory)."""
    return str(make_tiny_student(tmp_path_factory.mktemp("tiny") / "student"))


@pytest.fixture(scope="module")
def rows(model_cache: Path) -> dict[str, list[DorpoRow]]:
    """Train rows from 8 capitals prompts, held-out rows from 4 others (same topic: what training can carry)."""
    teacher = load_model("builtin:smollm2-135m")
    capitals = [p for p in demo_prompts("train") if p.meta.get("topic") == "capitals"]
    heldout = [p for p in demo_prompts("heldout") if p.meta.get("topic") == "capitals"]
    config = ShakeConfig(candidates=2, max_new_tokens=12, batch_prompts=8, seed=3)
    judge = ReferenceJudge()
    return {
        "train": shake(teacher, capitals[:8], judge, config).rows,
        "heldout": shake(teacher, heldout[:4], judge, config).rows,
    }


def heldout_kl(model: torch.nn.Module, tokenizer: object, rows: list[DorpoRow]) -> float:
    encoded, _ = encode_rows(rows, tokenizer)
    model.eval()
    with torch.no_grad():
        out = dorpo_forward(model, collate(encoded, pad_id(tokenizer)), TrainConfig().loss_config())
    return out.kl


def small_config(**overrides: object) -> TrainConfig:
    settings: dict[str, object] = dict(steps=6, batch_size=4, warmup_steps=1, lr=1e-3, checkpoint_every=3)
    return TrainConfig(**{**settings, **overrides})  # type: ignore[arg-type]


def test_training_lowers_heldout_kl(rows: dict[str, list[DorpoRow]], tmp_path: Path) -> None:
    student = build_student(parse_student_ref(STUDENT))
    before = heldout_kl(student.model, student.tokenizer, rows["heldout"])
    # 8 steps take the held-out KL to about a twentieth (16 did no better): far below the bar
    trainer = DorpoTrainer(student, rows["train"], small_config(steps=8, checkpoint_every=100))
    reports = []
    result = trainer.train(on_step=reports.append)
    after = heldout_kl(student.model, student.tokenizer, rows["heldout"])
    assert result.steps_done == 8 and result.skipped_steps == 0 and len(reports) == 8
    assert all(math.isfinite(r.metrics["loss"]) and math.isfinite(r.grad_norm) for r in reports)
    assert reports[0].lr < reports[1].lr, "warm-up: the first step runs at a fraction of the peak rate"
    assert after < 0.7 * before, f"held-out KL {before:.3f} -> {after:.3f}"


def test_resume_continues_bit_exactly(rows: dict[str, list[DorpoRow]], tiny: str, tmp_path: Path) -> None:
    # 6 rows a step over 8: steps cross epochs; AdamW's betas other than torch's, as the run records them
    config = small_config(grad_accum=2, batch_size=3, adam_beta1=0.5, adam_beta2=0.95)
    straight = start_run(tmp_path / "straight", tiny, rows["train"], config)
    straight.train()

    interrupted = start_run(tmp_path / "resumed", tiny, rows["train"], config)
    interrupted.train(until=3)
    del interrupted
    resumed = resume_run(tmp_path / "resumed", rows["train"])
    assert resumed.step == 3 and resumed.config.adam_beta1 == 0.5
    assert straight.optimizer.param_groups[0]["betas"] == resumed.optimizer.param_groups[0]["betas"] == (0.5, 0.95)
    resumed.train()

    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), "resumed weights differ from an uninterrupted run"
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    straight_lines = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in straight_lines] == [line["loss"] for line in lines]


def test_an_influence_run_records_its_layers_and_resumes_without_choosing_again(
    rows: dict[str, list[DorpoRow]], tmp_path: Path
) -> None:
    """``spacing=influence`` is chosen once, on the run's rows; the run records the explicit list, so that
    ``--resume`` (and export) rebuild the same student without the data."""
    run = tmp_path / "run"
    trainer = start_run(run, "prune:builtin:smollm2-135m:layers=3:spacing=influence", rows["train"],
                        small_config(steps=2, checkpoint_every=1))  # fmt: skip
    recorded = json.loads((run / "garden-run.json").read_text())["student"]
    spec = parse_student_ref(recorded)
    assert spec.layers is not None and len(spec.layers) == 3 and spec.layers[0] == 0 and spec.layers[-1] == 29
    assert recorded == "prune:builtin:smollm2-135m:layers=" + ",".join(map(str, spec.layers))
    trainer.train(until=1)
    resumed = resume_run(run, rows["train"])
    assert resumed.step == 1 and len(resumed.model.model.layers) == 3
    a, b = dict(trainer.model.named_parameters()), dict(resumed.model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a), "another student was built"


def test_checkpoints_are_verified_kept_and_loadable(
    rows: dict[str, list[DorpoRow]], tiny: str, tmp_path: Path
) -> None:
    run_path = tmp_path / "run"
    trainer = start_run(run_path, tiny, rows["train"], small_config(keep_checkpoints=1, checkpoint_every=2))
    trainer.train()
    run = RunDir(run_path)
    checkpoint = run.latest()
    assert checkpoint is not None and checkpoint.step == 6
    assert sorted(p.name for p in (run_path / "checkpoints").iterdir()) == ["step-000006"]
    assert set(checkpoint.manifest["metrics"]) >= {"loss", "kl", "nll"}
    checkpoint.verify()

    # the run directory is a model reference: the latest checkpoint's weights, generating
    loaded = load_model(str(run_path))
    trained = dict(trainer.model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in loaded.model.named_parameters())
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")
    out = loaded.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3

    weights = checkpoint.model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.verify()
    with pytest.raises(CheckpointError, match="sha256"):
        resume_run(run_path, rows["train"])


def test_run_refusals(rows: dict[str, list[DorpoRow]], tiny: str, tmp_path: Path) -> None:
    run_path = tmp_path / "run"
    start_run(run_path, tiny, rows["train"], small_config(steps=2)).train()
    with pytest.raises(CheckpointError, match="already holds a training run"):
        start_run(run_path, tiny, rows["train"], small_config())
    with pytest.raises(CheckpointError, match="rows .* differ"):
        resume_run(run_path, rows["train"][:-1])
    with pytest.raises(CheckpointError, match=r"lr \(0.001 -> 0.01\)"):
        resume_run(run_path, rows["train"], {"lr": 1e-2})
    with pytest.raises(CheckpointError, match=r"adam_beta1 \(0.9 -> 0.5\)"):
        resume_run(run_path, rows["train"], {"adam_beta1": 0.5})
    with pytest.raises(CheckpointError, match="past --steps 1"):
        resume_run(run_path, rows["train"], {"steps": 1})
    longer = resume_run(run_path, rows["train"], {"steps": 3})  # training further is allowed
    assert longer.step == 2 and longer.train().steps_done == 3
    with pytest.raises(ValueError, match="no usable rows"):
        DorpoTrainer(build_student(parse_student_ref(tiny)), rows["train"], small_config(max_length=8))
    with pytest.raises(ValueError, match="invalid training settings: lr"):
        TrainConfig(lr=math.nan)


def test_a_nan_loss_step_is_skipped_not_applied(
    rows: dict[str, list[DorpoRow]], tiny: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A real fault injected into a real model: the head's output turns NaN during step 2 only."""
    student = build_student(parse_student_ref(tiny))
    trainer = DorpoTrainer(student, rows["train"], small_config(steps=3))
    trainer.train_step()
    poisoned = {"on": True}

    def poison(_module: object, _inputs: object, output: torch.Tensor) -> torch.Tensor | None:
        return torch.full_like(output, math.nan) if poisoned["on"] else None

    hook = student.model.lm_head.register_forward_hook(poison)
    before = {n: p.detach().clone() for n, p in student.model.named_parameters()}
    moments = {k: v["exp_avg"].clone() for k, v in trainer.optimizer.state.items()}
    with caplog.at_level(logging.WARNING, logger="garden.distill.trainer"):
        report = trainer.train_step()
    assert report.skipped and math.isnan(report.metrics["loss"]) and trainer.skipped_steps == 1
    assert "step 2: loss or gradient is not finite" in caplog.text
    assert all(torch.equal(p, before[n]) for n, p in student.model.named_parameters()), "a NaN step was applied"
    assert all(torch.equal(v["exp_avg"], moments[k]) for k, v in trainer.optimizer.state.items())
    poisoned["on"] = False
    hook.remove()
    report = trainer.train_step()
    assert not report.skipped and trainer.step == 3
    assert any(not torch.equal(p, before[n]) for n, p in student.model.named_parameters())


def test_lora_run_trains_the_adapter_and_resumes_exactly(
    rows: dict[str, list[DorpoRow]], tiny: str, tmp_path: Path
) -> None:
    lora = LoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    config = small_config(steps=4, checkpoint_every=2)
    straight = start_run(tmp_path / "a", tiny, rows["train"], config, lora)
    base = {n: p.detach().clone() for n, p in straight.model.named_parameters() if "lora_" not in n}
    straight.train()
    assert all(torch.equal(p, base[n]) for n, p in straight.model.named_parameters() if "lora_" not in n)
    assert (tmp_path / "a" / "checkpoints" / "step-000004" / "adapter" / "adapter_model.safetensors").is_file()

    first = start_run(tmp_path / "b", tiny, rows["train"], config, lora)
    first.train(until=2)
    resumed = resume_run(tmp_path / "b", rows["train"])
    resumed.train()
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a)
    merged = load_model(str(tmp_path / "b"))  # the merged model loads as a plain transformers model
    assert not hasattr(merged.model, "peft_config")


def test_embeddings_are_kept_by_default_and_a_run_from_before_the_setting_trains_them(
    rows: dict[str, list[DorpoRow]], tiny: str, tmp_path: Path
) -> None:
    def embeddings_and_layers(trainer: DorpoTrainer) -> tuple[torch.Tensor, torch.Tensor]:
        model = trainer.model
        layer = model.model.layers[0].mlp.up_proj.weight
        return model.get_input_embeddings().weight.detach().clone(), layer.detach().clone()

    kept = start_run(tmp_path / "kept", tiny, rows["train"], small_config(steps=2))
    embeddings, layer = embeddings_and_layers(kept)
    assert kept.config.freeze_embeddings and all(p.requires_grad for p in kept.model.model.layers.parameters())
    kept.train()
    assert torch.equal(kept.model.get_input_embeddings().weight, embeddings)  # the head is the same matrix (tied)
    assert not torch.equal(kept.model.model.layers[0].mlp.up_proj.weight, layer)

    config = small_config(steps=3, checkpoint_every=1, freeze_embeddings=False)
    trained = start_run(tmp_path / "trained", tiny, rows["train"], config)
    embeddings, _ = embeddings_and_layers(trained)
    trained.train(until=2)  # past the warm-up's first step
    assert not torch.equal(trained.model.get_input_embeddings().weight, embeddings)

    # a run whose manifest was written before the setting existed trained its embeddings: its resume goes on so
    manifest = RunDir(tmp_path / "trained").manifest_path
    info = json.loads(manifest.read_text())
    del info["config"]["freeze_embeddings"]
    manifest.write_text(json.dumps(info))
    resumed = resume_run(tmp_path / "trained", rows["train"])
    assert resumed.config.freeze_embeddings is False and resumed.step == 2
    assert resumed.model.get_input_embeddings().weight.requires_grad
    resumed.train()
    assert resumed.step == 3


def test_the_students_own_answers_become_the_rejected_ones_from_the_next_step(
    rows: dict[str, list[DorpoRow]], tiny: str
) -> None:
    """ORPO-Distill's negatives (``garden.distill.on_policy``): the student's samples replace the rejected answers
    of the share of rows asked for, the rest of each row (the chosen answer, the teacher's top-k) kept, and a
    trainer takes the new rows in the same places of its data order."""
    train = rows["train"]
    student = build_student(parse_student_ref(tiny))
    every = student_rejected(student, train, StudentRejected(max_new_tokens=6, seed=1))
    assert every.replaced == len(train) and every.kept == 0  # a random student never says the teacher's answer
    for old, new in zip(train, every.rows, strict=True):
        assert new.rejected and new.rejected != old.rejected and new.row_id != old.row_id
        assert (new.prompt, new.chosen, new.topk_logprobs) == (old.prompt, old.chosen, old.topk_logprobs)
    again = student_rejected(student, train, StudentRejected(max_new_tokens=6, seed=1))
    assert [r.rejected for r in again.rows] == [r.rejected for r in every.rows]  # a seed, the same answers

    half = student_rejected(student, train, StudentRejected(share=0.5, max_new_tokens=6, seed=2))
    changed = [new.row_id != old.row_id for old, new in zip(train, half.rows, strict=True)]
    assert 0 < sum(changed) < len(train) and sum(changed) == half.replaced, changed

    trainer = DorpoTrainer(student, train, small_config(steps=4, checkpoint_every=100))
    trainer.train(until=2)
    trainer.replace_rows(every.rows)
    assert all(row.rejected_ids is not None for row in trainer.encoded)
    with pytest.raises(ValueError, match="data order"):
        trainer.replace_rows(every.rows[:-1])
    result = trainer.train()
    assert result.steps_done == 4 and result.skipped_steps == 0
    assert math.isfinite(result.metrics["or_loss"]), result.metrics  # every row of the last steps had a pair
    with pytest.raises(ValueError, match="share"):
        StudentRejected(share=1.5)

"""The four pipeline commands in a row, in process (typer's runner), on the real built-in model: shake, train
(then resume further), eval the run directory, and generate with it. Plus `garden train`'s refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from garden.cli import app

pytestmark = pytest.mark.heavy(5)  # seconds in `make check`: see tests/conftest.py

TEACHER = "builtin:smollm2-135m"
STUDENT = "prune:builtin:smollm2-135m:layers=3:spacing=influence"  # 3 layers: 0, the one the rows choose, 29


@pytest.fixture(autouse=True)
def cache(model_cache: Path) -> Path:
    return model_cache


def garden(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    tmp = tmp_path_factory.mktemp("train-cli")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "What is the capital of France?", "reference": "The capital of France is Paris."}\n'
        '{"prompt": "What is the capital of Peru?", "reference": "The capital of Peru is Lima."}\n'
        '{"prompt": "What is 3 + 4?", "reference": "3 + 4 = 7."}\n'
    )
    out = tmp / "rows.jsonl"
    code, stdout, stderr = garden(
        "shake", "--teacher", TEACHER, "--prompts", str(prompts), "--out", str(out),
        "--candidates", "2", "--max-new-tokens", "10", "--no-store",
    )  # fmt: skip
    assert code == 0, stderr
    return out


@pytest.mark.slow
def test_shake_train_resume_eval_generate(rows_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "capitals"
    code, stdout, stderr = garden(
        "train", "--teacher", TEACHER, "--student", STUDENT, "--data", str(rows_file), "--steps", "2",
        "--batch-size", "2", "--checkpoint-every", "1", "--out", str(run), "--max-threads", "2",
    )  # fmt: skip
    assert code == 0, stderr
    assert "done: 2 steps" in stdout and "training" in stdout
    info = json.loads((run / "garden-run.json").read_text())
    # the run records the layers spacing=influence chose on the rows, and says which
    assert re.fullmatch(r"prune:builtin:smollm2-135m:layers=0,\d+,29", info["student"]), info["student"]
    assert f"student: {info['student']}" in stdout, stdout
    assert info["latest"] == "step-000002" and info["teachers"] == [TEACHER]
    assert info["data"]["rows"] == 3

    code, stdout, stderr = garden("train", "--data", str(rows_file), "--out", str(run), "--resume", "--steps", "3")
    assert code == 0, stderr
    assert "resuming at step 2" in stdout and "done: 3 steps" in stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

    code, stdout, stderr = garden("eval", "--student", str(run), "--data", str(rows_file), "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["rows"] == 3 and report["kl"] > 0 and 0 <= report["top1"] <= 1

    code, stdout, stderr = garden("generate", "--model", str(run), "--max-new-tokens", "4", "Capital of Peru?")
    assert code == 0, stderr
    assert stdout.strip()


def test_train_refusals(rows_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, _, stderr = garden("train", "--data", str(rows_file), "--out", str(run))
    assert code == 2 and "--student is needed" in stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text(rows_file.read_text().splitlines()[0] + "\n{broken\n")
    code, _, stderr = garden("train", "--student", STUDENT, "--data", str(bad), "--out", str(run))
    assert code == 2 and f"{bad}:2:" in stderr and "Traceback" not in stderr
    assert not run.exists(), "nothing is written for bad data"

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, stderr = garden("train", "--student", STUDENT, "--data", str(empty), "--out", str(run))
    assert code == 2 and "no rows" in stderr

    code, _, stderr = garden("train", "--student", "nope:thing", "--data", str(rows_file), "--out", str(run))
    assert code == 2 and "unknown model reference scheme" in stderr

    code, _, stderr = garden("train", "--student", STUDENT, "--data", str(rows_file), "--out", str(run), "--lr", "-1")
    assert code == 2 and "invalid training settings: lr" in stderr

    code, _, stderr = garden("train", "--data", str(rows_file), "--out", str(tmp_path / "none"), "--resume")
    assert code == 2 and "not a training run" in stderr

    args = ("--student", STUDENT, "--data", str(rows_file), "--out", str(run), "--steps", "1", "--batch-size", "2")
    assert garden("train", *args)[0] == 0
    code, _, stderr = garden("train", *args)
    assert code == 2 and "already holds a training run" in stderr
    code, _, stderr = garden("train", "--data", str(rows_file), "--out", str(run), "--resume", "--lr", "0.5")
    assert code == 2 and "these differ: lr" in stderr

"""`garden shake` with repeatable --teacher and the local store, on the real built-in teacher (in process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from garden.cli import app
from garden.daemon.datadir import DataDir, DataDirLock
from garden.protocol.rows import read_preference_jsonl
from garden.store import Store

BUILTIN = "builtin:smollm2-135m"
SMALL = ["--candidates", "1", "--max-new-tokens", "8", "--seed", "5"]


@pytest.fixture(autouse=True)
def cache(model_cache: Path) -> Path:
    return model_cache


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "What is the capital of France?", "reference": "The capital of France is Paris."}\n'
        '{"prompt": "What is 2 + 2?", "reference": "2 + 2 = 4."}\n'
    )
    return path


def shake(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["shake", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.slow
def test_falls_back_past_a_missing_teacher_and_stores_rows_once(tmp_path: Path, prompts: Path) -> None:
    data_dir = tmp_path / "data"
    teachers = ["--teacher", str(tmp_path / "missing.gguf"), "--teacher", BUILTIN]
    first_out = tmp_path / "first.jsonl"
    code, stdout, _ = shake(
        *teachers, "--prompts", str(prompts), "--out", str(first_out), *SMALL, "--data-dir", str(data_dir), "--no-store"
    )
    assert code == 0, stdout
    assert f"teacher {tmp_path / 'missing.gguf'}: skipped: cannot load: GGUF file" in stdout
    assert f"teacher {BUILTIN}: 2 rows from 2 prompts, 0 passed on" in stdout
    assert not DataDir(data_dir).store.exists()  # --no-store: the store is not even created
    rows = read_preference_jsonl(first_out)
    assert [r.teacher for r in rows] == [BUILTIN, BUILTIN]

    # a running daemon holds the data dir's lock and its own store connection: shake stores beside it
    daemon_lock = DataDirLock(DataDir(data_dir))
    daemon_lock.acquire()
    daemon_store = Store(DataDir(data_dir).store)
    try:
        assert daemon_store.add_rows(rows[:1]) == 1
        out = tmp_path / "again.jsonl"
        code, stdout, _ = shake(
            *teachers, "--prompts", str(prompts), "--out", str(out), *SMALL, "--data-dir", str(data_dir)
        )
        assert code == 0, stdout
        assert f"stored in {DataDir(data_dir).store}: 1 new rows, 1 already there" in stdout
        assert out.read_text() == first_out.read_text()  # same seed, same teacher: the same rows
        assert sorted(r.row_id for r in daemon_store.get_rows()) == sorted(r.row_id for r in rows)
    finally:
        daemon_store.close()
        daemon_lock.release()


def test_teacher_judge_is_built_for_the_teacher_that_answers(tmp_path: Path, prompts: Path) -> None:
    one = tmp_path / "one.jsonl"
    one.write_text(prompts.read_text().splitlines()[1] + "\n")
    out = tmp_path / "rows.jsonl"
    code, stdout, _ = shake(
        "--teacher",
        "builtin:nope",
        "--teacher",
        BUILTIN,
        "--judge",
        "teacher",
        "--prompts",
        str(one),
        "--out",
        str(out),
        "--candidates",
        "2",
        "--max-new-tokens",
        "8",
        "--no-store",
    )
    assert code == 0, stdout
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["judge"] == "teacher" and row["teacher"] == BUILTIN


def test_no_usable_teacher_is_a_clear_error(tmp_path: Path, prompts: Path) -> None:
    out = tmp_path / "rows.jsonl"
    code, _, stderr = shake(
        "--teacher",
        "builtin:nope",
        "--teacher",
        str(tmp_path / "x.gguf"),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--data-dir",
        str(tmp_path / "d"),
    )
    assert code == 2 and "no teacher could be used: builtin:nope: cannot load: unknown built-in model" in stderr
    assert "x.gguf: cannot load: GGUF file" in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_an_unreadable_store_fails_before_any_model_loads(tmp_path: Path, prompts: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    DataDir(data_dir).store.write_bytes(b"not a database, but 100 bytes of something else entirely" * 2)
    out = tmp_path / "rows.jsonl"
    code, stdout, stderr = shake(
        "--teacher", "builtin:nope", "--prompts", str(prompts), "--out", str(out), "--data-dir", str(data_dir)
    )
    assert code == 2 and "cannot open the local store" in stderr and "--no-store" in stderr
    assert "loading" not in stdout and not out.exists()

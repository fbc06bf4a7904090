"""`garden eval` in process (typer's runner), on tiny data files, with the built-in model as teacher and student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from garden.cli import app
from garden.data import demo_prompts
from garden.models.loading import load_model
from garden.protocol.rows import write_preference_jsonl
from garden.distill.evaluate import rows_from_prompts

MODEL = "builtin:smollm2-135m"
FIELDS = {
    "student", "teacher", "data", "data_kind", "topk_filled_rows", "rows", "tokens", "kl", "kl_tokens", "nll",
    "pref_acc", "pairs", "top1", "hard_label_rows", "dropped_too_long", "notes",
}  # fmt: skip


@pytest.fixture(autouse=True)
def cache(model_cache: Path) -> Path:
    return model_cache


@pytest.fixture(scope="module")
def rows_file(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two garden rows with the teacher's log-probs (the demo references as chosen answers)."""
    path = tmp_path_factory.mktemp("eval") / "heldout.jsonl"
    write_preference_jsonl(rows_from_prompts(load_model(MODEL), demo_prompts("heldout")[:2]), path)
    return path


def garden_eval(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["eval", "--student", MODEL, *args])
    return result.exit_code, result.stdout, result.stderr


def test_prints_a_table_with_notes(rows_file: Path) -> None:
    code, out, err = garden_eval("--data", str(rows_file))
    assert code == 0, err
    for label in ("KL(teacher || student)", "top-1 agreement", "NLL of chosen", "preference accuracy"):
        assert label in out
    assert "note: no row has a rejected answer" in out
    assert "loading the student" in err  # progress goes to stderr, never into the table


def test_json_is_parseable_has_every_field_and_goes_to_out(rows_file: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "report" / "eval.json"
    code, out, err = garden_eval("--data", str(rows_file), "--json", "--out", str(out_file), "--batch-size", "1")
    assert code == 0, err
    report = json.loads(out)
    assert set(report) == FIELDS
    assert report["data_kind"] == "rows" and report["rows"] == 2 and report["topk_filled_rows"] == 0
    assert report["kl"] < 1e-3 and report["top1"] == 1.0  # the teacher is its own student
    assert report["pref_acc"] is None and report["pairs"] == 0
    assert json.loads(out_file.read_text()) == report
    assert err == ""  # --json is quiet


def test_plain_trl_pairs_get_the_teachers_top_k(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    lines = [
        {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Berlin.", "source": "x"},
        {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": ""},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, out, err = garden_eval("--data", str(path), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["data_kind"] == "pairs" and report["topk_filled_rows"] == 2 and report["pairs"] == 1
    assert report["kl"] < 1e-3 and report["top1"] == 1.0 and report["pref_acc"] in (0.0, 1.0)


def test_a_prompts_file_uses_its_references(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "What is 4 + 4?", "reference": "4 + 4 = 8."}) + "\n")
    code, out, err = garden_eval("--data", str(path), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["data_kind"] == "prompts" and report["rows"] == 1 and report["pref_acc"] is None


def test_a_malformed_line_is_refused_with_its_line_number(rows_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text(rows_file.read_text().splitlines()[0] + "\n{not json\n")
    code, _, err = garden_eval("--data", str(path))
    assert code == 2 and f"{path}:2: not JSON" in err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Hi?", "chosen": "Hello."}\n\n{"prompt": "Bye?", "chosen": ["a", "b"]}\n')
    code, _, err = garden_eval("--data", str(pairs))
    assert code == 2 and f"{pairs}:3: chosen must be a non-empty string" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{empty}"], "is empty"),
        (["--data", "{missing}"], "does not exist"),
        (["--data", "{unknown}"], "neither a preference row"),
        (["--batch-size", "0"], "--batch-size >= 1"),
    ],
)
def test_bad_input_exits_2_with_the_reason(tmp_path: Path, args: list[str], message: str) -> None:
    files = {"empty": tmp_path / "empty.jsonl", "missing": tmp_path / "missing.jsonl", "unknown": tmp_path / "u.jsonl"}
    files["empty"].write_text("\n")
    files["unknown"].write_text('{"question": "?"}\n')
    code, _, err = garden_eval(*[a.format(**files) for a in args])
    assert code == 2 and message in err


def test_a_bad_student_reference_exits_2() -> None:
    result = CliRunner().invoke(app, ["eval", "--student", "nope:thing"])
    assert result.exit_code == 2 and "unknown model reference scheme 'nope'" in result.stderr


def test_several_students_are_evaluated_in_one_process_and_a_broken_one_stops_no_other(
    rows_file: Path, tmp_path: Path
) -> None:
    """What the lead's vouching runs for the checkpoints of an epoch: another peer's files may be anything, so a
    student that cannot load is reported in its place, and the ones after it are evaluated all the same."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": "wide"}')
    out_file = tmp_path / "several.json"
    code, single, err = garden_eval("--data", str(rows_file), "--json")
    assert code == 0, err
    code, out, err = garden_eval("--student", str(broken), "--student", str(tmp_path / "missing"), "--student", MODEL,
                                 "--data", str(rows_file), "--json", "--out", str(out_file))  # fmt: skip
    assert code == 2
    reports = json.loads(out)
    assert [r["student"] for r in reports] == [MODEL, str(broken), str(tmp_path / "missing"), MODEL]
    assert reports[0] == reports[3] == json.loads(single)  # the same figures as a process of its own
    assert set(reports[1]) == set(reports[2]) == {"student", "error"} and reports[1]["error"]
    assert "hidden_size" in reports[1]["error"] and "is not a model directory" in reports[2]["error"]
    assert json.loads(out_file.read_text()) == reports
    assert f"garden: {broken}: " in err  # each failure is said on stderr too

"""``garden mission create``'s words before any daemon is asked: which rated prompts an owner lets leave, and
the one mission file (a FILTER only with ``--from-feedback``); ``garden mission layers``, which asks none."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from garden.cli import app
from garden.cli.mission import pick


def test_the_owner_picks_which_prompts_leave() -> None:
    assert pick("all", 3) == pick("y", 3) == pick(" YES ", 3) == [0, 1, 2]
    assert pick("none", 3) == pick("n", 3) == pick("", 3) == []
    assert pick("3,1", 4) == [0, 2] and pick("2-4", 4) == [1, 2, 3] and pick("1, 2-3, 2", 5) == [0, 1, 2]
    wrongs = {"0": "numbered 1 to 3", "2-4": "numbered 1 to 3", "3-2": "numbered 1 to 3",
              "two": "not a prompt number", "1-": "not a prompt number", "-1": "not a prompt number"}  # fmt: skip
    for wrong, said in wrongs.items():
        with pytest.raises(ValueError, match=said):
            pick(wrong, 3)


def test_a_filter_comes_only_with_from_feedback() -> None:
    runner = CliRunner()
    two = runner.invoke(app, ["mission", "create", "all", "spec.toml", "--url", "http://127.0.0.1:9"])
    assert two.exit_code == 2 and "a FILTER comes only with --from-feedback" in two.output, two.output
    three = runner.invoke(app, ["mission", "create", "--from-feedback", "all", "a.toml", "b.toml"])
    assert three.exit_code == 2 and "one mission file" in three.output, three.output
    none = runner.invoke(app, ["mission", "create"])
    assert none.exit_code == 2 and "Missing argument" in none.output, none.output


@pytest.mark.slow
def test_mission_layers_lists_the_students_layers_to_sign_from_the_missions_prompts(
    tmp_path: Path, model_cache: Path
) -> None:
    """``garden mission layers``: measured once by the lead on the mission's prompts (its answers do not exist
    yet), printed as the ``[student] layers`` line, which loads back as a mission whose trainers build them."""
    from garden.data import DEMO_PROMPTS, demo_prompts
    from garden.models.student import section_reference
    from garden.protocol.mission import load_mission_toml

    head = 'name = "layers"\nteachers = ["builtin:smollm2-135m"]\nprompts = "builtin:demo"\n[student]\n'
    (tmp_path / "m.toml").write_text(head + 'base = "builtin:smollm2-135m"\n')
    out = CliRunner().invoke(app, ["mission", "layers", str(tmp_path / "m.toml"), "--keep", "10"])
    assert out.exit_code == 0, out.output
    line = next(line for line in out.output.splitlines() if line.startswith("layers = ["))
    # the demo prompts alone choose what the demo rows (prompts and answers) chose in benchmarks/dorpo_distill.py,
    # and what the demo's mission signs
    from garden.demo import STUDENT_LAYERS

    assert line == "layers = [0, 1, 11, 20, 22, 23, 24, 27, 28, 29]" == f"layers = {list(STUDENT_LAYERS)}", out.output
    (tmp_path / "m.toml").write_text(head + 'base = "builtin:smollm2-135m"\n' + line + "\n")
    spec = load_mission_toml(tmp_path / "m.toml", {DEMO_PROMPTS: demo_prompts}).spec
    assert section_reference(spec.student) == "prune:builtin:smollm2-135m:layers=0,1,11,20,22,23,24,27,28,29"

    too_many = CliRunner().invoke(app, ["mission", "layers", str(tmp_path / "m.toml"), "--keep", "31"])
    assert too_many.exit_code != 0 and "cannot keep 31 of 30 layers" in too_many.output, too_many.output
    missing = CliRunner().invoke(app, ["mission", "layers", str(tmp_path / "nope.toml"), "--keep", "4"])
    assert missing.exit_code != 0 and "nope.toml" in missing.output, missing.output

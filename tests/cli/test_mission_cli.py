"""``garden mission create``'s words before any daemon is asked: which rated prompts an owner lets leave, and
the one mission file (a FILTER only with ``--from-feedback``)."""

from __future__ import annotations

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

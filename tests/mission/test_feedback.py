"""The owner's verdicts become pairs (garden.mission.feedback) on a real store: accept, redo chains, edits;
the export loads with ``datasets``; bad verdicts are refused; nothing but what was rated counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from garden.errors import Conflict, NotFound
from garden.mission.feedback import Feedback
from garden.store import MAX_UNRATED_ANSWERS, Store
from harness.pairs import load_with_datasets


@pytest.fixture
def feedback(tmp_path: Path) -> Feedback:
    return Feedback(Store(tmp_path / "garden.sqlite3"))


def chat(feedback: Feedback, prompt: str, text: str, redo_of: str | None = None, model: str = "m") -> str:
    request = {"model": model, "messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": prompt}], "temperature": 0}  # fmt: skip
    return feedback.keep(model, "chat", request, text, redo_of=redo_of).answer_id


def test_verdicts_become_pairs(feedback: Feedback, tmp_path: Path) -> None:
    accepted = chat(feedback, "Capital of France?", "Paris.")
    first = chat(feedback, "Name a colour.", "Banana.")
    second = chat(feedback, "Name a colour.", "Bread.", redo_of=first)
    third = chat(feedback, "Name a colour.", "Blue.", redo_of=second)
    edited = chat(feedback, "Say hi.", "Goodbye.")
    chat(feedback, "Unrated?", "Yes.")
    feedback.rate(accepted, "accept")
    feedback.rate(first, "redo")
    feedback.rate(second, "redo")
    feedback.rate(third, "accept")
    feedback.rate(edited, "edit", "Hi!")
    pairs = {(p.prompt, p.chosen, p.rejected) for p in feedback.pairs()}
    # the accepted redo is chosen over each answer it replaced; the edit over the model's answer
    assert pairs == {("Name a colour.", "Blue.", "Bread."), ("Name a colour.", "Blue.", "Banana."),
                     ("Say hi.", "Hi!", "Goodbye.")}  # fmt: skip
    assert all(p.system == "Be brief." and p.model == "m" for p in feedback.pairs())
    with_examples = {(p.prompt, p.chosen, p.rejected) for p in feedback.pairs(examples=True)}
    assert ("Capital of France?", "Paris.", None) in with_examples and len(with_examples) == 4
    prompts = {r.prompt: r.reference for r in feedback.prompts()}
    assert prompts == {"Capital of France?": "Paris.", "Name a colour.": "Blue.", "Say hi.": "Hi!"}
    assert feedback.pairs(model="other") == []

    # the export TRL reads, through datasets
    out = tmp_path / "pairs.jsonl"
    out.write_text("".join(json.dumps(p.to_json()) + "\n" for p in feedback.pairs()))
    columns, loaded = load_with_datasets(out)
    assert len(loaded) == 3 and {"prompt", "chosen", "rejected"} <= set(columns)
    assert sorted(r["chosen"] for r in loaded) == ["Blue.", "Blue.", "Hi!"]

    # a later verdict replaces the earlier one; clearing forgets everything
    feedback.rate(edited, "accept")
    assert ("Say hi.", "Hi!", "Goodbye.") not in {(p.prompt, p.chosen, p.rejected) for p in feedback.pairs()}
    assert feedback.clear() == 6 and feedback.pairs(examples=True) == []


def test_bad_verdicts_are_refused(feedback: Feedback) -> None:
    answer = chat(feedback, "Q?", "A.")
    with pytest.raises(NotFound, match="no answer"):
        feedback.rate("chatcmpl-nope", "accept")
    with pytest.raises(Conflict, match="needs the text"):
        feedback.rate(answer, "edit", "   ")
    with pytest.raises(Conflict, match="edit only"):
        feedback.rate(answer, "accept", "text")
    with pytest.raises(Conflict, match="one of"):
        feedback.rate(answer, "maybe")
    with pytest.raises(Conflict, match="at most"):
        feedback.rate(answer, "edit", "x" * 40_000)
    assert feedback.get(answer).verdict is None


def test_unrated_answers_are_bounded_rated_ones_kept(feedback: Feedback, monkeypatch: pytest.MonkeyPatch) -> None:
    import garden.store

    monkeypatch.setattr(garden.store, "MAX_UNRATED_ANSWERS", 3)
    rated = chat(feedback, "keep me", "kept")
    feedback.rate(rated, "accept")
    ids = [chat(feedback, f"q{i}", f"a{i}") for i in range(6)]
    kept = {a.answer_id for a in feedback.store.answers(limit=100)}
    assert kept == {rated, *ids[-3:]} and MAX_UNRATED_ANSWERS == 2000

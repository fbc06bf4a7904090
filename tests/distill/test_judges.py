"""Judges: crafted candidates with known right answers, and the teacher judge on the real
built-in model."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from garden.models.loading import LoadedModel, load_model
from garden.protocol.mission_spec import RegexJudgeSection, ReferenceJudgeSection
from garden.protocol.rows import PromptRow
from garden.distill.judge_sandbox import IsolatedJudge
from garden.distill.judges import (
    JUDGES,
    RATING_PREFIX,
    RATING_PROMPT,
    RATING_TOKENS,
    Judge,
    Judgement,
    JsonSchemaJudge,
    ReferenceJudge,
    RegexJudge,
    TeacherJudge,
    build_judge,
    make_judge,
    normalize_tokens,
    parse_json_answer,
    rouge_l,
    token_f1,
)

pytestmark = pytest.mark.heavy(3)  # seconds in `make check`: see tests/conftest.py

CAPITAL = PromptRow(prompt="What is the capital of France?", reference="The capital of France is Paris.")


# --- reference ------------------------------------------------------------------------------------------


def test_f1_normalisation() -> None:
    assert normalize_tokens("The Paris.") == ["paris"]
    assert normalize_tokens("An «apple», a pear; THE end!") == ["apple", "pear", "end"]
    assert token_f1("The Paris.", "paris") == 1.0
    assert token_f1("Paris!", "the  PARIS") == 1.0
    assert token_f1("theatre", "the atre") == 0.0  # articles only as whole words
    # bag of tokens with multiplicity: "paris paris" vs "paris" -> P = 1/2, R = 1, F1 = 2/3
    assert token_f1("paris paris", "paris") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("the", "paris") == 0.0 and token_f1("paris", "") == 0.0


def test_rouge_l_hand_computed() -> None:
    # reference tokens [cat, sat, on, mat]; candidate [mat, on, cat, sat]: same bag (F1 = 1) but the
    # longest common subsequence is "cat sat" (2): P = 2/4, R = 2/4, F = 0.5
    assert rouge_l("mat on the cat sat", "The cat sat on the mat.") == pytest.approx(0.5)
    assert token_f1("mat on the cat sat", "The cat sat on the mat.") == pytest.approx(1.0)
    # [cat, on, mat] vs [cat, sat, on, mat]: LCS 3, P = 1, R = 3/4, F = 2 * 3/4 / (7/4) = 6/7
    assert rouge_l("cat on mat", "the cat sat on the mat") == pytest.approx(6 / 7)
    # [x, y, z, w] vs [y, b, w, z]: LCS 2 ("y z" or "y w"), F = 0.5; with "a" for "b" the article is
    # dropped: [y, w, z], P = 2/4, R = 2/3, F = 4/7
    assert rouge_l("x y z w", "y b w z") == pytest.approx(0.5)
    assert rouge_l("x y z w", "y a w z") == pytest.approx(4 / 7)


def test_reference_best_above_threshold_is_chosen_worst_rejected() -> None:
    candidates = ["Bananas.", "Paris is the capital of France.", "I think it is Paris."]
    got = ReferenceJudge(threshold=0.5).judge(CAPITAL, candidates)
    assert got.chosen == "Paris is the capital of France."
    assert got.rejected == "Bananas."
    assert not got.reference_used
    assert got.candidate_scores[0] == 0.0 and got.candidate_scores[1] == 1.0  # same bag of words
    assert 0 < got.candidate_scores[2] < 1
    assert got.scores == {"chosen": 1.0, "rejected": 0.0}


def test_reference_all_below_threshold_falls_back_to_reference() -> None:
    # F1 vs reference [capital, of, france, is, paris]: P = 1/2, R = 1/5, F1 = 2/7; and 0
    candidates = ["Maybe Paris.", "Bananas."]
    got = ReferenceJudge(threshold=0.5).judge(CAPITAL, candidates)
    assert got.chosen == CAPITAL.reference and got.reference_used
    assert got.rejected == "Bananas."
    assert got.candidate_scores == pytest.approx((2 / 7, 0.0))
    assert got.scores == {"chosen": 1.0, "rejected": 0.0}
    # a lower threshold lets the sampled answer win instead
    low = ReferenceJudge(threshold=0.25).judge(CAPITAL, candidates)
    assert low.chosen == "Maybe Paris." and not low.reference_used and low.rejected == "Bananas."


def test_reference_rouge_metric_changes_the_ranking() -> None:
    prompt = PromptRow(prompt="Order?", reference="one two three four")
    candidates = ["four three two one", "one two three"]
    f1 = ReferenceJudge(metric="f1").judge(prompt, candidates)
    rouge = ReferenceJudge(metric="rougeL").judge(prompt, candidates)
    assert f1.chosen == "four three two one"  # F1 1.0 vs 6/7
    assert rouge.chosen == "one two three"  # ROUGE-L 6/7 vs 1/4
    assert rouge.candidate_scores == pytest.approx((0.25, 6 / 7))


def test_reference_no_pair_from_equals() -> None:
    judge = ReferenceJudge(threshold=0.3)  # "Paris." scores F1 1/3, "France: Paris." 4/7
    same = judge.judge(CAPITAL, ["Paris.", "Paris."])
    assert same.chosen == "Paris." and same.rejected is None and "rejected" not in same.scores
    tied = judge.judge(CAPITAL, ["France: Paris.", "Paris, France."])  # same score, other text
    assert tied.chosen == "France: Paris." and tied.rejected is None
    # a sampled answer equal to the reference is chosen, never paired against itself
    exact = ReferenceJudge(threshold=1.0).judge(CAPITAL, [CAPITAL.reference or ""])
    assert exact.chosen == CAPITAL.reference and exact.rejected is None and not exact.reference_used


def test_reference_empty_candidates_and_missing_reference() -> None:
    got = ReferenceJudge().judge(CAPITAL, [])
    assert got == Judgement(CAPITAL.reference, None, {"chosen": 1.0}, (), reference_used=True)
    with pytest.raises(ValueError, match=r"reference judge: prompt 'What is the capital of France\?' has no ref"):
        ReferenceJudge().judge(PromptRow(prompt="What is the capital of France?"), ["Paris"])
    with pytest.raises(ValueError, match="has no reference answer"):
        ReferenceJudge().judge(PromptRow(prompt="Q", reference="  "), ["Paris"])


@pytest.mark.parametrize("bad", [{"threshold": -0.1}, {"threshold": 1.5}, {"metric": "bleu"}])
def test_reference_bad_options(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="reference judge"):
        ReferenceJudge(**bad)  # type: ignore[arg-type]


# --- regex ----------------------------------------------------------------------------------------------


def test_regex_match_and_non_match() -> None:
    judge = RegexJudge(r"answer: \d+")
    got = judge.judge(CAPITAL, ["I don't know", "the answer: 42", "answer: 7", "no idea"])
    assert (got.chosen, got.rejected) == ("the answer: 42", "I don't know")
    assert got.candidate_scores == (0.0, 1.0, 1.0, 0.0)
    assert got.scores == {"chosen": 1.0, "rejected": 0.0}


def test_regex_none_match_all_match_and_empty() -> None:
    judge = RegexJudge(r"^\d+$")
    none = judge.judge(CAPITAL, ["four", "4 apples"])
    assert none.chosen is None and none.rejected is None and none.candidate_scores == (0.0, 0.0)
    every = judge.judge(CAPITAL, ["4", "5"])
    assert every.chosen == "4" and every.rejected is None and every.scores == {"chosen": 1.0}
    assert judge.judge(CAPITAL, []) == Judgement(None, None, {}, ())


def test_regex_full_match_and_flags() -> None:
    assert RegexJudge(r"\d+").judge(CAPITAL, ["4 apples"]).chosen == "4 apples"
    assert RegexJudge(r"\d+", full_match=True).judge(CAPITAL, ["4 apples"]).chosen is None
    assert RegexJudge("paris", flags=re.IGNORECASE).judge(CAPITAL, ["PARIS"]).chosen == "PARIS"
    assert RegexJudge("paris").judge(CAPITAL, ["PARIS"]).chosen is None


def test_regex_bad_pattern() -> None:
    with pytest.raises(ValueError, match=r"regex judge: bad pattern '\(unclosed'"):
        RegexJudge("(unclosed")


def test_a_string_is_not_a_candidate_list() -> None:
    with pytest.raises(TypeError, match="not one string"):
        RegexJudge("x").judge(CAPITAL, "xyz")


# --- json schema ----------------------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer", "minimum": 0}},
    "required": ["city"],
    "additionalProperties": False,
}


def test_json_parsing_with_and_without_fences() -> None:
    assert parse_json_answer(' {"a": 1} ') == {"a": 1}
    assert parse_json_answer('```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_json_answer("```\n[1, 2]\n```") == [1, 2]
    assert parse_json_answer('```JSON {"a": 1}```') == {"a": 1}
    for bad in ['Here it is: {"a": 1}', '```json\n{"a": 1}\n``` done', "{'a': 1}", "NaN", '{"a": Infinity}']:
        with pytest.raises(ValueError):
            parse_json_answer(bad)


def test_json_schema_valid_invalid_not_json_fenced() -> None:
    judge = JsonSchemaJudge(SCHEMA)
    candidates = [
        "Paris, population 2 million",  # not JSON
        '{"city": "Paris", "population": -5}',  # JSON, invalid (minimum)
        '```json\n{"city": "Paris", "population": 2100000}\n```',  # fenced, valid
        '{"city": "Paris"}',  # valid
        '{"population": 3}',  # invalid (required)
    ]
    got = judge.judge(CAPITAL, candidates)
    assert got.candidate_scores == (0.0, 0.0, 1.0, 1.0, 0.0)
    assert got.chosen == candidates[2] and got.rejected == candidates[0]
    assert judge.judge(CAPITAL, ['{"city": 3}', "null"]).chosen is None
    only = judge.judge(CAPITAL, ['{"city": "Paris"}'])
    assert only.chosen == '{"city": "Paris"}' and only.rejected is None
    assert judge.judge(CAPITAL, []).chosen is None


@pytest.mark.parametrize("schema", [{"type": "strin"}, {"required": "city"}, {"properties": {"a": {"minimum": "x"}}}])
def test_json_schema_bad_schema(schema: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="json_schema judge: bad schema"):
        JsonSchemaJudge(schema)


def test_json_schema_rejects_a_non_schema() -> None:
    with pytest.raises(ValueError, match="must be a JSON object"):
        JsonSchemaJudge('{"type": "object"}')  # type: ignore[arg-type]


# --- registry and batching ------------------------------------------------------------------------------


def test_make_judge_builds_each_kind() -> None:
    assert isinstance(make_judge("reference", threshold=0.7, metric="rougeL"), ReferenceJudge)
    assert isinstance(make_judge("regex", pattern="x", full_match=True), RegexJudge)
    assert isinstance(make_judge("json_schema", schema=SCHEMA), JsonSchemaJudge)
    assert set(JUDGES) == {"reference", "regex", "json_schema", "teacher"}
    assert all(JUDGES[kind].name == kind for kind in JUDGES)


def test_make_judge_errors() -> None:
    with pytest.raises(ValueError, match="unknown judge 'llm'; judges: reference, regex, json_schema, teacher"):
        make_judge("llm")
    with pytest.raises(ValueError, match="bad options for the teacher judge.*teacher"):
        make_judge("teacher")
    with pytest.raises(ValueError, match="bad options for the regex judge.*patern"):
        make_judge("regex", pattern="x", patern="y")
    with pytest.raises(ValueError, match="regex judge: bad pattern"):
        make_judge("regex", pattern="[")


def test_build_judge_from_a_mission_section_or_the_same_keys() -> None:
    """One function builds judges for missions (their [judge] section) and the CLI (--judge, --pattern)."""
    rouge = build_judge(ReferenceJudgeSection(threshold=0.7, metric="rougeL"))
    assert isinstance(rouge, ReferenceJudge) and (rouge.threshold, rouge.metric) == (0.7, "rougeL")
    assert isinstance(build_judge({"kind": "reference"}), ReferenceJudge)
    # the format judges run in a child process (garden.distill.judge_sandbox), built from the same options
    regex = build_judge(RegexJudgeSection(kind="regex", pattern=r"\d+"))
    assert isinstance(regex, IsolatedJudge)
    assert (regex.kind, regex.options) == ("regex", {"pattern": r"\d+", "full_match": False})
    whole = build_judge({"kind": "regex", "pattern": "x", "full_match": True})
    assert isinstance(whole, IsolatedJudge) and whole.options["full_match"] is True
    schema = build_judge({"kind": "json_schema", "schema": SCHEMA})
    assert isinstance(schema, IsolatedJudge) and (schema.kind, schema.options) == ("json_schema", {"schema": SCHEMA})

    def never(ref: str) -> LoadedModel:
        raise AssertionError(f"loaded {ref}")

    factory = build_judge({"kind": "teacher"}, load=never)
    assert callable(factory) and not isinstance(factory, Judge)  # built for each teacher that samples, later


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"kind": "llm"}, "judge.kind: unknown judge 'llm'; one of reference, regex, json_schema, teacher"),
        ({"kind": "regex"}, "judge.pattern: Field required"),
        ({"kind": "regex", "pattern": "["}, "judge.pattern: not a usable regular expression"),
        ({"kind": "regex", "pattern": "(a)\\1"}, "judge.pattern: not a usable regular expression: invalid escape"),
        ({"kind": "json_schema", "schema": {"$ref": "file:///dev/zero"}},
         "judge.schema: schema.$ref is 'file:///dev/zero': only references inside"),
        ({"kind": "reference", "treshold": 0.5}, "judge.treshold: unknown key"),
        ({"kind": "json_schema"}, "judge.schema: Field required"),
    ],
)
def test_build_judge_names_the_bad_key(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        build_judge(spec)


def test_judge_many_loops_and_checks_lengths() -> None:
    judge: Judge = RegexJudge(r"\d")
    got = judge.judge_many([CAPITAL, CAPITAL], [["a", "1"], ["b"]])
    assert [(j.chosen, j.rejected) for j in got] == [("1", "a"), (None, None)]
    with pytest.raises(ValueError, match="2 prompts but 1 candidate lists"):
        judge.judge_many([CAPITAL, CAPITAL], [["1"]])


# --- teacher, on the real built-in model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(model_cache: Path) -> Iterator[LoadedModel]:
    yield load_model("builtin:smollm2-135m")


FRANCE = PromptRow(prompt="What is the capital of France?")
GOOD, BAD = "The capital of France is Paris.", "Bananas are yellow and I like trains."


def test_teacher_prefers_the_correct_answer(teacher: LoadedModel) -> None:
    judge = TeacherJudge(teacher)
    for candidates in ([GOOD, BAD], [BAD, GOOD]):
        got = judge.judge(FRANCE, candidates)
        assert (got.chosen, got.rejected) == (GOOD, BAD)
        assert got.scores["chosen"] > got.scores["rejected"]
        assert all(0.0 <= s <= 1.0 for s in got.candidate_scores)  # P(Yes) among {Yes, No}
        assert got.scores["verdict_mass"] > 0.2  # the teacher does answer Yes or No


@pytest.mark.parametrize(
    ("question", "good", "off_topic"),
    [
        ("What is 2 + 2?", "2 + 2 equals 4.", "The sky is blue."),
        ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet.", "Dogs bark loudly at night."),
        ("How many legs does a spider have?", "A spider has eight legs.", "The library opens at nine."),
    ],
)
def test_teacher_ranks_relevant_above_off_topic(teacher: LoadedModel, question: str, good: str, off_topic: str) -> None:
    # what a 135M teacher can do; it does not reliably tell a right answer from a fluent wrong one
    scores, _ = TeacherJudge(teacher).rate(question, [off_topic, good])
    assert scores[1] > scores[0]


@pytest.mark.slow
def test_teacher_is_deterministic_and_batch_independent(teacher: LoadedModel) -> None:
    judge = TeacherJudge(teacher)
    candidates = [GOOD, BAD, "Paris.", "I am not sure, maybe Lyon or Marseille, it is hard to say."]
    first, second = judge.judge(FRANCE, candidates), judge.judge(FRANCE, candidates)
    assert first == second
    # left padding + masks + positions: a row scores the same in a padded batch as alone
    alone = [judge.rate(FRANCE.prompt, [c])[0][0] for c in candidates]
    assert first.candidate_scores == pytest.approx(alone, abs=1e-4)
    assert len(set(first.candidate_scores)) == len(candidates)
    assert teacher.tokenizer.padding_side == "right"  # the shared tokenizer was left alone


def test_teacher_edge_cases(teacher: LoadedModel) -> None:
    judge = TeacherJudge(teacher)
    assert judge.judge(FRANCE, []) == Judgement(None, None, {}, ())
    same = judge.judge(FRANCE, [GOOD, GOOD])
    assert same.chosen == GOOD and same.rejected is None
    # braces and field names inside a question are text, not template fields
    tricky = judge.rate("What does {answer} mean in {x}?", ["A placeholder."])[0]
    assert len(tricky) == 1
    rated, mass = TeacherJudge(teacher, RATING_PROMPT, RATING_TOKENS, RATING_PREFIX).rate(FRANCE.prompt, [GOOD, BAD])
    assert all(1.0 <= r <= 5.0 for r in rated) and min(mass) > 0.5  # digits follow "Rating: "
    assert isinstance(make_judge("teacher", teacher=teacher), TeacherJudge)


def test_build_judge_teacher(teacher: LoadedModel) -> None:
    factory = build_judge({"kind": "teacher", "answer_prefix": "Answer: "})
    assert callable(factory) and not isinstance(factory, Judge)
    judge = factory(teacher)
    assert isinstance(judge, TeacherJudge) and judge.teacher is teacher and judge.answer_prefix == "Answer: "
    loads: list[str] = []

    def load(ref: str) -> LoadedModel:
        loads.append(ref)
        return teacher

    graded = build_judge({"kind": "teacher", "model": "builtin:smollm2-135m"}, load=load)
    assert isinstance(graded, TeacherJudge) and loads == ["builtin:smollm2-135m"]  # loaded now, once


def test_teacher_bad_options(teacher: LoadedModel) -> None:
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['answer'\]"):
        TeacherJudge(teacher, rating_prompt="Rate: {question}")
    with pytest.raises(ValueError, match="one distinct token"):
        TeacherJudge(teacher, verdicts={"Absolutely": 1.0, "Nope, not at all": 0.0})
    with pytest.raises(ValueError, match="at least two"):
        TeacherJudge(teacher, verdicts={"Yes": 1.0})
    with pytest.raises(ValueError, match="must be a LoadedModel"):
        TeacherJudge("builtin:smollm2-135m")  # type: ignore[arg-type]

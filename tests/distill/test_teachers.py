"""Multi-teacher fallback on real models: the built-in teacher, and a second real teacher made from the same
weights with a short context and one extra token (so its tokenizer fingerprint differs)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from garden.models.loading import LoadedModel, load_model, tokenizer_fingerprint
from garden.protocol.rows import PromptRow
from garden.distill.judges import Judge, Judgement, ReferenceJudge, RegexJudge
from garden.distill.shaker import ShakeConfig, shake
from garden.distill.teachers import NoTeacherError, shake_with_fallback

pytestmark = pytest.mark.heavy(11)  # seconds in `make check`: see tests/conftest.py

BUILTIN = "builtin:smollm2-135m"
SHORT_CONTEXT = 48  # the chat-templated "What is 2 + 2?" is 38 tokens: it fits with 8 new tokens, longer ones do not
CONFIG = ShakeConfig(candidates=1, max_new_tokens=8, batch_prompts=4, seed=3)
SHORT = PromptRow(prompt="What is 2 + 2?", reference="2 + 2 = 4.")
LONG = PromptRow(
    prompt="What is the capital of France? Please answer in one short sentence.",
    reference="The capital of France is Paris.",
)


@pytest.fixture(autouse=True)
def cache(model_cache: Path) -> Path:
    return model_cache


@pytest.fixture(scope="module")
def short_teacher(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real model directory: the built-in's weights (linked, not copied), a 48-token context, and a
    tokenizer with one added token."""
    source = Path(load_model(BUILTIN).source)
    target = tmp_path_factory.mktemp("short-teacher")
    (target / "model.safetensors").symlink_to(source / "model.safetensors")
    shutil.copy(source / "generation_config.json", target)
    config = json.loads((source / "config.json").read_text())
    config["max_position_embeddings"] = SHORT_CONTEXT
    (target / "config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_tokens(["<garden-short-teacher>"])
    tokenizer.save_pretrained(target)
    return str(target)


class ExplodingJudge(Judge):
    """Stands for a teacher that fails mid-batch (e.g. out of memory while grading)."""

    name = "exploding"

    def judge(self, prompt: PromptRow, candidates: Sequence[str]) -> Judgement:
        raise RuntimeError("out of memory while grading")


def test_one_teacher_gives_exactly_the_rows_of_shake() -> None:
    teacher = load_model(BUILTIN)
    prompts = [SHORT, LONG]
    plain = shake(teacher, prompts, ReferenceJudge(), CONFIG)
    fallback = shake_with_fallback([BUILTIN], prompts, ReferenceJudge(), CONFIG)
    assert [r.row_id for r in fallback.rows] == [r.row_id for r in plain.rows] and len(plain.rows) == 2
    assert fallback.rows_by_teacher() == {BUILTIN: 2} and fallback.samples == plain.samples == 2


def test_a_teacher_that_does_not_load_is_skipped_with_its_reason() -> None:
    seen: list[str] = []

    def load(ref: str) -> LoadedModel:
        seen.append(ref)
        return load_model(ref)

    result = shake_with_fallback(
        ["/nonexistent/teacher.gguf", "builtin:nope", BUILTIN, "/never/needed.gguf"],
        [SHORT],
        ReferenceJudge(),
        CONFIG,
        load=load,
    )
    missing, unknown, builtin, spare = result.teachers
    assert "does not exist" in (missing.error or "") and not missing.loaded
    assert "unknown built-in model" in (unknown.error or "")
    assert builtin.usable and builtin.loaded and builtin.rows == 1 and builtin.passed_on == 0
    assert seen == ["/nonexistent/teacher.gguf", "builtin:nope", BUILTIN]  # the spare is loaded lazily: never
    assert spare.usable and not spare.loaded and spare.prompts == 0
    assert [r.teacher for r in result.rows] == [BUILTIN] and not result.dropped


def test_a_prompt_too_long_for_the_first_teacher_goes_to_the_second(short_teacher: str) -> None:
    short = load_model(short_teacher)
    builtin = load_model(BUILTIN)
    assert tokenizer_fingerprint(short.tokenizer) != tokenizer_fingerprint(builtin.tokenizer)
    result = shake_with_fallback([short_teacher, BUILTIN], [SHORT, LONG], ReferenceJudge(), CONFIG)
    by_prompt = {row.prompt: row for row in result.rows}
    assert set(by_prompt) == {SHORT.prompt, LONG.prompt} and not result.dropped
    assert by_prompt[SHORT.prompt].teacher == short_teacher
    assert by_prompt[SHORT.prompt].tokenizer == tokenizer_fingerprint(short.tokenizer)
    assert by_prompt[LONG.prompt].teacher == BUILTIN
    assert by_prompt[LONG.prompt].tokenizer == tokenizer_fingerprint(builtin.tokenizer)
    first, second = result.teachers
    assert (first.prompts, first.rows, first.passed_on) == (2, 1, 1)
    assert (second.prompts, second.rows, second.passed_on) == (1, 1, 0)


def test_prompts_a_teachers_judge_rejects_or_that_fail_fall_through(short_teacher: str) -> None:
    """The judge factory gets each loaded teacher: the short teacher's judge rejects every answer (or
    raises), the built-in's accepts; a prompt no teacher can answer is dropped with every reason."""

    def picky(teacher: LoadedModel) -> Judge:
        return RegexJudge(r"^\d{40}$", full_match=True) if teacher.ref.kind == "dir" else ReferenceJudge()

    result = shake_with_fallback([short_teacher, BUILTIN], [SHORT], picky, CONFIG)
    assert [r.teacher for r in result.rows] == [BUILTIN] and result.rows[0].judge == "reference"
    assert result.rows_by_teacher() == {short_teacher: 0, BUILTIN: 1}

    def exploding_then_impossible(teacher: LoadedModel) -> Judge:
        return ExplodingJudge() if teacher.ref.kind == "dir" else RegexJudge(r"^\d{40}$", full_match=True)

    result = shake_with_fallback([short_teacher, BUILTIN], [SHORT], exploding_then_impossible, CONFIG)
    assert not result.rows and result.teachers[0].failed_batches == 1
    ((prompt, why),) = result.dropped
    assert prompt is SHORT
    assert f"{short_teacher}: RuntimeError: out of memory while grading" in why
    assert f"{BUILTIN}: judge regex found no usable answer" in why


def test_no_loadable_teacher_is_a_clear_error() -> None:
    with pytest.raises(NoTeacherError, match=r"no teacher could be used: builtin:nope: cannot load: .*nowhere\.gguf"):
        shake_with_fallback(["builtin:nope", "/nowhere.gguf"], [SHORT], ReferenceJudge(), CONFIG)
    with pytest.raises(ValueError, match="at least one teacher"):
        shake_with_fallback([], [SHORT], ReferenceJudge(), CONFIG)

"""Format judges from missions run in a child process with limits (:mod:`garden.distill.judge_sandbox`):
hostile patterns and schemas, as a mission's lead would write them, stop the child, never the caller."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from garden.distill.judge_sandbox import IsolatedJudge, JudgeLimitError
from garden.distill.judges import make_judge
from garden.protocol.mission_spec import JsonSchemaJudgeSection, RegexJudgeSection
from garden.protocol.rows import PromptRow

CATASTROPHIC = r"^(\w*\s*)*ZZZ$"  # Python's re: about a second at 28 characters, doubling every few more
PROMPT = PromptRow(prompt="Answer in JSON.")


class Ticker:
    """A thread that notes the longest gap between its ticks: what a frozen GIL would do to the daemon."""

    def __init__(self) -> None:
        self.longest, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.01):
            now = time.monotonic()
            self.longest, last = max(self.longest, now - last), now

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def children() -> Iterator[list[int]]:
    """The judge processes this test started; none may outlive it."""
    before = {p.pid for p in psutil.Process().children()}
    seen: list[int] = []
    yield seen
    late = [p for p in psutil.Process().children() if p.pid not in before and "judge_sandbox" in " ".join(p.cmdline())]
    assert not late, late


def test_an_isolated_judge_gives_the_judgements_of_the_judge_it_stands_for(children: list[int]) -> None:
    answers = [["no digits", "42", "7 and 8"], ["none"], []]
    prompts = [PROMPT] * 3
    for kind, options in (
        ("regex", {"pattern": r"\d+", "full_match": False}),
        ("regex", {"pattern": r"\d+", "full_match": True}),
        ("json_schema", {"schema": {"type": "object", "required": ["city"]}}),
    ):
        with IsolatedJudge(kind, options) as isolated:
            assert isolated.name == kind
            assert isolated.judge_many(prompts, answers) == make_judge(kind, **options).judge_many(prompts, answers)
            one = ['{"city": "Paris"}', "Paris 1"]
            assert isolated.judge(PROMPT, one) == make_judge(kind, **options).judge(PROMPT, one)


def test_a_catastrophic_pattern_is_linear_in_a_regex_judge() -> None:
    """The pattern that froze a peer for 30 s runs through RE2 in microseconds, in the child or not."""
    answer = "a " * 5_000
    started = time.monotonic()
    assert make_judge("regex", pattern=CATASTROPHIC).judge(PROMPT, [answer]).chosen is None
    assert time.monotonic() - started < 0.5
    with IsolatedJudge("regex", {"pattern": CATASTROPHIC}) as isolated:
        assert isolated.judge(PROMPT, [answer, "ZZZ"]).chosen == "ZZZ"


def test_a_schema_too_slow_to_check_stops_its_child_not_the_caller(children: list[int]) -> None:
    """jsonschema runs a schema's own ``pattern`` through Python's backtracking re: the child is stopped
    after its time limit, the calling thread never stalls, and the next batch gets a new child."""
    schema = {"type": "string", "pattern": CATASTROPHIC}
    slow = '"' + "a " * 40 + '"'
    with IsolatedJudge("json_schema", {"schema": schema}, timeout=1.0) as judge, Ticker() as ticker:
        assert judge.judge(PROMPT, ['"ok ZZZ"']).chosen == '"ok ZZZ"'  # quick answers pass
        first = judge._proc
        started = time.monotonic()
        with pytest.raises(JudgeLimitError, match=r"json_schema judge took over 1 s .*too slow to check"):
            judge.judge(PROMPT, [slow])
        assert time.monotonic() - started < 3.0
        assert first is not None and first.poll() is not None  # killed
        assert judge.judge(PROMPT, ['"ZZZ"']).chosen == '"ZZZ"'  # a new child
    assert ticker.longest < 0.25, f"the caller stalled {ticker.longest:.2f} s"


def test_a_child_past_its_memory_limit_fails_the_batch_clearly(children: list[int]) -> None:
    # 1 MiB of address space: the child cannot even start Python, as a memory bomb would end it
    with pytest.raises(JudgeLimitError, match=r"process died .*1 MiB memory limit"):
        IsolatedJudge("regex", {"pattern": "x"}, memory=1 << 20).judge(PROMPT, ["x"])
    # a schema that builds a huge value in the child: its MemoryError is a limit, reported as one
    with IsolatedJudge("json_schema", {"schema": {"type": "array"}}, memory=256 << 20) as judge:
        big = "[" + ",".join(["1"] * 20_000_000) + "]"  # 40 MB of text, ~800 MB as a Python list
        with pytest.raises(JudgeLimitError, match="memory"):
            judge.judge(PROMPT, [big])


@pytest.mark.parametrize(
    "ref",
    ["file:///dev/zero", "http://192.168.1.1/schema.json", "https://example.com/s#/x", "other.json",
     "/etc/passwd", "urn:x"],
)  # fmt: skip
def test_a_schema_may_refer_only_to_itself(ref: str) -> None:
    nested = {"type": "object", "properties": {"a": {"allOf": [{"$ref": ref}]}}}
    with pytest.raises(ValueError, match=re.escape("only references inside the schema (#...)")):
        make_judge("json_schema", schema=nested)
    with pytest.raises(ValueError, match="only references inside the schema"):
        JsonSchemaJudgeSection.model_validate({"kind": "json_schema", "schema": nested})
    with pytest.raises(ValueError, match="only references inside the schema"):
        IsolatedJudge("json_schema", {"schema": nested})  # checked in the caller, before any child starts
    # a local one works, also under an $id that names a URL (nothing is fetched from it)
    local = {"$id": "http://192.168.1.1/s", "$defs": {"n": {"type": "integer"}},
             "properties": {"a": {"$ref": "#/$defs/n"}}}  # fmt: skip
    judge = make_judge("json_schema", schema=local)
    assert judge.judge(PROMPT, ['{"a": "x"}', '{"a": 1}']).chosen == '{"a": 1}'


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?<=a)b", r"(?=x)", "["])
def test_patterns_that_need_backtracking_are_refused_when_the_mission_is_read(pattern: str) -> None:
    with pytest.raises(ValueError, match="not a usable regular expression"):
        RegexJudgeSection.model_validate({"kind": "regex", "pattern": pattern})

"""Judges: turn a prompt's sampled candidate answers into a preference pair.

The shaker samples a few answers per prompt from the teacher, and a judge picks the ``chosen`` answer
(what the student imitates: NLL + KL) and the ``rejected`` one (what the ORPO odds-ratio term pushes
down). Every judge is a policy: data in, a :class:`Judgement` out, no I/O. Three outcomes:

- ``chosen`` and ``rejected``: a full DORPO row;
- ``rejected is None``: a chosen-only row (KL + NLL, no odds-ratio term), as the seed paper specifies
  for prompts where nothing worse was sampled: never invent a rejected answer;
- ``chosen is None``: nothing usable, the shaker drops the prompt.

Judges: ``reference`` (token-F1 or ROUGE-L against a known answer), ``regex`` and ``json_schema``
(format checks, pass or fail) and ``teacher`` (the teacher model grades each candidate itself).
:func:`build_judge` builds the judge a judge spec asks for (a mission's ``[judge]``, or the CLI's
``--judge``): the one place missions and the CLI build judges. :func:`make_judge` builds one by name and
constructor options.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import string
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ValidationError

from garden.models.loading import LoadedModel, load_model
from garden.protocol.linear_regex import LinearRegexError, compile_linear
from garden.protocol.mission_spec import JudgeSection, check_local_refs, describe_spec_error
from garden.protocol.rows import PromptRow
from garden.models.chat import left_pad, pad_id


@dataclass(frozen=True)
class Judgement:
    """A judge's verdict on one prompt.

    :param chosen: the answer to imitate; None when no candidate is usable (the shaker drops the prompt)
    :param rejected: the answer to push down; None for a chosen-only row (no odds-ratio term)
    :param scores: ``{"chosen": ..., "rejected": ...}`` for those present, plus judge-specific extras
    :param candidate_scores: one score per candidate, in the candidates' order (higher is better)
    :param reference_used: the chosen answer is the prompt's reference, not a sampled candidate
    """

    chosen: str | None
    rejected: str | None
    scores: dict[str, float]
    candidate_scores: tuple[float, ...]
    reference_used: bool = False


class Judge(ABC):
    """One way to rank a prompt's candidates. Subclasses set ``name`` (the :func:`make_judge` kind) and
    implement :meth:`judge`; :meth:`judge_many` is what the shaker calls and may be overridden to batch
    across prompts."""

    name: ClassVar[str]

    @abstractmethod
    def judge(self, prompt: PromptRow, candidates: Sequence[str]) -> Judgement:
        """The preference pair for one prompt; an empty ``candidates`` is allowed."""

    def judge_many(
        self, prompts: Sequence[PromptRow], candidates_per_prompt: Sequence[Sequence[str]]
    ) -> list[Judgement]:
        self._check_batch(prompts, candidates_per_prompt)
        return [self.judge(p, c) for p, c in zip(prompts, candidates_per_prompt, strict=True)]

    def _check_batch(self, prompts: Sequence[PromptRow], candidates_per_prompt: Sequence[Sequence[str]]) -> None:
        if len(prompts) != len(candidates_per_prompt):
            raise ValueError(
                f"{self.name} judge: {len(prompts)} prompts but {len(candidates_per_prompt)} candidate lists"
            )
        for candidates in candidates_per_prompt:
            _candidates(self.name, candidates)

    def close(self) -> None:  # noqa: B027  # most judges hold nothing: not abstract, on purpose
        """Let go of what the judge holds (a child process: :mod:`garden.distill.judge_sandbox`)."""


def _candidates(judge: str, candidates: Sequence[str]) -> list[str]:
    # a bare string is a Sequence[str] too: judging its characters one by one is never what was meant
    if isinstance(candidates, str):
        raise TypeError(f"{judge} judge: candidates must be a sequence of answers, not one string")
    return list(candidates)


def _pass_fail(candidates: list[str], passed: list[bool]) -> Judgement:
    """The rule of the format judges: chosen = first passing candidate (score 1), rejected = first failing
    one (score 0). First, not random: the candidates come in sampling order, so this is reproducible."""
    scores = tuple(1.0 if ok else 0.0 for ok in passed)
    chosen = next((c for c, ok in zip(candidates, passed, strict=True) if ok), None)
    if chosen is None:
        return Judgement(chosen=None, rejected=None, scores={}, candidate_scores=scores)
    rejected = next((c for c, ok in zip(candidates, passed, strict=True) if not ok), None)
    return Judgement(
        chosen=chosen,
        rejected=rejected,
        scores={"chosen": 1.0} if rejected is None else {"chosen": 1.0, "rejected": 0.0},
        candidate_scores=scores,
    )


def _best_worst(scores: Sequence[float]) -> tuple[int, int]:
    """Indices of the first best and the first worst candidate."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return best, worst


def _rejected_or_none(chosen: str, chosen_score: float, candidate: str, score: float) -> str | None:
    """A rejected answer must differ from the chosen one and score strictly lower: a pair of equals would
    teach the odds-ratio term to push down a good answer."""
    return candidate if candidate != chosen and score < chosen_score else None


# --- reference: token-F1 / ROUGE-L against a known answer -------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = frozenset(string.punctuation)


def normalize_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lowercase, drop punctuation (ASCII, as SQuAD, plus any Unicode
    punctuation so that « » and 、 count too), drop the articles a/an/the, split on whitespace."""
    text = "".join(" " if ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    return _ARTICLES.sub(" ", text).split()


def _f_measure(overlap: int, n_candidate: int, n_reference: int) -> float:
    if n_candidate == 0 or n_reference == 0:  # SQuAD: two empty answers agree, one empty one does not
        return float(n_candidate == n_reference)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_candidate, overlap / n_reference
    return 2 * precision * recall / (precision + recall)


def token_f1(candidate: str, reference: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the shared bag of normalised tokens."""
    cand, ref = normalize_tokens(candidate), normalize_tokens(reference)
    counts: dict[str, int] = {}
    for tok in ref:
        counts[tok] = counts.get(tok, 0) + 1
    overlap = 0
    for tok in cand:
        if counts.get(tok, 0) > 0:
            counts[tok] -= 1
            overlap += 1
    return _f_measure(overlap, len(cand), len(ref))


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure (Lin 2004, beta = 1): precision and recall of the longest common subsequence of
    tokens. Unlike token F1 it rewards keeping the reference's word order. Tokens are normalised as in
    :func:`normalize_tokens` (so articles are dropped and there is no stemming, unlike ``rouge_score``)."""
    cand, ref = normalize_tokens(candidate), normalize_tokens(reference)
    return _f_measure(_lcs_length(cand, ref), len(cand), len(ref))


METRICS: dict[str, Callable[[str, str], float]] = {"f1": token_f1, "rougeL": rouge_l}


def _short(prompt: PromptRow) -> str:
    return repr(prompt.prompt if len(prompt.prompt) <= 80 else prompt.prompt[:77] + "...")


class ReferenceJudge(Judge):
    """Scores each candidate against the prompt's ``reference`` answer.

    chosen = the best candidate if it scores at least ``threshold``, else the reference itself (the
    student then learns the known answer rather than the teacher's best miss); rejected = the worst
    candidate when it differs from chosen and scores strictly lower. A prompt without a reference is a
    ``ValueError``, not a dropped prompt: it means a mission chose this judge for a data set that does
    not fit it, which silently shrinking the data set would hide.

    :param threshold: lowest score (0..1) at which a sampled answer beats the reference; 0.5 keeps
        paraphrases, raise it towards 1 to keep only near-verbatim answers
    :param metric: ``"f1"`` (bag of tokens, SQuAD) or ``"rougeL"`` (longest common subsequence, order aware)
    """

    name = "reference"

    def __init__(self, threshold: float = 0.5, metric: Literal["f1", "rougeL"] = "f1") -> None:
        if not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"reference judge: threshold must be a number in [0, 1], got {threshold!r}")
        if metric not in METRICS:
            raise ValueError(f"reference judge: unknown metric {metric!r}; use one of {', '.join(METRICS)}")
        self.threshold = float(threshold)
        self.metric = metric
        self._score = METRICS[metric]

    def judge(self, prompt: PromptRow, candidates: Sequence[str]) -> Judgement:
        cands = _candidates(self.name, candidates)
        reference = prompt.reference
        if reference is None or not reference.strip():  # an empty chosen answer would teach silence
            raise ValueError(f"reference judge: prompt {_short(prompt)} has no reference answer")
        scores = tuple(self._score(c, reference) for c in cands)
        if not cands:
            return Judgement(reference, None, {"chosen": 1.0}, (), reference_used=True)
        best, worst = _best_worst(scores)
        if scores[best] >= self.threshold:
            chosen, chosen_score, used = cands[best], scores[best], False
        else:
            chosen, chosen_score, used = reference, self._score(reference, reference), True
        rejected = _rejected_or_none(chosen, chosen_score, cands[worst], scores[worst])
        picked = {"chosen": chosen_score} | ({} if rejected is None else {"rejected": scores[worst]})
        return Judgement(chosen, rejected, picked, scores, reference_used=used)


# --- format judges: regex, JSON schema ---------------------------------------------------------------


class RegexJudge(Judge):
    """Pass/fail on a regular expression: chosen = first matching candidate, rejected = first other one;
    no match → unusable prompt, all match → chosen-only row.

    :param pattern: an RE2 pattern (Python's syntax, minus backreferences and lookarounds: it runs in linear
        time, see :mod:`garden.protocol.linear_regex`), compiled once here (a bad one is a ``ValueError`` now,
        not at the first prompt)
    :param flags: ``re.IGNORECASE``, ``re.MULTILINE`` and ``re.DOTALL``, combined
    :param full_match: the whole answer must match (``fullmatch``) rather than any part (``search``)
    """

    name = "regex"

    def __init__(self, pattern: str, flags: int = 0, full_match: bool = False) -> None:
        try:
            self._regex = compile_linear(pattern, flags)
        except LinearRegexError as e:
            raise ValueError(f"regex judge: bad pattern {pattern!r}: {e}") from None
        self._test = self._regex.fullmatch if full_match else self._regex.search

    def judge(self, prompt: PromptRow, candidates: Sequence[str]) -> Judgement:
        cands = _candidates(self.name, candidates)
        return _pass_fail(cands, [self._test(c) is not None for c in cands])


_FENCED = re.compile(r"\A```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```\Z", re.DOTALL | re.IGNORECASE)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_answer(text: str) -> Any:
    """The JSON value of an answer that is JSON, optionally wrapped whole in one ```json fence; raises
    ``ValueError`` otherwise. Prose around the JSON fails: the chosen answer is what the student learns
    to write, and a consumer parsing its output would choke on the prose. NaN/Infinity fail too (Python's
    json accepts them, JSON does not)."""
    text = text.strip()
    fenced = _FENCED.match(text)
    if fenced:
        text = fenced.group(1)
    return json.loads(text, parse_constant=_reject_constant)


class JsonSchemaJudge(Judge):
    """Pass/fail on "is JSON and validates against ``schema``" (the ``jsonschema`` library, draft taken
    from the schema's ``$schema``, latest by default); the pass/fail rule of :class:`RegexJudge`.

    :param schema: a JSON Schema as a dict (or ``True``/``False``); checked here, a bad one is a ``ValueError``
    """

    name = "json_schema"

    def __init__(self, schema: Mapping[str, Any] | bool) -> None:
        try:
            from jsonschema import exceptions, validators
        except ImportError:  # a dependency of garden: only an environment built by hand lacks it
            raise ImportError(
                "the json_schema judge needs the jsonschema package: pip install 'jsonschema>=4.18'"
            ) from None

        if not isinstance(schema, Mapping | bool):
            raise ValueError(f"json_schema judge: the schema must be a JSON object, got {type(schema).__name__}")
        from referencing import Registry

        schema = dict(schema) if isinstance(schema, Mapping) else schema
        cls = validators.validator_for(schema)
        try:
            cls.check_schema(schema)
            check_local_refs(schema)
        except exceptions.SchemaError as e:
            raise ValueError(f"json_schema judge: bad schema: {e.message} (at {list(e.path)})") from None
        except ValueError as e:
            raise ValueError(f"json_schema judge: {e}") from None
        # an empty registry, which retrieves nothing: jsonschema's default one would fetch URLs and files
        self._validator = cls(schema, registry=Registry())

    def _passes(self, text: str) -> bool:
        try:
            value = parse_json_answer(text)
        except ValueError:  # json.JSONDecodeError is a ValueError
            return False
        return bool(self._validator.is_valid(value))

    def judge(self, prompt: PromptRow, candidates: Sequence[str]) -> Judgement:
        cands = _candidates(self.name, candidates)
        return _pass_fail(cands, [self._passes(c) for c in cands])


# --- teacher: the teacher grades each candidate itself -------------------------------------------------

VERDICT_PROMPT = "Question: {question}\n\nAnswer: {answer}\n\nIs this answer correct? Reply Yes or No."
VERDICT_TOKENS: dict[str, float] = {"Yes": 1.0, "No": 0.0}
RATING_PROMPT = (
    "Rate how well the answer answers the question on a scale from 1 to 5 "
    "(1 = wrong or off-topic, 5 = correct and complete).\n\nQuestion: {question}\n\nAnswer: {answer}"
)
RATING_PREFIX = "Rating: "
RATING_TOKENS: dict[str, float] = {str(d): float(d) for d in range(1, 6)}
_FIELD = re.compile(r"\{(question|answer)\}")


def _clip_tokens(tokenizer: Any, text: str, max_tokens: int) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]) + " …"


class TeacherJudge(Judge):
    """The teacher grades each candidate: the grading prompt goes through the chat template and the score
    is the teacher's expected verdict, the mean of the ``verdicts`` values weighted by the next-token
    probabilities of their tokens (renormalised over those tokens). Expected value, not argmax: it is
    smooth, so ties are rare even when the top verdict is the same for every candidate. One batched,
    left-padded forward pass per prompt, no sampling: the same call gives the same scores.

    best = chosen, worst = rejected (None when all candidates score the same).

    The default asks "Is this answer correct?" and scores P(Yes). On the built-in SmolLM2-135M it ranks a
    correct answer above an off-topic one on each of 12 hand-written questions, but above a fluent,
    on-topic, wrong answer on only 8 of 12: a model that small judges relevance, not truth. The 1-5 rating
    (``rating_prompt=RATING_PROMPT, verdicts=RATING_TOKENS, answer_prefix=RATING_PREFIX``) ranked at chance
    at that size; it is there for larger teachers.

    :param teacher: the loaded teacher (its weights are only read)
    :param rating_prompt: the user message, with ``{question}`` and ``{answer}`` fields
    :param verdicts: verdict text → value; each text must be one token of the teacher's vocabulary
    :param answer_prefix: text put at the start of the assistant turn (e.g. ``"Rating: "``) so that the
        next token is the verdict rather than a preamble
    :param max_question_tokens: longer questions are cut (the verdict is read after the instruction that
        follows the answer, so that instruction must survive); also bounds the batch's memory
    :param max_answer_tokens: likewise for each candidate
    """

    name = "teacher"

    def __init__(
        self,
        teacher: LoadedModel,
        rating_prompt: str = VERDICT_PROMPT,
        verdicts: Mapping[str, float] = VERDICT_TOKENS,
        answer_prefix: str = "",
        max_question_tokens: int = 1024,
        max_answer_tokens: int = 1024,
    ) -> None:
        if not isinstance(teacher, LoadedModel):
            raise ValueError(
                f"teacher judge: teacher must be a LoadedModel (garden.models.loading.load_model), got {teacher!r}"
            )
        missing = {"question", "answer"} - set(_FIELD.findall(rating_prompt))
        if missing:
            raise ValueError(f"teacher judge: rating_prompt lacks the field(s) {sorted(missing)}, e.g. {{answer}}")
        if len(verdicts) < 2 or not all(math.isfinite(v) for v in verdicts.values()):
            raise ValueError(f"teacher judge: verdicts needs at least two texts with finite values, got {verdicts!r}")
        if min(max_question_tokens, max_answer_tokens) < 1:
            raise ValueError("teacher judge: max_question_tokens and max_answer_tokens must be >= 1")
        self.teacher = teacher
        self.rating_prompt = rating_prompt
        self.answer_prefix = answer_prefix
        self.max_question_tokens = max_question_tokens
        self.max_answer_tokens = max_answer_tokens
        tokenizer = teacher.tokenizer
        ids = {text: tokenizer.encode(text, add_special_tokens=False) for text in verdicts}
        if any(len(i) != 1 for i in ids.values()) or len({i[0] for i in ids.values()}) != len(ids):
            raise ValueError(f"teacher judge: each verdict must be one distinct token of {teacher.ref}; got {ids}")
        self._verdict_ids = [i[0] for i in ids.values()]
        self._verdict_values = list(verdicts.values())

    def _render(self, question: str, answer: str) -> str:
        tokenizer = self.teacher.tokenizer
        fields = {
            "question": _clip_tokens(tokenizer, question, self.max_question_tokens),
            "answer": _clip_tokens(tokenizer, answer, self.max_answer_tokens),
        }
        # one pass with a function, not str.format: a question may itself contain "{answer}" or braces
        user = _FIELD.sub(lambda m: fields[m.group(1)], self.rating_prompt)
        if getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": user}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return str(text) + self.answer_prefix
        return f"{user}\n{self.answer_prefix}"

    def rate(self, question: str, answers: Sequence[str]) -> tuple[list[float], list[float]]:
        """(expected verdict, probability mass on the verdict tokens) per answer, from one forward pass.
        A low mass means the teacher wanted to say something else: the prompt does not suit it."""
        import torch

        answers = _candidates(self.name, answers)
        if not answers:
            return [], []
        tokenizer, model = self.teacher.tokenizer, self.teacher.model
        special = not getattr(tokenizer, "chat_template", None)  # the template already has BOS etc.
        rows = [tokenizer.encode(self._render(question, a), add_special_tokens=special) for a in answers]
        # pad on the left, so the verdict is read at the last position of every row; the shared
        # tokenizer's padding_side is left alone (other users of the same loaded teacher rely on it)
        input_ids, mask = left_pad(rows, pad_id(tokenizer), device=next(model.parameters()).device)
        # positions count real tokens only, so a padded row sees the positions it would see alone
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        logps = logits.float().log_softmax(-1)[:, self._verdict_ids]
        probs = logps.softmax(-1)
        values = torch.tensor(self._verdict_values, device=probs.device)
        expected = (probs * values).sum(-1)
        return [float(x) for x in expected], [float(x) for x in logps.exp().sum(-1)]

    def judge(self, prompt: PromptRow, candidates: Sequence[str]) -> Judgement:
        cands = _candidates(self.name, candidates)
        if not cands:
            return Judgement(None, None, {}, ())
        scores, mass = self.rate(prompt.prompt, cands)
        best, worst = _best_worst(scores)
        rejected = _rejected_or_none(cands[best], scores[best], cands[worst], scores[worst])
        picked = {"chosen": scores[best], "verdict_mass": min(mass)}
        if rejected is not None:
            picked["rejected"] = scores[worst]
        return Judgement(cands[best], rejected, picked, tuple(scores))


# --- registry ------------------------------------------------------------------------------------------

JUDGES: dict[str, type[Judge]] = {cls.name: cls for cls in (ReferenceJudge, RegexJudge, JsonSchemaJudge, TeacherJudge)}


def make_judge(kind: str, **options: Any) -> Judge:
    """A judge by its kind (``reference | regex | json_schema | teacher``) and its constructor's options,
    e.g. ``make_judge("regex", pattern=r"\\d+")`` or ``make_judge("teacher", teacher=load_model(ref))``."""
    cls = JUDGES.get(kind)
    if cls is None:
        raise ValueError(f"unknown judge {kind!r}; judges: {', '.join(JUDGES)}")
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as e:
        raise ValueError(f"bad options for the {kind} judge: {e}") from None
    return cls(**options)


ISOLATED_KINDS = ("regex", "json_schema")
"""Judges that :func:`build_judge` runs in a child process with a time and memory limit (their work is pure
Python configured by a mission, which would hold the daemon's GIL); ``reference`` runs fixed code, and
``teacher`` is a model's forward pass."""


class _JudgeSpec(BaseModel):
    judge: JudgeSection


def build_judge(
    spec: JudgeSection | Mapping[str, Any], load: Callable[[str], LoadedModel] = load_model
) -> Judge | Callable[[LoadedModel], Judge]:
    """The judge ``spec`` asks for: a mission's ``[judge]`` section, or the same keys as a mapping (the CLI's
    ``--judge`` and ``--pattern``), which is checked as strictly as a mission's (``ValueError`` naming the key).

    ``regex`` and ``json_schema`` judges run in a child process (:data:`ISOLATED_KINDS`): :meth:`Judge.close`
    stops it. The judge is built now, so a bad spec fails before any teacher loads, except the ``teacher`` judge without
    a ``model``: it grades with whichever teacher sampled, so a factory comes back
    (``garden.distill.teachers.JudgeFactory``), to call with that loaded teacher. A ``teacher`` judge that
    names a ``model`` loads it now, with ``load``."""
    if isinstance(spec, Mapping):
        try:
            spec = _JudgeSpec.model_validate({"judge": dict(spec)}).judge
        except ValidationError as e:
            raise ValueError(describe_spec_error(e)) from None
    options = spec.model_dump(by_alias=True, exclude={"kind"})
    if spec.kind == "teacher":
        grader = options.pop("model", None)
        options = {k: v for k, v in options.items() if v is not None}
        if grader is not None:
            return make_judge("teacher", teacher=load(grader), **options)
        return lambda loaded: make_judge("teacher", teacher=loaded, **options)
    if spec.kind in ISOLATED_KINDS:
        from garden.distill.judge_sandbox import IsolatedJudge

        return IsolatedJudge(spec.kind, options)
    return make_judge(spec.kind, **options)

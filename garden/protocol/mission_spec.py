"""The mission spec a lead writes (``mission.toml``): strict sections, clear errors naming the key, and one
canonical encoding (its sha256 is what the lead signs, with the prompts' hash: see ``garden.protocol.mission``).

A mission travels from a stranger's machine to every peer that works on it, so the spec is checked as
strictly as any DHT record: unknown keys, wrong types and out-of-range numbers are errors naming the
key (a typo such as ``temprature`` must not silently fall back to a default on a thousand machines).
Ranges mirror the single-machine settings (``ShakeConfig``, ``TrainConfig``), which ``protocol/`` may not import.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from garden.protocol.records import RecordError, decode_record
from garden.protocol.rows import sorted_maps

MAX_SPEC_BYTES = 12 * 1024
"""Cap on a spec's canonical encoding (~450 bytes typical; a json_schema judge's schema is the usual bulk),
so that the signed body fits the 16 KiB envelope with a lead key of up to 1 KiB."""
MAX_REF_CHARS = 512
"""Longest model reference (hub id, directory, .gguf file, builtin:NAME)."""

JUDGE_KINDS = ("reference", "regex", "json_schema", "teacher")

ModelRefText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_REF_CHARS, pattern=r"^\S(.*\S)?$")]
"""A model reference as written; resolved (and its existence checked) by the peer that loads it, since a
path on the lead's machine says nothing about another peer's."""


class MissionSpecError(ValueError):
    """A mission file or spec that is not valid; the message names the file and the key path."""


class _Section(BaseModel):
    # forbid, unlike DHT records: a key this peer does not understand is a setting it cannot honour
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


# --- the spec ----------------------------------------------------------------------------------------


class LoraSection(_Section):
    """A LoRA adapter on the student (mirrors ``garden.trainer.student.LoraSpec``; the caps are the spec's)."""

    r: int = Field(default=16, ge=1, le=1024)
    alpha: int = Field(default=32, ge=1, le=4096)
    target_modules: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, max_length=64
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class StudentSection(_Section):
    base: ModelRefText
    keep_layers: int | None = Field(default=None, ge=1, le=1024)
    lora: LoraSection | None = None


class SamplingSection(_Section):
    """Teacher sampling; fields and ranges mirror ``garden.trainer.shaker.ShakeConfig``. Its
    ``batch_prompts`` is each peer's own (hardware) choice and its ``seed`` comes from :func:`prompt_seed`."""

    candidates: int = Field(default=4, ge=1, le=64)
    temperature: float = Field(default=0.8, gt=0.0, le=10.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    top_k_logprobs: int = Field(default=20, ge=1, le=256)


class ReferenceJudgeSection(_Section):
    """Options of ``garden.trainer.judges.ReferenceJudge``."""

    kind: Literal["reference"] = "reference"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    metric: Literal["f1", "rougeL"] = "f1"


class RegexJudgeSection(_Section):
    """Options of ``RegexJudge``; flags go inline in the pattern, e.g. ``(?i)``."""

    kind: Literal["regex"]
    pattern: str = Field(min_length=1, max_length=4096)
    full_match: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"not a valid Python regular expression: {e}") from None
        return pattern


class JsonSchemaJudgeSection(_Section):
    """Options of ``JsonSchemaJudge``: ``schema`` is a JSON Schema object (a TOML table)."""

    kind: Literal["json_schema"]
    # named schema_ because a field "schema" would shadow BaseModel.schema(); it reads and writes as "schema"
    model_config = ConfigDict(serialize_by_alias=True)
    schema_: dict[str, Any] = Field(alias="schema")

    @field_validator("schema_")
    @classmethod
    def _is_json_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        _check_json(schema, "schema")  # TOML dates and times are not JSON
        from jsonschema import exceptions, validators  # a dependency of garden; imported only when used

        try:
            validators.validator_for(schema).check_schema(schema)
        except exceptions.SchemaError as e:
            raise ValueError(f"not a valid JSON Schema: {e.message} (at {list(e.path)})") from None
        return schema


class TeacherJudgeSection(_Section):
    """Options of ``TeacherJudge``; None keeps the judge's own default prompt and verdicts."""

    kind: Literal["teacher"]
    model: ModelRefText | None = Field(default=None, description="grading model; None: the teacher that sampled")
    rating_prompt: str | None = Field(default=None, min_length=1, max_length=4096)
    verdicts: dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], float] | None = Field(
        default=None, min_length=2, max_length=16
    )
    answer_prefix: str = Field(default="", max_length=256)
    max_question_tokens: int = Field(default=1024, ge=1, le=32768)
    max_answer_tokens: int = Field(default=1024, ge=1, le=32768)

    @field_validator("rating_prompt")
    @classmethod
    def _has_fields(cls, prompt: str | None) -> str | None:
        missing = [f for f in ("{question}", "{answer}") if prompt is not None and f not in prompt]
        if missing:
            raise ValueError(f"must contain {' and '.join(missing)}")
        return prompt


JudgeSection = Annotated[
    ReferenceJudgeSection | RegexJudgeSection | JsonSchemaJudgeSection | TeacherJudgeSection,
    Field(discriminator="kind"),
]


class TrainSection(_Section):
    """Collaborative training settings every trainer must share (ranges mirror
    ``garden.trainer.collab.CollabConfig``; ``batch_size``, ``grad_accum`` and threads are per peer).
    An *epoch* is hivemind's: ``target_batch_size`` rows trained across the swarm."""

    lr: float = Field(default=1e-4, gt=0.0, le=1.0)
    lambda_or: float = Field(default=0.1, ge=0.0)
    lambda_kl: float = Field(default=1.0, ge=0.0)
    target_batch_size: int = Field(default=256, ge=1, le=1_000_000)
    max_epochs: int = Field(default=20, ge=1, le=10_000_000)
    warmup_epochs: int = Field(default=1, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(default=1.0, ge=0.0)
    max_length: int = Field(default=512, ge=8, le=32768)
    mode: Literal["sync", "local"] = "sync"
    outer_lr: float = Field(default=1.0, gt=0.0, le=10.0)
    outer_momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    compression: Literal["none", "fp16", "8bit"] = "none"
    checkpoint_every: int = Field(default=1, ge=1, le=1_000_000)
    matchmaking_time: float = Field(default=5.0, gt=0.0, le=600.0)
    averaging_timeout: float = Field(default=30.0, gt=0.0, le=3600.0)

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainSection:
        if self.warmup_epochs > self.max_epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds max_epochs ({self.max_epochs})")
        return self


class MissionSpec(_Section):
    """What a mission asks of the swarm, as the lead wrote it (one ``mission.toml``). Every key and its
    range: docs/missions.md.

    :param name: a short slug shown in listings (lowercase letters, digits, ``.``, ``_``, ``-``)
    :param teachers: model references tried in order (multi-teacher fallback)
    :param prompts: where the lead's prompts came from, as written (a path relative to the TOML file, or
        ``builtin:NAME``); informational for other peers, who get the prompts themselves, hashed
    :param shard_size: prompts per shard, the unit a peer leases
    """

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    teachers: list[ModelRefText] = Field(min_length=1, max_length=8)
    prompts: str = Field(min_length=1, max_length=1024)
    shard_size: int = Field(default=8, ge=1, le=1024)
    student: StudentSection
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    judge: JudgeSection = Field(default_factory=ReferenceJudgeSection)
    train: TrainSection = Field(default_factory=TrainSection)

    @field_validator("teachers")
    @classmethod
    def _distinct(cls, teachers: list[str]) -> list[str]:
        repeated = sorted({t for t in teachers if teachers.count(t) > 1})
        if repeated:
            raise ValueError(f"lists {', '.join(repeated)} more than once")
        return teachers

    @model_validator(mode="after")
    def _fits(self) -> MissionSpec:
        size = len(self.canonical())
        if size > MAX_SPEC_BYTES:
            raise ValueError(
                f"spec encodes to {size} bytes, over the {MAX_SPEC_BYTES}-byte cap (a large judge.schema?)"
            )
        return self

    def canonical(self) -> bytes:
        """msgpack of every key (defaults included), maps sorted by key, floats as float64: equal specs encode
        to equal bytes whatever the TOML's key order, whitespace or number spelling."""
        return canonical_msgpack(self.model_dump(mode="python", by_alias=True))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    @classmethod
    def from_canonical(cls, raw: bytes) -> MissionSpec:
        """A spec from a peer: strictly validated and required to be canonical (so its hash is a function of
        its content); raises only ``RecordError``."""
        spec = decode_record(cls, raw, "signed spec", describe=describe_spec_error)
        if spec.canonical() != raw:
            raise RecordError("spec is not in canonical form")
        return spec


def describe_spec_error(e: ValidationError, limit: int = 5) -> str:
    """``key.path: problem`` for each of the first ``limit`` errors, joined by ``; `` (TOML users fix them
    all at once). The judge's kind is not repeated in the path: ``judge.pattern``, not
    ``judge.regex.pattern``."""
    parts = []
    for err in e.errors()[:limit]:
        loc: list[Any] = list(err["loc"])
        if len(loc) >= 2 and loc[0] == "judge" and loc[1] in JUDGE_KINDS:
            del loc[1]
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "union_tag_not_found":
            loc, message = ["judge", "kind"], f"missing; one of {', '.join(JUDGE_KINDS)}"
        elif err["type"] == "union_tag_invalid":
            tag = (err.get("ctx") or {}).get("tag")
            loc, message = ["judge", "kind"], f"unknown judge {tag!r}; one of {', '.join(JUDGE_KINDS)}"
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "spec"
        parts.append(f"{path}: {message}")
    more = len(e.errors()) - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _check_json(value: Any, path: str) -> None:
    """Refuse anything JSON cannot hold (TOML dates, NaN), since the value is hashed and sent as msgpack."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path}: key {key!r} is not a string")
            _check_json(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path}: {value} is not a JSON number")
    elif not isinstance(value, str | int | float | bool):
        raise ValueError(f"{path}: a {type(value).__name__} is not a JSON value")


def canonical_msgpack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(sorted_maps(value), use_bin_type=True)
    return packed

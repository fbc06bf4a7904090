"""The mission spec a lead writes (``mission.toml``): strict sections, clear errors naming the key, and one
canonical encoding (its sha256 is what the lead signs, with the prompts' hash: see ``garden.protocol.mission``).

A mission travels from a stranger's machine to every peer that works on it, so the spec is checked as
strictly as any DHT record: unknown keys, wrong types and out-of-range numbers are errors naming the
key (a typo such as ``temprature`` must not silently fall back to a default on a thousand machines).
Sampling ranges mirror ``ShakeConfig``, which ``protocol/`` may not import. The training hyper-parameters
are defined here once (:class:`DorpoSettings`, :class:`SwarmSettings`): the spec's ``[train]`` section, the
swarm trainer's ``CollabConfig`` and the single-machine ``TrainConfig`` are built on them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Any, ClassVar, Literal

import msgpack
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from garden.protocol.records import RecordError, decode_record
from garden.protocol.linear_regex import LinearRegexError, compile_linear
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
    """A LoRA adapter on the student (mirrors ``garden.models.student.LoraSpec``; the caps are the spec's)."""

    r: int = Field(default=16, ge=1, le=1024)
    alpha: int = Field(default=32, ge=1, le=4096)
    target_modules: list[Annotated[str, StringConstraints(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1, max_length=64
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)


class StudentSection(_Section):
    """:param keep_layers: prune the base to this many decoder layers, first and last included
    :param spacing: which layers a pruned student keeps (``garden.models.student.kept_layer_indices``): ``even``
        spacing, or ``front``, nearly all the first ones (measured in docs/training.md). Left out of the
        canonical encoding while ``even`` (:data:`OMITTED_AT_DEFAULT`), so missions signed before the key keep
        their hash
    :param layers: prune the base to exactly these decoder layers (increasing), instead of ``keep_layers``: e.g.
        the layers of highest Block Influence on the mission's data, which the lead measures once
        (``garden mission layers``) so that every trainer builds the same student. Left out of the canonical
        encoding while unset"""

    base: ModelRefText
    keep_layers: int | None = Field(default=None, ge=1, le=1024)
    spacing: Literal["even", "front"] = "even"
    layers: list[Annotated[int, Field(ge=0, lt=1 << 16)]] | None = Field(default=None, min_length=1, max_length=1024)
    lora: LoraSection | None = None

    @model_validator(mode="after")
    def _spacing_prunes(self) -> StudentSection:
        if self.layers is not None:
            if self.keep_layers is not None or self.spacing != "even":
                raise ValueError("layers lists the layers to keep: leave keep_layers and spacing out")
            if self.layers != sorted(set(self.layers)):
                raise ValueError("list the layers to keep in increasing order, each once")
        if self.spacing != "even" and self.keep_layers is None:
            raise ValueError(f"spacing = {self.spacing!r} chooses the layers a pruned student keeps: set keep_layers")
        return self


class SamplingSection(_Section):
    """Teacher sampling; fields and ranges mirror ``garden.distill.shaker.ShakeConfig``. Its
    ``batch_prompts`` is each peer's own (hardware) choice and its ``seed`` comes from :func:`prompt_seed`."""

    candidates: int = Field(default=4, ge=1, le=64)
    temperature: float = Field(default=0.8, gt=0.0, le=10.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    top_k_logprobs: int = Field(default=20, ge=1, le=256)
    verify_fraction: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="share of each winning row set that peers with the teacher check (garden.distill.verify); "
        "one row at least, unless 0",
    )


class ReferenceJudgeSection(_Section):
    """Options of ``garden.distill.judges.ReferenceJudge``."""

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
            compile_linear(pattern)  # it runs on strangers' machines: linear time only
        except LinearRegexError as e:
            raise ValueError(f"not a usable regular expression: {e}") from None
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
        check_local_refs(schema)
        return schema


REF_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")


def check_local_refs(schema: Any, where: str = "schema") -> None:
    """Refuse a schema that refers outside itself: a reference is resolved on every shaker's machine, and a
    URL or a file there (``http://192.168.1.1/``, ``file:///dev/zero``) would make strangers' machines fetch
    into their own LAN or read their own disks. Only ``#...`` (this schema) is allowed; raises ``ValueError``
    naming the place."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in REF_KEYWORDS and isinstance(value, str) and not value.startswith("#"):
                raise ValueError(
                    f"{where}.{key} is {str(value)[:100]!r}: only references inside the schema (#...) are allowed, "
                    "never a URL or a file"
                )
            check_local_refs(value, f"{where}.{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            check_local_refs(value, f"{where}[{i}]")


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


class Settings(_Section):
    """A strict, frozen settings object. A subclass that sets :attr:`invalid` (e.g. ``"training settings"``)
    raises a one-line ``ValueError`` naming each bad key when constructed directly:
    ``invalid training settings: lr=nan (Input should be a finite number)``."""

    invalid: ClassVar[str | None] = None

    def __init__(self, **data: Any) -> None:
        what = type(self).invalid
        try:
            super().__init__(**data)
        except ValidationError as e:
            if what is None:
                raise
            raise ValueError(f"invalid {what}: {describe_settings_error(e)}") from None


Schedule = Literal["cosine", "linear", "constant"]
TrainMode = Literal["sync", "local"]
Compression = Literal["none", "fp16", "8bit"]
TargetBatchSize = Annotated[int, Field(ge=1, le=1_000_000)]
Epochs = Annotated[int, Field(ge=1, le=10_000_000)]
WarmupEpochs = Annotated[int, Field(ge=0)]


class DorpoSettings(Settings):
    """The DORPO loss and optimiser hyper-parameters, defined once: the mission spec's ``[train]``, the swarm
    trainer (``garden.collab.trainer.CollabConfig``) and the single-machine trainer
    (``garden.distill.trainer.TrainConfig``) are built on this class.

    :param lr: AdamW's peak learning rate, reached after the warm-up
    :param weight_decay: AdamW's weight decay
    :param schedule: decay after the warm-up: cosine or linear to 0, or constant
    :param max_grad_norm: clip the gradient's global norm to this (0: no clipping)
    :param max_length: longest prompt + answer in tokens; longer rows are left out
    :param lambda_or: weight of the odds-ratio (preference) term; 0 with ``lambda_kl`` 0 is plain SFT
    :param lambda_kl: weight of the top-k KL to the teacher
    :param adam_beta1: AdamW's first-moment decay (momentum). torch's 0.9 unless set; a short run learns faster with
        a shorter memory (benchmarks/dorpo_distill.py, 120 steps: 0.5 with ``adam_beta2`` 0.95 gave a 3.5 % lower
        held-out KL; docs/training.md). Left out of a mission spec's canonical encoding while 0.9
    :param adam_beta2: AdamW's second-moment decay. torch's 0.999 unless set; left out of the canonical encoding
        while 0.999
    """

    lr: float = Field(default=1e-4, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    schedule: Schedule = "cosine"
    max_grad_norm: float = Field(default=1.0, ge=0.0)
    max_length: int = Field(default=512, ge=8, le=32768)
    lambda_or: float = Field(default=0.1, ge=0.0)
    lambda_kl: float = Field(default=1.0, ge=0.0)
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(default=0.999, ge=0.0, lt=1.0)


class SwarmSettings(DorpoSettings):
    """What every trainer of one mission must share, on top of :class:`DorpoSettings`. An *epoch* is
    hivemind's: ``target_batch_size`` rows trained across the swarm.

    :param target_batch_size: samples (rows) across the swarm per epoch
    :param max_epochs: the run ends at this epoch; also the length of the learning-rate schedule
    :param warmup_epochs: epochs of linear warm-up before ``schedule`` decays (at most ``max_epochs``)
    :param mode: ``sync`` averages gradients every epoch (equivalent to one big batch); ``local`` steps on
        its own and averages parameters every epoch, then takes an outer step (DiLoCo: far fewer bytes per
        sample)
    :param outer_lr: ``local`` mode: the outer SGD learning rate on the pseudo-gradient (parameters at the
        last round minus their average now); 1 with ``outer_momentum`` 0 is plain averaging
    :param outer_momentum: ``local`` mode: Nesterov momentum of the outer step (DiLoCo uses 0.7 and 0.9). The
        anchor and momentum are each peer's own: a peer that misses a round keeps another anchor from then
        on, so the outer step suits swarms whose peers rarely miss rounds; the default is plain averaging
    :param compression: how averaged tensors travel: ``none`` (fp32), ``fp16``, or ``8bit`` (uniform
        8-bit quantization for large tensors, fp16 for small ones)
    :param matchmaking_time: seconds a peer waits to gather others for an averaging round
    :param averaging_timeout: seconds a round may take before the peers that answered go on without the
        others (a peer killed mid-round holds the rest up for at most this long)
    :param min_trainers: trainers that must be in the swarm's progress record before any of them takes its
        first step (1: each starts alone). A condition on the start only: once met, the run goes on whoever
        leaves. Left out of the spec's canonical encoding while 1 (see :data:`OMITTED_AT_DEFAULT`)
    :param freeze_embeddings: keep the student's token embeddings and output head as the base has them, as
        ``garden train`` does by default (single-machine DORPO: held-out KL 1.80 -> 1.67; docs/training.md).
        The trainers then average only the other parameters, which for a pruned student are the smaller part.
        Off unless set, so that missions signed before the key existed train as they did; left out of the
        canonical encoding while false
    :param average_state_every: ``sync`` mode: the parameter round (hivemind's state averaging) at every this
        many epochs instead of every epoch. Peers that met in an epoch's gradient round take the same step, so
        their parameters stay equal without it (up to rounding, and 8-bit compression's error); the parameter
        round, which moves the whole model once more, pulls back together peers that missed a round. Every
        fourth epoch nearly halves a sync swarm's bytes (docs/training.md). 1 (every epoch, as before the key
        existed) unless set, and left out of the canonical encoding while 1. ``local`` mode averages parameters
        every epoch, as its round: it must stay 1 there
    """

    target_batch_size: TargetBatchSize = 256
    max_epochs: Epochs = 20
    warmup_epochs: WarmupEpochs = 1
    mode: TrainMode = "sync"
    outer_lr: float = Field(default=1.0, gt=0.0, le=10.0)
    outer_momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    compression: Compression = "none"
    matchmaking_time: float = Field(default=5.0, gt=0.0, le=600.0)
    averaging_timeout: float = Field(default=30.0, gt=0.0, le=3600.0)
    min_trainers: int = Field(default=1, ge=1, le=1000)
    freeze_embeddings: StrictBool = False
    average_state_every: int = Field(default=1, ge=1, le=1000)

    @field_validator("warmup_epochs")
    @classmethod
    def _warmup_fits(cls, warmup_epochs: int, info: ValidationInfo) -> int:
        max_epochs = info.data.get("max_epochs")
        if max_epochs is not None and warmup_epochs > max_epochs:
            raise ValueError(f"{warmup_epochs} exceeds max_epochs ({max_epochs})")
        return warmup_epochs

    @model_validator(mode="after")
    def _state_rounds_fit_the_mode(self) -> SwarmSettings:
        if self.mode == "local" and self.average_state_every != 1:
            raise ValueError(
                "average_state_every applies to sync mode: local mode averages parameters every epoch "
                "(set target_batch_size to average less often)"
            )
        return self


class TrainSection(SwarmSettings):
    """The spec's ``[train]``: :class:`SwarmSettings` and how often the swarm writes a checkpoint
    (``batch_size``, ``grad_accum`` and threads are each peer's own).

    :param checkpoint_every: epochs between checkpoints (the last epoch is always saved)
    """

    checkpoint_every: int = Field(default=1, ge=1, le=1_000_000)


OMITTED_AT_DEFAULT: dict[str, tuple[str, ...]] = {
    "student": ("spacing", "layers"),
    "train": ("min_trainers", "freeze_embeddings", "average_state_every", "adam_beta1", "adam_beta2"),
    "sampling": ("verify_fraction",),
}
"""Keys added to a section after missions were first signed (section -> keys). The canonical encoding holds every
other key, defaults included, but leaves these out while they equal their default: a spec that does not set one
encodes, hashes (the mission id) and reads on older peers exactly as before the key existed, and since
:meth:`MissionSpec.from_canonical` asks for the canonical bytes, a spec that spells such a key out at its default is
refused (one spec, one encoding). A key added later goes here, never into the encoding of specs that do not use it."""


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
        """msgpack of every key (defaults included, except those of :data:`OMITTED_AT_DEFAULT` while at their
        default), maps sorted by key, floats as float64: equal specs encode to equal bytes whatever the TOML's key
        order, whitespace or number spelling."""
        encoded = self.model_dump(mode="python", by_alias=True)
        for name, keys in OMITTED_AT_DEFAULT.items():
            section = getattr(self, name)
            for key in keys:
                if getattr(section, key) == type(section).model_fields[key].default:
                    del encoded[name][key]
        return canonical_msgpack(encoded)

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


def describe_settings_error(e: ValidationError, limit: int = 5) -> str:
    """``key=value (problem)`` for each of the first ``limit`` errors of a settings object, joined by ``; ``."""
    parts = []
    for err in e.errors()[:limit]:
        key = ".".join(str(p) for p in err["loc"]) or "settings"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            parts.append(f"{key}: missing")
        elif err["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown setting")
        else:
            parts.append(f"{key}={err['input']!r} ({message})")
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

"""Prompt and DORPO row records: what shakers read and write, what trainers consume, what peers
replicate. Strict schemas (reject, never coerce), like every record that may come from a stranger.

A :class:`DorpoRow` keeps its token arrays as little-endian ``bytes`` (ids as uint16 when the teacher's
vocabulary fits, else int32; log-probs and rest mass as float16), so a row is small in msgpack, in the
store and on the wire: 84 bytes per token at k = 20 with uint16 ids. Rows are content-addressed:
:attr:`DorpoRow.row_id` is the sha256 of the row's canonical msgpack encoding (see :meth:`DorpoRow.to_msgpack`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from garden.protocol.records import RecordError, decode_record, first_error

MAX_PROMPT_CHARS = 32_000


class PromptRow(BaseModel):
    """One prompt of a mission's data set (a line of a prompts JSONL file).

    :param prompt: the user message (the chat template is applied by the shaker)
    :param reference: a known good answer, for the ``reference`` judge (optional)
    :param meta: free-form extras carried along (e.g. ``{"topic": "capitals"}``), never interpreted
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    reference: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    meta: dict[str, Any] = Field(default_factory=dict)


# --- DORPO rows ------------------------------------------------------------------------------------

ROW_VERSION = 1
"""Version of the DorpoRow format (``v``). Adding a field changes every row's canonical encoding, hence
its id: bump this when the format changes."""

MAX_ANSWER_CHARS = 128_000
"""Longest chosen/rejected answer text (a token is rarely more than 16 characters; 8192 tokens)."""
MAX_TOKENS = 8192
"""Longest chosen answer, in tokens (T)."""
MAX_TOPK = 256
"""Most teacher log-probs kept per token (k)."""
MAX_NAME_CHARS = 512
"""Longest model / judge / tokenizer reference."""
MAX_SCORES = 16
MAX_ROW_BYTES = 16 * 1024 * 1024
"""Default cap on an encoded row: the largest valid row (T = 8192, k = 256, int32 ids, longest texts)
is about 14 MiB; a typical one (T = 512, k = 20) about 45 KiB."""

UINT16_VOCAB = 65536
"""Vocabularies up to this size store their ids as uint16, larger ones as int32."""
FLOAT16_MIN = float(np.finfo(np.float16).min)
"""-65504: log-probs below it (float16 would make them -inf) are clamped to it, so stored values are finite."""
POSITIVE_LOGPROB_SLACK = 1e-3
"""``from_arrays`` rounds log-probs in (0, 1e-3] (float error of a near-certain token) down to 0; larger
positive values are an error."""
TOPK_MASS_SLACK = 0.05
"""The top-k probabilities of one token may sum to at most 1 + this (teachers computing in bf16 overshoot a
little); more is not a distribution."""
REST_MASS_SLACK = 0.01
"""How far a stored rest mass may be from max(0, 1 - sum(exp(top-k log-probs))) (float16 rounding)."""

IdDtype = Literal["uint16", "int32"]
_ID_NUMPY: dict[str, str] = {"uint16": "<u2", "int32": "<i4"}
_F16 = "<f2"

_Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]
_ScoreKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class DorpoRow(BaseModel):
    """One DORPO training row: a prompt, the chosen answer (with the teacher's top-k distribution on each of
    its tokens), optionally a rejected answer, and where it came from.

    Array fields are little-endian bytes; build rows with :meth:`from_arrays` and read the arrays back with
    the ``*_array()`` accessors. With T = number of chosen tokens and w = 2 (uint16) or 4 (int32):

    :param chosen_ids: T ids (T * w bytes), in the teacher's tokenizer (see ``tokenizer``)
    :param topk_ids: [T, k] ids, row-major (T * k * w bytes); distinct within a token
    :param topk_logprobs: [T, k] float16 log-probs of the teacher at those ids, temperature 1, all in
        [-65504, 0] (T * k * 2 bytes)
    :param rest_mass: [T] float16, 1 - sum(exp(top-k log-probs)) clamped to >= 0 (T * 2 bytes)
    :param k: log-probs per token; 0 for a row without log-probs (a teacher whose tokenizer differs from the
        student's, or that gave none): ``topk_ids``, ``topk_logprobs`` and ``rest_mass`` are then empty
    :param rejected: the rejected answer, or None for a chosen-only row (never ``""``: see
        :func:`write_preference_jsonl`)
    :param teacher: model reference of the teacher that produced the log-probs / answers
    :param judge: the judge that ranked the answers (e.g. ``"reference"`` or a model reference)
    :param scores: the judge's scores, e.g. ``{"chosen": 0.9, "rejected": 0.1}``
    :param tokenizer: identifier of the teacher's tokenizer (its ``name_or_path``): a trainer applies the KL
        term and uses ``chosen_ids`` only when it matches the student's
    :param reference_used: the chosen answer is the prompt's reference, not a teacher sample
    """

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

    v: int = Field(default=ROW_VERSION, ge=1)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    chosen: str = Field(max_length=MAX_ANSWER_CHARS)
    rejected: str | None = Field(default=None, min_length=1, max_length=MAX_ANSWER_CHARS)
    id_dtype: IdDtype
    chosen_ids: bytes = Field(min_length=2, max_length=MAX_TOKENS * 4)
    k: int = Field(default=0, ge=0, le=MAX_TOPK)
    topk_ids: bytes = Field(default=b"", max_length=MAX_TOKENS * MAX_TOPK * 4)
    topk_logprobs: bytes = Field(default=b"", max_length=MAX_TOKENS * MAX_TOPK * 2)
    rest_mass: bytes = Field(default=b"", max_length=MAX_TOKENS * 2)
    teacher: _Name
    judge: _Name
    scores: dict[_ScoreKey, float] = Field(default_factory=dict, max_length=MAX_SCORES)
    tokenizer: _Name
    reference_used: bool = False

    # --- validation --------------------------------------------------------------------------------
    @model_validator(mode="after")
    def _check_arrays(self) -> DorpoRow:
        width = np.dtype(_ID_NUMPY[self.id_dtype]).itemsize
        if len(self.chosen_ids) % width:
            size = len(self.chosen_ids)
            raise ValueError(f"chosen_ids has {size} bytes, not a multiple of {width} ({self.id_dtype})")
        t, k = len(self.chosen_ids) // width, self.k
        if not 1 <= t <= MAX_TOKENS:
            raise ValueError(f"chosen_ids holds {t} tokens, outside 1..{MAX_TOKENS}")
        expected = {"topk_ids": t * k * width, "topk_logprobs": t * k * 2, "rest_mass": t * 2 if k else 0}
        for name, size in expected.items():
            got = len(getattr(self, name))
            if got != size:
                raise ValueError(f"{name} has {got} bytes, expected {size} for T={t} tokens, k={k} ({self.id_dtype})")
        if self.id_dtype == "int32":
            for name in ("chosen_ids", "topk_ids"):
                if np.any(np.frombuffer(getattr(self, name), dtype="<i4") < 0):
                    raise ValueError(f"{name} holds negative token ids")
        if k == 0:
            return self
        ids = np.frombuffer(self.topk_ids, dtype=_ID_NUMPY[self.id_dtype]).reshape(t, k)
        if k > 1 and np.any(np.diff(np.sort(ids, axis=1), axis=1) == 0):
            raise ValueError("topk_ids repeats an id within a token")
        logprobs = np.frombuffer(self.topk_logprobs, dtype=_F16).astype(np.float64).reshape(t, k)
        if not np.all(np.isfinite(logprobs)):
            raise ValueError("topk_logprobs holds NaN or infinite values")
        if np.any(logprobs > 0):
            raise ValueError(f"topk_logprobs holds positive log-probs (max {logprobs.max():g})")
        mass = np.exp(logprobs).sum(axis=1)
        if np.any(mass > 1 + TOPK_MASS_SLACK):
            raise ValueError(f"top-k probabilities of a token sum to {mass.max():.4f} > 1: not temperature-1 log-probs")
        rest = np.frombuffer(self.rest_mass, dtype=_F16).astype(np.float64)
        if not np.all(np.isfinite(rest)) or np.any(rest < 0) or np.any(rest > 1):
            raise ValueError("rest_mass holds values outside [0, 1]")
        error = np.abs(rest - np.maximum(0.0, 1.0 - mass)).max()
        if error > REST_MASS_SLACK:
            raise ValueError(f"rest_mass is off 1 - sum(exp(topk_logprobs)) by up to {error:.4f}")
        return self

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        *,
        prompt: str,
        chosen: str,
        rejected: str | None = None,
        chosen_ids: Any,
        topk_ids: Any = None,
        topk_logprobs: Any = None,
        teacher: str,
        judge: str,
        scores: dict[str, float] | None = None,
        tokenizer: str,
        reference_used: bool = False,
        vocab_size: int,
    ) -> DorpoRow:
        """Build a row from arrays: ``Sequence[int]``, numpy arrays or torch tensors (any device, any dtype).

        :param chosen_ids: [T] token ids of the chosen answer
        :param topk_ids: [T, k] the teacher's top-k ids per chosen token, or None (with ``topk_logprobs``)
            for a row without log-probs
        :param topk_logprobs: [T, k] the teacher's temperature-1 log-probs at those ids (any float dtype)
        :param vocab_size: the teacher's vocabulary size: ids are stored as uint16 when it is <= 65536, else
            as int32 (one dtype for all of a teacher's rows), and every id must be below it

        Log-probs are rounded to float16, those below -65504 clamped to it (float16 would give -inf) and
        tiny positive ones (<= 1e-3, float error) to 0; the rest mass is computed from the rounded values.
        Raises ``ValueError`` (a pydantic ``ValidationError`` for schema errors) on inconsistent input.
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= 2**31 - 1:
            raise ValueError(f"vocab_size must be an int in 1..2**31-1, got {vocab_size!r}")
        ids = _array(chosen_ids, "chosen_ids", ndim=1, integers=True)
        t = ids.shape[0]
        if (topk_ids is None) != (topk_logprobs is None):
            raise ValueError("give both topk_ids and topk_logprobs, or neither (a row without log-probs)")
        if topk_ids is None:
            top = np.zeros((t, 0), dtype=np.int64)
            logprobs = np.zeros((t, 0), dtype=np.float64)
        else:
            top = _array(topk_ids, "topk_ids", ndim=2, integers=True)
            logprobs = _array(topk_logprobs, "topk_logprobs", ndim=2, integers=False)
            if top.shape != logprobs.shape or top.shape[0] != t:
                raise ValueError(
                    f"topk_ids {top.shape} and topk_logprobs {logprobs.shape} must both be [T, k] with T = {t}"
                )
        for name, arr in (("chosen_ids", ids), ("topk_ids", top)):
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise ValueError(f"{name} holds ids outside 0..{vocab_size - 1} (vocab_size {vocab_size})")
        if np.any(np.isnan(logprobs)):
            raise ValueError("topk_logprobs holds NaN")
        if logprobs.size and logprobs.max() > POSITIVE_LOGPROB_SLACK:
            raise ValueError(f"topk_logprobs holds positive log-probs (max {logprobs.max():g})")
        id_dtype: IdDtype = "uint16" if vocab_size <= UINT16_VOCAB else "int32"
        return cls._build(
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            id_dtype=id_dtype,
            chosen_ids=ids,
            topk_ids=top,
            topk_logprobs=logprobs,
            teacher=teacher,
            judge=judge,
            scores=dict(scores or {}),
            tokenizer=tokenizer,
            reference_used=reference_used,
        )

    @classmethod
    def _build(
        cls,
        *,
        id_dtype: IdDtype,
        chosen_ids: np.ndarray,
        topk_ids: np.ndarray,
        topk_logprobs: np.ndarray,
        **fields: Any,
    ) -> DorpoRow:
        """Pack checked int64 / float64 arrays into a validated row (rest mass computed here)."""
        k = int(topk_ids.shape[1])
        logprobs16 = np.clip(topk_logprobs, FLOAT16_MIN, 0.0).astype(_F16)
        logprobs16 = logprobs16 + np.float16(0.0)  # -0.0 -> +0.0: one encoding per value, one row id
        if k:
            rest = np.maximum(0.0, 1.0 - np.exp(logprobs16.astype(np.float64)).sum(axis=1)).astype(_F16)
            rest_bytes = rest.tobytes()
        else:
            rest_bytes = b""
        id_np = _ID_NUMPY[id_dtype]
        return cls(
            id_dtype=id_dtype,
            chosen_ids=chosen_ids.astype(id_np).tobytes(),
            k=k,
            topk_ids=topk_ids.astype(id_np).tobytes(),
            topk_logprobs=logprobs16.astype(_F16).tobytes(),
            rest_mass=rest_bytes,
            **fields,
        )

    # --- accessors ---------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        """T, the number of chosen tokens."""
        return len(self.chosen_ids) // np.dtype(_ID_NUMPY[self.id_dtype]).itemsize

    @property
    def has_logprobs(self) -> bool:
        """Whether the row carries the teacher's top-k (k > 0), i.e. the KL term can apply."""
        return self.k > 0

    def chosen_ids_array(self) -> np.ndarray:
        """[T] int64 chosen token ids."""
        return np.frombuffer(self.chosen_ids, dtype=_ID_NUMPY[self.id_dtype]).astype(np.int64)

    def topk_ids_array(self) -> np.ndarray:
        """[T, k] int64 teacher top-k ids ([T, 0] for a row without log-probs)."""
        ids = np.frombuffer(self.topk_ids, dtype=_ID_NUMPY[self.id_dtype]).astype(np.int64)
        return ids.reshape(self.num_tokens, self.k)

    def topk_logprobs_array(self) -> np.ndarray:
        """[T, k] float32 teacher log-probs (the stored float16 values, exactly)."""
        return np.frombuffer(self.topk_logprobs, dtype=_F16).astype(np.float32).reshape(self.num_tokens, self.k)

    def rest_mass_array(self) -> np.ndarray:
        """[T] float32 rest mass; all 1.0 for a row without log-probs (k = 0: the whole mass is the rest)."""
        if not self.k:
            return np.ones(self.num_tokens, dtype=np.float32)
        return np.frombuffer(self.rest_mass, dtype=_F16).astype(np.float32)

    def bytes_per_token(self) -> float:
        """Stored array bytes per chosen token: 2 + 4k + 2 with uint16 ids (84 at k = 20)."""
        total = len(self.chosen_ids) + len(self.topk_ids) + len(self.topk_logprobs) + len(self.rest_mass)
        return total / self.num_tokens

    # --- identity and encoding ---------------------------------------------------------------------
    def to_msgpack(self) -> bytes:
        """The canonical encoding: ``msgpack.packb(model_dump(), use_bin_type=True)`` with every map's keys
        sorted (by code point), bytes as msgpack bin, text as str, floats as float64 and ints in msgpack's
        smallest form. Every field is written, defaults included, so equal rows encode to equal bytes in any
        process, and ``from_msgpack(to_msgpack())`` gives back an equal row."""
        packed: bytes = msgpack.packb(sorted_maps(self.model_dump(mode="python")), use_bin_type=True)
        return packed

    @cached_property
    def row_id(self) -> str:
        """sha256 hex of :meth:`to_msgpack`: the row's content address (identical content, identical id)."""
        return hashlib.sha256(self.to_msgpack()).hexdigest()

    @classmethod
    def from_msgpack(cls, raw: Any, max_bytes: int = MAX_ROW_BYTES) -> DorpoRow:
        """Decode an encoded row (possibly from a stranger): size-capped before unpacking; raises only
        ``RecordError`` with the reason."""
        if not isinstance(raw, bytes):
            raise RecordError(f"row is {type(raw).__name__}, not bytes")
        if len(raw) > max_bytes:
            raise RecordError(f"row is {len(raw)} bytes, over the {max_bytes}-byte cap")
        return decode_record(cls, raw, "row")


HELDOUT_EVERY = 16
"""One prompt in this many (by hash) is held out of a mission's training: the lead measures each checkpoint on
their rows, so the published KL is on prompts no trainer learnt from (6 %: 64 rows in a mission of ~1000)."""
HELDOUT_FROM = 64
"""Missions of fewer prompts hold none out: a handful of prompts would lose most of what it has to teach (or,
all of them held out by chance, train on nothing), and a few held-out rows measure nothing. From 64 on, about 4
prompts are held out; the lead's vouch says when none was (its figures are then on trained-on rows)."""


def holds_out(prompts_count: int) -> bool:
    """Whether a mission of ``prompts_count`` prompts (its signed body's ``prompts_count``) holds any out."""
    return prompts_count >= HELDOUT_FROM


def held_out(mission_id: str, prompt: str) -> bool:
    """Whether ``prompt``'s rows are held out of ``mission_id``'s training. Every peer computes the same split
    from the signed mission alone (nothing to agree on, nothing a peer could claim), the split is by prompt (a
    prompt's other rows would leak its answers into training), and salted by the mission (each mission holds out
    other prompts of a shared prompt file)."""
    digest = hashlib.sha256(f"garden-heldout\n{mission_id}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_EVERY == 0


def sorted_maps(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: sorted_maps(value[key]) for key in sorted(value)}
    if isinstance(value, list | tuple):
        return [sorted_maps(item) for item in value]
    return value


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor; torch is not imported here
        tensor = value.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # bfloat16 has no numpy dtype
        return np.asarray(tensor.numpy())
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} is not a rectangular array: {str(e)[:200]}") from None


def _array(value: Any, name: str, ndim: int, integers: bool) -> np.ndarray:
    """``value`` as an int64 (``integers``) or float64 array of ``ndim`` dimensions, or a ValueError."""
    arr = _to_numpy(value, name)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    kinds, what = ("iu", "integers") if integers else ("iuf", "numbers")
    if arr.size and arr.dtype.kind not in kinds:
        raise ValueError(f"{name} must hold {what}, got {arr.dtype}")
    return arr.astype(np.int64 if integers else np.float64)


# --- JSONL ---------------------------------------------------------------------------------------

_JSONL_KEYS = (
    "prompt", "chosen", "rejected", "chosen_ids", "topk_ids", "topk_logprobs", "rest_mass", "k", "id_dtype",
    "teacher", "judge", "scores", "tokenizer", "reference_used", "v", "row_id",
)  # fmt: skip


def write_preference_jsonl(rows: Iterable[DorpoRow], path: Path | str) -> int:
    """Write rows as JSONL in TRL's preference format; returns the number of rows written.

    Each line is an object with TRL's ``prompt``, ``chosen`` and ``rejected`` columns, plus ``chosen_ids``,
    ``topk_ids`` [T][k], ``topk_logprobs`` [T][k], ``rest_mass`` [T] as JSON lists (the exact float16
    values, as the accessors return them), ``k``, ``id_dtype``, ``teacher``, ``judge``, ``scores``,
    ``tokenizer``, ``reference_used``, ``v`` and ``row_id``.

    A chosen-only row is written with ``"rejected": ""``: TRL's preference format needs a string there (its
    trainers tokenize the column and fail on null). TRL itself would train on that empty answer as a real
    loser, so drop rows with an empty ``rejected`` before giving the file to a TRL pairwise trainer; a row's
    ``rejected`` is never ``""`` otherwise, so :func:`read_preference_jsonl` reads it back as None.

    The file is written to a temporary file beside ``path``, flushed to disk, then renamed over ``path``: a
    failure midway leaves the previous file (or none) and no temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                if not isinstance(row, DorpoRow):
                    raise TypeError(f"row {count + 1} is a {type(row).__name__}, not a DorpoRow")
                f.write(preference_json_line(row))
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return count


def preference_json_line(row: DorpoRow) -> str:
    """One line of :func:`write_preference_jsonl` (newline included), e.g. for streaming over HTTP."""
    return json.dumps(_row_to_json(row), ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"


def _row_to_json(row: DorpoRow) -> dict[str, Any]:
    return {
        "prompt": row.prompt,
        "chosen": row.chosen,
        "rejected": row.rejected if row.rejected is not None else "",
        "chosen_ids": row.chosen_ids_array().tolist(),
        "topk_ids": row.topk_ids_array().tolist(),
        "topk_logprobs": row.topk_logprobs_array().astype(np.float64).tolist(),
        "rest_mass": row.rest_mass_array().astype(np.float64).tolist(),
        "k": row.k,
        "id_dtype": row.id_dtype,
        "teacher": row.teacher,
        "judge": row.judge,
        "scores": dict(sorted(row.scores.items())),
        "tokenizer": row.tokenizer,
        "reference_used": row.reference_used,
        "v": row.v,
        "row_id": row.row_id,
    }


def read_preference_jsonl(path: Path | str) -> list[DorpoRow]:
    """Read a file written by :func:`write_preference_jsonl` back into equal rows (same ``row_id``).

    Blank lines are skipped; ``"rejected": ""`` (or null) means no rejected answer. ``row_id`` is optional,
    but when present it must match the row read (a changed line is refused, not silently re-addressed).
    Raises ``ValueError`` naming the file and line on any malformed line; an empty file gives ``[]``.
    """
    path = Path(path)
    rows: list[DorpoRow] = []
    for line_no, obj in read_json_objects(path):
        try:
            rows.append(_row_from_json(obj))
        except ValidationError as e:
            raise ValueError(f"{path}:{line_no}: {first_error(e)}") from None
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: {e}") from None
    return rows


def _row_from_json(obj: dict[str, Any]) -> DorpoRow:
    unknown = sorted(set(obj) - set(_JSONL_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown}")
    missing = sorted(set(_JSONL_KEYS) - {"row_id", "rest_mass"} - set(obj))
    if missing:
        raise ValueError(f"missing keys {missing}")
    id_dtype = obj["id_dtype"]
    if id_dtype not in _ID_NUMPY:
        raise ValueError(f"id_dtype must be one of {sorted(_ID_NUMPY)}, got {id_dtype!r}")
    k = obj["k"]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOPK:
        raise ValueError(f"k must be an int in 0..{MAX_TOPK}, got {k!r}")
    ids = _json_array(obj["chosen_ids"], "chosen_ids", "iu")
    if ids.ndim != 1:
        raise ValueError(f"chosen_ids must be a list of ints, got shape {ids.shape}")
    t = ids.shape[0]
    top = _json_array(obj["topk_ids"], "topk_ids", "iu")
    logprobs = _json_array(obj["topk_logprobs"], "topk_logprobs", "iuf")
    for name, arr in (("topk_ids", top), ("topk_logprobs", logprobs)):
        if arr.shape != (t, k) and not (k == 0 and arr.size == 0):
            raise ValueError(f"{name} has shape {arr.shape}, expected [T={t}, k={k}]")
    limit = UINT16_VOCAB if id_dtype == "uint16" else 2**31
    for name, arr in (("chosen_ids", ids), ("topk_ids", top)):
        if arr.size and (arr.min() < 0 or arr.max() >= limit):
            raise ValueError(f"{name} holds ids outside 0..{limit - 1} ({id_dtype})")
    if np.any(np.isnan(logprobs)) or (logprobs.size and logprobs.max() > 0):
        raise ValueError("topk_logprobs holds NaN or positive values")
    rejected = obj["rejected"]
    row = DorpoRow._build(
        id_dtype=id_dtype,
        chosen_ids=ids,
        topk_ids=top.reshape(t, k),
        topk_logprobs=logprobs.reshape(t, k),
        prompt=obj["prompt"],
        chosen=obj["chosen"],
        rejected=None if rejected == "" else rejected,
        teacher=obj["teacher"],
        judge=obj["judge"],
        scores=obj["scores"],
        tokenizer=obj["tokenizer"],
        reference_used=obj["reference_used"],
        v=obj["v"],
    )
    if "rest_mass" in obj:
        rest = _json_array(obj["rest_mass"], "rest_mass", "iuf")
        if rest.shape != (t,) or np.abs(rest - row.rest_mass_array()).max() > REST_MASS_SLACK:
            raise ValueError("rest_mass does not match 1 - sum(exp(topk_logprobs))")
    if "row_id" in obj and obj["row_id"] != row.row_id:
        raise ValueError(f"row_id {str(obj['row_id'])[:80]!r} does not match the row's content ({row.row_id})")
    return row


def _json_array(value: Any, name: str, kinds: str) -> np.ndarray:
    if not isinstance(value, list):
        raise ValueError(f"{name} must be a list, got {type(value).__name__}")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):
        raise ValueError(f"{name} is not a rectangular list of numbers") from None
    if arr.size and arr.dtype.kind not in kinds:
        raise ValueError(f"{name} must hold {'integers' if kinds == 'iu' else 'numbers'}, got {arr.dtype}")
    return arr.astype(np.int64 if kinds == "iu" else np.float64)


def read_prompts_jsonl(path: Path | str) -> list[PromptRow]:
    """Read a prompts file: one JSON object per line, each a :class:`PromptRow`; blank lines are skipped.

    Raises ``ValueError`` naming the file, the line number and the problem for a malformed line (invalid
    UTF-8 or JSON, not an object, schema error), and ``ValueError("<path> has no prompts")`` when the file
    holds no prompt at all.
    """
    path = Path(path)
    prompts: list[PromptRow] = []
    for line_no, obj in read_json_objects(path):
        try:
            prompts.append(PromptRow.model_validate(obj))
        except ValidationError as e:
            raise ValueError(f"{path}:{line_no}: {first_error(e)}") from None
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return prompts


def read_json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; ``ValueError`` naming the file and line for
    anything else (not UTF-8, not JSON, NaN/Infinity constants, not an object)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text, parse_constant=_reject_constant)
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({str(e)[:200]})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line_no}: a JSON {type(obj).__name__}, not an object")
            yield line_no, obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


__all__ = [
    "DorpoRow",
    "MAX_ROW_BYTES",
    "preference_json_line",
    "PromptRow",
    "read_preference_jsonl",
    "read_prompts_jsonl",
    "write_preference_jsonl",
]

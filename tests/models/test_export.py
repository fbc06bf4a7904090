"""``garden export``: the built-in model and students as one GGUF file (loaded back by transformers, as llama.cpp
would load it), a transformers directory and a LoRA adapter; and the errors of bad requests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from garden.cli import app
from garden.data import demo_prompts
from garden.models.export import ExportError, export_model, rotary_permute
from garden.models.loading import load_model
from harness.trainers import make_tiny_student

pytestmark = pytest.mark.heavy(2)  # seconds in `make check` (the `slow` ones run in `make test` only)
MODEL = "builtin:smollm2-135m"


@pytest.fixture(autouse=True)
def cache(model_cache: Path) -> Path:
    return model_cache


def greedy(model: object, tokenizer: object, prompts: list[str], tokens: int = 16) -> list[list[int]]:
    from garden.inference.generate import prompt_ids

    answers = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)  # type: ignore[attr-defined]
        answers.append(out[0, len(ids) :].tolist())
    return answers


def load_gguf(path: Path) -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export")
    return {quant: export_model(MODEL, out / f"smollm2-{quant}.gguf", "gguf", quant).path for quant in ("f16", "q8_0")}


@pytest.mark.slow
def test_the_f16_gguf_answers_as_the_source_model_does(exported: dict[str, Path]) -> None:
    source = load_model(MODEL)
    model, tokenizer = load_gguf(exported["f16"])
    prompts = [p.prompt for p in demo_prompts("heldout")[:3]]
    # the tokenizer and its chat template came through: the same ids for the same chat
    from garden.inference.generate import prompt_ids

    assert all(prompt_ids(tokenizer, p) == prompt_ids(source.tokenizer, p) for p in prompts)
    assert greedy(model, tokenizer, prompts) == greedy(source.model, source.tokenizer, prompts)
    ids = torch.tensor([prompt_ids(source.tokenizer, prompts[0])])
    with torch.no_grad():
        a, b = source.model(ids).logits, model(ids).logits  # type: ignore[operator]
    gap = float((a - b).abs().max())
    print(f"f16 GGUF: largest logit gap {gap:.4f} (logits up to {float(a.abs().max()):.1f})")
    # float16 weights (11 bits of mantissa) through 30 layers: a few hundredths, far below a token's margin
    assert gap < 0.1, gap


@pytest.mark.slow
# alone: ~45 s of one core (a GGUF parsed in Python, 16 greedy answers); beside a swarm test in `make test`'s other
# worker (load 7-8 on 2 cores) it once ran past pytest-timeout's 300 s
@pytest.mark.serial
def test_the_q8_0_gguf_agrees_on_most_tokens_and_is_smaller(exported: dict[str, Path]) -> None:
    from garden.inference.generate import prompt_ids

    source = load_model(MODEL)
    model, tokenizer = load_gguf(exported["q8_0"])
    prompts = [p.prompt for p in demo_prompts("heldout")[:16]]
    theirs = greedy(source.model, source.tokenizer, prompts)
    # each token of the source's greedy answers, as q8_0 picks it after the same prefix: a near-tie that q8_0
    # tips once (4 of 16 answers part so, at top-2 gaps of 0.03-0.15) would otherwise count every later token
    same = total = 0
    for prompt, answer in zip(prompts, theirs, strict=True):
        ids = prompt_ids(source.tokenizer, prompt)
        with torch.no_grad():
            picked = model(torch.tensor([ids + answer])).logits[0, len(ids) - 1 : -1].argmax(-1)  # type: ignore[operator]
        same, total = same + int((picked == torch.tensor(answer)).sum()), total + len(answer)
    mine = greedy(model, tokenizer, prompts[:3])
    alike = sum(a == b for x, y in zip(mine, theirs, strict=False) for a, b in zip(x, y, strict=False))
    print(f"q8_0 GGUF: {same}/{total} of the source's greedy tokens picked after the same prefix; its own greedy "
          f"answers to 3 prompts share {alike}/{sum(len(y) for y in theirs[:3])} positions")  # fmt: skip
    assert same >= 0.95 * total, (same, total)
    assert exported["q8_0"].stat().st_size < 0.6 * exported["f16"].stat().st_size
    from gguf import GGUFReader

    fields = GGUFReader(str(exported["q8_0"])).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm" and fields["general.architecture"].contents() == "llama"
    assert "im_start" in fields["tokenizer.chat_template"].contents()


@pytest.mark.slow
def test_a_pruned_student_exports(tmp_path: Path) -> None:
    from gguf import GGUFReader

    from garden.inference.generate import prompt_ids
    from garden.models.student import build_student, parse_student_ref

    ref = f"prune:{MODEL}:layers=4"
    path = export_model(ref, tmp_path / "pruned.gguf", "gguf", "f16").path
    pruned = GGUFReader(str(path))
    assert pruned.fields["llama.block_count"].contents() == 4
    assert {t.name.split(".")[1] for t in pruned.tensors if t.name.startswith("blk.")} == {"0", "1", "2", "3"}
    # loaded back, it is the pruned student: the same greedy answers, logits within float16 rounding
    source, (model, tokenizer) = build_student(parse_student_ref(ref)), load_gguf(path)
    prompts = [p.prompt for p in demo_prompts("heldout")[:2]]
    assert greedy(model, tokenizer, prompts, tokens=8) == greedy(source.model.eval(), source.tokenizer, prompts, 8)
    ids = torch.tensor([prompt_ids(source.tokenizer, prompts[0])])
    with torch.no_grad():
        gap = float((source.model(ids).logits - model(ids).logits).abs().max())  # type: ignore[operator]
    print(f"pruned f16 GGUF: largest logit gap {gap:.4f}")
    assert gap < 0.1, gap


@pytest.mark.slow
def test_a_lora_student_exports_as_its_adapter_and_merged(tmp_path: Path) -> None:
    # a LoRA student's checkpoint as garden writes one: the merged model at the top, the adapter in adapter/
    from garden.models.student import LoraSpec, StudentSpec, build_student

    student = build_student(StudentSpec(make_tiny_student(tmp_path / "tiny").as_posix(), lora=LoraSpec(r=4)))
    with torch.no_grad():
        for name, parameter in student.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a trained adapter (a fresh one changes nothing)
    checkpoint = tmp_path / "checkpoint"
    student.model.save_pretrained(checkpoint / "adapter")
    merged = student.model.merge_and_unload()
    merged.save_pretrained(checkpoint)
    student.tokenizer.save_pretrained(checkpoint)
    adapter = export_model(str(checkpoint), tmp_path / "adapter-out", "peft")
    assert json.loads((adapter.path / "adapter_config.json").read_text())["r"] == 4
    assert (adapter.path / "adapter_model.safetensors").is_file()
    whole = export_model(str(checkpoint), tmp_path / "lora.gguf", "gguf", "f16")
    model, _ = load_gguf(whole.path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert float((model(ids).logits - merged(ids).logits).abs().max()) < 1e-2  # type: ignore[operator]


def test_the_rotary_permutation_interleaves_each_heads_halves() -> None:
    rows = torch.arange(8).reshape(8, 1).numpy()  # 2 heads of 4 rows: halves (0 1 | 2 3), (4 5 | 6 7)
    assert rotary_permute(rows, 2).reshape(-1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_bad_requests_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="cannot load 'hub-id/that-does-not-exist'"):
        export_model("hub-id/that-does-not-exist", tmp_path / "x.gguf")
    with pytest.raises(ExportError, match="unknown format 'onnx'"):
        export_model(MODEL, tmp_path / "x", "onnx")
    with pytest.raises(ExportError, match="unknown quantization 'q2_k'"):
        export_model(MODEL, tmp_path / "x.gguf", "gguf", "q2_k")
    with pytest.raises(ExportError, match="--quant applies to --format gguf only"):
        export_model(MODEL, tmp_path / "x", "hf", "q8_0")
    with pytest.raises(ExportError, match="is not a directory"):
        export_model(MODEL, tmp_path / "missing" / "x.gguf")
    with pytest.raises(ExportError, match="not a LoRA student"):
        export_model(str(make_tiny_student(tmp_path / "tiny")), tmp_path / "adapter", "peft")
    # another architecture: a tiny GPT-2
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    load_model(MODEL).tokenizer.save_pretrained(gpt2)
    with pytest.raises(ExportError, match="supports the Llama family.*'gpt2'"):
        export_model(str(gpt2), tmp_path / "gpt2.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))  # nothing half-written


def test_the_cli_exports_and_fails_clearly(tmp_path: Path) -> None:
    tiny = make_tiny_student(tmp_path / "tiny")
    runner = CliRunner()
    done = runner.invoke(app, ["export", str(tiny), "-o", str(tmp_path / "tiny.gguf"), "--quant", "q8_0"])
    assert done.exit_code == 0, done.output
    assert "wrote" in done.stdout and (tmp_path / "tiny.gguf").stat().st_size > 0
    hf = runner.invoke(app, ["export", str(tiny), "-o", str(tmp_path / "hf"), "--format", "hf"])
    assert hf.exit_code == 0, hf.output
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    bad = runner.invoke(app, ["export", str(tiny), "-o", str(tmp_path / "x"), "--format", "onnx"])
    assert bad.exit_code == 2 and "unknown format 'onnx'" in bad.stderr

"""Students from the real built-in model: pruning and LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from garden.models.loading import ModelRefError, load_model
from garden.models.chat import answer_ids, chat_prompt_ids
from garden.models.student import (
    LoraSpec,
    StudentSpec,
    block_influence,
    build_student,
    influence_layers,
    kept_layer_indices,
    parse_student_ref,
    resolve_influence,
    student_reference,
)


@pytest.fixture(autouse=True)
def cache(model_cache: Path) -> Path:
    return model_cache


@pytest.mark.parametrize(
    "total, keep, expected",
    [(30, 10, [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]), (30, 2, [0, 29]), (30, 30, list(range(30))), (5, 3, [0, 2, 4])],
)
def test_kept_layers_are_evenly_spaced_with_first_and_last(total: int, keep: int, expected: list[int]) -> None:
    assert kept_layer_indices(total, keep) == expected


@pytest.mark.parametrize(
    "total, keep, expected",
    [(30, 10, [0, 1, 2, 4, 7, 10, 13, 18, 23, 29]), (30, 2, [0, 29]), (30, 30, list(range(30))), (5, 3, [0, 1, 4])],
)
def test_front_spacing_keeps_the_first_layers_and_widens_the_gaps(total: int, keep: int, expected: list[int]) -> None:
    assert kept_layer_indices(total, keep, "front") == expected
    for n in range(2, 31):  # any size: distinct, increasing, first and last kept
        kept = kept_layer_indices(30, n, "front")
        assert len(kept) == n and kept[0] == 0 and kept[-1] == 29 and sorted(set(kept)) == kept


@pytest.mark.parametrize("keep", [0, 1, 31])
def test_impossible_layer_counts(keep: int) -> None:
    with pytest.raises(ModelRefError, match="cannot keep"):
        kept_layer_indices(30, keep)


def test_parse_student_refs() -> None:
    assert parse_student_ref("prune:builtin:smollm2-135m:layers=10") == StudentSpec("builtin:smollm2-135m", 10)
    assert parse_student_ref("builtin:smollm2-135m") == StudentSpec("builtin:smollm2-135m")
    front = parse_student_ref("prune:builtin:smollm2-135m:layers=10:spacing=front")
    assert front == StudentSpec("builtin:smollm2-135m", 10, spacing="front")
    assert parse_student_ref("prune:builtin:smollm2-135m:layers=10:spacing=even").spacing == "even"
    influence = parse_student_ref("prune:builtin:smollm2-135m:layers=10:spacing=influence")
    assert influence == StudentSpec("builtin:smollm2-135m", 10, spacing="influence")
    listed = parse_student_ref("prune:builtin:smollm2-135m:layers=0,1,11,29")
    assert listed == StudentSpec("builtin:smollm2-135m", 4, layers=(0, 1, 11, 29))
    assert student_reference(listed.base, layers=listed.layers) == "prune:builtin:smollm2-135m:layers=0,1,11,29"
    for bad in [
        "prune:builtin:smollm2-135m", "prune:builtin:smollm2-135m:layers=x", "prune:builtin:nope:layers=3",
        "prune:builtin:smollm2-135m:spacing=front", "prune:builtin:smollm2-135m:layers=10:spacing=back",
        "prune:builtin:smollm2-135m:layers=0,2,1", "prune:builtin:smollm2-135m:layers=0,2,2",
        "prune:builtin:smollm2-135m:layers=0,,2", "prune:builtin:smollm2-135m:layers=0,5:spacing=front",
    ]:  # fmt: skip
        with pytest.raises(ModelRefError):
            parse_student_ref(bad)


def test_influence_keeps_first_last_and_the_layers_that_turn_the_stream_most() -> None:
    scores = [0.9, 0.01, 0.5, 0.02, 0.3, 0.03, 0.04]
    assert influence_layers(scores, 4) == [0, 2, 4, 6]  # 6 kept whatever its score, as every spacing keeps it
    assert influence_layers(scores, 2) == [0, 6] and influence_layers(scores, 7) == list(range(7))
    assert influence_layers([0.1, 0.2, 0.2, 0.2, 0.1], 3) == [0, 1, 4]  # a tie goes to the earlier layer
    with pytest.raises(ModelRefError, match="cannot keep"):
        influence_layers(scores, 8)


def test_block_influence_of_the_built_in_model_picks_a_student_with_those_layers() -> None:
    base = load_model("builtin:smollm2-135m")
    tokenizer = base.tokenizer
    texts = [chat_prompt_ids(tokenizer, q) + answer_ids(tokenizer, a) for q, a in [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Name a primary colour.", "Red is a primary colour."),
    ]]  # fmt: skip
    scores = block_influence(base.model, texts)
    assert len(scores) == 30 and all(0.0 <= s <= 2.0 for s in scores)
    # the first layer turns the embeddings into the stream (measured 0.98); the middle ones barely turn it
    assert scores[0] > 0.5 and min(scores[2:20]) < 0.05, scores
    assert block_influence(base.model, texts) == scores  # the same text gives the same choice
    spec = resolve_influence(parse_student_ref("prune:builtin:smollm2-135m:layers=6:spacing=influence"), texts)
    assert spec.layers == tuple(influence_layers(scores, 6)) and spec.keep_layers == 6
    student = build_student(spec).model
    for new, old in enumerate(spec.layers):
        weight = base.model.model.layers[old].mlp.up_proj.weight
        assert torch.equal(student.model.layers[new].mlp.up_proj.weight, weight)
    # unresolved, it cannot be built (it needs the data), and a listed layer the base lacks is refused
    with pytest.raises(ModelRefError, match="chooses the layers from data"):
        build_student(parse_student_ref("prune:builtin:smollm2-135m:layers=6:spacing=influence"))
    with pytest.raises(ModelRefError, match="the base has 30 layers"):
        build_student(parse_student_ref("prune:builtin:smollm2-135m:layers=0,30"))
    with pytest.raises(ModelRefError, match="needs calibration text"):
        block_influence(base.model, [])


def test_pruned_student_keeps_layers_and_still_generates(tmp_path: Path) -> None:
    base = load_model("builtin:smollm2-135m")
    student = build_student(parse_student_ref("prune:builtin:smollm2-135m:layers=10"))
    model = student.model
    assert len(model.model.layers) == 10 and model.config.num_hidden_layers == 10
    assert len(base.model.model.layers) == 30, "the shared base must not be modified"
    for new, old in [(0, 0), (9, 29), (3, 10)]:
        assert torch.equal(model.model.layers[new].mlp.up_proj.weight, base.model.model.layers[old].mlp.up_proj.weight)
        assert model.model.layers[new].self_attn.layer_idx == new
    assert model.model.layers[0].mlp.up_proj.weight is not base.model.model.layers[0].mlp.up_proj.weight
    front = build_student(parse_student_ref("prune:builtin:smollm2-135m:layers=10:spacing=front")).model
    for new, old in [(0, 0), (3, 4), (7, 18), (9, 29)]:
        assert torch.equal(front.model.layers[new].mlp.up_proj.weight, base.model.model.layers[old].mlp.up_proj.weight)
    assert torch.equal(model.lm_head.weight, base.model.lm_head.weight)

    tokenizer = student.tokenizer
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    model.save_pretrained(tmp_path / "student")  # a pruned student is an ordinary model directory
    tokenizer.save_pretrained(tmp_path / "student")
    reloaded = load_model(str(tmp_path / "student"))
    assert reloaded.model.config.num_hidden_layers == 10
    with torch.no_grad():
        assert torch.allclose(reloaded.model(**inputs).logits, model.eval()(**inputs).logits, atol=1e-5)


def test_lora_trains_only_the_adapter() -> None:
    spec = parse_student_ref("prune:builtin:smollm2-135m:layers=4", lora=LoraSpec(r=4, alpha=8))
    student = build_student(spec).model
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=1.0)
    ids = torch.randint(0, 1000, (2, 12))
    student(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = {name for name, p in student.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trainable
    assert any("lora_B" in name for name in changed)


def test_lora_init_is_the_same_on_every_peer() -> None:
    spec = StudentSpec("builtin:smollm2-135m", keep_layers=2, lora=LoraSpec(r=4, alpha=8, seed=7))
    first, second = build_student(spec).model, build_student(spec).model
    adapters = [(n, p) for n, p in first.named_parameters() if "lora_A" in n]
    assert adapters
    for name, param in adapters:
        assert torch.equal(param, dict(second.named_parameters())[name])


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"alpha": 0}, {"dropout": 1.5}, {"target_modules": ()}])
def test_bad_lora_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LoraSpec(**kwargs)


def test_qlora_needs_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the 4-bit path is exercised instead")
    spec = StudentSpec("builtin:smollm2-135m", lora=LoraSpec(quantize_4bit=True))
    with pytest.raises(ModelRefError, match="needs a CUDA GPU"):
        build_student(spec)

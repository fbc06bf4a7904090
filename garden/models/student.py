"""Student construction: a model reference, optionally pruned to fewer decoder layers, optionally with
a LoRA adapter.

``prune:<ref>:layers=N`` keeps N evenly spaced decoder layers of ``<ref>``, always the first and the
last (the first reads the embeddings, the last feeds the head: dropping either costs most), and
keeps the embeddings, final norm and head. ``prune:<ref>:layers=N:spacing=front`` keeps more of the first
layers and fewer of the later ones (:func:`kept_layer_indices`; docs/training.md has what it measured).
``prune:<ref>:layers=0,1,11,...`` keeps exactly those layers, and ``prune:<ref>:layers=N:spacing=influence``
keeps the N layers that change their input most on the training data (:func:`influence_layers`), which
``garden train`` resolves into such an explicit list before it builds the student. Every peer of a mission
must build the identical student from the spec, so pruning is deterministic and the LoRA initialisation is
seeded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from garden.models.cache import hub_cache_dir
from garden.models.loading import LoadedModel, ModelRefError, load_model, parse_model_ref
from garden.protocol.mission_spec import StudentSection

PRUNE_SCHEME = "prune:"
LayerSpacing = Literal["even", "front", "influence"]
SPACINGS: tuple[LayerSpacing, ...] = ("even", "front", "influence")
# ``front`` spacing: layer i of the student is the base's layer i + (dropped) * (i / (keep - 1)) ** FRONT_POWER
FRONT_POWER = 2.5


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter (peft ``LoraConfig``). ``seed`` fixes the adapter's initial weights, so that
    peers averaging one adapter start from the same point.

    :param r: rank (8-64 typical; higher learns more, costs more)
    :param alpha: scaling numerator (the update is scaled by alpha / r)
    :param target_modules: module names to adapt (the attention projections by default)
    :param quantize_4bit: load the base in 4 bits (QLoRA; needs CUDA and bitsandbytes)
    """

    r: int = 16
    alpha: int = 32
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    dropout: float = 0.0
    seed: int = 0
    quantize_4bit: bool = False

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise ValueError(f"LoRA r and alpha must be >= 1 (got r={self.r}, alpha={self.alpha})")
        if not 0.0 <= self.dropout < 1.0 or not math.isfinite(self.dropout):
            raise ValueError(f"LoRA dropout must be in [0, 1) (got {self.dropout})")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module, e.g. q_proj")


@dataclass(frozen=True)
class StudentSpec:
    base: str  # a model reference (hub id, directory, .gguf, builtin:NAME)
    keep_layers: int | None = None
    lora: LoraSpec | None = field(default=None)
    spacing: LayerSpacing = "even"  # which layers a pruned student keeps (kept_layer_indices)
    layers: tuple[int, ...] | None = None  # exactly these layers (then keep_layers is their count)


def parse_student_ref(text: str, lora: LoraSpec | None = None) -> StudentSpec:
    """``<model ref>``, ``prune:<model ref>:layers=N[:spacing=even|front|influence]`` or
    ``prune:<model ref>:layers=I,J,...`` (increasing layer indices); raises ``ModelRefError`` with the reason."""
    if not text.startswith(PRUNE_SCHEME):
        parse_model_ref(text)  # validates
        return StudentSpec(base=text, lora=lora)
    body, spacing = text[len(PRUNE_SCHEME) :], "even"
    rest, _, last = body.rpartition(":")
    if last.startswith("spacing="):
        spacing, body = last.removeprefix("spacing="), rest
        if spacing not in SPACINGS:
            raise ModelRefError(f"{text!r}: spacing is one of {', '.join(SPACINGS)}, not {spacing!r}")
    base, sep, option = body.rpartition(":")
    name, eq, value = option.partition("=")
    parts = value.split(",")
    if not sep or name != "layers" or not eq or not all(part.isdigit() for part in parts):
        raise ModelRefError(
            f"{text!r}: write prune:<model ref>:layers=N[:spacing=front|influence] or layers=I,J,..., e.g. "
            "prune:builtin:smollm2-135m:layers=10"
        )
    parse_model_ref(base)
    if len(parts) == 1:
        return StudentSpec(base=base, keep_layers=int(value), lora=lora, spacing=spacing)  # type: ignore[arg-type]
    layers = tuple(int(part) for part in parts)
    if spacing != "even":
        raise ModelRefError(f"{text!r}: the layers are listed; spacing chooses them from a count (layers=N)")
    if list(layers) != sorted(set(layers)):
        raise ModelRefError(f"{text!r}: list the layers to keep in increasing order, each once")
    return StudentSpec(base=base, keep_layers=len(layers), lora=lora, layers=layers)


def student_reference(
    base: str, keep_layers: int | None = None, spacing: LayerSpacing = "even", layers: tuple[int, ...] | None = None
) -> str:
    """The reference :func:`parse_student_ref` reads back: ``base`` itself, ``prune:<base>:layers=N`` with
    ``:spacing=...`` when the spacing is not even (a mission's student section, as one model reference), or
    ``prune:<base>:layers=I,J,...`` for ``layers``."""
    if layers is not None:
        return f"{PRUNE_SCHEME}{base}:layers=" + ",".join(str(i) for i in layers)
    if keep_layers is None:
        return base
    return f"{PRUNE_SCHEME}{base}:layers={keep_layers}" + ("" if spacing == "even" else f":spacing={spacing}")


def section_reference(section: StudentSection) -> str:
    """A mission's ``[student]`` (LoRA aside) as the one model reference its trainers, its vouching lead and its
    published student record build from."""
    layers = tuple(section.layers) if section.layers is not None else None
    return student_reference(section.base, section.keep_layers, section.spacing, layers)


def kept_layer_indices(total: int, keep: int, spacing: LayerSpacing = "even") -> list[int]:
    """``keep`` indices in ``range(total)``, first and last included: evenly spaced, or (``front``) each kept
    layer ``i`` moved back by ``(total - keep) * (i / (keep - 1)) ** FRONT_POWER``, so that the first layers are
    kept nearly all and the gaps grow towards the last (30 -> 10: 0, 1, 2, 4, 7, 10, 13, 18, 23, 29). The early
    layers build the features every later one reads: in benchmarks/dorpo_distill.py this student started closer
    to its teacher than the evenly spaced one (held-out KL 10.7 against 13.1) and ended closer (1.56 against
    1.61). Other choices that look alike scatter widely (docs/training.md), so missions keep ``even``."""
    if total == 1 and keep == 1:
        return [0]
    if not 2 <= keep <= total:
        raise ModelRefError(f"cannot keep {keep} of {total} layers: keep between 2 and {total} (first and last stay)")
    if spacing == "influence":
        raise ModelRefError(
            "spacing=influence chooses the layers from data: garden train resolves it from its rows into "
            "layers=I,J,... (resolve_influence)"
        )
    if spacing == "front":
        return [round(i + (total - keep) * (i / (keep - 1)) ** FRONT_POWER) for i in range(keep)]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def student_layers(spec: StudentSpec, total: int) -> list[int]:
    """The base's layers ``spec`` keeps, of its ``total``; ``ModelRefError`` when a listed one is not there."""
    assert spec.keep_layers is not None
    if spec.layers is None:
        return kept_layer_indices(total, spec.keep_layers, spec.spacing)
    if spec.layers[-1] >= total:
        raise ModelRefError(f"cannot keep layer {spec.layers[-1]}: the base has {total} layers (0 to {total - 1})")
    return list(spec.layers)


INFLUENCE_TOKENS = 1024
"""Tokens of calibration text :func:`block_influence` reads at most: on the demo rows it chose the same 10 of the
built-in model's 30 layers from 500 tokens to 8,192, and 1,024 take 2.4 s on one CPU thread."""
INFLUENCE_BATCH = 8
"""Texts per forward pass in :func:`block_influence` (right-padded; the padding is left out of the means)."""


def block_influence(model: Any, texts: Iterable[list[int]]) -> list[float]:
    """Each decoder layer's Block Influence (ShortGPT, Men et al. 2024): one minus the mean cosine similarity
    of its input and output hidden states over the tokens of ``texts`` (token id lists, read until
    :data:`INFLUENCE_TOKENS` are in hand: a generator is tokenized no further). A layer that barely turns the
    residual stream scores near 0 and is the cheapest to drop."""
    import torch

    layers = model.model.layers
    device = next(model.parameters()).device
    sums = torch.zeros(len(layers), dtype=torch.float64)
    current: dict[int, Any] = {}

    def hook(index: int) -> Any:
        def measure(module: Any, args: Any, kwargs: Any, out: Any) -> None:
            before = args[0] if args else kwargs["hidden_states"]
            after = out[0] if isinstance(out, tuple) else out
            current[index] = torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1)

        return measure

    kept: list[list[int]] = []
    room = INFLUENCE_TOKENS
    for ids in texts:
        if ids:
            kept.append(list(ids[:room]))
            room -= len(kept[-1])
        if room <= 0:
            break
    if not kept:
        raise ModelRefError("spacing=influence needs calibration text: no tokens were given")
    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for first in range(0, len(kept), INFLUENCE_BATCH):
                batch = kept[first : first + INFLUENCE_BATCH]
                width = max(map(len, batch))
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, text in enumerate(batch):
                    ids[row, : len(text)] = torch.tensor(text)
                    mask[row, : len(text)] = 1
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
                real = mask.to(torch.float64)
                sums += torch.stack([(current[i].double().cpu() * real).sum() for i in range(len(layers))])
    finally:
        for handle in handles:
            handle.remove()
    tokens = sum(map(len, kept))
    return [float(v) for v in 1.0 - sums / tokens]


def influence_layers(influence: list[float], keep: int) -> list[int]:
    """The first and the last layer (as every spacing keeps them), and the ``keep - 2`` others of the highest
    :func:`block_influence`, in order. On the built-in model and the demo rows (30 -> 10: 0, 1, 11, 20, 22, 23, 24,
    27, 28, 29), this student reached a held-out KL of 1.05 against 1.61 for evenly spaced layers, and a top-1
    agreement of 0.63 against 0.58 (benchmarks/dorpo_distill.py; docs/training.md)."""
    total = len(influence)
    if total == 1 or keep == total:
        return kept_layer_indices(total, keep)
    kept_layer_indices(total, keep)  # the same bounds as every spacing
    middle = sorted(range(1, total - 1), key=lambda i: (-influence[i], i))[: keep - 2]
    return sorted([0, *middle, total - 1])


def resolve_influence(spec: StudentSpec, texts: Iterable[list[int]]) -> StudentSpec:
    """``spec`` with ``spacing=influence`` made explicit (``layers``), from the base's :func:`block_influence` on
    ``texts``; any other spec as it is. The explicit list is what a run records, so that resuming or exporting it
    builds the same student without the data."""
    if spec.spacing != "influence" or spec.keep_layers is None:
        return spec
    base = load_model(spec.base)
    layers = influence_layers(block_influence(base.model, texts), spec.keep_layers)
    return StudentSpec(base=spec.base, keep_layers=len(layers), lora=spec.lora, layers=tuple(layers))


def prune_layers_(model: Any, indices: list[int]) -> None:
    """Keep only the decoder layers at ``indices``, in place, and renumber them for the KV cache."""
    import torch

    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if decoder is None or not isinstance(layers, torch.nn.ModuleList):
        raise ModelRefError(
            f"pruning needs a decoder with model.layers (Llama family); {type(model).__name__} has none"
        )
    kept = torch.nn.ModuleList([layers[i] for i in indices])
    for new_index, layer in enumerate(kept):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index  # the cache is indexed by position in the new stack
    decoder.layers = kept
    model.config.num_hidden_layers = len(indices)
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types:
        model.config.layer_types = [layer_types[i] for i in indices]


def build_student(spec: StudentSpec, dtype: str = "float32") -> LoadedModel:
    """A trainable student. The base's weights (shared, read-only) are copied, never modified."""
    if spec.lora is not None and spec.lora.quantize_4bit:
        return _build_qlora(spec)
    base = load_model(spec.base, dtype=dtype)
    model = copy.deepcopy(base.model)
    if spec.keep_layers is not None:
        prune_layers_(model, student_layers(spec, model.config.num_hidden_layers))
    if spec.lora is not None:
        model = _with_lora(model, spec.lora)
    model.train()
    return LoadedModel(ref=base.ref, model=model, tokenizer=base.tokenizer, source=base.source)


def _with_lora(model: Any, lora: LoraSpec) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules),
        lora_dropout=lora.dropout,
        task_type="CAUSAL_LM",
    )
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(lora.seed)  # every peer must start from the same adapter
    try:
        return get_peft_model(model, config)
    finally:
        torch.random.set_rng_state(rng_state)


def _build_qlora(spec: StudentSpec) -> LoadedModel:
    """QLoRA: the base in 4 bits on the GPU (bitsandbytes), a LoRA adapter in full precision on top."""
    import torch

    if not torch.cuda.is_available():
        raise ModelRefError("4-bit QLoRA needs a CUDA GPU; drop quantize_4bit to train LoRA in full precision")
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    assert spec.lora is not None
    base = load_model(spec.base)  # resolves and converts the reference, and gives the tokenizer
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = AutoModelForCausalLM.from_pretrained(
        base.source, quantization_config=quantization, device_map={"": 0}, cache_dir=hub_cache_dir()
    )  # the files load_model just fetched (a daemon's hub cache is in its data dir)
    if spec.keep_layers is not None:
        prune_layers_(model, student_layers(spec, model.config.num_hidden_layers))
    model = _with_lora(prepare_model_for_kbit_training(model), spec.lora)
    return LoadedModel(ref=base.ref, model=model, tokenizer=base.tokenizer, source=base.source)

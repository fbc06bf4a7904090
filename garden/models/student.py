"""Student construction: a model reference, optionally pruned to fewer decoder layers, optionally with
a LoRA adapter.

``prune:<ref>:layers=N`` keeps N evenly spaced decoder layers of ``<ref>``, always the first and the
last (the first reads the embeddings, the last feeds the head: dropping either costs most), and
keeps the embeddings, final norm and head. ``prune:<ref>:layers=N:spacing=front`` keeps more of the first
layers and fewer of the later ones (:func:`kept_layer_indices`; docs/training.md has what it measured). Every
peer of a mission must build the identical student from the spec, so pruning is deterministic and the LoRA
initialisation is seeded.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from garden.models.cache import hub_cache_dir
from garden.models.loading import LoadedModel, ModelRefError, load_model, parse_model_ref

PRUNE_SCHEME = "prune:"
LayerSpacing = Literal["even", "front"]
SPACINGS: tuple[LayerSpacing, ...] = ("even", "front")
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


def parse_student_ref(text: str, lora: LoraSpec | None = None) -> StudentSpec:
    """``<model ref>`` or ``prune:<model ref>:layers=N[:spacing=even|front]``; raises ``ModelRefError`` with the
    reason."""
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
    if not sep or name != "layers" or not eq or not value.isdigit():
        raise ModelRefError(
            f"{text!r}: write prune:<model ref>:layers=N[:spacing=front], e.g. prune:builtin:smollm2-135m:layers=10"
        )
    parse_model_ref(base)
    return StudentSpec(base=base, keep_layers=int(value), lora=lora, spacing=spacing)  # type: ignore[arg-type]


def student_reference(base: str, keep_layers: int | None = None, spacing: LayerSpacing = "even") -> str:
    """The reference :func:`parse_student_ref` reads back: ``base`` itself, or ``prune:<base>:layers=N``, with
    ``:spacing=front`` when the spacing is not even (a mission's student section, as one model reference)."""
    if keep_layers is None:
        return base
    return f"{PRUNE_SCHEME}{base}:layers={keep_layers}" + ("" if spacing == "even" else f":spacing={spacing}")


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
    if spacing == "front":
        return [round(i + (total - keep) * (i / (keep - 1)) ** FRONT_POWER) for i in range(keep)]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


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
        prune_layers_(model, kept_layer_indices(model.config.num_hidden_layers, spec.keep_layers, spec.spacing))
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
        prune_layers_(model, kept_layer_indices(model.config.num_hidden_layers, spec.keep_layers, spec.spacing))
    model = _with_lora(prepare_model_for_kbit_training(model), spec.lora)
    return LoadedModel(ref=base.ref, model=model, tokenizer=base.tokenizer, source=base.source)

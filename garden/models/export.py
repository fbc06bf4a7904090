"""Export a model garden can load to where small models live on home machines: one GGUF file (llama.cpp,
Ollama, LM Studio), a plain transformers directory, or the adapter of a LoRA student.

GGUF is written with the ``gguf`` package's writer and quantizers (no hand-written encoding), for the Llama
family garden trains (the built-in SmolLM2 and the students pruned or adapted from it), as llama.cpp's own
``convert_hf_to_gguf.py`` lays it out: its tensor names, the query and key rows permuted into llama.cpp's rotary
layout, norms in float32, and the tokenizer (a GPT-2 style BPE: tokens, types, merges, special ids) with the chat
template. ``transformers`` loads the result back (``gguf_file=``), which is how the tests check it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garden.durable import replace_file, swap_dir

FORMATS = ("gguf", "hf", "peft")
QUANTS = ("f32", "f16", "q8_0", "q4_0")
SMOLLM_PRETOKENIZER = "smollm"
"""llama.cpp's name for SmolLM2's pre-tokenizer (what the built-in GGUF declares), for SmolLM2's vocabulary (49152
tokens, ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` first); other tokenizers get "default"."""


class ExportError(ValueError):
    """A model that cannot be exported as asked: said in the words of the user's request."""


@dataclass
class Exported:
    """What was written: the path, its format, bytes, and for GGUF the tensors by storage type."""

    path: Path
    format: str
    bytes: int
    tensor_types: dict[str, int]


def export_model(ref: str, out: Path, fmt: str = "gguf", quant: str = "f16") -> Exported:
    """Export the model ``ref`` (any reference ``garden generate --model`` takes, or ``prune:REF:layers=N``) to
    ``out``: a file for ``gguf``, a directory for ``hf`` and ``peft``. Nothing is left at ``out`` on failure."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if quant not in QUANTS:
        raise ExportError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")
    if fmt != "gguf" and quant != "f16":
        raise ExportError("--quant applies to --format gguf only")
    _check_writable(out)
    if fmt == "peft":
        return _export_adapter(ref, out)
    model, tokenizer = _load(ref)
    if fmt == "hf":
        return _export_hf(model, tokenizer, out)
    return export_gguf(model, tokenizer, out, quant)


def _check_writable(out: Path) -> None:
    parent = out.resolve().parent
    if not parent.is_dir():
        raise ExportError(f"cannot write {out}: {parent} is not a directory")
    probe = parent / f".{out.name}.probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None


def _load(ref: str) -> tuple[Any, Any]:
    from garden.models.loading import ModelRefError, load_model
    from garden.models.student import PRUNE_SCHEME, build_student, parse_student_ref

    try:
        loaded = build_student(parse_student_ref(ref)) if ref.startswith(PRUNE_SCHEME) else load_model(ref)
    except (ModelRefError, OSError, ValueError) as e:
        raise ExportError(f"cannot load {ref!r}: {e}") from None
    model = loaded.model
    if hasattr(model, "merge_and_unload"):  # a LoRA student: its weights with the adapter merged in
        model = model.merge_and_unload()
    return model, loaded.tokenizer


def _export_hf(model: Any, tokenizer: Any, out: Path) -> Exported:
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    swap_dir(staging, out)
    shutil.rmtree(staging, ignore_errors=True)  # what swap_dir swapped out, if ``out`` existed
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return Exported(out, "hf", size, {})


def _export_adapter(ref: str, out: Path) -> Exported:
    """The ``adapter/`` of a LoRA student's checkpoint (a pulled checkpoint, or a training run's latest)."""
    from garden.models.loading import ModelRefError, run_model_dir

    source = Path(ref)
    if not source.is_dir():
        raise ExportError(f"--format peft takes a LoRA student's checkpoint or training run directory, not {ref!r}")
    try:
        model_dir = run_model_dir(source)
    except ModelRefError as e:
        raise ExportError(str(e)) from None
    candidates = (source / "adapter", model_dir.parent / "adapter")
    adapter = next((d for d in candidates if (d / "adapter_config.json").is_file()), None)
    if adapter is None:
        raise ExportError(f"{ref} is not a LoRA student: it has no adapter (adapter/adapter_config.json)")
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(adapter, staging)
    swap_dir(staging, out)
    shutil.rmtree(staging, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return Exported(out, "peft", size, {})


# --- GGUF ----------------------------------------------------------------------------------------------
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(name: str) -> str:
    """llama.cpp's name for a transformers Llama tensor (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``); :class:`ExportError` for a tensor llama.cpp's Llama has no place for."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        mapped = _LAYER_TENSORS.get(".".join(parts[3:]))
        if mapped is not None:
            return f"blk.{parts[2]}.{mapped}"
    raise ExportError(f"tensor {name!r} has no place in a llama.cpp Llama model")


def rotary_permute(weight: Any, heads: int) -> Any:
    """Reorder a query or key projection's rows from transformers' rotary layout (halves) to llama.cpp's
    (interleaved pairs), per head: what ``convert_hf_to_gguf.py`` does and transformers' GGUF loader undoes."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def export_gguf(model: Any, tokenizer: Any, out: Path, quant: str = "f16") -> Exported:
    """Write ``model`` (a transformers Llama) and ``tokenizer`` as one GGUF file at ``out``."""
    import gguf
    import numpy as np

    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise ExportError(
            f"GGUF export supports the Llama family garden trains; this model is {getattr(config, 'model_type', '?')!r}"
        )
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]  # fmt: skip
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]  # fmt: skip
    staging = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(str(staging), "llama")
    try:
        writer.add_name(getattr(config, "_name_or_path", "") or "garden student")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or _rope_theta(config)))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_type)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        types: dict[str, int] = {}
        state = model.state_dict()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        for name, tensor in state.items():
            if name == "lm_head.weight" and tied:
                continue
            target = gguf_name(name)
            data = tensor.detach().to("cpu").float().numpy()
            if name.endswith("self_attn.q_proj.weight"):
                data = rotary_permute(data, heads)
            elif name.endswith("self_attn.k_proj.weight"):
                data = rotary_permute(data, kv_heads)
            kind = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32  # norms stay float32
            block = gguf.GGML_QUANT_SIZES[kind][0]
            if kind not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) and data.shape[-1] % block:
                kind = gguf.GGMLQuantizationType.F16  # rows that do not fill whole blocks: as llama.cpp does
            if kind == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(target, np.ascontiguousarray(data, dtype=np.float32))
            elif kind == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(target, np.ascontiguousarray(data, dtype=np.float16))
            else:
                writer.add_tensor(target, gguf.quants.quantize(data, kind), raw_dtype=kind)
            types[kind.name] = types.get(kind.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        staging.unlink(missing_ok=True)
        raise
    writer.close()
    replace_file(staging, out)
    return Exported(out, "gguf", out.stat().st_size, types)


def _rope_theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = parameters.get("rope_theta") if isinstance(parameters, dict) else None
    if theta is None:
        raise ExportError("the model's config names no rope_theta")
    return float(theta)


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's GPT-2 style BPE (``tokenizer.json``'s vocabulary and merges), its special ids,
    whether to add BOS, and the chat template."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    bpe = spec.get("model") or {}
    if bpe.get("type") != "BPE":
        raise ExportError(f"GGUF export supports BPE tokenizers; this one is {bpe.get('type')!r}")
    by_id = {int(i): token for token, i in bpe["vocab"].items()}
    added = {int(t["id"]): t for t in spec.get("added_tokens", [])}
    for i, t in added.items():
        by_id[i] = t["content"]
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            extra = added.get(i)
            types.append(gguf.TokenType.NORMAL if extra is None else
                         gguf.TokenType.CONTROL if extra.get("special") else gguf.TokenType.USER_DEFINED)  # fmt: skip
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    smollm = vocab_size == 49152 and [by_id.get(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    pre = SMOLLM_PRETOKENIZER if smollm else "default"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, value in (
        (writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):  # fmt: skip
        if value is not None:
            setter(int(value))
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)

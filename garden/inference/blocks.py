"""A contiguous range of a causal LM's decoder layers, run on hidden states with a KV cache per session,
and the two ends that stay with the client: the token embeddings and the final norm + LM head.

Why the ends stay on the client (as in Petals): the client holds the tokenizer, the sampling settings and
the stop strings, so it turns logits into tokens itself; servers only see hidden states, any server can
serve any session, and a server's answer never decides which token comes next. The cost is the embedding
matrix on the client (for SmolLM2-135M, 28 M of its 135 M parameters, tied with the head).

Only the weights of the layers asked for are read: a converted GGUF or any local safetensors model is
opened with ``safe_open`` and only ``model.layers.<i>.*`` (or the embedding, norm and head) tensors are
loaded. A hub id is first resolved to its local snapshot; if that is not safetensors, the whole model loads
and the rest is dropped.

transformers 5 runs a slice of layers only through ``LlamaModel.forward``, which always starts at layer 0;
so :class:`Blocks` does what that method does for its own layers: position ids from the cache's length,
the causal mask (``create_causal_mask``, which accounts for the cached prefix), and the rotary embeddings.
Each layer's ``layer_idx`` is renumbered from 0 within the range, so a session's ``DynamicCache`` holds
exactly the range's layers (a session on a sub-range leaves the others empty). The attention kernel is the
same as the full model's (``sdpa``), so a chain of ranges gives the logits ``model.generate`` gives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garden.models.loading import ModelRef, ModelRefError, model_source, parse_model_ref

SUPPORTED_FAMILIES = ("llama",)
"""``config.model_type`` values whose decoder layers :class:`Blocks` can run (SmolLM2 is a Llama)."""
ATTENTION = "sdpa"
"""The attention kernel of every range: the one transformers picks for the full model on CPU and CUDA."""


GEMM_ROWS = 4
"""Rows from which a CPU matrix product with the LM head is one pass over its weights (MKL on this machine,
576 x 49152: 1 row 9.1 ms, 2 rows 22.8, 3 rows 33.9, 4 rows 16.4, 8 rows 19.0): fewer rows are padded."""


class UnsupportedModelError(ModelRefError):
    """A model whose family :class:`Blocks` cannot run yet."""


@dataclass(frozen=True, order=True)
class LayerSpan:
    """Decoder layers ``[start, end)``, half-open as in Python; written ``start-end`` (``0-15``)."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"layer range {self.start}-{self.end} is empty or negative (need 0 <= start < end)")

    @classmethod
    def parse(cls, text: str) -> LayerSpan:
        match = re.fullmatch(r"(\d+)-(\d+)", text.strip())
        if not match:
            raise ValueError(f"layer range {text!r} is not START-END (e.g. 0-15: layers 0..14)")
        return cls(int(match[1]), int(match[2]))

    def __len__(self) -> int:
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"

    def contains(self, other: LayerSpan) -> bool:
        return self.start <= other.start and other.end <= self.end

    def check_within(self, num_layers: int) -> None:
        if self.end > num_layers:
            raise ValueError(f"layer range {self} goes past the model's {num_layers} layers (0-{num_layers})")


def load_config(ref: str | ModelRef) -> Any:
    """The model's transformers config; raises ``UnsupportedModelError`` for a family not supported yet."""
    from transformers import AutoConfig

    parsed = ref if isinstance(ref, ModelRef) else parse_model_ref(ref)
    config = AutoConfig.from_pretrained(model_source(parsed))
    if config.model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"{parsed} is a {config.model_type!r} model; serving layer ranges is not supported yet for that "
            f"family (supported: {', '.join(SUPPORTED_FAMILIES)})"
        )
    config._attn_implementation = ATTENTION
    return config


def _safetensors_files(source: str) -> list[Path]:
    path = Path(source)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, allow_patterns=["*.safetensors", "*.json"], local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the local hub cache: the caller loads the whole model
            return []
    return sorted(path.glob("*.safetensors"))


def load_tensors(ref: str | ModelRef, wanted: Any) -> dict[str, Any]:
    """The tensors of ``ref`` whose names ``wanted(name)`` accepts, read one by one from its safetensors
    files (float32); for a model stored otherwise, from the whole model loaded once."""
    parsed = ref if isinstance(ref, ModelRef) else parse_model_ref(ref)
    files = _safetensors_files(model_source(parsed))
    tensors: dict[str, Any] = {}
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if wanted(name):
                        tensors[name] = f.get_tensor(name).float()
        return tensors
    from garden.models.loading import load_model

    state = load_model(parsed).model.state_dict()
    return {name: t.detach().clone().float() for name, t in state.items() if wanted(name)}


class Blocks:
    """Decoder layers ``span`` of one model, ready to run on hidden states of shape ``[1, tokens, hidden]``."""

    def __init__(self, ref: ModelRef, config: Any, span: LayerSpan, layers: Any, rotary: Any) -> None:
        self.ref, self.config, self.span, self.layers, self.rotary = ref, config, span, layers, rotary

    @classmethod
    def load(cls, ref: str | ModelRef, span: LayerSpan) -> Blocks:
        import torch
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        parsed = ref if isinstance(ref, ModelRef) else parse_model_ref(ref)
        config = load_config(parsed)
        span.check_within(config.num_hidden_layers)
        pattern = re.compile(r"model\.layers\.(\d+)\.(.+)")

        def wanted(name: str) -> bool:
            match = pattern.fullmatch(name)
            return match is not None and span.start <= int(match[1]) < span.end

        tensors = load_tensors(parsed, wanted)
        layers = torch.nn.ModuleList()
        for i in range(span.start, span.end):
            prefix = f"model.layers.{i}."
            own = {name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)}
            with torch.device("meta"):
                layer = LlamaDecoderLayer(config, layer_idx=i - span.start)
            missing = set(layer.state_dict()) - set(own)
            if missing:
                raise ModelRefError(f"{parsed}: layer {i} lacks {sorted(missing)[:3]} in its weights")
            layer.load_state_dict(own, assign=True)
            layers.append(layer)
        return cls(parsed, config, span, layers.eval(), LlamaRotaryEmbedding(config).eval())

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def new_cache(self) -> Any:
        """An empty KV cache with one layer per layer of the range (a session may use a sub-range)."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache()
        cache.layers.extend(DynamicLayer() for _ in range(len(self.span)))
        return cache

    def forward(self, hidden: Any, cache: Any, sub: LayerSpan | None = None) -> Any:
        """Run layers ``sub`` (default: the whole range) on ``hidden``, the next tokens of a session whose
        earlier tokens ``cache`` holds; the cache grows by those tokens."""
        import torch
        from transformers.masking_utils import create_causal_mask

        sub = sub or self.span
        if not self.span.contains(sub):
            raise ValueError(f"layers {sub} are not within the served range {self.span}")
        first = sub.start - self.span.start
        with torch.inference_mode():
            past = cache.get_seq_length(first)
            positions = torch.arange(past, past + hidden.shape[1]).unsqueeze(0)
            mask = create_causal_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=None, cache=cache, position_ids=positions,
                layer_idx=first,
            )  # fmt: skip
            rotary = self.rotary(hidden, position_ids=positions)
            for layer in self.layers[first : first + len(sub)]:
                hidden = layer(
                    hidden, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                    position_embeddings=rotary,
                )  # fmt: skip
        return hidden

    def forward_batch(self, hiddens: list[Any], caches: list[Any], sub: LayerSpan | None = None) -> list[Any]:
        """One decode step of several sessions at once: ``hiddens[i]`` (``[1, 1, hidden]``) is the next token
        of the session whose cache is ``caches[i]``; all run layers ``sub``. Returns their outputs in order.

        Why not :meth:`forward` on a padded batch: the sessions sit at different positions with caches of
        different lengths, and padding them into one batched cache would copy every cache at every step.
        Here the projections and the MLP, which hold nearly all the weights, run once for the whole batch
        (a CPU pass is bound by reading the weights: 8 sessions cost 1.7x one, not 8x), while attention runs
        per session on its own cache. Each session's output is what :meth:`forward` gives it alone: the
        same operations in the same order (one query token attends to its whole cache, no mask), which the
        tests check on greedy output."""
        import torch
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        sub = sub or self.span
        if not self.span.contains(sub):
            raise ValueError(f"layers {sub} are not within the served range {self.span}")
        if len(hiddens) != len(caches) or any(h.shape[:2] != (1, 1) for h in hiddens):
            raise ValueError("a batched step takes one token of each session, one cache each")
        first = sub.start - self.span.start
        attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        batch = len(hiddens)
        with torch.inference_mode():
            hidden = torch.cat(hiddens, dim=0)  # [batch, 1, hidden]
            positions = torch.tensor([[cache.get_seq_length(first)] for cache in caches])
            cos, sin = self.rotary(hidden, position_ids=positions)
            for layer in self.layers[first : first + len(sub)]:
                attn = layer.self_attn
                x = layer.input_layernorm(hidden)
                shape = (batch, 1, -1, attn.head_dim)
                q = attn.q_proj(x).view(shape).transpose(1, 2)
                k = attn.k_proj(x).view(shape).transpose(1, 2)
                v = attn.v_proj(x).view(shape).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                outputs = []
                for i, cache in enumerate(caches):
                    keys, values = cache.update(k[i : i + 1], v[i : i + 1], attn.layer_idx)
                    out, _ = attention(attn, q[i : i + 1], keys, values, None, dropout=0.0, scaling=attn.scaling)
                    outputs.append(out)
                hidden = hidden + attn.o_proj(torch.cat(outputs, dim=0).reshape(batch, 1, -1))
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return list(hidden.split(1, dim=0))


class Ends:
    """What the client runs: token embeddings in, final norm and LM head out, and the tokenizer."""

    def __init__(
        self, ref: ModelRef, config: Any, embed: Any, norm: Any, head: Any, tokenizer: Any, eos_ids: frozenset[int]
    ) -> None:
        self.ref, self.config, self.embed_tokens, self.norm, self.head = ref, config, embed, norm, head
        self.tokenizer, self.eos_ids = tokenizer, eos_ids

    @classmethod
    def load(cls, ref: str | ModelRef) -> Ends:
        import torch
        from transformers import AutoTokenizer
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        parsed = ref if isinstance(ref, ModelRef) else parse_model_ref(ref)
        config = load_config(parsed)
        names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
        tensors = load_tensors(parsed, lambda name: name in names)
        embed_weight = tensors["model.embed_tokens.weight"]
        head_weight = tensors.get("lm_head.weight", embed_weight if config.tie_word_embeddings else None)
        if head_weight is None:
            raise ModelRefError(f"{parsed}: no lm_head weights and the embeddings are not tied")
        embed = torch.nn.Embedding.from_pretrained(embed_weight, freeze=True)
        norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norm.load_state_dict({"weight": tensors["model.norm.weight"]})
        head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        head.weight = torch.nn.Parameter(head_weight, requires_grad=False)
        tokenizer = AutoTokenizer.from_pretrained(model_source(parsed))
        return cls(parsed, config, embed.eval(), norm.eval(), head.eval(), tokenizer, _eos_ids(parsed, tokenizer))

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def embed(self, ids: list[int]) -> Any:
        import torch

        with torch.inference_mode():
            return self.embed_tokens(torch.tensor([ids], dtype=torch.long))

    def logits(self, hidden: Any) -> Any:
        """Next-token logits (float32, ``[vocab]``) from the last position of the last layer's output."""
        import torch

        with torch.inference_mode():
            return self.head(self.norm(hidden[:, -1:, :].float()))[0, -1]

    def logits_many(self, hiddens: list[Any]) -> list[Any]:
        """:meth:`logits` of several generations in one pass of the head (it reads its weights once)."""
        import torch

        with torch.inference_mode():
            last = torch.cat([h[:, -1:, :].float() for h in hiddens], dim=0)
            if len(hiddens) < GEMM_ROWS:  # CPU BLAS runs 2 or 3 rows as slowly as that many calls: pad them
                last = torch.cat([last, last.new_zeros(GEMM_ROWS - len(hiddens), *last.shape[1:])])
            return list(self.head(self.norm(last))[: len(hiddens), -1].unbind(0))


def _eos_ids(ref: ModelRef, tokenizer: Any) -> frozenset[int]:
    """The generation config's end tokens plus the tokenizer's: chat models often end a turn with a token
    (``<|im_end|>``) that only one of the two names (as ``garden.inference.generate`` does locally)."""
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        configured = GenerationConfig.from_pretrained(model_source(ref)).eos_token_id
    except OSError:
        configured = None
    ids.update(configured if isinstance(configured, list) else [] if configured is None else [configured])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(int(i) for i in ids)

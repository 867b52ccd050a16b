"""Rules that read Hugging Face decoder tensor names.

One set of rules covers the common families (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3,
GPT-2 style, GPT-NeoX) instead of a description file per model: a transformer block is
``<container>.<index>.`` with a known container name (``layers``, ``h``, ``blocks``, ...),
and a module's role comes from the tokens in its name. Unknown decoders fall back to the
first numbered component of a name as its block index, and to role ``other``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

# "model.layers.3.self_attn.q_proj.weight", "transformer.h.3.attn.c_attn.weight", ...
_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|block|layer))\.(?P<index>\d+)\.(?P<rest>.+)$")
# Generic fallback: the first numbered component ("backbone.stages.3.mixer.weight").
_FALLBACK_RE = re.compile(r"^(?P<prefix>[^.]+(?:\.[^.\d][^.]*)*?)\.(?P<index>\d+)\.(?P<rest>.+)$")

# Ordered: the first rule whose token occurs in the name decides the role.
_ROLE_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("embed", ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")),
    ("lm_head", ("lm_head", "embed_out")),
    ("position_embed", ("wpe", "position_embeddings")),
    ("attn_qkv", ("qkv_proj", "c_attn", "query_key_value", "Wqkv")),
    ("attn_q", ("q_proj", "query")),
    ("attn_k", ("k_proj", "key")),
    ("attn_v", ("v_proj", "value")),
    ("mlp_up", ("dense_h_to_4h",)),  # GPT-NeoX, before the bare "dense" of attention outputs
    ("mlp_down", ("dense_4h_to_h",)),
    ("attn_o", ("o_proj", "attn.c_proj", "dense", "out_proj")),
    ("mlp_gate_up", ("gate_up_proj",)),
    ("mlp_gate", ("gate_proj", "w1")),
    ("mlp_up", ("up_proj", "c_fc", "fc1", "w3")),
    ("mlp_down", ("down_proj", "mlp.c_proj", "fc2", "w2")),
    ("norm", ("norm", "ln_", "layernorm")),
)

# GPT-2 and the models built like it use transformers' ``Conv1D`` for these modules, which
# stores its weight as [in, out], the transpose of ``nn.Linear``'s [out, in]. The same names
# in other families (GPT-BigCode's c_attn, c_proj, c_fc) are ``nn.Linear``: the model type decides.
_CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
_CONV1D_MODULES = ("c_attn", "q_attn", "c_proj", "c_fc")


@dataclass(frozen=True)
class TensorName:
    """A parsed tensor name."""

    name: str
    layer: int | None  # transformer block index, None for embeddings, final norm, lm_head
    role: str  # embed, lm_head, attn_q, ..., mlp_down, norm, other

    @property
    def is_embedding(self) -> bool:
        """Rows indexed by token id (input embeddings or output head)."""
        return self.role in ("embed", "lm_head")


def _layer_match(name: str) -> re.Match[str] | None:
    return _LAYER_RE.match(name) or _FALLBACK_RE.match(name)


def layer_index(name: str) -> int | None:
    match = _layer_match(name)
    return int(match.group("index")) if match else None


def with_layer_index(name: str, index: int) -> str:
    """The same tensor name in block ``index`` (used when slices renumber layers)."""
    match = _layer_match(name)
    if not match:
        raise ValueError(f"tensor '{name}' is not inside a numbered layer")
    return f"{match.group('prefix')}.{index}.{match.group('rest')}"


def module_role(name: str) -> str:
    components = name.split(".")
    if components[-1] in ("weight", "bias"):
        components = components[:-1]
    module = ".".join(components)
    for role, tokens in _ROLE_RULES:
        if any(token in module for token in tokens):
            return role
    return "other"


def parse_name(name: str) -> TensorName:
    return TensorName(name=name, layer=layer_index(name), role=module_role(name))


def stores_transposed(name: str, config: Mapping[str, Any]) -> bool:
    """Whether module (or weight) ``name`` of a model with ``config`` stores its weight as [in, out].

    True for transformers' ``Conv1D`` layers (GPT-2 style: ``transformer.h.0.attn.c_attn``);
    their update in PEFT is ΔW = (B·A)ᵀ, with ``fan_in_fan_out`` in the adapter config.
    """
    components = name.split(".")
    if components[-1] in ("weight", "bias"):
        components = components[:-1]
    return config.get("model_type") in _CONV1D_MODEL_TYPES and components[-1] in _CONV1D_MODULES


def architecture(config: Mapping[str, Any]) -> str:
    """The model class a config names (``architectures[0]``), else its ``model_type``, else 'unknown'."""
    names = config.get("architectures")
    if isinstance(names, list) and names:
        return str(names[0])
    return str(config.get("model_type") or "unknown")


def same_architecture(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two configs are of one architecture: by model class when both name one, else by
    ``model_type`` when both have it (a config without either matches anything)."""
    names_a, names_b = a.get("architectures"), b.get("architectures")
    if isinstance(names_a, list) and names_a and isinstance(names_b, list) and names_b:
        return str(names_a[0]) == str(names_b[0])
    type_a, type_b = a.get("model_type"), b.get("model_type")
    return not (type_a and type_b) or type_a == type_b

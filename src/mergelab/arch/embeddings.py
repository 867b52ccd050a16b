"""Token-indexed tensors: input embeddings, the output head, and whether the two are tied.

A model "ties" its output head to its input embeddings when ``tie_word_embeddings`` is
true in its config (transformers then uses the embedding matrix as the head, whatever
``lm_head.weight`` the checkpoint may also store). Older configs without the key are
read from the checkpoint itself: no output-head tensor means tied.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from mergelab.arch.names import parse_name

VOCAB_ROLES = ("embed", "lm_head")


def is_vocab_tensor(name: str) -> bool:
    """Rows of this tensor are indexed by token id (axis 0)."""
    return parse_name(name).role in VOCAB_ROLES


def embedding_name(tensor_names: Iterable[str]) -> Optional[str]:
    """The input embedding tensor (``model.embed_tokens.weight``, ``transformer.wte.weight``, ...)."""
    return next((name for name in tensor_names if parse_name(name).role == "embed"), None)


def head_names(tensor_names: Iterable[str]) -> list[str]:
    """The output head tensors (``lm_head.weight``, and a bias if the head has one)."""
    return [name for name in tensor_names if parse_name(name).role == "lm_head"]


def ties_embeddings(config: Mapping[str, Any], tensor_names: Iterable[str]) -> bool:
    """Whether the model's output head is its input embedding matrix."""
    names = list(tensor_names)
    declared = config.get("tie_word_embeddings")
    if declared is None and isinstance(config.get("text_config"), Mapping):
        declared = config["text_config"].get("tie_word_embeddings")
    if declared is None:
        return not head_names(names) and embedding_name(names) is not None
    return bool(declared)

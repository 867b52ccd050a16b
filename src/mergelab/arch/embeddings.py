"""Token-indexed tensors: input embeddings, the output head, and whether the two are tied.

A model "ties" its output head to its input embeddings when ``tie_word_embeddings`` is
true in its config; older configs without the key are read from the checkpoint itself: no
output-head tensor means tied. A tied checkpoint that also stores ``lm_head.weight`` is
fine when the two matrices are equal; when they differ, transformers 4 uses the
embeddings as the head and transformers 5 the stored head, so :func:`check_stored_head`
refuses such a checkpoint rather than guess.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from mergelab.arch.names import parse_name
from mergelab.errors import InputError

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


_AGREEING: set[tuple[Any, ...]] = set()  # models whose stored head was found equal to the embeddings, by file state


def check_stored_head(checkpoint: Any) -> None:
    """A tied model (``ties_embeddings``) that stores an output head too must store the embedding
    matrix there; reads both tensors once per model and process."""
    if not ties_embeddings(checkpoint.config, checkpoint.tensors):
        return
    embed = embedding_name(checkpoint.tensors)
    heads = [name for name in head_names(checkpoint.tensors) if name.endswith("weight")]
    if embed is None or not heads:
        return
    infos = [checkpoint.info(embed), checkpoint.info(heads[0])]
    files = sorted({info.file for info in infos})
    state = tuple((file, (checkpoint.path / file).stat().st_mtime_ns, (checkpoint.path / file).stat().st_size)
                  for file in files)
    key = (str(checkpoint.path.resolve()), embed, heads[0], state)
    if key in _AGREEING:
        return
    import torch

    same_layout = tuple(infos[0].shape) == tuple(infos[1].shape) and infos[0].dtype == infos[1].dtype
    if not same_layout or not torch.equal(checkpoint.get_tensor(embed), checkpoint.get_tensor(heads[0])):
        raise InputError(
            f"model '{checkpoint.path}' ties its embeddings (tie_word_embeddings) but also stores a different "
            f"'{heads[0]}': transformers 4 would use '{embed}' as the head, transformers 5 the stored one. Set "
            "tie_word_embeddings in its config.json to the model you mean (false keeps the stored head)."
        )
    _AGREEING.add(key)

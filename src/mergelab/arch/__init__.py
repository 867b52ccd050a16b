"""What a tensor name means: layer index, module role, embedding or not, tied output head."""

from mergelab.arch.embeddings import (
    check_stored_head,
    embedding_name,
    head_names,
    is_vocab_tensor,
    ties_embeddings,
)
from mergelab.arch.names import (
    TensorName,
    architecture,
    layer_index,
    module_role,
    parse_name,
    same_architecture,
    stores_transposed,
    with_layer_index,
)

__all__ = [
    "TensorName",
    "check_stored_head",
    "architecture",
    "embedding_name",
    "head_names",
    "is_vocab_tensor",
    "layer_index",
    "module_role",
    "parse_name",
    "same_architecture",
    "stores_transposed",
    "ties_embeddings",
    "with_layer_index",
]

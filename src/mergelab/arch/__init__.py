"""What a tensor name means: layer index, module role, embedding or not."""

from mergelab.arch.names import TensorName, layer_index, module_role, parse_name, with_layer_index

__all__ = ["TensorName", "layer_index", "module_role", "parse_name", "with_layer_index"]

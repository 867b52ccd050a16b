"""Reading and writing checkpoints: lazy safetensors inputs, streamed sharded outputs."""

from mergelab.io.checkpoint import Checkpoint, TensorInfo, resolve_model_dir
from mergelab.io.writer import LiveModelSink, OutputDirectory, OutputTensor, ShardedWriter, parse_size

__all__ = [
    "Checkpoint",
    "LiveModelSink",
    "OutputDirectory",
    "OutputTensor",
    "ShardedWriter",
    "TensorInfo",
    "parse_size",
    "resolve_model_dir",
]

"""The streaming engine every capability plans work for."""

from mergelab.engine.run import RunStats, resolve_device, run
from mergelab.engine.task import CopyInput, TaskOutput, TensorRef, TensorSource, TensorTask

__all__ = ["CopyInput", "RunStats", "TaskOutput", "resolve_device", "TensorRef", "TensorSource", "TensorTask", "run"]

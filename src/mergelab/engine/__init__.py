"""The streaming engine every capability plans work for."""

from mergelab.engine.run import RunOptions, RunStats, apply_threads, check_options, check_threads, resolve_device, run
from mergelab.engine.task import CopyInput, TaskOutput, TensorRef, TensorSource, TensorTask

__all__ = ["CopyInput", "RunOptions", "RunStats", "apply_threads", "check_options", "check_threads", "TaskOutput", "resolve_device", "TensorRef", "TensorSource", "TensorTask", "run"]

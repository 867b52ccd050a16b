"""Plans are lists of ``TensorTask``s: plain, hashable, printable values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from mergelab.io.checkpoint import DTYPE_BYTES, TensorInfo
from mergelab.io.writer import OutputTensor


class TensorSource(Protocol):
    """Anything the engine can read named tensors from (a checkpoint, an adapter, ...)."""

    def get_tensor(self, name: str) -> Any: ...

    def info(self, name: str) -> TensorInfo: ...


@dataclass(frozen=True)
class TensorRef:
    """Input tensor ``name`` of the source registered under key ``source``."""

    source: str
    name: str

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


@dataclass(frozen=True)
class TaskOutput:
    """What an op may return instead of bare tensors: the tensors plus metrics to report.

    ``metrics`` (e.g. a reconstruction error) are collected by the engine in
    ``RunStats.metrics`` under the task's first output name.
    """

    tensors: tuple[Any, ...]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CopyInput:
    """An op that returns input ``index`` unchanged (tensors a plan copies, e.g. non-float buffers)."""

    index: int = 0

    def __call__(self, inputs: list[Any]) -> Any:
        return inputs[self.index]

    @property
    def description(self) -> str:
        return f"copy(input {self.index})"


@dataclass(frozen=True)
class TensorTask:
    """Make the tensors ``outputs`` as ``op([inputs...])``.

    ``op`` is a pure function of the loaded input tensors (already cast to
    ``work_dtype`` and placed on the compute device). It returns one tensor (one
    output), a tuple of tensors (one per output, in order) or a ``TaskOutput``. Each
    result is cast to its output's dtype. ``work_dtype`` None means: promote the inputs
    to a common dtype.
    """

    outputs: tuple[OutputTensor, ...]
    inputs: tuple[TensorRef, ...]
    op: Callable[[list[Any]], Any]
    work_dtype: str | None = None

    @property
    def name(self) -> str:
        return self.outputs[0].name

    @property
    def out_bytes(self) -> int:
        return sum(output.nbytes for output in self.outputs)

    def input_bytes(self, sources: Mapping[str, TensorSource]) -> int:
        """Bytes the inputs occupy once loaded and cast to the working dtype."""
        total = 0
        for ref in self.inputs:
            info = sources[ref.source].info(ref.name)
            size = DTYPE_BYTES[self.work_dtype] if self.work_dtype else DTYPE_BYTES[info.dtype]
            total += info.numel * max(size, DTYPE_BYTES[info.dtype])
        return total

    def describe(self) -> str:
        names = ", ".join(output.name for output in self.outputs)
        return f"{names} <- {getattr(self.op, 'description', repr(self.op))}"

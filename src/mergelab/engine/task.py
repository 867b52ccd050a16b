"""Plans are lists of ``TensorTask``s: plain, hashable, printable values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from mergelab.io.checkpoint import DTYPE_BYTES, TensorInfo


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
class TensorTask:
    """Make output tensor ``output`` as ``op([inputs...])``.

    ``op`` is a pure function of the loaded input tensors (already cast to
    ``work_dtype`` and placed on the compute device); its result is cast to
    ``out_dtype``. ``work_dtype`` None means: promote the inputs to a common dtype.
    """

    output: str
    inputs: tuple[TensorRef, ...]
    op: Callable[[list[Any]], Any]
    shape: tuple[int, ...]
    out_dtype: str
    work_dtype: str | None = None

    @property
    def out_bytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPE_BYTES[self.out_dtype]

    def input_bytes(self, sources: dict[str, TensorSource]) -> int:
        """Bytes the inputs occupy once loaded and cast to the working dtype."""
        total = 0
        for ref in self.inputs:
            info = sources[ref.source].info(ref.name)
            size = DTYPE_BYTES[self.work_dtype] if self.work_dtype else DTYPE_BYTES[info.dtype]
            total += info.numel * max(size, DTYPE_BYTES[info.dtype])
        return total

    def describe(self) -> str:
        return f"{self.output} <- {getattr(self.op, 'description', repr(self.op))}"

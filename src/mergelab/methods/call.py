"""A registered method as a ``TensorTask`` op: its name, resolved parameters and seed.

Planners (``merge``, ``lora``) decide which inputs a tensor needs and resolve the
method's parameters for it; ``MethodCall`` is the plain, hashable value that carries
that decision to the engine and runs the method on the loaded inputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from mergelab.methods.registry import get_method


def tensor_seed(seed: int, tensor_name: str) -> int:
    """A per-tensor seed, so random methods give the same result whatever the execution order."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class MethodCall:
    """A ``TensorTask`` op: run registered method ``method`` on the loaded inputs.

    ``base_index`` is the position of the base model's tensor among the inputs (None when
    the method has no base); ``params`` are fully resolved for this tensor (lists frozen
    to tuples, so the call is hashable).
    """

    method: str
    base_index: Optional[int]
    params: tuple[tuple[str, Any], ...]
    seed: Optional[int] = None

    @classmethod
    def resolved(cls, method: str, base_index: Optional[int], params: Mapping[str, Any],
                 seed: Optional[int] = None) -> "MethodCall":
        """The call with ``params`` as resolved by ``mergelab.config`` (per-model values are lists)."""
        frozen = tuple((name, tuple(value) if isinstance(value, list) else value) for name, value in params.items())
        return cls(method, base_index, frozen, seed)

    def __call__(self, inputs: list[Any]) -> Any:
        import torch

        method = get_method(self.method)
        params = {name: list(value) if isinstance(value, tuple) else value for name, value in self.params}
        if method.random:
            generator = torch.Generator(device=inputs[0].device)
            generator.manual_seed(self.seed if self.seed is not None else 0)
            params["generator"] = generator
        base = inputs[self.base_index] if self.base_index is not None else None
        others = [tensor for index, tensor in enumerate(inputs) if index != self.base_index]
        return method(others, base=base, **params)

    @property
    def description(self) -> str:
        shown = ", ".join(f"{name}={_shown(value)}" for name, value in self.params)
        return f"{self.method}({shown})"


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return repr(value) if isinstance(value, str) else str(value)

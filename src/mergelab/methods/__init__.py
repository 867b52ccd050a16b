"""Merge math as pure functions on tensors, registered with ``@merge_method``.

Importing this package registers every method. Look a method up with
``get_method(name)``; list them with ``all_methods()``.
"""

from mergelab.methods import (  # noqa: F401  (registration)
    arcee_fusion,
    karcher,
    linear,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    ram,
    sce,
    slerp,
    task_arithmetic,
)
from mergelab.methods.registry import REGISTRY, MergeMethod, Param, all_methods, get_method, merge_method

__all__ = ["REGISTRY", "MergeMethod", "Param", "all_methods", "get_method", "merge_method"]

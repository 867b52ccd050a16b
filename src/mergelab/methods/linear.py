"""Weighted averages and copies: ``linear`` and ``passthrough``."""

from __future__ import annotations

import torch

from mergelab.methods.numerics import combine
from mergelab.methods.registry import Param, merge_method, refuse_zero_weight_sum


@merge_method(
    "linear",
    task_vector=True,
    params=(
        Param("weight", per_model=True, help="each model's coefficient"),
        Param("normalize", type=bool, default=True, help="divide by Σ weight"),
    ),
    needs_base=False,
    paper="Model soups (Wortsman et al., 2022) https://arxiv.org/abs/2203.05482",
    check=refuse_zero_weight_sum("linear", "normalize"),
)
def linear(tensors, *, weight, normalize=True):
    """θ = Σ_i w_i θ_i  (÷ Σ_i w_i if normalize); computed in float32 (float64 inputs stay float64)."""
    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    # chunk by chunk: w_1 θ_1, then + w_i θ_i in turn, then ÷ Σ w_i
    return combine(tensors, weight, dtype, divisor=sum(weight) if normalize else None).to(first.dtype)


@merge_method(
    "passthrough",
    params=(Param("scale", default=None, per_model=True, help="optional factor applied to the copy"),),
    needs_base=False,
    max_models=1,
)
def passthrough(tensors, *, scale=None):
    """θ = θ_1 (× scale if given): copy tensors unchanged, e.g. to stack layers from slices."""
    (tensor,) = tensors
    factor = scale[0] if scale else None
    return tensor if factor is None else tensor * factor

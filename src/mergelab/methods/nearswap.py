"""NearSwap: take the other model's value where it is close to the base's."""

from __future__ import annotations

import torch

from mergelab.methods.numerics import compute_dtype, flat_chunks
from mergelab.methods.registry import Param, merge_method


@merge_method(
    "nearswap",
    task_vector=True,
    params=(Param("t", low=0.0, help="distance below which the other model's value is taken whole"),),
    min_models=1,
    max_models=1,
    paper="alchemonaut, NearSwap https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    differs_from_mergekit="half-precision inputs are computed in float32 and rounded once",
)
def nearswap(tensors, base, *, t):
    """θ = w·θ_1 + (1 − w)·θ_base entry-wise, w = clamp(t / max(|θ_base − θ_1|, 1e-6), 0, 1)."""
    (other,) = tensors
    dtype = compute_dtype(base)
    start, end = base.reshape(-1), other.reshape(-1)
    out = torch.empty(start.numel(), dtype=dtype, device=base.device)
    for part in flat_chunks(start.numel()):
        a, b = start[part].to(dtype), end[part].to(dtype)
        weight = torch.sub(a, b).abs_().clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(min=0, max=1)
        torch.mul(weight, b, out=out[part])
        out[part].add_(weight.neg_().add_(1).mul_(a))  # w·b + (1 − w)·a
    return out.view(base.shape).to(base.dtype)

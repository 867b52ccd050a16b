"""Arcee Fusion: take the other model's changes only where they matter most."""

from __future__ import annotations

import torch

from mergelab.methods.numerics import compute_dtype, flat_chunks, row_blocks
from mergelab.methods.registry import merge_method
from mergelab.methods.sparsify import kth_largest

KL_EPS = 1e-8


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """s = |θ_1 − θ_base| · KL(softmax(θ_1) ‖ softmax(θ_base)), the KL taken per row (last dim).

    The KL is computed in float64 and then rounded to the scores' dtype. A fine-tune's rows
    are close to the base's, so the KL of their softmaxes is a small difference of nearly
    equal terms: in float32 (as mergekit computes it) rounding dominates it, and which
    entries pass the threshold then depends on the order of the sums, i.e. on the device.
    """
    p = torch.softmax(other.double(), dim=-1) + KL_EPS
    q = torch.softmax(base.double(), dim=-1) + KL_EPS
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True).to(other.dtype)
    return (other - base).abs() * divergence


def quantile_floor(values: torch.Tensor, q: float) -> torch.Tensor:
    """The entry at index ⌊q·(n − 1)⌋ of the sorted values (no interpolation), exactly."""
    flat = values.reshape(-1)
    index = int(q * (flat.numel() - 1))
    return kth_largest(flat, flat.numel() - index)


@merge_method(
    "arcee_fusion",
    min_models=1,
    max_models=1,
    paper="Arcee Fusion (Arcee AI, 2025) https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration",
    differs_from_mergekit=(
        "quartiles are exact for every tensor (mergekit estimates them from a random sample of 10⁶ entries for "
        "larger tensors, so its result is not reproducible there); the per-row KL is computed in float64 (in float32 "
        "rounding dominates it for rows close to the base, so a few percent of entries pass or fail the threshold "
        "by chance, differently on CPU and GPU); half-precision inputs are computed in float32"
    ),
)
def arcee_fusion(tensors, base):
    """θ = θ_base + [s ≥ median(s) + 1.5·IQR(s)] ⊙ (θ_1 − θ_base), s = |δ| · KL(softmax(θ_1) ‖ softmax(θ_base)) per row."""
    (other,) = tensors
    dtype = compute_dtype(base)
    length = base.shape[-1] if base.dim() else 1
    start, end = base.reshape(-1, length), other.reshape(-1, length)
    scores = torch.empty(start.shape, dtype=dtype, device=base.device)
    for rows in row_blocks(start.shape[0], length):
        scores[rows] = importance(end[rows].to(dtype), start[rows].to(dtype))
    q1, median, q3 = (quantile_floor(scores, q) for q in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    flat_scores, first, second = scores.reshape(-1), start.reshape(-1), end.reshape(-1)
    out = torch.empty(first.numel(), dtype=dtype, device=base.device)
    for part in flat_chunks(first.numel()):
        a = first[part].to(dtype)
        out[part] = a + (second[part].to(dtype) - a) * (flat_scores[part] >= threshold)
    return out.view(base.shape).to(base.dtype)

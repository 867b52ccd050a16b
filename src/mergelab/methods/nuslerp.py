"""NuSLERP: slerp between two models (or their task vectors), flattened or per row."""

from __future__ import annotations

import math

import torch

from mergelab.methods.numerics import combine, compute_dtype, gram, row_blocks
from mergelab.methods.registry import Param, merge_method

NORM_EPS = 1e-7  # smallest norm when normalising
COLINEAR_EPS = 1e-8  # 1 − cos² ≤ eps²: (anti)parallel, use lerp


def nuslerp_tensors(t: float, start: torch.Tensor, end: torch.Tensor, *, dim: int = -1, flatten: bool = False) -> torch.Tensor:
    """Slerp from ``start`` (t = 0) to ``end`` (t = 1) along ``dim`` (or over everything when ``flatten``).

    cos Ω = ⟨a/‖a‖, b/‖b‖⟩ per vector along ``dim`` (norms clamped at 1e-7);
    result = (sin((1−t)Ω)·a + sin(tΩ)·b) / sin Ω, or (1−t)a + tb where 1 − cos²Ω ≤ 1e-16.
    """
    shape = start.shape
    if flatten:
        start, end = start.reshape(-1), end.reshape(-1)
    elif dim != -1:
        start, end = start.transpose(dim, -1), end.transpose(dim, -1)
    unit_start = start / torch.linalg.vector_norm(start, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    unit_end = end / torch.linalg.vector_norm(end, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cosine = (unit_start * unit_end).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cosine.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cosine))
    result = (torch.sin((1 - t) * theta) * start + torch.sin(t * theta) * end) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * start + t * end, result)
    if dim != -1 and not flatten:
        result = result.transpose(dim, -1)
    return result.reshape(shape)


def slerp_coefficients(t: float, products: torch.Tensor) -> tuple[float, float]:
    """(α, β) with slerp(a, b; t) = α·a + β·b, from the Gram matrix [[a·a, a·b], [a·b, b·b]]."""
    norm_a = max(math.sqrt(max(float(products[0, 0]), 0.0)), NORM_EPS)
    norm_b = max(math.sqrt(max(float(products[1, 1]), 0.0)), NORM_EPS)
    cosine = min(1.0, max(-1.0, float(products[0, 1]) / (norm_a * norm_b)))
    if 1 - cosine * cosine <= COLINEAR_EPS**2:
        return 1 - t, t
    theta = math.acos(cosine)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def vector_coefficients(t: float, aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector (α, β) with slerp(a, b; t) = α·a + β·b, from ‖a‖², ‖b‖², ⟨a, b⟩ (mergekit's rules)."""
    norm_a = aa.clamp(min=0).sqrt().clamp(min=NORM_EPS)
    norm_b = bb.clamp(min=0).sqrt().clamp(min=NORM_EPS)
    cosine = (ab / (norm_a * norm_b)).clamp(-1, 1)
    colinear = (1 - cosine.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cosine))
    sin_theta = torch.where(colinear, 1, torch.sin(theta))
    alpha = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    beta = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return alpha, beta


def per_vector(t: float, start: torch.Tensor, end: torch.Tensor, origin: torch.Tensor | None, dim: int,
               dtype: torch.dtype) -> torch.Tensor:
    """origin + slerp(start − origin, end − origin; t) of every vector along ``dim`` (not flattened).

    2-D tensors are walked in blocks of rows: vectors along the last dim are finished block
    by block; vectors along dim 0 (columns) get their inner products accumulated over the
    blocks first, then a second pass combines. Other shapes use ``nuslerp_tensors`` whole.
    """
    if start.dim() != 2:
        a, b = start.to(dtype), end.to(dtype)
        if origin is None:
            return nuslerp_tensors(t, a, b, dim=dim)
        o = origin.to(dtype)
        return o + nuslerp_tensors(t, a - o, b - o, dim=dim)

    def block(rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        a, b = start[rows].to(dtype), end[rows].to(dtype)
        o = origin[rows].to(dtype) if origin is not None else None
        if o is not None:
            a, b = a - o, b - o
        return a, b, o

    out = torch.empty(start.shape, dtype=dtype, device=start.device)
    blocks = list(row_blocks(start.shape[0], start.shape[1]))
    columns = dim in (0, -2)
    if columns:
        sums = torch.zeros(3, start.shape[1], dtype=torch.float64, device=start.device)
        for rows in blocks:
            a, b, _ = block(rows)
            sums += torch.stack([(a * a).sum(0), (b * b).sum(0), (a * b).sum(0)]).to(torch.float64)
        alpha, beta = (c.to(dtype) for c in vector_coefficients(t, sums[0], sums[1], sums[2]))
    for rows in blocks:
        a, b, o = block(rows)
        if not columns:
            alpha, beta = vector_coefficients(t, (a * a).sum(1, keepdim=True), (b * b).sum(1, keepdim=True),
                                              (a * b).sum(1, keepdim=True))
        result = torch.mul(a, alpha).add_(torch.mul(b, beta))  # a, b may be views of the inputs
        out[rows] = result if o is None else result.add_(o)
    return out


@merge_method(
    "nuslerp",
    task_vector=True,
    params=(
        Param("weight", per_model=True, help="relative weight of each of the two models; t = w₂ / (w₁ + w₂)"),
        Param("nuslerp_row_wise", type=bool, default=False, help="interpolate vectors along dim 0 instead of rows"),
        Param("nuslerp_flatten", type=bool, default=True, help="interpolate the whole tensor as one vector"),
    ),
    needs_base=False,
    optional_base=True,
    min_models=2,
    max_models=2,
    paper="Shoemake (1985) slerp; mergekit's NuSLERP https://github.com/arcee-ai/mergekit",
    differs_from_mergekit="the flattened angle is computed from inner products accumulated in float64; "
    "half-precision inputs are computed in float32 and rounded once",
)
def nuslerp(tensors, base=None, *, weight, nuslerp_row_wise=False, nuslerp_flatten=True):
    """θ = slerp(θ₁, θ₂; t) with t = w₂/(w₁ + w₂) (0.5 if w₁ + w₂ ≈ 0); with a base: θ_base + slerp(δ₁, δ₂; t).

    Flattened (default), or per vector along the last dim (``nuslerp_flatten: false``),
    or along dim 0 (``nuslerp_row_wise: true``, with flatten off).
    """
    first, second = tensors
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    dtype = compute_dtype(first)
    if nuslerp_flatten:
        alpha, beta = slerp_coefficients(t, gram([first, second], base))
        if base is None:
            return combine([first, second], [alpha, beta], dtype).to(first.dtype)
        return combine([first, second, base], [alpha, beta, 1 - alpha - beta], dtype).to(first.dtype)
    return per_vector(t, first, second, base, 0 if nuslerp_row_wise else -1, dtype).to(first.dtype)

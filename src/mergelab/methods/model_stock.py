"""Model Stock: how far to move from the base toward the average of the fine-tunes."""

from __future__ import annotations

import torch

from mergelab.methods.numerics import combine, compute_dtype, gram, row_blocks
from mergelab.methods.registry import Param, merge_method

COS_EPS = 1e-6  # smallest norm product; and |denominator| below this keeps the base


def mean_pairwise_cosine(deltas: list[torch.Tensor]) -> torch.Tensor:
    """c = mean over pairs i < j of cos(δ_i, δ_j) along the last dim (each clamped to [−1, 1]).

    Shapes: each δ is [..., d]; the result is [...]. Norm products are clamped at 1e-6.
    """
    cosines = []
    for index, first in enumerate(deltas):
        for second in deltas[index + 1 :]:
            norms = torch.linalg.vector_norm(first, dim=-1) * torch.linalg.vector_norm(second, dim=-1)
            cosines.append(((first * second).sum(dim=-1) / norms.clamp(min=COS_EPS)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0)


def gram_mean_cosine(products: torch.Tensor) -> float:
    """The same mean pairwise cosine, from the Gram matrix of the task vectors."""
    norms = products.diagonal().sqrt()
    cosines = [
        (products[i, j] / (norms[i] * norms[j]).clamp(min=COS_EPS)).clamp(-1, 1)
        for i in range(len(norms))
        for j in range(i + 1, len(norms))
    ]
    return float(torch.stack(cosines).mean())


def interpolation_ratio(cosine: torch.Tensor, count: int) -> torch.Tensor:
    """t = N·c / (1 + (N − 1)·c); t = 0 (keep the base) where the denominator is ~0."""
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < COS_EPS
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cosine), count * cosine / safe)


@merge_method(
    "model_stock",
    task_vector=True,
    params=(Param("filter_wise", type=bool, default=False, help="one ratio per row instead of per tensor"),),
    min_models=2,
    paper="Model Stock: All we need is just a few fine-tuned models (Jang et al., 2024) https://arxiv.org/abs/2403.19522",
    differs_from_mergekit="cosines over the whole tensor are accumulated in float64; half-precision inputs are "
    "computed in float32 and rounded once",
)
def model_stock(tensors, base, *, filter_wise=False):
    """θ = t·mean_i θ_i + (1 − t)·θ_base, t = N·c / (1 + (N − 1)·c), c = mean pairwise cos(δ_i, δ_j).

    δ_i = θ_i − θ_base over the flattened tensor, or per row with ``filter_wise`` (a 1-D
    tensor is one row). t = 0 where 1 + (N − 1)·c is ~0.
    """
    dtype = compute_dtype(base)
    count = len(tensors)
    if not filter_wise:
        ratio = float(interpolation_ratio(torch.tensor(gram_mean_cosine(gram(tensors, base))), count))
        return combine([*tensors, base], [ratio / count] * count + [1 - ratio], dtype).to(base.dtype)
    length = base.shape[-1]
    start = base.reshape(-1, length)
    models = [tensor.reshape(-1, length) for tensor in tensors]
    out = torch.empty(start.shape, dtype=dtype, device=base.device)
    for rows in row_blocks(start.shape[0], length):
        origin = start[rows].to(dtype)
        block = [model[rows].to(dtype) for model in models]
        ratio = interpolation_ratio(mean_pairwise_cosine([b - origin for b in block]), count).unsqueeze(-1)
        out[rows] = ratio * (sum(block) / count) + (1 - ratio) * origin
    return out.view(base.shape).to(base.dtype)

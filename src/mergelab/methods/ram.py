"""RAM: Reinforced Agent Merging — average only where task vectors overlap."""

from __future__ import annotations

import torch

from mergelab.methods.numerics import compute_dtype, flat_chunks
from mergelab.methods.registry import Param, merge_method

PAPER = "RAM: Reinforced Agent Merging (2026) https://arxiv.org/abs/2601.13572"
EPSILON = Param("epsilon", default=1e-5, low=0.0, help="|δ| above this counts as a change")
DIFFERS = "half-precision inputs are computed in float32 and rounded once"


def contributions(task_vectors: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(changed, counts): changed_i = [|δ_i| > ε] ([N, M]); counts = Σ_i changed_i ([1, M])."""
    changed = task_vectors.abs() > epsilon
    # summing bytes is far faster than summing booleans
    count_dtype = torch.uint8 if task_vectors.shape[0] < 256 else torch.int32
    return changed, changed.view(torch.uint8).sum(dim=0, keepdim=True, dtype=count_dtype)


def ram_task_vector(task_vectors: torch.Tensor, epsilon: float, unique_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Σ_i changed_i ⊙ δ_i · (s_i where only model i changed, else 1/count); ``task_vectors`` is [N, M].

    A change made by one model alone is divided by a count of 1, which is exact, so the
    unique and shared cases share one division (the sums equal mergekit's term by term).
    """
    changed, counts = contributions(task_vectors, epsilon)
    kept = task_vectors * changed
    per_model = kept / counts.clamp(min=1)
    if not isinstance(unique_scale, float) or unique_scale != 1.0:
        per_model = torch.where(counts == 1, kept * unique_scale, per_model)
    return per_model.sum(dim=0)


def _merge(tensors: list, base: torch.Tensor, epsilon: float, boost=None) -> torch.Tensor:
    """θ_base + RAM task vector in one chunked pass; ``boost(shared, unique)`` scales unique changes per model.

    With a boost, the scale of a model's unique changes depends on counts over the whole
    tensor, so the pass keeps each entry's unique change and its owner, and a last cheap
    pass adds them scaled (each entry's sum equals mergekit's term by term).
    """
    dtype = compute_dtype(base)
    flats = [tensor.reshape(-1) for tensor in tensors]
    start = base.reshape(-1)
    out = torch.empty(start.numel(), dtype=dtype, device=start.device)
    if boost is None:
        for part in flat_chunks(start.numel()):
            deltas = torch.stack([flat[part] for flat in flats]).to(dtype).sub_(start[part].to(dtype))
            out[part] = start[part].to(dtype) + ram_task_vector(deltas, epsilon)
        return out.view(base.shape).to(base.dtype)
    shared = torch.zeros(len(flats), dtype=torch.long, device=start.device)
    unique = torch.zeros_like(shared)
    unique_change = torch.empty_like(out)
    owner = torch.empty(start.numel(), dtype=torch.uint8 if len(flats) < 256 else torch.int32, device=start.device)
    for part in flat_chunks(start.numel()):
        deltas = torch.stack([flat[part] for flat in flats]).to(dtype).sub_(start[part].to(dtype))
        changed, counts = contributions(deltas, epsilon)
        alone = counts == 1
        mine = changed & alone
        shared += torch.count_nonzero(changed & (counts > 1), dim=1)
        unique += torch.count_nonzero(mine, dim=1)
        kept = deltas.mul_(changed)
        overlap = torch.where(alone, 0, kept / counts.clamp(min=1)).sum(dim=0)
        out[part] = start[part].to(dtype) + overlap
        unique_change[part] = torch.where(alone, kept, 0).sum(dim=0)
        whose = owner[part].zero_()
        for index in range(1, len(flats)):  # at most one model owns an entry's unique change
            whose.add_(mine[index].to(owner.dtype), alpha=index)
    scale = boost(shared, unique).to(dtype)
    for part in flat_chunks(start.numel()):
        out[part] += unique_change[part] * scale[owner[part].long()]
    return out.view(base.shape).to(base.dtype)


@merge_method(
    "ram",
    params=(EPSILON,),
    paper=PAPER,
    differs_from_mergekit=DIFFERS,
)
def ram(tensors, base, *, epsilon=1e-5):
    """θ = θ_base + Σ_i [|δ_i| > ε] δ_i / c, c = #{j : |δ_j| > ε} per entry (a change made by one model is kept whole)."""
    return _merge(tensors, base, epsilon)


@merge_method(
    "ramplus_tl",
    params=(
        Param("r", default=0.1, help="strength of the boost for unique changes"),
        Param("alpha", default=0.2, help="cap on the shared/unique ratio"),
        EPSILON,
    ),
    paper=PAPER,
    differs_from_mergekit=DIFFERS,
)
def ramplus_tl(tensors, base, *, r=0.1, alpha=0.2, epsilon=1e-5):
    """RAM with unique changes of model i boosted by λ_i = 1 + r·clamp(ρ_i, 0, α), ρ_i = #shared_i / #unique_i (per tensor)."""
    return _merge(tensors, base, epsilon, lambda shared, unique: 1 + r * (shared / unique.clamp(min=epsilon)).clamp(0, alpha))

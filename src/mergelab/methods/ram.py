"""RAM: Reinforced Agent Merging — average only where task vectors overlap."""

from __future__ import annotations

import torch

from mergelab.methods.numerics import chunk_stack, compute_dtype, flat_chunks, task_vector_chunks
from mergelab.methods.registry import Param, merge_method

PAPER = "RAM: Reinforced Agent Merging (2026) https://arxiv.org/abs/2601.13572"
EPSILON = Param("epsilon", default=1e-5, low=0.0, help="|δ| above this counts as a change")
DIFFERS = "half-precision inputs are computed in float32 and rounded once"


def contributions_(task_vectors: torch.Tensor, epsilon: float, changed: torch.Tensor) -> torch.Tensor:
    """For task vectors [N, M]: counts = Σ_i changed_i ([M]), changed_i = [|δ_i| > ε] as 1.0/0.0.

    In place: ``task_vectors`` become kept_i = δ_i where |δ_i| > ε, else 0, and ``changed``
    (a buffer shaped like them) receives changed_i. Float arithmetic only (boolean tensors
    cost several times more per entry): ``hardshrink`` zeroes |δ| <= ε, and with ε >= 0
    the kept entries are exactly the non-zero ones.
    """
    if epsilon >= 0:
        kept = torch.hardshrink(task_vectors, epsilon, out=task_vectors)
        torch.sign(kept, out=changed).abs_()  # sign(NaN) = 0: NaN is no change, as NaN > ε is false
    else:  # every entry but NaN is a change, zeros included
        changed.copy_(task_vectors.abs() > epsilon)
    return changed.sum(dim=0)


def only_one(counts: torch.Tensor) -> torch.Tensor:
    """1.0 where exactly one model changed an entry, else 0.0: max(c·(2 − c), 0) for integer counts c."""
    return torch.rsub(counts, 2).mul_(counts).clamp_min_(0)


def shared_mean_(kept: torch.Tensor, counts: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i kept_i / max(count, 1) ([M]); a change made by one model alone is divided by 1, which is exact.

    In place: divides ``kept``.
    """
    return torch.sum(kept.div_(counts.clamp_min(1)), dim=0, out=out)


def _merge(tensors: list, base: torch.Tensor, epsilon: float, boost=None) -> torch.Tensor:
    """θ_base + RAM task vector, chunk by chunk; ``boost(shared, unique)`` scales unique changes per model.

    With a boost, the scale λ_i of a model's unique changes depends on counts over the
    whole tensor. The one pass over the inputs stores the mean of the changes (for a change
    made by model i alone, δ_i itself) and, per entry, which model made it alone (a byte);
    a last pass over those multiplies by λ_i there and by 1 elsewhere and adds θ_base, so
    each entry equals mergekit's sum term by term.
    """
    dtype = compute_dtype(base)
    start = base.reshape(-1)
    out = torch.empty(start.numel(), dtype=dtype, device=base.device)
    scratch = chunk_stack("ram changes", len(tensors), start.numel(), dtype, base.device)
    if boost is None:
        for part, deltas in task_vector_chunks(tensors, base, dtype):
            counts = contributions_(deltas, epsilon, scratch(part))
            torch.add(start[part].to(dtype), shared_mean_(deltas, counts), out=out[part])
        return out.view(base.shape).to(base.dtype)
    changes = torch.zeros(len(tensors), dtype=torch.long, device=base.device)
    unique = torch.zeros_like(changes)
    # owner: i + 1 where model i alone changed the entry, 0 elsewhere
    codes = torch.arange(1, len(tensors) + 1, dtype=dtype, device=base.device)
    owner = torch.empty(start.numel(), dtype=torch.uint8 if len(tensors) < 256 else torch.int32, device=base.device)
    for part, deltas in task_vector_chunks(tensors, base, dtype):
        changed = scratch(part)
        counts = contributions_(deltas, epsilon, changed)
        alone = only_one(counts)
        # per chunk these counts are integers below 2^24, exact in float32
        changes += changed.sum(dim=1).long()
        unique += torch.mv(changed, alone).long()
        owner[part].copy_(torch.mv(changed.T, codes).mul_(alone))
        shared_mean_(deltas, counts, out=out[part])
    scale = boost(changes - unique, unique).to(dtype)
    factors = torch.cat([torch.ones(1, dtype=dtype, device=base.device), scale])  # by owner: 1, λ_0, λ_1, …
    for part in flat_chunks(start.numel()):
        merged = out[part].mul_(factors.index_select(0, owner[part].int()))
        torch.add(start[part].to(dtype), merged, out=merged)
    return out.view(base.shape).to(base.dtype)


@merge_method(
    "ram",
    task_vector=True,
    params=(EPSILON,),
    paper=PAPER,
    differs_from_mergekit=DIFFERS,
)
def ram(tensors, base, *, epsilon=1e-5):
    """θ = θ_base + Σ_i [|δ_i| > ε] δ_i / c, c = #{j : |δ_j| > ε} per entry (a change made by one model is kept whole)."""
    return _merge(tensors, base, epsilon)


@merge_method(
    "ramplus_tl",
    task_vector=True,
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

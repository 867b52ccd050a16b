"""The task-vector family: task arithmetic, TIES, DARE (linear and TIES).

All of them work on task vectors δ_i = θ_i − θ_base:

    δ_i ← sparsify(δ_i)                (TIES: top-density by |δ|; DARE: random keep)
    Wδ_i = w_i · δ_i
    with sign consensus (TIES, DARE-TIES):
        s = sign(Σ_i Wδ_i) (0 counts as +),   m_i = [sign(Wδ_i) = s]
        mix = Σ_i m_i·Wδ_i,   divisor = Σ_i w_i·m_i   (0 → 1)
    without:  mix = Σ_i Wδ_i,  divisor = Σ_i w_i      (|·| < 1e-8 → 1)
    mix ← mix / divisor if normalize;   θ = θ_base + λ · mix

Shapes: ``tensors`` is a list of N tensors shaped like ``base``; ``weight`` and
``density`` are lists of N floats. Computation happens in the inputs' dtype (the merge's
working dtype), as mergekit does.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from mergelab.methods.consensus import disjoint_merge_, majority_sign
from mergelab.methods.registry import Param, merge_method
from mergelab.methods.sparsify import l1_rescale_factor, magnitude_mask, random_mask

WEIGHT = Param("weight", per_model=True, help="scale of each model's task vector")
DENSITY = Param("density", default=1.0, per_model=True, low=0.0, high=1.0, help="fraction of δ kept")
LAMBDA = Param("lambda", default=1.0, argument="lambda_", help="scale of the merged task vector")
INT8_MASK = Param(
    "int8_mask", type=bool, default=False, help="accepted for compatibility; masks are always 1 byte"
)


def normalize_param(default: bool) -> Param:
    return Param("normalize", type=bool, default=default, help="divide by the sum of (agreeing) weights")


def rescale_param(default: bool) -> Param:
    return Param("rescale", type=bool, default=default, help="rescale kept entries to δ's L1 norm")


# keep_mask(δ_i, i) -> boolean mask of the entries of task vector i that survive
KeepMask = Callable[[torch.Tensor, int], torch.Tensor]


def keep_masks(
    tensors: list[torch.Tensor], base: torch.Tensor, keep_mask: KeepMask, rescale: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor | float]]:
    """Per task vector δ_i = θ_i − θ_base: its flattened keep mask and (if ``rescale``) its L1 factor.

    One δ buffer is reused across models; only the boolean masks are kept.
    """
    delta = torch.empty_like(base)
    masks, factors = [], []
    for index, tensor in enumerate(tensors):
        torch.sub(tensor, base, out=delta)
        mask = keep_mask(delta, index)
        masks.append(mask.reshape(-1))
        factors.append(l1_rescale_factor(delta, mask) if rescale else 1.0)
    return masks, factors


# The mixing runs over chunks of the flattened tensors: temporaries stay small and are
# reused by the allocator instead of faulting in fresh pages for every whole-tensor op.
CHUNK_ELEMENTS = 1 << 20


def combine_task_vectors(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    keep_mask: Optional[KeepMask] = None,
    rescale: bool = False,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """θ_base + λ·mix for the family above; ``keep_mask(δ_i, i)`` sparsifies task vector i."""
    if not tensors:
        return base
    masks, factors = keep_masks(tensors, base, keep_mask, rescale) if keep_mask else (None, None)
    flats = [tensor.reshape(-1) for tensor in tensors]
    base_flat = base.reshape(-1)
    out = torch.empty_like(base_flat)
    divisor_all = sum(weight)
    for start in range(0, base_flat.numel(), CHUNK_ELEMENTS):
        end = start + CHUNK_ELEMENTS
        chunk = torch.stack([flat[start:end] for flat in flats]).sub_(base_flat[start:end])  # δ_i
        for index, value in enumerate(weight):
            if masks is not None:
                chunk[index].mul_(masks[index][start:end])
                if not isinstance(factors[index], float) or factors[index] != 1.0:
                    chunk[index].mul_(factors[index])
            chunk[index].mul_(value)
        if consensus:
            mixed = disjoint_merge_(chunk, weight, majority_sign(chunk), normalize)
        else:
            mixed = chunk.sum(dim=0)
            if normalize and abs(divisor_all) >= 1e-8:
                mixed /= divisor_all
        if lambda_ != 1:
            mixed *= lambda_
        torch.add(base_flat[start:end], mixed, out=out[start:end])
    return out.view(base.shape)


@merge_method(
    "task_arithmetic",
    params=(WEIGHT, normalize_param(False), LAMBDA),
    paper="Editing Models with Task Arithmetic (Ilharco et al., 2023) https://arxiv.org/abs/2212.04089",
    accepted_without_effect=("density", "int8_mask", "rescale"),
)
def task_arithmetic(tensors, base, *, weight, normalize=False, lambda_=1.0):
    """θ = θ_base + λ · Σ_i w_i (θ_i − θ_base)  (÷ Σ_i w_i if normalize)."""
    return combine_task_vectors(tensors, base, weight=weight, consensus=False, normalize=normalize, lambda_=lambda_)


@merge_method(
    "ties",
    params=(WEIGHT, DENSITY, normalize_param(True), rescale_param(False), LAMBDA, INT8_MASK),
    paper="TIES-Merging: Resolving Interference When Merging Models (Yadav et al., 2023) https://arxiv.org/abs/2306.01708",
)
def ties(tensors, base, *, weight, density, normalize=True, rescale=False, lambda_=1.0, int8_mask=False):
    """Trim each δ_i to its top-density entries by |δ|, elect sign s = sign(Σ w_i δ_i), average agreeing entries.

    θ = θ_base + λ · Σ_i m_i w_i trim(δ_i) / Σ_i m_i w_i, with m_i = [sign(w_i trim(δ_i)) = s].
    """
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        keep_mask=lambda delta, i: magnitude_mask(delta, density[i]),
        rescale=rescale,
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )


@merge_method(
    "dare_ties",
    params=(WEIGHT, DENSITY, normalize_param(False), rescale_param(True), LAMBDA, INT8_MASK),
    random=True,
    paper="Language Models are Super Mario: DARE (Yu et al., 2024) https://arxiv.org/abs/2311.03099",
)
def dare_ties(
    tensors, base, *, weight, density, normalize=False, rescale=True, lambda_=1.0, int8_mask=False, generator=None
):
    """DARE drop (keep each δ entry with probability density, L1-rescale) then TIES sign consensus."""
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        keep_mask=lambda delta, i: random_mask(delta, density[i], generator),
        rescale=rescale,
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )


@merge_method(
    "dare_linear",
    params=(WEIGHT, DENSITY, normalize_param(False), rescale_param(True), LAMBDA),
    random=True,
    paper="Language Models are Super Mario: DARE (Yu et al., 2024) https://arxiv.org/abs/2311.03099",
    accepted_without_effect=("int8_mask",),
)
def dare_linear(tensors, base, *, weight, density, normalize=False, rescale=True, lambda_=1.0, generator=None):
    """DARE drop (keep each δ entry with probability density, L1-rescale), then θ_base + λ Σ_i w_i δ_i."""
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        keep_mask=lambda delta, i: random_mask(delta, density[i], generator),
        rescale=rescale,
        consensus=False,
        normalize=normalize,
        lambda_=lambda_,
    )

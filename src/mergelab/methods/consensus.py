"""Sign consensus for TIES-style merges, over a stack of weighted task vectors.

Shapes: ``weighted`` is [N, *shape] with entries w_i·δ_i; ``sign`` is [*shape] of ±1.
"""

from __future__ import annotations

import torch


def majority_sign(weighted: torch.Tensor) -> torch.Tensor:
    """s = sign(Σ_i w_i·δ_i), with 0 counted as +1 (TIES "elect"). Values ±1 in ``weighted``'s dtype."""
    total = weighted.sum(dim=0)
    return torch.where(total >= 0, 1.0, -1.0).to(weighted.dtype)


def agreement_mask(weighted_one: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """m_i = [sign(w_i·δ_i) = s] for one model; zero entries never agree."""
    return (weighted_one * sign) > 0


def disjoint_merge_(weighted: torch.Tensor, weights: list[float], sign: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Σ_i m_i·w_i·δ_i, divided (if ``normalize``) by Σ_i w_i·m_i where non-zero (TIES "disjoint merge").

    In place: zeroes the disagreeing entries of ``weighted`` (the caller's scratch stack).
    """
    divisor = torch.zeros_like(sign) if normalize else None
    for index, weight in enumerate(weights):
        agree = agreement_mask(weighted[index], sign)
        weighted[index].mul_(agree)
        if divisor is not None:
            divisor.add_(agree, alpha=weight)
    mixed = weighted.sum(dim=0)
    if divisor is not None:
        divisor[divisor == 0] = 1
        mixed /= divisor
    return mixed

"""Sign consensus for TIES-style merges, over a stack of weighted task vectors.

Shapes: ``weighted`` is [N, *shape] with entries w_i·δ_i; ``sign`` is [*shape] of ±1.

Both steps use only float arithmetic (sums, clamps, signs): comparisons that produce
boolean tensors, ``where`` and boolean indexing cost several times more per entry.
"""

from __future__ import annotations

import torch


def majority_sign(weighted: torch.Tensor) -> torch.Tensor:
    """s = sign(Σ_i w_i·δ_i), with 0 counted as +1 (TIES "elect"). Values ±1 in ``weighted``'s dtype.

    A NaN sum gives −1 (it is not >= 0).
    """
    total = torch.nan_to_num(weighted.sum(dim=0), nan=-1.0)
    total.add_(0.0)  # −0 → +0, so that copysign counts it as positive
    return torch.copysign(torch.ones((), dtype=total.dtype, device=total.device), total)


def agreement_mask(weighted_one: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """m_i = [sign(w_i·δ_i) = s] for one model; zero entries never agree."""
    return (weighted_one * sign) > 0


def disjoint_merge_(weighted: torch.Tensor, weights: list[float], sign: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Σ_i m_i·w_i·δ_i, divided (if ``normalize``) by Σ_i w_i·m_i where non-zero (TIES "disjoint merge").

    m_i = [sign(w_i·δ_i) = s]. Computed as s · Σ_i max(s·w_i·δ_i, 0): the agreeing terms
    all have sign s, so this equals the masked sum bit for bit (rounding is symmetric),
    and m_i = sign(max(s·w_i·δ_i, 0)) ∈ {0, 1}. In place: overwrites ``weighted``
    (the caller's scratch stack).
    """
    agreeing = weighted.mul_(sign).clamp_min_(0)  # |w_i·δ_i| where model i agrees, else 0
    mixed = agreeing.sum(dim=0)
    if normalize:
        agree = agreeing.sign_()
        if all(weight == 1.0 for weight in weights):
            divisor = agree.sum(dim=0)  # small integers: exact in any order
        else:
            # Σ w_i·m_i at least in float32: in half precision a weight such as 0.3 would round, and the
            # quotient would be off by w / round(w) everywhere while the numerator used w itself.
            wide = torch.float32 if mixed.dtype in (torch.float16, torch.bfloat16) else mixed.dtype
            divisor = torch.zeros(mixed.shape, dtype=wide, device=mixed.device)
            for index, weight in enumerate(weights):
                divisor.add_(agree[index], alpha=weight)
        if all(weight > 0 for weight in weights):
            # a non-zero divisor is at least the smallest weight; a zero one goes with a zero sum
            divisor.clamp_min_(min(weights))
        else:
            divisor.masked_fill_(divisor == 0, 1)
        mixed.div_(divisor)
    return mixed.mul_(sign)

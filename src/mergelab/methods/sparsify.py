"""Sparsifiers: which entries of a task vector δ survive.

Each returns a boolean *keep mask* shaped like δ; the caller applies it (in place on its
own buffers) and, optionally, rescales with :func:`l1_rescale_factor`. Random ones take
an explicit ``torch.Generator``. Pure functions: inputs are never modified.
"""

from __future__ import annotations

import torch

from mergelab.methods.numerics import row_blocks

# Below this L1 norm (before or after masking) rescaling is skipped, as in mergekit.
RESCALE_EPS = 1e-7
# Tensors above this size find their k-th largest value by sampling-bracketed selection.
_SELECT_DIRECT_MAX = 1 << 18
_SELECT_SAMPLE = 1 << 16


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest entry of a 1-D tensor (1 <= k <= numel).

    ``torch.kthvalue`` over tens of millions of entries is slow and single-threaded, so
    large inputs are bracketed first: quantiles of a strided sample give bounds
    [lo, hi] that almost surely contain the answer, the entries above ``hi`` are counted,
    and the exact selection runs only over the few entries inside the bracket. If the
    bracket misses (improbable), the direct selection runs instead. Always exact.
    """
    numel = values.numel()
    if numel <= _SELECT_DIRECT_MAX:
        return torch.kthvalue(values, numel - k + 1).values
    sample = values[:: max(1, numel // _SELECT_SAMPLE)]
    size = sample.numel()
    below = 1.0 - k / numel  # quantile of the answer
    margin = 4.0 * (below * (1.0 - below) / size) ** 0.5 + 4.0 / size
    low = torch.kthvalue(sample, max(1, int((below - margin) * size))).values
    high = torch.kthvalue(sample, min(size, int((below + margin) * size) + 1)).values
    missing = k - int(torch.count_nonzero(values > high))
    if missing > 0:
        inside = values[(values >= low) & (values <= high)]
        if missing <= inside.numel():
            return torch.kthvalue(inside, inside.numel() - missing + 1).values
    return torch.kthvalue(values, numel - k + 1).values


def _magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """|δ| flattened; half precision is widened on CPU, where selection on it is slow."""
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.dtype in (torch.float16, torch.bfloat16) and magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    return magnitudes


def top_k_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Flat mask of exactly the ``k`` largest ``magnitudes`` (a 1-D tensor); ties: lowest indices win.

    Masks for different k over the same magnitudes are nested (k₁ < k₂ ⇒ mask₁ ⊆ mask₂).
    """
    numel = magnitudes.numel()
    if k >= numel:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    threshold = kth_largest(magnitudes, k)
    mask = magnitudes >= threshold
    surplus = int(torch.count_nonzero(mask)) - k
    if surplus > 0:  # entries tied with the threshold: drop the highest-index ones
        tied = torch.nonzero(magnitudes == threshold).squeeze(1)
        mask[tied[-surplus:]] = False
    return mask


def magnitude_mask(delta: torch.Tensor, density: float, at_least_one: bool = True) -> torch.Tensor:
    """Keep the k = max(1, int(density · N)) entries of largest |δ| (TIES "trim").

    Exactly k entries are kept; among entries tied at the threshold, the lowest indices
    win (mergekit's sort breaks such ties arbitrarily). ``at_least_one=False`` gives
    PEFT's k = int(density · N), which may be 0.
    """
    numel = delta.numel()
    if density >= 1 or numel == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = int(density * numel)
    if at_least_one:
        k = max(1, k)
    return top_k_mask(_magnitudes(delta), k).reshape(delta.shape)


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the int(γ·N) largest |δ| (outliers), keep the next int(density·N).

    When γ·N + density·N exceed N, fewer outliers are dropped so that int(density·N)
    entries survive; γ = 0 keeps exactly the top-density entries. density ≥ 1 keeps all.
    In descending order of |δ| the kept ranks are [skip, skip + k) with
    k = int(density·N), skip = min(int(γ·N), N − k).
    """
    numel = delta.numel()
    if density >= 1 or numel == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    keep = max(0, int(density * numel))
    skip = min(int(gamma * numel), numel - keep)
    magnitudes = _magnitudes(delta)
    if 0 < keep and skip + keep < numel:
        # Fast path: between the skip-th and the (skip + keep)-th largest values. Exact when no
        # value ties at either threshold, which the two counts reveal.
        mask = magnitudes >= kth_largest(magnitudes, skip + keep)
        outliers_exact = True
        if skip > 0:
            outliers = magnitudes >= kth_largest(magnitudes, skip)
            outliers_exact = int(torch.count_nonzero(outliers)) == skip
            mask &= ~outliers
        if outliers_exact and int(torch.count_nonzero(mask)) == keep:
            return mask.reshape(delta.shape)
    mask = top_k_mask(magnitudes, skip + keep)
    if skip > 0:
        mask &= ~top_k_mask(magnitudes, skip)
    return mask.reshape(delta.shape)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's per-entry keep probability (float32), ranked by |δ| within each row.

    p = (density − ε) + 2ε · r,  r = (rank − 1)/(n − 1) ∈ [0, 1], where rank ∈ 1..n orders
    |δ| ascending along dim 1 (a 1-D δ is one row), so the largest entry of a row is kept
    with probability density + ε and the smallest with density − ε. A row of one entry
    gets p = density.
    """
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    magnitudes = rows.abs()
    if magnitudes.dtype == torch.float32 and magnitudes.device.type == "cpu":
        # non-negative float32 values order like their bit patterns, and integer sorts are faster
        magnitudes = magnitudes.view(torch.int32)
    elif magnitudes.dtype in (torch.float16, torch.bfloat16) and magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    order = torch.argsort(magnitudes, dim=1)
    del magnitudes
    # the inverse permutation of the sort: rank - 1 of every entry, one sort instead of two
    shape = [1] * rows.dim()
    shape[1] = rows.shape[1]
    positions = torch.arange(rows.shape[1], device=rows.device, dtype=torch.float32).view(shape)
    ranks = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
    ranks.scatter_(1, order, positions.expand(rows.shape))
    del order
    span = rows.shape[1] - 1
    if span > 0:
        ranks.div_(span)
    else:
        ranks.fill_(0.5)
    return ranks.mul_(2 * epsilon).add_(density - epsilon).reshape(delta.shape)


def della_mask(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator | None,
    with_probabilities: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """DELLA MagPrune: keep each entry with its rank-based probability; return (mask, probabilities).

    A 2-D δ is ranked a block of rows at a time, so the sort's index tensors stay small.
    Without ``with_probabilities`` (only ``rescale: exact`` needs them) 1.0 is returned in
    their place.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool), 1.0
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool), 0.0
    if delta.dim() != 2:
        probabilities = della_probabilities(delta, density, epsilon)
        draws = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32)
        return draws < probabilities, (probabilities if with_probabilities else 1.0)
    mask = torch.empty(delta.shape, dtype=torch.bool, device=delta.device)
    kept_probabilities = torch.empty(delta.shape, dtype=torch.float32, device=delta.device) if with_probabilities else None
    for rows in row_blocks(delta.shape[0], delta.shape[1]):
        probabilities = della_probabilities(delta[rows], density, epsilon)
        draws = torch.rand(probabilities.shape, generator=generator, device=delta.device, dtype=torch.float32)
        torch.lt(draws, probabilities, out=mask[rows])
        if kept_probabilities is not None:
            kept_probabilities[rows] = probabilities
    return mask, (kept_probabilities if kept_probabilities is not None else 1.0)


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE's random drop)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    return torch.rand(delta.shape, generator=generator, device=delta.device) < density


def l1_rescale_factor(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | float:
    """‖δ‖₁ / ‖mask ⊙ δ‖₁: mergekit's DARE "rescale" (not the paper's 1/p).

    Both norms are summed in float32 (float64 stays float64), so half-precision inputs
    cannot overflow to inf (mergekit sums in the input dtype: a float16 ‖δ‖₁ above 65504
    becomes inf and the tensor NaN). The factor is returned in that precision too.
    Returns 1.0 when either norm is below 1e-7 (nothing sensible to match).
    """
    magnitudes = delta.abs()
    before = magnitudes.sum(dtype=torch.float32 if delta.dtype != torch.float64 else None)
    after = magnitudes.mul_(mask).sum(dtype=before.dtype)
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after


def exact_rescale_factor(probability: torch.Tensor | float) -> torch.Tensor | float:
    """1 / p, the DARE and DELLA papers' rescale: E[mask ⊙ δ / p] = δ entry by entry."""
    if isinstance(probability, torch.Tensor):
        return torch.reciprocal(probability)
    return 1.0 / probability if probability > 0 else 1.0

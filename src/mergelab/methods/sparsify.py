"""Sparsifiers: which entries of a task vector δ survive.

Each returns a boolean *keep mask* shaped like δ; the caller applies it (in place on its
own buffers) and, optionally, rescales with :func:`l1_rescale_factor`. Random ones take
an explicit ``torch.Generator``. Pure functions: inputs are never modified.
"""

from __future__ import annotations

import torch

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


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density · N)) entries of largest |δ| (TIES "trim").

    Exactly k entries are kept; among entries tied at the threshold, the lowest indices
    win (mergekit's sort breaks such ties arbitrarily).
    """
    numel = delta.numel()
    if density >= 1 or numel == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * numel))
    magnitudes = delta.abs().reshape(-1)
    if magnitudes.dtype in (torch.float16, torch.bfloat16) and magnitudes.device.type == "cpu":
        magnitudes = magnitudes.float()
    threshold = kth_largest(magnitudes, k)
    mask = magnitudes >= threshold
    surplus = int(torch.count_nonzero(mask)) - k
    if surplus > 0:  # entries tied with the threshold: drop the highest-index ones
        tied = torch.nonzero(magnitudes == threshold).squeeze(1)
        mask[tied[-surplus:]] = False
    return mask.reshape(delta.shape)


def random_mask(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """Keep each entry independently with probability ``density`` (DARE's random drop)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    return torch.rand(delta.shape, generator=generator, device=delta.device) < density


def l1_rescale_factor(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | float:
    """‖δ‖₁ / ‖mask ⊙ δ‖₁: mergekit's DARE "rescale" (not the paper's 1/p).

    Returns 1.0 when either norm is below 1e-7 (nothing sensible to match).
    """
    before = delta.abs().sum(dtype=torch.float32 if delta.dtype != torch.float64 else None)
    after = torch.where(mask, delta.abs(), 0).sum(dtype=before.dtype)
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return (before / after).to(delta.dtype)

"""Sparsifiers: which entries of a task vector δ survive.

Each returns a boolean *keep mask* shaped like δ (or, for the top-k by magnitude, a
:class:`MagnitudeCut` that applies without a mask); the caller applies it (in place on its
own buffers) and, optionally, rescales with :func:`l1_rescale_factor`. Random ones take
an explicit ``torch.Generator``. Pure functions: inputs are never modified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy
import torch

from mergelab.methods.numerics import CHUNK_ELEMENTS, flat_chunks, row_blocks, workspace

# Below this L1 norm (before or after masking) rescaling is skipped, as in mergekit.
RESCALE_EPS = 1e-7
# Tensors above this size find their k-th largest value by sampling-bracketed selection.
_SELECT_DIRECT_MAX = 1 << 18
# The sample has about numel^(2/3) entries, within these bounds: that balances selecting twice in
# the sample against selecting in the bracket, whose width shrinks as 1/sqrt(sample size).
_SELECT_SAMPLE_MIN = 1 << 12
_SELECT_SAMPLE_MAX = 1 << 16


def _selection_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Half precision is widened on CPU, where selection on it is slow."""
    if dtype in (torch.float16, torch.bfloat16) and device.type == "cpu":
        return torch.float32
    return dtype


def _entries(flat: torch.Tensor, base: Optional[torch.Tensor], absolute: bool, part: slice = slice(None),
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Entries ``part`` of what is selected among: ``flat``, |flat| (``absolute``) or |flat − base| (a ``base``).

    In the selection dtype; written into ``out`` (a buffer of that dtype) when given, and a
    view of ``flat`` when nothing needs computing. δ = flat − base is computed in the
    inputs' dtype, as a whole δ would be.
    """
    piece = flat[part]
    kind = piece.dtype if base is None else torch.promote_types(piece.dtype, base.dtype)
    into = out if out is not None and out.dtype == kind else None
    if base is not None:
        piece = torch.sub(piece, base[part], out=into).abs_()
    elif absolute:
        piece = torch.abs(piece, out=into) if into is not None else piece.abs()
    dtype = _selection_dtype(kind, piece.device)
    if piece.dtype != dtype:
        piece = out.copy_(piece) if out is not None else piece.to(dtype)
    return piece


def _kth_smallest(values: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank``-th smallest entry (1-based) of a 1-D tensor, as a 0-d tensor; NaN sorts last.

    On CPU, NumPy's introselect is about twice as fast as ``torch.kthvalue``, which also
    tracks indices; both order NaN last, so they select the same value.
    """
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        chosen = numpy.partition(values.numpy(), rank - 1)[rank - 1]
        return torch.tensor(chosen.item(), dtype=values.dtype)
    return torch.kthvalue(values, rank).values


@dataclass(frozen=True)
class _Selection:
    """The k-th largest entry and, when the bracket found it, how many entries are above and equal to
    it, and the entries inside the bracket, chunk by chunk (as ``flat_chunks`` cuts the input)."""

    threshold: torch.Tensor  # 0-d, in the selection dtype
    greater: Optional[int] = None
    equal: Optional[int] = None
    inside: Optional[list[torch.Tensor]] = None


def _sparse_select(values: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """``values[flags]`` for sparse ``flags``: groups of 8 flags read as one int64 are skipped when all clear."""
    whole = values.numel() - values.numel() % 8
    groups = torch.nonzero(flags[:whole].view(torch.int64)).squeeze(1)
    chosen = torch.masked_select(
        values[:whole].reshape(-1, 8).index_select(0, groups), flags[:whole].view(-1, 8).index_select(0, groups)
    )
    if whole == values.numel():
        return chosen
    return torch.cat([chosen, values[whole:][flags[whole:]]])


def _select(flat: torch.Tensor, k: int, absolute: bool, base: Optional[torch.Tensor] = None) -> _Selection:
    """The exact k-th largest of ``flat``, |flat| (``absolute``) or |flat − base|, 1 <= k <= numel.

    ``torch.kthvalue`` over tens of millions of entries is slow and single-threaded, so
    large inputs are bracketed first: quantiles of a strided sample give bounds
    [low, high] that almost surely contain the answer; one pass over the input, a chunk
    at a time in reused buffers, counts the entries above ``high`` and gathers those
    inside the bracket, and the exact selection runs only over those few. If the
    bracket misses (improbable), the direct selection runs instead. Always exact.
    """
    numel = flat.numel()
    if numel <= _SELECT_DIRECT_MAX:
        return _Selection(_kth_smallest(_entries(flat, base, absolute), numel - k + 1))
    sample_size = min(_SELECT_SAMPLE_MAX, max(_SELECT_SAMPLE_MIN, round(numel ** (2 / 3))))
    sample = _entries(flat, base, absolute, slice(None, None, max(1, numel // sample_size)))
    size = sample.numel()
    below = 1.0 - k / numel  # quantile of the answer
    margin = 4.0 * (below * (1.0 - below) / size) ** 0.5 + 4.0 / size
    low = _kth_smallest(sample, max(1, int((below - margin) * size)))
    high = _kth_smallest(sample, min(size, int((below + margin) * size) + 1))
    chunk = min(numel, CHUNK_ELEMENTS)
    scratch = workspace("selection", chunk, sample.dtype, flat.device)
    at_least_low = workspace("selection: at least low", chunk, torch.bool, flat.device)
    at_most_high = workspace("selection: at most high", chunk, torch.bool, flat.device)
    above, inside = 0, []
    for part in flat_chunks(numel):
        size = part.stop - part.start
        piece = _entries(flat, base, absolute, part, scratch[:size])
        flags = torch.ge(piece, low, out=at_least_low[:size])
        candidates = int(torch.count_nonzero(flags))
        flags.logical_and_(torch.le(piece, high, out=at_most_high[:size]))
        chosen = _sparse_select(piece, flags)
        above += candidates - chosen.numel()  # entries > high (NaN is in neither count)
        inside.append(chosen)
    within = torch.cat(inside)
    missing = k - above
    if 0 < missing <= within.numel():
        threshold = _kth_smallest(within, within.numel() - missing + 1)
        greater = above + int(torch.count_nonzero(within > threshold))
        return _Selection(threshold, greater, int(torch.count_nonzero(within == threshold)), inside)
    return _Selection(_kth_smallest(_entries(flat, base, absolute), numel - k + 1))


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest entry of a 1-D tensor (1 <= k <= numel); see :func:`_select`."""
    return _select(values, k, absolute=False).threshold


def _top_k(flat: torch.Tensor, k: int, absolute: bool, base: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, int]:
    """(threshold, tied_end) of exactly the k largest entries (1 <= k < numel); ties: lowest indices win.

    Kept: entries > threshold, and entries = threshold at flat positions below tied_end.
    """
    selection = _select(flat, k, absolute, base)
    threshold = selection.threshold
    if selection.greater is None:
        values = _entries(flat, base, absolute)
        greater, equal = int(torch.count_nonzero(values > threshold)), int(torch.count_nonzero(values == threshold))
    else:
        greater, equal = selection.greater, selection.equal
    keep = k - greater  # tied entries kept; >= 1 unless the threshold is NaN, which nothing equals
    if keep >= equal:
        return threshold, flat.numel()
    seen = 0
    for index, part in enumerate(flat_chunks(flat.numel())):
        if selection.inside is not None:  # ties lie inside the bracket: skip chunks with too few
            tied_here = int(torch.count_nonzero(selection.inside[index] == threshold))
            if seen + tied_here < keep:
                seen += tied_here
                continue
        tied = torch.nonzero(_entries(flat, base, absolute, part) == threshold).squeeze(1)
        if seen + tied.numel() >= keep:
            return threshold, part.start + int(tied[keep - seen - 1]) + 1
        seen += tied.numel()
    raise AssertionError("fewer entries tied at the threshold than counted")


@dataclass(frozen=True)
class MagnitudeCut:
    """Exactly the k entries of largest |δ| of a flattened δ, without a mask.

    Kept: |δ| > ``threshold`` everywhere, and |δ| = ``threshold`` at flat positions below
    ``tied_end`` (among ties the lowest indices win). ``threshold`` is a value of δ's dtype.
    """

    threshold: float
    tied_end: int
    dtype: torch.dtype
    # the next value of the dtype below the threshold: |x| > it ⇔ |x| >= threshold
    just_below: float = field(init=False)

    def __post_init__(self) -> None:
        threshold = torch.tensor(self.threshold, dtype=self.dtype)
        below = torch.nextafter(threshold, torch.tensor(-math.inf, dtype=self.dtype))
        object.__setattr__(self, "just_below", float(below))

    def mask(self, delta: torch.Tensor) -> torch.Tensor:
        """The boolean keep mask, shaped like ``delta``."""
        magnitudes = _entries(delta.reshape(-1), None, absolute=True)
        mask = magnitudes >= self.threshold
        if self.tied_end < mask.numel():
            torch.gt(magnitudes[self.tied_end :], self.threshold, out=mask[self.tied_end :])
        return mask.reshape(delta.shape)

    def apply_(self, values: torch.Tensor, start: int) -> torch.Tensor:
        """Zero in place the dropped entries of ``values``, the flattened δ[start : start + len(values)].

        ``hardshrink(x, λ)`` zeroes |x| <= λ in one pass: λ = the threshold drops the ties,
        λ = the next value of the dtype below it keeps them (for threshold 0 that is a
        negative λ, which keeps everything). Dropped entries become +0.
        """
        split = min(max(self.tied_end - start, 0), values.numel())
        if split:
            torch.hardshrink(values[:split], self.just_below, out=values[:split])
        if split < values.numel():
            torch.hardshrink(values[split:], self.threshold, out=values[split:])
        return values


def top_k_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Flat mask of exactly the ``k`` largest ``magnitudes`` (a 1-D tensor); ties: lowest indices win.

    Masks for different k over the same magnitudes are nested (k₁ < k₂ ⇒ mask₁ ⊆ mask₂).
    """
    numel = magnitudes.numel()
    if k >= numel:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    threshold, tied_end = _top_k(magnitudes, k, absolute=False)
    values = _entries(magnitudes, None, absolute=False)
    mask = values >= threshold
    if tied_end < numel:
        torch.gt(values[tied_end:], threshold, out=mask[tied_end:])
    return mask


def magnitude_cut(
    tensor: torch.Tensor, density: float, at_least_one: bool = True, base: Optional[torch.Tensor] = None
) -> Union[MagnitudeCut, torch.Tensor]:
    """Keep the k = max(1, int(density · N)) entries of largest |δ| (TIES "trim"), δ = ``tensor`` − ``base``.

    Without a ``base``, δ is ``tensor`` itself; with one, δ is computed a chunk at a time
    and never held whole. Exactly k entries are kept; among entries tied at the
    threshold, the lowest indices win (mergekit's sort breaks such ties arbitrarily).
    ``at_least_one=False`` gives PEFT's k = int(density · N), which may be 0. Keeping all
    or none is a boolean mask, anything else a :class:`MagnitudeCut` (a NaN threshold,
    which no entry reaches, keeps none).
    """
    numel = tensor.numel()
    if density >= 1 or numel == 0:
        return torch.ones_like(tensor, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(tensor, dtype=torch.bool)
    k = int(density * numel)
    if at_least_one:
        k = max(1, k)
    if k >= numel:
        return torch.ones_like(tensor, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(tensor, dtype=torch.bool)
    threshold, tied_end = _top_k(tensor.reshape(-1), k, True, None if base is None else base.reshape(-1))
    if torch.isnan(threshold):
        return torch.zeros_like(tensor, dtype=torch.bool)
    dtype = tensor.dtype if base is None else torch.result_type(tensor, base)
    return MagnitudeCut(float(threshold), tied_end, dtype)


def magnitude_mask(delta: torch.Tensor, density: float, at_least_one: bool = True) -> torch.Tensor:
    """:func:`magnitude_cut` as a boolean mask shaped like δ."""
    kept = magnitude_cut(delta, density, at_least_one)
    return kept.mask(delta) if isinstance(kept, MagnitudeCut) else kept


def _magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """|δ| flattened; half precision is widened on CPU, where selection on it is slow."""
    return _entries(delta.reshape(-1), None, absolute=True)


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

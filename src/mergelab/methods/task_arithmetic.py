"""The task-vector family: task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA, magnitude prune.

All of them work on task vectors δ_i = θ_i − θ_base:

    δ_i ← sparsify(δ_i)     (TIES, magnitude prune: top-density by |δ|; DARE: random keep;
                             Breadcrumbs: drop the top-γ outliers, keep the next density;
                             DELLA: random keep with a probability that grows with |δ|)
    δ_i ← δ_i · rescale     (optional: ‖δ‖₁/‖kept δ‖₁ as mergekit, or 1/p as the papers)
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

from typing import Any, Callable, Optional, Union

import torch

from mergelab.errors import ConfigError
from mergelab.methods.consensus import disjoint_merge_, majority_sign
from mergelab.methods.numerics import task_vector_chunks
from mergelab.methods.registry import Param, merge_method
from mergelab.methods.sparsify import (
    MagnitudeCut,
    della_mask,
    exact_rescale_factor,
    l1_rescale_factor,
    magnitude_cut,
    outlier_mask,
    random_mask,
)

WEIGHT = Param("weight", per_model=True, help="scale of each model's task vector")
DENSITY = Param("density", default=1.0, per_model=True, low=0.0, high=1.0, help="fraction of δ kept")
LAMBDA = Param("lambda", default=1.0, argument="lambda_", help="scale of the merged task vector")
INT8_MASK = Param(
    "int8_mask", type=bool, default=False, help="accepted for compatibility; masks are always 1 byte"
)


def normalize_param(default: bool) -> Param:
    return Param("normalize", type=bool, default=default, help="divide by the sum of (agreeing) weights")


def rescale_param(default: bool, exact: bool = False) -> Param:
    if not exact:
        return Param("rescale", type=bool, default=default, help="rescale kept entries to δ's L1 norm")
    return Param(
        "rescale",
        type=object,
        default=default,
        choices=(False, True, "exact"),
        help="true: rescale kept entries to δ's L1 norm (mergekit); exact: × 1/keep-probability (the paper)",
    )


TIE_BREAK = (
    "entries tied in |δ| at the trim threshold are broken by lowest index (mergekit's sort breaks them arbitrarily, "
    "so the two can differ in those tied entries); L1 rescale norms are summed in float32"
)
GAMMA = Param("gamma", default=0.01, per_model=True, low=0.0, high=1.0, help="fraction of largest |δ| dropped as outliers")
EPSILON = Param("epsilon", default=0.15, per_model=True, low=0.0, help="spread of keep probabilities around density")

Rescale = Union[bool, str]  # False, True (L1, mergekit) or "exact" (1/p)
Probability = Union[torch.Tensor, float]
# What survives of a task vector: a boolean mask shaped like δ_i, or a MagnitudeCut (top-k by |δ_i|)
Keep = Union[torch.Tensor, MagnitudeCut]


class TaskVector:
    """δ_i = θ_i − θ_base of one model, as a sparsifier sees it.

    ``delta`` is computed on first use, into a buffer shared by the models of one tensor;
    sparsifiers that can work a chunk at a time from ``tensor`` and ``base`` (the top-k by
    magnitude) never need it whole.
    """

    def __init__(self, tensor: torch.Tensor, base: torch.Tensor, buffer: Callable[[], torch.Tensor]):
        self.tensor, self.base = tensor, base
        self._buffer = buffer
        self._delta: Optional[torch.Tensor] = None

    @property
    def delta(self) -> torch.Tensor:
        if self._delta is None:
            self._delta = torch.sub(self.tensor, self.base, out=self._buffer())
        return self._delta


# keep_mask(task vector i, i) -> what survives of it, or (mask, keep probability) for random
# sparsifiers (a float, or a tensor shaped like δ_i)
KeepMask = Callable[[TaskVector, int], Union[Keep, tuple[torch.Tensor, Probability]]]


def rescale_factor(
    task_vector: TaskVector, mask: Keep, probability: Optional[Probability], rescale: Rescale
) -> Probability:
    """The factor kept entries are multiplied by: 1, ‖δ‖₁/‖mask ⊙ δ‖₁ (``true``) or 1/p (``exact``)."""
    if rescale is False:
        return 1.0
    if rescale == "exact":
        if probability is None:
            raise ValueError("rescale: exact needs a random sparsifier (DARE, DELLA)")
        factor = exact_rescale_factor(probability)
        return factor.reshape(-1) if isinstance(factor, torch.Tensor) else factor
    delta = task_vector.delta
    return l1_rescale_factor(delta, mask.mask(delta) if isinstance(mask, MagnitudeCut) else mask)


def keep_masks(
    tensors: list[torch.Tensor], base: torch.Tensor, keep_mask: KeepMask, rescale: Rescale
) -> tuple[list[Keep], list[Probability]]:
    """Per task vector δ_i = θ_i − θ_base: what survives of it (a flattened mask or a cut) and its rescale factor.

    One δ buffer, allocated if a sparsifier asks for a whole δ, is reused across models;
    only the boolean masks (and, for DELLA with ``rescale: exact``, the per-entry
    factors) are kept.
    """
    shared: list[torch.Tensor] = []

    def buffer() -> torch.Tensor:
        if not shared:
            shared.append(torch.empty_like(base))
        return shared[0]

    masks, factors = [], []
    for index, tensor in enumerate(tensors):
        task_vector = TaskVector(tensor, base, buffer)
        kept = keep_mask(task_vector, index)
        mask, probability = kept if isinstance(kept, tuple) else (kept, None)
        masks.append(mask if isinstance(mask, MagnitudeCut) else mask.reshape(-1))
        factors.append(rescale_factor(task_vector, mask, probability, rescale))
    return masks, factors


def apply_keep_(delta: torch.Tensor, keep: Keep, part: slice) -> None:
    """Zero in place the entries of ``delta`` (flat entries ``part`` of δ_i) that ``keep`` drops."""
    if isinstance(keep, MagnitudeCut):
        keep.apply_(delta, part.start)
    else:
        delta.mul_(keep[part])


# The mixing runs over chunks of the flattened tensors (numerics.CHUNK_ELEMENTS) in one reused
# stack of task vectors: temporaries stay small and in cache, and no fresh pages fault in.


def combine_task_vectors(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    *,
    weight: list[float],
    keep_mask: Optional[KeepMask] = None,
    rescale: Rescale = False,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """θ_base + λ·mix for the family above; ``keep_mask(δ_i, i)`` sparsifies task vector i."""
    if not tensors:
        return base
    masks, factors = keep_masks(tensors, base, keep_mask, rescale) if keep_mask else (None, None)
    base_flat = base.reshape(-1)
    out = torch.empty_like(base_flat)
    # Without consensus, mix = Σ_i w_i δ_i accumulates in the output chunk itself (fewer passes
    # than scaling each δ_i, then summing the stack), then ÷ Σw and × λ as mergekit orders them
    # (folded into the weights they could overflow half precision when Σw is tiny).
    divisor_all = sum(weight)
    divide = normalize and abs(divisor_all) >= 1e-8
    for part, chunk in task_vector_chunks(tensors, base, tensors[0].dtype):
        for index, delta in enumerate(chunk):
            if masks is not None:
                apply_keep_(delta, masks[index], part)
                factor = factors[index]
                if isinstance(factor, torch.Tensor):
                    delta.mul_(factor[part] if factor.dim() else factor)
                elif factor != 1.0:
                    delta.mul_(factor)
            if consensus and weight[index] != 1.0:
                delta.mul_(weight[index])
        target = out[part]
        if consensus:
            mixed = disjoint_merge_(chunk, weight, majority_sign(chunk), normalize)
            if lambda_ != 1:
                mixed *= lambda_
            torch.add(base_flat[part], mixed, out=target)
            continue
        torch.mul(chunk[0], weight[0], out=target)
        for delta, value in zip(chunk[1:], weight[1:]):
            target.add_(delta, alpha=value)
        if divide:
            target.div_(divisor_all)
        if lambda_ != 1:
            target.mul_(lambda_)
        target.add_(base_flat[part])
    return out.view(base.shape)


@merge_method(
    "task_arithmetic",
    task_vector=True,
    params=(WEIGHT, normalize_param(False), LAMBDA),
    paper="Editing Models with Task Arithmetic (Ilharco et al., 2023) https://arxiv.org/abs/2212.04089",
    accepted_without_effect=("density", "int8_mask", "rescale"),
)
def task_arithmetic(tensors, base, *, weight, normalize=False, lambda_=1.0):
    """θ = θ_base + λ · Σ_i w_i (θ_i − θ_base)  (÷ Σ_i w_i if normalize)."""
    return combine_task_vectors(tensors, base, weight=weight, consensus=False, normalize=normalize, lambda_=lambda_)


@merge_method(
    "ties",
    task_vector=True,
    params=(WEIGHT, DENSITY, normalize_param(True), rescale_param(False), LAMBDA, INT8_MASK),
    paper="TIES-Merging: Resolving Interference When Merging Models (Yadav et al., 2023) https://arxiv.org/abs/2306.01708",
    differs_from_mergekit=TIE_BREAK,
)
def ties(tensors, base, *, weight, density, normalize=True, rescale=False, lambda_=1.0, int8_mask=False):
    """Trim each δ_i to its top-density entries by |δ|, elect sign s = sign(Σ w_i δ_i), average agreeing entries.

    θ = θ_base + λ · Σ_i m_i w_i trim(δ_i) / Σ_i m_i w_i, with m_i = [sign(w_i trim(δ_i)) = s].
    """
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        keep_mask=lambda task, i: magnitude_cut(task.tensor, density[i], base=task.base),
        rescale=rescale,
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )


DARE_DIFFERS = (
    "accepts rescale: exact (× 1/density, the DARE paper's rescale) beside mergekit's rescale: true (match δ's L1 "
    "norm); L1 norms are summed in float32, so float16 inputs cannot overflow; masks come from a per-tensor seed"
)


def dare_keep(density: list[float], generator: Optional[torch.Generator]) -> KeepMask:
    """DARE's sparsifier: keep each entry of δ_i with probability density_i."""
    return lambda task, i: (random_mask(task.tensor, density[i], generator), density[i])


@merge_method(
    "dare_ties",
    task_vector=True,
    params=(WEIGHT, DENSITY, normalize_param(False), rescale_param(True, exact=True), LAMBDA, INT8_MASK),
    random=True,
    paper="Language Models are Super Mario: DARE (Yu et al., 2024) https://arxiv.org/abs/2311.03099",
    differs_from_mergekit=DARE_DIFFERS,
)
def dare_ties(
    tensors, base, *, weight, density, normalize=False, rescale=True, lambda_=1.0, int8_mask=False, generator=None
):
    """DARE drop (keep each δ entry with probability density, rescale) then TIES sign consensus.

    δ_i ← Bernoulli(density_i) ⊙ δ_i · r_i, r_i = ‖δ_i‖₁/‖kept δ_i‖₁ (rescale: true) or 1/density_i
    (rescale: exact); θ = θ_base + λ · Σ_i m_i w_i δ_i (÷ Σ_i m_i w_i if normalize).
    """
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        keep_mask=dare_keep(density, generator),
        rescale=rescale,
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )


@merge_method(
    "dare_linear",
    task_vector=True,
    params=(WEIGHT, DENSITY, normalize_param(False), rescale_param(True, exact=True), LAMBDA),
    random=True,
    paper="Language Models are Super Mario: DARE (Yu et al., 2024) https://arxiv.org/abs/2311.03099",
    differs_from_mergekit=DARE_DIFFERS,
    accepted_without_effect=("int8_mask",),
)
def dare_linear(tensors, base, *, weight, density, normalize=False, rescale=True, lambda_=1.0, generator=None):
    """DARE drop (keep each δ entry with probability density, rescale), then θ_base + λ Σ_i w_i δ_i.

    r_i = ‖δ_i‖₁/‖kept δ_i‖₁ (rescale: true, mergekit) or 1/density_i (rescale: exact, the paper).
    """
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        keep_mask=dare_keep(density, generator),
        rescale=rescale,
        consensus=False,
        normalize=normalize,
        lambda_=lambda_,
    )


BREADCRUMBS_PAPER = "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, 2024) https://arxiv.org/abs/2312.06795"


def breadcrumbs_keep(density: list[float], gamma: list[float]) -> KeepMask:
    return lambda task, i: outlier_mask(task.delta, density[i], gamma[i])


@merge_method(
    "breadcrumbs",
    task_vector=True,
    params=(WEIGHT, DENSITY, GAMMA, normalize_param(False), rescale_param(False), LAMBDA),
    paper=BREADCRUMBS_PAPER,
    differs_from_mergekit=TIE_BREAK,
    accepted_without_effect=("int8_mask",),
)
def breadcrumbs(tensors, base, *, weight, density, gamma, normalize=False, rescale=False, lambda_=1.0):
    """Drop the top-γ outliers of each |δ_i| and keep the next density, then θ_base + λ Σ_i w_i δ_i.

    Kept: ranks [min(γN, N − k), … + k) of |δ_i| in descending order, k = int(density·N);
    γ = 0 keeps exactly the top-density entries; density 1 keeps δ_i whole.
    """
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        keep_mask=breadcrumbs_keep(density, gamma),
        rescale=rescale,
        consensus=False,
        normalize=normalize,
        lambda_=lambda_,
    )


@merge_method(
    "breadcrumbs_ties",
    task_vector=True,
    params=(WEIGHT, DENSITY, GAMMA, normalize_param(False), rescale_param(False), LAMBDA, INT8_MASK),
    paper=BREADCRUMBS_PAPER,
    differs_from_mergekit=TIE_BREAK,
)
def breadcrumbs_ties(
    tensors, base, *, weight, density, gamma, normalize=False, rescale=False, lambda_=1.0, int8_mask=False
):
    """Breadcrumbs sparsification (drop top-γ outliers, keep the next density) then TIES sign consensus.

    θ = θ_base + λ · Σ_i m_i w_i bc(δ_i)  (÷ Σ_i m_i w_i if normalize), m_i = [sign(w_i bc(δ_i)) = s].
    """
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        keep_mask=breadcrumbs_keep(density, gamma),
        rescale=rescale,
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )


DELLA_PAPER = "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling (Deep et al., 2024) https://arxiv.org/abs/2406.11617"
DELLA_DIFFERS = (
    "accepts rescale: exact (× 1/p per entry, the DELLA paper's rescale) beside mergekit's rescale: true (match δ's "
    "L1 norm); L1 norms are summed in float32; density ± epsilon outside (0, 1) is refused at planning time, naming "
    "the tensor (mergekit fails mid-merge); masks come from a per-tensor seed"
)


def _check_della(params: dict[str, Any], where: str) -> None:
    for index, (density, epsilon) in enumerate(zip(params["density"], params["epsilon"])):
        if 0 < density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
            raise ConfigError(
                f"{where}: model {index + 1} (in config order, base excluded) has density {density:g} and epsilon "
                f"{epsilon:g}, but DELLA needs 0 < density - epsilon and density + epsilon < 1; lower epsilon "
                f"(below {min(density, 1 - density):g}) or change density."
            )


def della_keep(
    density: list[float], epsilon: list[float], generator: Optional[torch.Generator], rescale: Rescale
) -> KeepMask:
    exact = rescale == "exact"  # only the exact rescale needs the per-entry keep probabilities
    return lambda task, i: della_mask(task.delta, density[i], epsilon[i], generator, with_probabilities=exact)


@merge_method(
    "della",
    task_vector=True,
    params=(WEIGHT, DENSITY, EPSILON, normalize_param(True), rescale_param(True, exact=True), LAMBDA, INT8_MASK),
    random=True,
    paper=DELLA_PAPER,
    differs_from_mergekit=DELLA_DIFFERS,
    check=_check_della,
)
def della(
    tensors, base, *, weight, density, epsilon, normalize=True, rescale=True, lambda_=1.0, int8_mask=False,
    generator=None,
):
    """DELLA MagPrune (keep δ entries with probability rising with |δ|, rescale) then TIES sign consensus.

    Per row, p = density − ε + 2ε·(rank − 1)/(n − 1) with rank of |δ| ascending; δ_i ← Bernoulli(p) ⊙ δ_i · r_i,
    r_i = ‖δ_i‖₁/‖kept δ_i‖₁ (rescale: true) or 1/p (rescale: exact); θ = θ_base + λ Σ_i m_i w_i δ_i / Σ_i m_i w_i.
    """
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        keep_mask=della_keep(density, epsilon, generator, rescale),
        rescale=rescale,
        consensus=True,
        normalize=normalize,
        lambda_=lambda_,
    )


@merge_method(
    "della_linear",
    task_vector=True,
    params=(WEIGHT, DENSITY, EPSILON, normalize_param(False), rescale_param(True, exact=True), LAMBDA),
    random=True,
    paper=DELLA_PAPER,
    differs_from_mergekit=DELLA_DIFFERS,
    accepted_without_effect=("int8_mask",),
    check=_check_della,
)
def della_linear(
    tensors, base, *, weight, density, epsilon, normalize=False, rescale=True, lambda_=1.0, generator=None
):
    """DELLA MagPrune (probability rising with |δ|, rescale), then θ_base + λ Σ_i w_i δ_i (no sign consensus)."""
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        keep_mask=della_keep(density, epsilon, generator, rescale),
        rescale=rescale,
        consensus=False,
        normalize=normalize,
        lambda_=lambda_,
    )


@merge_method(
    "magnitude_prune",
    task_vector=True,
    params=(WEIGHT, DENSITY, LAMBDA),
    paper="PEFT add_weighted_adapter combination_type='magnitude_prune' https://huggingface.co/docs/peft/developer_guides/model_merging",
    differs_from_mergekit="not a mergekit method: PEFT's combination type (k = int(density·N), may be 0)",
)
def magnitude_prune(tensors, base, *, weight, density, lambda_=1.0):
    """Trim each δ_i to its top int(density·N) entries by |δ|, then θ_base + λ Σ_i w_i δ_i (no sign consensus).

    PEFT's ``magnitude_prune`` combination, per tensor; density may differ per model.
    """
    return combine_task_vectors(
        tensors,
        base,
        weight=weight,
        keep_mask=lambda task, i: magnitude_cut(task.tensor, density[i], at_least_one=False, base=task.base),
        consensus=False,
        normalize=False,
        lambda_=lambda_,
    )

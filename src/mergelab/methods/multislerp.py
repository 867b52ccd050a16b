"""Multi-SLERP: a weighted barycentre of several models on the hypersphere."""

from __future__ import annotations

import torch

from mergelab.errors import ComputeError, ConfigError
from mergelab.methods.numerics import combine, compute_dtype, gram
from mergelab.methods.registry import Param, merge_method, refuse_zero_weight_sum


def multislerp_coefficients(products: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor | None:
    """k with result = Σ_i k_i x_i, from the Gram matrix of the x_i (float64); None if Σ w_i u_i ≈ 0.

    Every vector in the construction is a linear combination of the x_i, so its norms and
    inner products follow from the Gram matrix: u_i = s_i x_i with s_i = 1/(‖x_i‖ + ε), etc.
    """
    norms = products.diagonal().clamp(min=0).sqrt()
    scale = 1 / (norms + eps)
    mean = weights * scale  # Σ w_i u_i
    mean_norm = (mean @ products @ mean).clamp(min=0).sqrt()
    if mean_norm < eps:
        return None
    mean = mean / mean_norm
    dots = scale * (products @ mean)  # ⟨u_i, m⟩
    tangent = weights * scale - (weights * dots).sum() * mean  # Σ w_i (u_i − ⟨u_i, m⟩ m)
    tangent_norm = (tangent @ products @ tangent).clamp(min=0).sqrt() + eps
    direction = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    return direction * (norms * weights).sum()


def _check_weights(params: dict, where: str) -> None:
    weights = params["weight"]
    if all(weight == 0 for weight in weights):
        raise ConfigError(f"{where}: multislerp weights are all zero; give at least one model a nonzero weight.")
    refuse_zero_weight_sum("multislerp", "normalize_weights")(params, where)


@merge_method(
    "multislerp",
    task_vector=True,
    params=(
        Param("weight", per_model=True, help="each model's weight"),
        Param("normalize_weights", type=bool, default=True, help="divide the weights by their sum"),
        Param("eps", default=1e-8, low=0.0, help="numerical floor for norms"),
    ),
    needs_base=False,
    optional_base=True,
    paper="Goddard, Multi-SLERP https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    differs_from_mergekit="norms and angles come from inner products accumulated in float64; half-precision inputs "
    "are computed in float32 and rounded once",
    check=_check_weights,
)
def multislerp(tensors, base=None, *, weight, normalize_weights=True, eps=1e-8):
    """Weighted spherical barycentre of the (task) vectors, scaled to their weighted mean norm.

    x_i = θ_i (− θ_base), u_i = x_i/(‖x_i‖ + ε), m = Σ w_i u_i / ‖Σ w_i u_i‖ (w normalised to sum 1),
    v = Σ w_i (u_i − ⟨u_i, m⟩ m) (tangent space at m), r = cos‖v‖·m + sin‖v‖·v/‖v‖ (‖v‖ + ε),
    θ = (θ_base +) r · Σ w_i ‖x_i‖. One model: θ = θ_1. If Σ w_i u_i ≈ 0: lerp for two models, else an error.
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = compute_dtype(tensors[0])
    products = gram(tensors, base)
    weights = torch.tensor(weight, dtype=torch.float64, device=products.device)
    if normalize_weights:
        weights = weights / weights.sum()
    coefficients = multislerp_coefficients(products, weights, eps)
    if coefficients is None:
        if len(tensors) != 2:
            raise ComputeError(
                "multislerp: the weighted sum of the input directions is zero (antipodal inputs with balancing "
                "weights); change the weights."
            )
        coefficients = weights
    values = [float(c) for c in coefficients]
    if base is None:
        return combine(tensors, values, dtype).to(tensors[0].dtype)
    return combine([*tensors, base], values + [1 - sum(values)], dtype).to(tensors[0].dtype)

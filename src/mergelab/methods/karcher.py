"""Karcher mean: the weighted Riemannian centre of mass of the models on the hypersphere."""

from __future__ import annotations

import math

import torch

from mergelab.errors import ConfigError
from mergelab.methods.numerics import combine, compute_dtype, gram
from mergelab.methods.registry import Param, merge_method


def karcher_coefficients(products: torch.Tensor, weights: list[float], max_iter: int, tol: float) -> list[float]:
    """k with result = Σ_i k_i θ_i, from the Gram matrix of the θ_i (float64).

    The iterate m stays a combination Σ a_i u_i of the unit vectors u_i = θ_i/‖θ_i‖, so
    every inner product it needs is a ⟨u_i, u_j⟩ from the Gram matrix, and the whole
    iteration runs on N coefficients instead of N full tensors.
    """
    total = sum(weights)
    alphas = [w / total for w in weights]
    norms = products.diagonal().clamp(min=0).sqrt()
    valid = [i for i in range(len(weights)) if float(norms[i]) > tol]
    if not valid:
        return [0.0] * len(weights)
    valid_sum = sum(alphas[i] for i in valid)
    coefficient = torch.tensor([alphas[i] / valid_sum for i in valid], dtype=torch.float64)
    scale = norms[valid]
    units = (products[valid][:, valid] / torch.outer(scale, scale)).cpu()  # ⟨u_i, u_j⟩
    length = lambda a: math.sqrt(max(float(a @ units @ a), 0.0))  # noqa: E731  ‖Σ a_i u_i‖
    mean = coefficient.clone()
    mean_norm = length(mean)
    if mean_norm < tol:
        mean = torch.zeros_like(coefficient)
        mean[0] = 1.0
    else:
        mean = mean / mean_norm
    eye = torch.eye(len(valid), dtype=torch.float64)
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1.0, 1.0)  # ⟨m, u_j⟩
        tangent = torch.zeros_like(mean)
        for j in range(len(valid)):
            theta = math.acos(float(dots[j]))
            if theta < tol:
                continue
            tangent += float(coefficient[j]) * (theta / math.sin(theta)) * (eye[j] - dots[j] * mean)
        tangent_norm = length(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = length(mean)
        if unit_norm > tol:
            mean = mean / unit_norm
    radius = sum(alpha * float(norm) for alpha, norm in zip(alphas, norms))
    result = [0.0] * len(weights)
    for position, index in enumerate(valid):
        result[index] = radius * float(mean[position]) / float(norms[index])
    return result


def _check_weights(params: dict, where: str) -> None:
    if sum(params["weight"]) <= 0:
        raise ConfigError(f"{where}: karcher weights sum to zero; give at least one model a positive weight.")


@merge_method(
    "karcher",
    params=(
        Param("weight", default=1.0, per_model=True, low=0.0, extension=True,
              help="each model's weight (mergekit ignores weights)"),
        Param("max_iter", type=int, default=10, low=1, help="iterations of the fixed-point update"),
        Param("tol", default=1e-5, low=0.0, help="convergence tolerance"),
    ),
    needs_base=False,
    paper="Karcher (1977) Riemannian center of mass; merging: https://arxiv.org/abs/2603.04972",
    differs_from_mergekit=(
        "honours per-model weight (mergekit 0.1.5 silently uses equal weights); equal weights give mergekit's result; "
        "angles come from inner products accumulated in float64; half-precision inputs are computed in float32"
    ),
    check=_check_weights,
)
def karcher(tensors, *, weight=None, max_iter=10, tol=1e-5):
    """Weighted Karcher mean on the hypersphere, θ = (Σ w_i‖θ_i‖/Σ w_i) · argmin_m Σ w_i d(m, θ_i/‖θ_i‖)².

    With α_i = w_i/Σ w and u_i = θ_i/‖θ_i‖ (inputs with ‖θ_i‖ ≤ tol skipped): m₀ = Σ α_i u_i/‖·‖; up to
    max_iter times, v = Σ α_i θ_i/sin θ_i · (u_i − cos θ_i·m) with cos θ_i = ⟨m, u_i⟩, stop when ‖v‖ < tol,
    m ← cos‖v‖·m + sin‖v‖·v/‖v‖. Every input (a base_model too) is one point; weights default to 1.
    """
    weights = weight if weight is not None else [1.0] * len(tensors)
    if len(tensors) == 1:
        return tensors[0]
    coefficients = karcher_coefficients(gram(tensors), weights, max_iter, tol)
    return combine(tensors, coefficients, compute_dtype(tensors[0])).to(tensors[0].dtype)

"""Spherical linear interpolation between two models."""

from __future__ import annotations

import math

import torch

from mergelab.methods.numerics import combine, compute_dtype, gram
from mergelab.methods.registry import Param, merge_method

DOT_THRESHOLD = 0.9995  # above this |cos| the vectors are (anti)parallel: use lerp
NORM_EPS = 1e-8


def slerp_tensors(t: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Interpolate along the great circle from ``start`` (t=0) to ``end`` (t=1); extrapolate beyond.

    With flattened tensors a, b and cos Ω = ⟨a/‖a‖, b/‖b‖⟩ (clamped to [−1, 1]):
        θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b,   or (1−t)a + tb when |cos Ω| > 0.9995.
    The inner products come from one chunked pass accumulated in float64, the combination
    from a second pass in float32 (float64 stays float64); returns float32/float64.
    """
    products = gram([start, end])
    norm_a = math.sqrt(max(float(products[0, 0]), 0.0))
    norm_b = math.sqrt(max(float(products[1, 1]), 0.0))
    norm_a = norm_a if norm_a > NORM_EPS else 1.0
    norm_b = norm_b if norm_b > NORM_EPS else 1.0
    dot = min(1.0, max(-1.0, float(products[0, 1]) / (norm_a * norm_b)))
    if abs(dot) > DOT_THRESHOLD:
        coefficients = (1 - t, t)
    else:
        omega = math.acos(dot)
        coefficients = (math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega))
    return combine([start, end], coefficients, compute_dtype(start))


@merge_method(
    "slerp",
    params=(
        Param("t", help="interpolation position: 0 = base model, 1 = the other; outside [0, 1] extrapolates"),
    ),
    min_models=1,
    max_models=1,
    paper="Shoemake, Animating rotation with quaternion curves (1985); https://en.wikipedia.org/wiki/Slerp",
)
def slerp(tensors, base, *, t):
    """θ = slerp(θ_base, θ_1; t), per tensor, flattened; lerp when |cos| > 0.9995.

    Any finite t is accepted, as in mergekit: outside [0, 1] the same formula continues along the
    great circle (or the line), an extrapolation away from one model.
    """
    (other,) = tensors
    return slerp_tensors(t, base, other).to(base.dtype)

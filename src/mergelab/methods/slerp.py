"""Spherical linear interpolation between two models."""

from __future__ import annotations

import torch

from mergelab.methods.registry import Param, merge_method

DOT_THRESHOLD = 0.9995  # above this |cos| the vectors are (anti)parallel: use lerp
NORM_EPS = 1e-8


def slerp_tensors(t: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Interpolate along the great circle from ``start`` (t=0) to ``end`` (t=1).

    With flattened tensors a, b and cos Ω = ⟨a/‖a‖, b/‖b‖⟩ (clamped to [−1, 1]):
        θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b,   or (1−t)a + tb when |cos Ω| > 0.9995.
    Computed in float32 (float64 stays float64); returns float32/float64.
    """
    dtype = torch.float64 if start.dtype == torch.float64 else torch.float32
    a = start.reshape(-1).to(dtype)
    b = end.reshape(-1).to(dtype)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = norm_a if norm_a > NORM_EPS else torch.ones_like(norm_a)
    norm_b = norm_b if norm_b > NORM_EPS else torch.ones_like(norm_b)
    dot = torch.dot(a / norm_a, b / norm_b).clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        result = (1 - t) * a + t * b
    else:
        omega = torch.acos(dot)
        sin_omega = torch.sin(omega)
        result = (torch.sin((1 - t) * omega) / sin_omega) * a + (torch.sin(t * omega) / sin_omega) * b
    return result.reshape(start.shape)


@merge_method(
    "slerp",
    params=(Param("t", low=0.0, high=1.0, help="interpolation position: 0 = base model, 1 = the other"),),
    min_models=1,
    max_models=1,
    paper="Shoemake, Animating rotation with quaternion curves (1985); https://en.wikipedia.org/wiki/Slerp",
    differs_from_mergekit="output keeps the working dtype (mergekit writes float32 for half-precision inputs unless out_dtype is set)",
)
def slerp(tensors, base, *, t):
    """θ = slerp(θ_base, θ_1; t), per tensor, flattened; lerp when |cos| > 0.9995."""
    (other,) = tensors
    return slerp_tensors(t, base, other).to(base.dtype)

"""Truncated SVD re-factorisation of a weight update: M ≈ B·A with rank k.

For M of shape [out, in] with singular values σ_1 ≥ σ_2 ≥ …, the best rank-k
approximation (Eckart–Young) is U_k Σ_k V_kᵀ; we split Σ_k evenly between the factors,

    B = U_k Σ_k^½   [out, k],     A = Σ_k^½ V_kᵀ   [k, in],

so that neither factor carries all the scale (better conditioned in half precision).
Its relative reconstruction error is

    ‖M − B·A‖_F / ‖M‖_F = √(Σ_{i>k} σ_i²) / √(Σ_i σ_i²),

which we report as measured on the factors as they are stored (rounded to the output
dtype), so the figure includes the storage rounding.

The singular vectors come from the eigendecomposition of the Gram matrix of the shorter
side (MᵀM or MMᵀ), formed and decomposed in float64: the same subspace as an SVD of M,
several times faster on CPU than LAPACK's SVD for these shapes, and float64 keeps the
squared spectrum accurate far below float32 resolution. B·A equals the projection of M
onto the top-k singular subspace however Σ is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergelab.engine import TaskOutput

# Singular values below this fraction of the largest are treated as zero (their
# directions carry no energy that float32 factors could represent).
ZERO_SINGULAR_VALUE = 1e-12


@dataclass(frozen=True)
class Factorisation:
    """B [out, k], A [k, in], and the energies for the error report (float64 scalars)."""

    b: torch.Tensor
    a: torch.Tensor
    residual_energy: float  # ‖M − B·A‖_F² (≈ Σ_{i>k} σ_i², plus storage rounding)
    total_energy: float  # Σ_i σ_i² = ‖M‖_F²

    @property
    def relative_error(self) -> float:
        return relative_error(self.residual_energy, self.total_energy)

    def task_output(self) -> TaskOutput:
        """The engine's result for a factorising task: outputs (A, B) and the error report."""
        return TaskOutput(
            (self.a, self.b),
            {
                "relative_error": self.relative_error,
                "residual_energy": self.residual_energy,
                "total_energy": self.total_energy,
            },
        )


def relative_error(residual_energy: float, total_energy: float) -> float:
    """√(residual / total); 0 for a zero update (nothing to lose)."""
    if total_energy <= 0:
        return 0.0
    return max(0.0, residual_energy / total_energy) ** 0.5


def _gram_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(σ² descending, eigenvectors as columns, whether they are right singular vectors)."""
    m = matrix.to(torch.float64)
    rows, cols = m.shape
    tall = rows >= cols
    gram = m.T @ m if tall else m @ m.T
    values, vectors = torch.linalg.eigh(gram)
    return values.flip(0).clamp_min(0), vectors.flip(1), tall


def spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """σ_i² of ``matrix``, descending, float64 (min(out, in) values)."""
    m = matrix.to(torch.float64)
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def rank_for_energy(energies: torch.Tensor, energy: float) -> int:
    """The smallest k whose top-k σ² sum to at least ``energy`` of the total (at least 1)."""
    total = float(energies.sum())
    if total <= 0:
        return 1
    kept = torch.cumsum(energies, 0)
    # A relative slack of 1e-12 keeps energy = 1.0 from demanding directions of zero energy.
    k = int(torch.count_nonzero(kept < energy * total * (1 - 1e-12))) + 1
    return max(1, min(k, energies.numel()))


def truncated_factors(matrix: torch.Tensor, rank: int, stored_dtype: torch.dtype | None = None) -> Factorisation:
    """The best rank-``rank`` factors B, A of ``matrix``, in ``stored_dtype`` (default float64).

    ``rank`` larger than min(out, in) is capped there. The residual is measured with the
    factors in ``stored_dtype``.
    """
    energies, vectors, tall = _gram_eigh(matrix)
    m = matrix.to(torch.float64)
    k = min(rank, energies.numel())
    sigma = energies[:k].sqrt()
    root = sigma.sqrt()
    floor = float(sigma[0]) * ZERO_SINGULAR_VALUE if k else 0.0
    inverse_root = torch.where(sigma > floor, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    top = vectors[:, :k]
    if tall:  # top = V_k:  A = Σ^½ V_kᵀ,  B = M V_k Σ^-½ = U_k Σ^½
        a = root[:, None] * top.T
        b = (m @ top) * inverse_root[None, :]
    else:  # top = U_k:  B = U_k Σ^½,  A = Σ^-½ U_kᵀ M = Σ^½ V_kᵀ
        b = top * root[None, :]
        a = inverse_root[:, None] * (top.T @ m)
    if stored_dtype is not None:
        b, a = b.to(stored_dtype), a.to(stored_dtype)
    total = float((m * m).sum())
    residual = float(torch.sub(m, b.to(torch.float64) @ a.to(torch.float64)).square_().sum())
    return Factorisation(b=b, a=a, residual_energy=residual, total_energy=total)

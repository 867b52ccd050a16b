"""The fast formulations (cuts instead of masks, float-only consensus and RAM) equal the plain ones bit for bit."""

from __future__ import annotations

import pytest
import torch

from mergelab.methods import get_method
from mergelab.methods.consensus import agreement_mask, disjoint_merge_, majority_sign
from mergelab.methods.numerics import CHUNK_ELEMENTS, GRAM_GROUP, flat_chunks, gram, workspace
from mergelab.methods.ram import contributions_, only_one
from mergelab.methods.sparsify import MagnitudeCut, kth_largest, magnitude_cut, magnitude_mask


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bit patterns, so that comparisons tell −0 from +0."""
    kind = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}[tensor.dtype]
    return tensor.view(kind)


def tied_task_vector(numel: int, seed: int) -> torch.Tensor:
    """Entries on a coarse grid: many ties at any threshold, and zeros of both signs."""
    grid = torch.randint(-6, 7, (numel,), generator=torch.Generator().manual_seed(seed)).float() * 0.25
    return torch.where(grid == 0, torch.tensor(-0.0), grid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.9])
def test_a_cut_keeps_what_the_mask_keeps(dtype, density):
    delta = tied_task_vector(300_001, seed=1).to(dtype)  # past the direct-selection size, odd length
    cut = magnitude_cut(delta, density)
    assert isinstance(cut, MagnitudeCut)
    mask = magnitude_mask(delta, density)
    assert int(mask.sum()) == int(density * delta.numel())
    applied = delta.clone()
    for part in flat_chunks(delta.numel(), 65_537):  # chunks that split the ties anywhere
        cut.apply_(applied[part], part.start)
    assert torch.equal(applied != 0, mask & (delta != 0))
    assert torch.equal(applied[mask], delta[mask])


def test_a_cut_from_tensor_and_base_is_the_cut_of_their_difference():
    base = randn(1200, 700, seed=2)
    tensor = base + tied_task_vector(base.numel(), seed=3).view(base.shape)
    assert magnitude_cut(tensor, 0.3, base=base) == magnitude_cut(tensor - base, 0.3)


def test_kth_largest_of_a_large_tensor_is_exact():
    values = tied_task_vector(2_000_000, seed=4)
    for k in (1, 1000, 1_000_000, 1_999_999):
        assert kth_largest(values, k) == torch.sort(values, descending=True).values[k - 1]


def masked_disjoint_merge(weighted, weights, normalize):
    """TIES' disjoint merge written with boolean masks, as mergekit does."""
    sign = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    mixed = torch.zeros_like(sign)
    divisor = torch.zeros_like(sign)
    for row, weight in zip(weighted, weights):
        agree = agreement_mask(row, sign)
        mixed += row * agree
        divisor += agree * weight
    if normalize:
        divisor[divisor == 0] = 1
        mixed /= divisor
    return mixed


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [1.0, 0.5, 0.7], [0.7, -0.3, 1.2], [0.0, 1.0, 2.0]])
@pytest.mark.parametrize("normalize", [True, False])
def test_float_only_disjoint_merge_equals_the_masked_one(weights, normalize):
    weighted = torch.stack([tied_task_vector(50_000, seed) * w for seed, w in enumerate(weights)])
    weighted[:, :4] = torch.tensor([[1.0, -1.0, 0.0, -0.0]] * 3)  # sums of exactly 0
    expected = masked_disjoint_merge(weighted, weights, normalize)
    mixed = disjoint_merge_(weighted.clone(), weights, majority_sign(weighted), normalize)
    assert torch.equal(mixed, expected)


def test_majority_sign_of_nan_is_negative():
    weighted = torch.tensor([[float("nan"), -0.0, 0.0], [1.0, -0.0, -0.0]])
    assert majority_sign(weighted).tolist() == [-1.0, 1.0, 1.0]


def test_ram_contributions_count_changes_above_epsilon():
    deltas = torch.tensor([[0.5, 1e-6, -2.0, float("nan")], [0.0, 3.0, 1e-5, 1.0]])
    changed = torch.empty_like(deltas)
    counts = contributions_(deltas, 1e-5, changed)
    assert changed.tolist() == [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]]
    assert counts.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert deltas[:, :3].tolist() == [[0.5, 0.0, -2.0], [0.0, 3.0, 0.0]]
    assert only_one(torch.tensor([0.0, 1.0, 2.0, 3.0, 7.0])).tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]


def mergekit_ramplus(tensors, base, r, alpha, epsilon):
    """mergekit's ``ramplus_tl_merge``, restated."""
    task_vectors = torch.stack([t - base for t in tensors]).view(len(tensors), -1)
    nonzero = task_vectors.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
    scale = 1 + r * rho.clamp(min=0, max=alpha)
    kept = task_vectors * nonzero
    merged = (kept * unique * scale.unsqueeze(-1) + kept * overlap / counts.clamp(min=1)).sum(dim=0)
    return base + merged.view(base.shape)


@pytest.mark.parametrize("r, alpha", [(0.1, 0.2), (-3.0, 2.0)])
def test_ramplus_equals_mergekit_bit_for_bit(r, alpha):
    base = randn(CHUNK_ELEMENTS + 4099, seed=5)  # more than one chunk
    tensors = [base + randn(base.numel(), seed=6 + i) * (randn(base.numel(), seed=9 + i) > 0.3) for i in range(3)]
    merged = get_method("ramplus_tl")(tensors, base=base, r=r, alpha=alpha, epsilon=1e-3)
    assert torch.equal(bits(merged), bits(mergekit_ramplus(tensors, base, r, alpha, 1e-3)))


def test_gram_sums_do_not_depend_on_the_chunk_size():
    base = randn(CHUNK_ELEMENTS + GRAM_GROUP + 5000, seed=12).double()
    tensors = [base + randn(base.numel(), seed=13 + i).double() for i in range(3)]
    expected = torch.zeros(3, 3, dtype=torch.float64)
    for group in flat_chunks(base.numel(), GRAM_GROUP):  # the grouping the sums are defined by
        block = torch.stack([t[group] - base[group] for t in tensors])
        whole = block.shape[1] // 4096 * 4096
        pieces = block[:, :whole].reshape(3, -1, 4096).transpose(0, 1)
        expected += torch.bmm(pieces, pieces.transpose(1, 2)).sum(dim=0)
        expected += block[:, whole:] @ block[:, whole:].T
    assert torch.equal(gram(tensors, base), expected)


def test_workspace_buffers_are_reused_and_grow():
    first = workspace("test buffer", 10, torch.float32, torch.device("cpu"))
    again = workspace("test buffer", 8, torch.float32, torch.device("cpu"))
    assert again.data_ptr() == first.data_ptr() and again.numel() == 8
    larger = workspace("test buffer", 100, torch.float32, torch.device("cpu"))
    assert larger.numel() == 100
    assert workspace("other buffer", 10, torch.float32, torch.device("cpu")).data_ptr() != larger.data_ptr()

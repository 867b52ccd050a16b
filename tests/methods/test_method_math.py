"""Merge math against hand computations, step by step."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab.methods import all_methods, get_method
from mergelab.methods.consensus import agreement_mask, disjoint_merge_, majority_sign
from mergelab.methods.slerp import slerp_tensors
from mergelab.methods.sparsify import kth_largest, l1_rescale_factor, magnitude_mask, random_mask


def test_magnitude_mask_keeps_exactly_the_largest():
    delta = torch.tensor([0.1, -3.0, 0.5, 2.0, -0.2, 0.0])
    assert magnitude_mask(delta, 0.5).tolist() == [False, True, True, True, False, False]
    assert magnitude_mask(delta, 0.01).tolist() == [False, True, False, False, False, False]  # at least one


def test_magnitude_mask_breaks_ties_by_lowest_index():
    delta = torch.tensor([1.0, -1.0, 1.0, 5.0])
    assert magnitude_mask(delta, 0.5).tolist() == [True, False, False, True]


@pytest.mark.parametrize("density", [0.001, 0.13, 0.5, 0.97])
def test_kth_largest_is_exact_on_large_inputs(density):
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(3_000_000, generator=generator).abs()
    values[:1000] = 0.5  # plateaus of equal values
    k = max(1, int(density * values.numel()))
    assert kth_largest(values, k) == torch.kthvalue(values, values.numel() - k + 1).values


def test_majority_sign_counts_zero_as_positive():
    weighted = torch.tensor([[1.0, -2.0, 1.0], [-1.0, 1.0, 0.0]])
    assert majority_sign(weighted).tolist() == [1.0, -1.0, 1.0]
    assert agreement_mask(torch.tensor([0.0, -3.0, 2.0]), torch.tensor([1.0, -1.0, -1.0])).tolist() == [
        False, True, False]


def test_disjoint_merge_averages_agreeing_entries():
    weights = [1.0, 0.5]
    weighted = torch.tensor([[2.0, -1.0, 0.0], [1.0, 3.0, -4.0]])  # already w_i * delta_i
    sign = majority_sign(weighted)  # [+, +, -]
    mixed = disjoint_merge_(weighted.clone(), weights, sign, normalize=True)
    # entry 0: both agree -> (2 + 1) / (1 + 0.5); entry 1: only model 2 -> 3 / 0.5; entry 2: only model 2 -> -4 / 0.5
    assert mixed.tolist() == pytest.approx([2.0, 6.0, -8.0])
    mixed = disjoint_merge_(weighted.clone(), weights, sign, normalize=False)
    assert mixed.tolist() == pytest.approx([3.0, 3.0, -4.0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_ties_of_one_model_gives_back_its_task_vector(dtype):
    """w·δ / w: the divisor must use the weight the numerator used, not w rounded to the dtype (0.3 is not
    representable in bfloat16, and a rounded divisor scaled every entry by w / round(w))."""
    torch.manual_seed(0)
    base = torch.zeros(4096, dtype=dtype)
    delta = torch.randn(4096).to(dtype)
    out = get_method("ties")([delta], base=base, weight=[0.3], density=[1.0])
    ratio = (out.double() / delta.double()).mean().item()
    assert ratio == pytest.approx(1.0, abs=2e-4)


def test_half_precision_task_arithmetic_with_a_tiny_weight_sum_stays_finite():
    """normalize with Σw = 1e-5: Σ w_i δ_i is divided afterwards, as mergekit does. Folded into the
    weights (w_i / Σw ≈ 1e5) the coefficients would not even fit float16."""
    base = torch.zeros(4, dtype=torch.float16)
    a, b = torch.ones(4, dtype=torch.float16), torch.full((4,), 0.999, dtype=torch.float16)
    out = get_method("task_arithmetic")([a, b], base=base, weight=[1.0, -0.99999], normalize=True)
    exact = (1 - 0.99999 * b.double()) / (1 - 0.99999)  # ≈ 98.7; Σ w_i δ_i rounds to float16 first
    assert torch.isfinite(out).all()
    assert out.double().tolist() == pytest.approx(exact.tolist(), rel=2e-2)


def test_ties_by_hand():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -1.0, 0.2, 0.0])
    b = torch.tensor([0.5, 2.0, -0.1, -1.0])
    out = get_method("ties")([a, b], base=base, weight=[1.0, 1.0], density=[0.5, 0.5])
    # trim: a keeps [1, -1, 0, 0]; b keeps [0, 2, 0, -1]; sum -> [1, 1, 0, -1] -> signs [+, +, +, -]
    # agree: a [1, -, 0, 0], b [0, 2, 0, -1] -> mean over agreeing weights
    assert out.tolist() == pytest.approx([1.0, 2.0, 0.0, -1.0])


def test_task_arithmetic_by_hand():
    base = torch.tensor([1.0, 2.0])
    a, b = torch.tensor([2.0, 2.0]), torch.tensor([1.0, 4.0])
    out = get_method("task_arithmetic")([a, b], base=base, weight=[0.5, 2.0], **{"lambda": 0.5})
    assert out.tolist() == pytest.approx([1.0 + 0.5 * 0.5, 2.0 + 0.5 * 4.0])


def test_linear_by_hand():
    a, b = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])
    method = get_method("linear")
    assert method([a, b], weight=[1.0, 3.0]).tolist() == pytest.approx([2.5, 4.5])
    assert method([a, b], weight=[1.0, 3.0], normalize=False).tolist() == pytest.approx([10.0, 18.0])


def test_slerp_by_hand():
    start, end = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    halfway = slerp_tensors(0.5, start, end)
    # omega = 90 degrees: coefficients sin(45)/sin(90) on the raw vectors
    assert halfway.tolist() == pytest.approx([math.sqrt(0.5), 2 * math.sqrt(0.5)])
    assert slerp_tensors(0.0, start, end).tolist() == pytest.approx(start.tolist())
    assert slerp_tensors(1.0, start, end).tolist() == pytest.approx(end.tolist(), abs=1e-6)
    parallel = slerp_tensors(0.25, torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]))
    assert parallel.tolist() == pytest.approx([1.25, 1.25])  # |cos| > 0.9995: lerp


def test_dare_mask_and_rescale():
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(200_000, generator=generator)
    mask = random_mask(delta, 0.3, generator)
    assert abs(mask.float().mean().item() - 0.3) < 0.005
    factor = l1_rescale_factor(delta, mask)
    assert float((delta * mask * factor).abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-5)
    again = random_mask(delta, 0.3, torch.Generator().manual_seed(5))
    same = random_mask(delta, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(again, same)


MERGEKIT_NAMES = {
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "passthrough",
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "nuslerp", "multislerp",
    "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
}


def test_every_mergekit_method_is_registered():
    from mergekit.merge_methods import registry

    assert {method.spec.name for method in registry.registered_methods()} <= MERGEKIT_NAMES
    assert MERGEKIT_NAMES <= {method.name for method in all_methods()}


@pytest.mark.parametrize("name", sorted(MERGEKIT_NAMES))
def test_declared_parameters_match_mergekit(name):
    """Our declarations carry mergekit's parameter names, scopes and defaults (extensions aside)."""
    from mergekit.merge_methods import registry

    theirs = {p.name: p for p in registry.get(name).spec.parameters}
    ours = get_method(name)
    declared = {p.name for p in ours.params if not p.extension} | set(ours.accepted_without_effect)
    assert declared == set(theirs), name
    for param in ours.params:
        if param.extension:
            assert ours.differs_from_mergekit and param.name in ours.differs_from_mergekit, (name, param.name)
            continue
        spec = theirs[param.name]
        if not spec.required:
            assert param.default == spec.default, (name, param.name)
        else:
            assert param.required, (name, param.name)
        assert param.per_model == (spec.scope.name != "SHARED"), (name, param.name)


def test_every_method_documents_its_formula():
    for method in all_methods():
        assert method.summary, method.name


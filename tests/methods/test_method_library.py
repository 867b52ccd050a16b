"""The methods beyond TIES/DARE: hand computations, mergekit's own functions, and where we differ on purpose."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab.errors import ConfigError
from mergelab.methods import all_methods, get_method
from mergelab.methods.sparsify import della_mask, della_probabilities, magnitude_mask, outlier_mask


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- Model Breadcrumbs ----------------------------------------------------------------------


def test_outlier_mask_drops_the_largest_and_keeps_the_next():
    delta = torch.tensor([0.1, -9.0, 0.5, 2.0, -0.2, 0.3, 4.0, -1.0, 0.05, 0.6])
    # gamma 0.2 -> drop the 2 largest (|-9|, 4); density 0.3 -> keep the next 3 (2, -1, 0.6)
    kept = outlier_mask(delta, density=0.3, gamma=0.2)
    assert delta[kept].tolist() == pytest.approx([2.0, -1.0, 0.6])
    # density + gamma > 1: fewer outliers are dropped so that int(density * N) survive
    kept = outlier_mask(delta, density=0.9, gamma=0.5)
    assert int(kept.sum()) == 9 and not kept[1]


def test_breadcrumbs_with_gamma_zero_keeps_the_top_density_entries():
    """Older mergekit releases dropped the whole task vector at gamma 0; 0.1.5 and mergelab keep the top density."""
    from mergekit.sparsify import magnitude_outliers

    delta = randn(64, 48)
    kept = outlier_mask(delta, density=0.3, gamma=0.0)
    assert torch.equal(kept, magnitude_mask(delta, 0.3))
    assert int(kept.sum()) == int(0.3 * delta.numel())
    base = torch.zeros_like(delta)
    merged = get_method("breadcrumbs")([delta], base=base, weight=[1.0], density=[0.3], gamma=[0.0])
    assert torch.equal(merged, delta * kept)
    assert torch.equal(merged, magnitude_outliers(delta, density=0.3, gamma=0.0))


# ---- DELLA ------------------------------------------------------------------------------------


def test_della_probabilities_by_hand():
    delta = torch.tensor([[0.1, -3.0, 0.5, 2.0], [4.0, 3.0, 2.0, 1.0]])
    p = della_probabilities(delta, density=0.5, epsilon=0.2)
    # ascending |delta| ranks 1..4 -> r = 0, 1/3, 2/3, 1 -> p = 0.3 + 0.4 r
    assert p[0].tolist() == pytest.approx([0.3, 0.7, 0.3 + 0.4 / 3, 0.3 + 0.8 / 3])
    assert p[1].tolist() == pytest.approx([0.7, 0.3 + 0.8 / 3, 0.3 + 0.4 / 3, 0.3])
    assert della_probabilities(torch.tensor([1.0, -2.0, 3.0]), 0.5, 0.1).tolist() == pytest.approx([0.4, 0.5, 0.6])


def kept_by_magnitude_quartile(delta, kept):
    order = delta.abs().reshape(delta.shape[0], -1).argsort(dim=1)
    quartiles = []
    n = order.shape[1]
    for q in range(4):
        rows = order[:, q * n // 4 : (q + 1) * n // 4]
        quartiles.append(torch.gather(kept.reshape(delta.shape[0], -1).float(), 1, rows).mean().item())
    return quartiles


def test_della_keeps_large_entries_more_often_as_mergekit_does():
    from mergekit.sparsify import della_magprune

    delta = randn(256, 512)
    ours, _ = della_mask(delta, 0.4, 0.15, torch.Generator().manual_seed(1))
    torch.manual_seed(1)
    theirs = della_magprune(delta, 0.4, 0.15) != 0
    expected = [0.4 - 0.15 + 0.3 * (q + 0.5) / 4 for q in range(4)]
    for mask in (ours, theirs):
        assert mask.float().mean().item() == pytest.approx(0.4, abs=0.005)
        assert kept_by_magnitude_quartile(delta, mask) == pytest.approx(expected, abs=0.01)


def test_della_l1_rescale_matches_mergekit_and_exact_rescale_is_one_over_p():
    base = torch.zeros(64, 256)
    delta = randn(64, 256)
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    method = get_method("della_linear")
    params = dict(weight=[1.0], density=[0.5], epsilon=[0.2])
    l1 = method([delta], base=base, generator=generator(), **params)
    exact = method([delta], base=base, generator=generator(), rescale="exact", **params)
    kept = l1 != 0
    assert torch.equal(kept, exact != 0)  # same seed, same mask
    # rescale: true (mergekit) -> one factor restoring the L1 norm
    assert float(l1.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-5)
    # rescale: exact (the paper) -> each kept entry divided by its own keep probability
    p = della_probabilities(delta, 0.5, 0.2)
    torch.testing.assert_close(exact[kept], (delta / p)[kept])


def test_della_refuses_epsilon_that_leaves_zero_one_before_any_tensor_is_read():
    method = get_method("della")
    with pytest.raises(ConfigError, match=r"tensor 'x'.*model 2 .*density 0.9 and epsilon 0.15.*lower epsilon"):
        method.check({"density": [0.5, 0.9], "epsilon": [0.15, 0.15]}, "tensor 'x'")
    method.check({"density": [1.0, 0.0], "epsilon": [0.5, 0.5]}, "tensor 'x'")  # nothing is sampled there


# ---- DARE rescale ------------------------------------------------------------------------------


def test_dare_exact_rescale_divides_kept_entries_by_density():
    base = torch.zeros(100_000)
    delta = randn(100_000)
    method = get_method("dare_linear")
    exact = method([delta], base=base, weight=[1.0], density=[0.25], rescale="exact",
                   generator=torch.Generator().manual_seed(0))
    kept = exact != 0
    assert kept.float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert torch.equal(exact[kept], delta[kept] / 0.25)
    l1 = method([delta], base=base, weight=[1.0], density=[0.25], generator=torch.Generator().manual_seed(0))
    assert not torch.equal(l1, exact)  # mergekit's default is a different, L1-matching factor
    assert float(l1.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-5)


@pytest.mark.parametrize("value, expected", [(True, True), ("true", True), (False, False), ("exact", "exact")])
def test_rescale_accepts_true_false_and_exact(value, expected):
    param = get_method("dare_ties").param("rescale")
    assert param.validate(value, "here") == expected


def test_rescale_refuses_other_values():
    with pytest.raises(ConfigError, match="'rescale' = 'sometimes' is not one of false, true, exact"):
        get_method("della").param("rescale").validate("sometimes", "parameters.rescale")
    with pytest.raises(ConfigError, match="true or false"):
        get_method("ties").param("rescale").validate("exact", "parameters.rescale")  # exact needs a keep probability


def test_l1_rescale_does_not_overflow_in_float16():
    """mergekit sums |δ| in float16: above 65504 the norm is inf and the tensor NaN; we sum in float32."""
    from mergekit.sparsify import RescaleNorm, magnitude

    delta = randn(200_000).half()
    assert not torch.isfinite(magnitude(delta, 0.5, rescale_norm=RescaleNorm.l1)).all()
    base = torch.zeros_like(delta)
    for method in ("ties", "breadcrumbs"):
        params = dict(weight=[1.0], density=[0.5], rescale=True)
        if method == "breadcrumbs":
            params["gamma"] = [0.0]
        half = get_method(method)([delta], base=base, **params)
        single = get_method(method)([delta.float()], base=base.float(), **params)
        assert half.dtype == torch.float16 and torch.isfinite(half).all()
        torch.testing.assert_close(half.float(), single, rtol=2e-3, atol=2e-3)


# ---- magnitude_prune (PEFT) ------------------------------------------------------------------


def test_magnitude_prune_matches_peft():
    from peft.utils.merge_utils import magnitude_prune

    base = randn(40, 30, seed=1)
    tensors = [base + randn(40, 30, seed=seed) for seed in (2, 3, 4)]
    weights = [1.0, 0.5, -0.3]
    ours = get_method("magnitude_prune")(tensors, base=base, weight=weights, density=[0.3] * 3)
    theirs = base + magnitude_prune([t - base for t in tensors], torch.tensor(weights), 0.3)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


# ---- Karcher ---------------------------------------------------------------------------------


def test_karcher_with_equal_weights_is_mergekits():
    from mergekit.merge_methods.karcher import karcher_merge_tensors

    tensors = [randn(20, 10, seed=s) for s in range(3)]
    ours = get_method("karcher")(tensors, weight=[2.0, 2.0, 2.0])
    torch.testing.assert_close(ours, karcher_merge_tensors(tensors, [1 / 3] * 3), rtol=1e-6, atol=1e-6)


def test_karcher_honours_weights():
    """On a great circle the weighted Karcher mean of two points is the slerp at w₂/(w₁ + w₂);
    mergekit 0.1.5 ignores weights and always returns the equal-weight mean."""
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 3.0, 0.0])
    method = get_method("karcher")
    merged = method([a, b], weight=[1.0, 3.0], max_iter=50, tol=1e-9)
    angle = 0.75 * math.pi / 2  # 3/4 of the way from a to b
    norm = (1.0 * 1 + 3.0 * 3) / 4  # weighted mean of the norms
    assert merged.tolist() == pytest.approx([norm * math.cos(angle), norm * math.sin(angle), 0.0], abs=1e-5)
    equal = method([a, b], weight=[1.0, 1.0], max_iter=50, tol=1e-9)
    assert not torch.allclose(merged, equal)
    assert torch.allclose(method([a, b], weight=[2.0, 6.0], max_iter=50, tol=1e-9), merged)  # scale-free
    assert torch.allclose(method([a, b], weight=[1.0, 0.0]), a)


# ---- the others, by hand -----------------------------------------------------------------------


def test_model_stock_by_hand():
    base = torch.zeros(4)
    method = get_method("model_stock")
    # orthogonal task vectors: c = 0 -> t = 0 -> the base
    assert method([torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])], base=base).tolist() == [0, 0, 0, 0]
    # c = 0.5 for two models: t = 2·0.5/(1 + 0.5) = 2/3 of the way to their average
    a, b = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0.5, math.sqrt(0.75), 0, 0])
    expected = (2 / 3) * (a + b) / 2
    assert method([a, b], base=base).tolist() == pytest.approx(expected.tolist(), abs=1e-6)


def test_nuslerp_by_hand():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    method = get_method("nuslerp")
    # t = 3 / (1 + 3) = 0.75 of the right angle
    merged = method([a, b], base=None, weight=[1.0, 3.0])
    assert merged.tolist() == pytest.approx([math.cos(0.75 * math.pi / 2), math.sin(0.75 * math.pi / 2)], abs=1e-6)
    # with a base, the task vectors are interpolated and added back
    base = torch.tensor([5.0, 5.0])
    assert method([a + base, b + base], base=base, weight=[1.0, 1.0]).tolist() == pytest.approx(
        [5 + math.sqrt(0.5), 5 + math.sqrt(0.5)], abs=1e-6)


def test_multislerp_by_hand():
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    merged = get_method("multislerp")([a, b], base=None, weight=[1.0, 1.0])
    # equal weights: the midpoint direction, at the mean norm 2 (the tangent sum vanishes)
    assert merged.tolist() == pytest.approx([math.sqrt(2), math.sqrt(2)], abs=1e-6)
    assert torch.equal(get_method("multislerp")([a], base=None, weight=[1.0]), a)


def test_sce_by_hand():
    base = torch.zeros(3)
    a, b = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([3.0, 1.0, -1.0])
    merged = get_method("sce")([a, b], base=base)
    # energy weights: mean(a²) = 2, mean(b²) = 11/3 -> 6/17, 11/17; signs of a + b: +, +, +
    wa, wb = 6 / 17, 11 / 17
    expected = [(wa * 1 + wb * 3) / (wa + wb), 1.0, 2.0]
    assert merged.tolist() == pytest.approx(expected, abs=1e-6)


def test_nearswap_by_hand():
    base, other = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([0.001, 0.5, 2.0])
    merged = get_method("nearswap")([other], base=base, t=0.1)
    # weight = clamp(t / |diff|, 0, 1): 1 (close: take other), 0.2, 0.05
    assert merged.tolist() == pytest.approx([0.001, 0.2 * 0.5, 0.05 * 2.0], abs=1e-7)


def test_ram_by_hand():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 2.0, 0.0, 0.0]), torch.tensor([3.0, 0.0, 4.0, 0.0])
    merged = get_method("ram")([a, b], base=base)
    # entry 0: both changed -> mean; 1, 2: only one changed -> kept whole; 3: nobody
    assert merged.tolist() == [2.0, 2.0, 4.0, 0.0]
    boosted = get_method("ramplus_tl")([a, b], base=base, r=0.5, alpha=2.0)
    # model a: 1 shared, 1 unique -> rho 1 -> lambda 1.5; model b: same
    assert boosted.tolist() == [2.0, 3.0, 6.0, 0.0]


def test_arcee_fusion_kl_is_not_rounding_noise_for_rows_close_to_the_base():
    """A fine-tune moves weights by ~2% of their spread: the KL of the rows' softmaxes is then a small
    difference of nearly equal terms. In float32 (mergekit) its rounding error is a large part of it, and
    which entries pass the threshold depends on the sum order (CPU and GPU disagree on a few percent)."""
    from mergelab.methods.arcee_fusion import KL_EPS, importance

    base = 0.02 * randn(64, 256, seed=3)
    other = base + 0.0004 * randn(64, 256, seed=4)
    p, q = (torch.softmax(t.double(), dim=-1) + KL_EPS for t in (other, base))
    exact = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ours = importance(other, base) / (other - base).abs()
    assert ((ours.double() - exact) / exact).abs().max() < 1e-6
    p, q = (torch.softmax(t, dim=-1) + KL_EPS for t in (other, base))
    float32 = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    assert ((float32.double() - exact) / exact).abs().max() > 1e-2  # why: float32 is mostly noise here


def test_arcee_fusion_quartiles_are_exact_on_large_tensors():
    """mergekit samples 10⁶ entries at random above that size; we select exactly, so the result is reproducible."""
    from mergelab.methods.arcee_fusion import quantile_floor

    values = randn(1_500_000).abs()
    for q in (0.25, 0.5, 0.75):
        index = int(q * (values.numel() - 1))
        assert quantile_floor(values, q) == values.sort().values[index]
    base = randn(1200, 1000, seed=1)
    other = base + 0.01 * randn(1200, 1000, seed=2)
    first = get_method("arcee_fusion")([other], base=base)
    assert torch.equal(first, get_method("arcee_fusion")([other], base=base))
    changed = (first != base).float().mean().item()
    assert 0.0 < changed < 0.5


# ---- every method ------------------------------------------------------------------------------


def example_call(method, count: int):
    """Arguments that make ``method`` run on ``count`` random [12, 10] models (plus a base if it takes one)."""
    params = {}
    for param in method.params:
        if param.name == "weight":
            value = 0.7
        elif param.name == "density":
            value = 0.5
        elif param.name == "t":
            value = 0.01 if method.name == "nearswap" else 0.3
        elif param.required:
            value = 0.5
        else:
            value = param.default
        params[param.name] = [value] * count if param.per_model and not isinstance(value, list) else value
    if method.random:
        params["generator"] = torch.Generator().manual_seed(0)
    return params


@pytest.mark.parametrize("name", [m.name for m in all_methods()])
def test_methods_never_modify_their_inputs(name):
    method = get_method(name)
    count = method.max_models if method.max_models is not None else max(method.min_models, 2)
    tensors = [randn(12, 10, seed=seed) for seed in range(1, count + 1)]
    base = randn(12, 10, seed=99) if method.uses_base else None
    before = [t.clone() for t in tensors] + ([base.clone()] if base is not None else [])
    merged = method(tensors, base=base, **example_call(method, count))
    after = tensors + ([base] if base is not None else [])
    assert all(torch.equal(x, y) for x, y in zip(before, after)), name
    assert merged.shape == (12, 10) and torch.isfinite(merged).all()
    assert all(merged.data_ptr() != t.data_ptr() for t in after) or name == "passthrough"

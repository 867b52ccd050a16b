"""``task_vector`` declarations are true of the math: a method that declares it sees the models
only through δ_i = θ_i − θ_base (so it merges LoRA updates exactly with a zero base), and every
method with a base that does not declare it really depends on more than the δ_i."""

from __future__ import annotations

import pytest
import torch

from mergelab.methods import all_methods, get_method

SHAPE = (12, 40)


def arguments(method) -> dict:
    """Every parameter: defaults, mid-range values for required ones, and a density that sparsifies."""
    values = {}
    for param in method.params:
        if param.name == "density":
            values[param.name] = 0.6
        elif not param.required:
            values[param.name] = param.default
        else:
            low = param.low if param.low is not None else 0.0
            values[param.name] = (low + param.high) / 2 if param.high is not None else low + 0.5
    return values


def call(method, models: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    params = {name: [value] * len(models) if method.param(name).per_model else value
              for name, value in arguments(method).items()}
    if method.random:
        params["generator"] = torch.Generator().manual_seed(7)
    return method(models, base=base, **params)


def inputs(method, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    count = 2 if method.max_models is None or method.max_models >= 2 else 1
    base = torch.randn(SHAPE, generator=generator, dtype=torch.float64)
    return [base + torch.randn(SHAPE, generator=generator, dtype=torch.float64) for _ in range(count)], base


@pytest.mark.parametrize("name", [m.name for m in all_methods() if m.uses_base])
def test_methods_with_a_base_are_task_vector_methods_exactly_when_translation_equivariant(name):
    """f(θ_i + c, θ_base + c) = f(θ_i, θ_base) + c for any tensor c ⇔ the result depends only on the δ_i."""
    method = get_method(name)
    models, base = inputs(method, 0)
    shift = 3.0 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    moved = call(method, [m + shift for m in models], base + shift)
    expected = call(method, models, base) + shift
    gap = float((moved - expected).abs().max() / expected.abs().max())
    if method.task_vector:
        assert gap < 1e-9, name
    else:
        assert gap > 1e-3, name


@pytest.mark.parametrize("name", [m.name for m in all_methods() if not m.uses_base and m.task_vector])
def test_task_vector_methods_without_a_base_are_linear(name):
    method = get_method(name)
    first, _ = inputs(method, 2)
    second, _ = inputs(method, 3)
    summed = call(method, [a + b for a, b in zip(first, second)], None)
    torch.testing.assert_close(summed, call(method, first, None) + call(method, second, None), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(call(method, [3 * a for a in first], None), 3 * call(method, first, None),
                               rtol=1e-12, atol=1e-12)


def test_the_declared_task_vector_methods():
    """The set lora merge accepts, spelled out: a change to it is a deliberate decision."""
    declared = {m.name for m in all_methods() if m.task_vector}
    assert declared == {
        "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear", "linear",
        "magnitude_prune", "model_stock", "multislerp", "nearswap", "nuslerp", "ram", "ramplus_tl", "sce",
        "task_arithmetic", "ties",
    }

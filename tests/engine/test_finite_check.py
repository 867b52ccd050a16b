"""The engine's non-finite check: every float dtype, empty tensors, overflow of the sum."""

from __future__ import annotations

import pytest
import torch

from mergelab.engine.run import _all_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_agrees_with_isfinite(dtype):
    finite = torch.randn(64, 8).to(dtype)
    assert _all_finite(finite)
    assert _all_finite(torch.empty(0, 8, dtype=dtype))  # an empty tensor has nothing non-finite
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = finite.clone()
        broken[3, 5] = bad
        assert not _all_finite(broken)


def test_a_sum_that_overflows_is_not_taken_for_a_non_finite_entry():
    large = torch.full((4,), 3e38, dtype=torch.float32)  # finite entries whose float32 sum is inf
    assert _all_finite(large)

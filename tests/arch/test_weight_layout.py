"""Which weights are stored [in, out]: the arch rule agrees with the module classes transformers builds."""

from __future__ import annotations

import pytest
import torch

from mergelab.arch import stores_transposed
from mergelab.zoo.random_models import FAMILIES, model_config


def layouts(config) -> dict[str, bool]:
    """Module name -> whether transformers builds it as Conv1D, for every Linear and Conv1D of the model."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_config(config)
    return {name: isinstance(module, Conv1D) for name, module in model.named_modules()
            if isinstance(module, (Conv1D, torch.nn.Linear))}


@pytest.mark.parametrize("family", FAMILIES)
def test_stores_transposed_matches_the_modules_transformers_builds(family):
    config = model_config(family, hidden=16, layers=1, intermediate=32, heads=2, kv_heads=1)
    found = layouts(config)
    assert found
    for name, conv1d in found.items():
        assert stores_transposed(name, config.to_dict()) == conv1d, name
        assert stores_transposed(f"{name}.weight", config.to_dict()) == conv1d, name
    assert any(found.values()) == (family == "gpt2")


def test_the_same_names_are_linear_in_gpt_bigcode():
    """GPT-BigCode names its layers c_attn / c_proj / c_fc like GPT-2 but builds them as nn.Linear."""
    from transformers import GPTBigCodeConfig

    config = GPTBigCodeConfig(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    found = layouts(config)
    assert "transformer.h.0.attn.c_attn" in found
    for name, conv1d in found.items():
        assert not conv1d and not stores_transposed(name, config.to_dict()), name

"""modules_to_save in lora merge, against PEFT's add_weighted_adapter.

PEFT refuses adapters that save the same module, and silently loses a module one adapter
saves. We refuse the first without a base (never picking one copy), merge the copies as
differences from the base when there is one, and keep a module one adapter saves.
"""

from __future__ import annotations

import pytest
import torch
from lora_support import ATTENTION_AND_MLP, lora_merge, make_adapter, peft_model
from safetensors.torch import load_file

from mergelab.errors import ConfigError, InputError

HEAD = "base_model.model.lm_head.weight"


@pytest.fixture(scope="module")
def savers(loras, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("savers")
    made = {
        # lm_head trained in full (modules_to_save), differently in each
        "first": make_adapter(loras.base, root / "first", 11, saved_noise=0.05, r=4, lora_alpha=8,
                              modules_to_save=["lm_head"]),
        "second": make_adapter(loras.base, root / "second", 12, saved_noise=0.05, r=2, lora_alpha=4,
                               modules_to_save=["lm_head"]),
        # lm_head as a LoRA module instead
        "head_lora": make_adapter(loras.base, root / "head_lora", 13, r=4, lora_alpha=8,
                                  target_modules=ATTENTION_AND_MLP + ["lm_head"]),
    }
    return {name: str(path) for name, path in made.items()} | {"plain": loras.path("plain")}


def saved_head(path: str) -> torch.Tensor:
    return load_file(f"{path}/adapter_model.safetensors")[HEAD]


def base_head(loras) -> torch.Tensor:
    return load_file(str(loras.base / "model.safetensors"))["lm_head.weight"]


def recipe(savers, names, weights, **extra) -> dict:
    return {"adapters": [{"adapter": savers[n], "parameters": {"weight": w}} for n, w in zip(names, weights)],
            "merge_method": "task_arithmetic", "rank": 4, **extra}


def test_two_adapters_saving_one_module_are_refused_without_a_base_as_peft_refuses_them(loras, savers, tmp_path):
    first, second, head = saved_head(savers["first"]), saved_head(savers["second"]), base_head(loras)
    assert not torch.equal(first, second) and not torch.equal(first, head) and not torch.equal(second, head)
    model = peft_model(loras.base, {"first": savers["first"], "second": savers["second"]})
    with pytest.raises(ValueError, match="same module with modules_to_save"):
        model.add_weighted_adapter(["first", "second"], [1.0, 1.0], "merged", combination_type="cat")

    with pytest.raises(ConfigError) as refused:
        lora_merge(recipe(savers, ["first", "second"], [1.0, 1.0]), tmp_path / "refused")
    message = str(refused.value)
    assert savers["first"] in message and savers["second"] in message
    assert "lm_head.weight" in message and "base_model:" in message and "not pick one" in message
    assert not (tmp_path / "refused").exists()


def test_with_a_base_the_saved_copies_merge_as_differences_from_it(loras, savers, tmp_path):
    weights = [0.5, 0.25]
    lora_merge(recipe(savers, ["first", "second"], weights, base_model=str(loras.base)), tmp_path / "merged")
    ours = load_file(str(tmp_path / "merged" / "adapter_model.safetensors"))[HEAD]
    head, first, second = base_head(loras), saved_head(savers["first"]), saved_head(savers["second"])
    torch.testing.assert_close(ours, head + 0.5 * (first - head) + 0.25 * (second - head), rtol=0, atol=1e-6)
    assert not torch.allclose(ours, first, atol=1e-3) and not torch.allclose(ours, second, atol=1e-3)
    merged = peft_model(loras.base, {"ours": str(tmp_path / "merged")}).merge_and_unload().state_dict()
    assert torch.equal(merged["lm_head.weight"], ours)


def test_a_module_one_adapter_saves_is_kept_where_peft_loses_it(loras, savers, tmp_path):
    names = ["plain", "first"]
    model = peft_model(loras.base, {n: savers[n] for n in names})
    model.add_weighted_adapter(names, [1.0, 1.0], "peft_cat", combination_type="cat")
    assert not model.peft_config["peft_cat"].modules_to_save  # PEFT's merged adapter drops the trained lm_head

    lora_merge({**recipe(savers, names, [1.0, 1.0]), "merge_method": "cat", "rank": None}, tmp_path / "cat")
    ours = load_file(str(tmp_path / "cat" / "adapter_model.safetensors"))[HEAD]
    assert torch.equal(ours, saved_head(savers["first"]))
    merged = peft_model(loras.base, {"ours": str(tmp_path / "cat")}).merge_and_unload().state_dict()
    assert torch.equal(merged["lm_head.weight"], saved_head(savers["first"]))


def test_a_lora_module_and_a_full_copy_of_it_are_refused(loras, savers, tmp_path):
    with pytest.raises(InputError) as refused:
        lora_merge(recipe(savers, ["head_lora", "first"], [1.0, 1.0], base_model=str(loras.base)), tmp_path / "out")
    message = str(refused.value)
    assert "module 'lm_head'" in message and savers["head_lora"] in message and savers["first"] in message
    assert "mergelab lora bake" in message
    assert not (tmp_path / "out").exists()


def test_adapters_saving_the_frozen_embedding_beside_its_lora_merge_without_a_base(loras, tmp_path):
    """PEFT saves embed_tokens.base_layer.weight with an embedding LoRA: the base's own matrix,
    equal in every adapter, so it is no conflict."""
    other = make_adapter(loras.base, tmp_path / "other_embedding", 21, r=2, lora_alpha=4,
                         target_modules=ATTENTION_AND_MLP + ["embed_tokens"])
    frozen = "base_model.model.model.embed_tokens.base_layer.weight"
    assert frozen in load_file(f"{other}/adapter_model.safetensors")
    lora_merge({"adapters": [{"adapter": loras.path("embedding")}, {"adapter": str(other)}],
                "merge_method": "task_arithmetic", "parameters": {"weight": 1.0}, "rank": 6}, tmp_path / "merged")
    ours = load_file(str(tmp_path / "merged" / "adapter_model.safetensors"))[frozen]
    assert torch.equal(ours, load_file(str(loras.base / "model.safetensors"))["model.embed_tokens.weight"])


def test_a_saved_bias_beside_another_adapters_lora_on_its_module_merges(tmp_path):
    """bias="all" saves k_proj.bias in full; LoRA on k_proj's weight in another adapter is no conflict."""
    from mergelab.zoo.random_models import make_model

    base = make_model(tmp_path / "qwen2", "qwen2", seed=0, tokenizer=False, hidden=32, layers=2, intermediate=64)
    lora = make_adapter(base, tmp_path / "lora", 31, r=2, lora_alpha=4, target_modules=["k_proj"])
    biases = make_adapter(base, tmp_path / "biases", 32, r=2, lora_alpha=4, target_modules=["q_proj"], bias="all")
    saved = "base_model.model.model.layers.0.self_attn.k_proj.bias"
    assert saved in load_file(f"{biases}/adapter_model.safetensors")
    lora_merge({"adapters": [{"adapter": str(lora)}, {"adapter": str(biases)}], "merge_method": "task_arithmetic",
                "parameters": {"weight": 1.0}, "rank": 4, "base_model": str(base)}, tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight" in merged and saved in merged

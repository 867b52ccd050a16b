"""lora bake: base + Σ w_i ΔW_i through the streaming engine equals PEFT's merge_and_unload."""

from __future__ import annotations

import torch
from helpers import load_model_tensors
from lora_support import peft_deltas, peft_model

from mergelab.lora.bake import run_bake
from mergelab.lora.output import LoraOptions


def test_bake_equals_merge_and_unload(loras, tmp_path):
    """Embedding LoRA, rslora, rank_pattern and modules_to_save: bit-identical to PEFT."""
    result = run_bake(str(loras.base), [loras.path("extras")], tmp_path / "baked", options=LoraOptions(progress=False))
    ours = load_model_tensors(result.out_dir)
    merged = peft_model(loras.base, {"x": loras.path("extras")}).merge_and_unload().state_dict()
    assert set(ours) == set(merged)
    for name, tensor in merged.items():
        assert torch.equal(ours[name], tensor), name


def test_bake_several_adapters_equals_peft_merging_them(loras, tmp_path):
    names = ["plain", "rslora", "patterned"]
    result = run_bake(str(loras.base), [loras.path(n) for n in names], tmp_path / "baked",
                      options=LoraOptions(progress=False))
    ours = load_model_tensors(result.out_dir)
    model = peft_model(loras.base, {n: loras.path(n) for n in names})
    merged = model.merge_and_unload(adapter_names=names).state_dict()
    for name, tensor in merged.items():
        assert torch.equal(ours[name], tensor), name


def test_bake_weights_scale_each_update(loras, tmp_path):
    from transformers import AutoModelForCausalLM

    names, weights = ["plain", "patterned"], [0.5, -2.0]
    result = run_bake(str(loras.base), [loras.path(n) for n in names], tmp_path / "baked", weights,
                      options=LoraOptions(progress=False))
    ours = load_model_tensors(result.out_dir)
    base = load_model_tensors(loras.base)
    model = peft_model(loras.base, {n: loras.path(n) for n in names})
    deltas = [peft_deltas(model, n) for n in names]
    for module in deltas[0]:
        name = f"{module}.weight"
        expected = base[name] + weights[0] * deltas[0][module] + weights[1] * deltas[1][module]
        assert torch.allclose(ours[name], expected, atol=1e-6), name
    assert torch.equal(ours["model.norm.weight"], base["model.norm.weight"])
    # A complete model directory: config, tokenizer, loadable by transformers.
    assert (result.out_dir / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(result.out_dir)
    assert torch.equal(loaded.state_dict()["model.layers.1.mlp.down_proj.weight"],
                       ours["model.layers.1.mlp.down_proj.weight"])

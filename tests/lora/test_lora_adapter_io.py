"""Adapter I/O: ΔW per module as PEFT computes it, and BASE+ADAPTER as PEFT's merge_and_unload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from lora_support import lora_layers, peft_deltas, peft_model

from mergelab.io import OutputTensor, ShardedWriter
from mergelab.io.adapter import Adapter
from mergelab.lora.adapted import AdaptedModel, open_model, split_adapted_reference


@pytest.mark.parametrize("name", ["plain", "rslora", "patterned", "extras"])
def test_delta_and_scaling_equal_peft(loras, name):
    """r, lora_alpha, use_rslora, rank_pattern, alpha_pattern and embedding LoRA give PEFT's ΔW bit for bit."""
    adapter = Adapter(loras.path(name))
    model = peft_model(loras.base, {"x": loras.path(name)})
    layers = lora_layers(model)
    expected = peft_deltas(model, "x")
    assert set(adapter.modules) == set(expected)
    for module, spec in adapter.modules.items():
        assert spec.scaling == layers[module].scaling["x"], module
        assert spec.rank == layers[module].r["x"], module
        assert torch.equal(adapter.delta(module), expected[module]), module


def test_patterns_and_extras_are_read(loras):
    patterned = Adapter(loras.path("patterned"))
    assert patterned.modules["model.layers.0.self_attn.v_proj"].rank == 2
    assert patterned.modules["model.layers.1.mlp.down_proj"].rank == 3
    assert patterned.modules["model.layers.0.mlp.down_proj"].rank == 6
    assert patterned.modules["model.layers.0.self_attn.o_proj"].scaling == pytest.approx(3 / 6)
    extras = Adapter(loras.path("extras"))
    assert extras.modules["model.embed_tokens"].embedding
    assert extras.modules["model.embed_tokens"].weight_shape == (320, 64)
    assert extras.modules["model.layers.0.self_attn.k_proj"].scaling == pytest.approx(8 / 2**0.5)
    assert {"lm_head.weight", "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight"} <= set(
        extras.full_tensors
    )


def test_base_plus_adapter_equals_merge_and_unload(loras):
    """open_model('BASE+ADAPTER') returns PEFT's merged weights exactly (embedding LoRA, modules_to_save, rslora)."""
    adapted = open_model(f"{loras.base}+{loras.path('extras')}")
    assert isinstance(adapted, AdaptedModel)
    merged = peft_model(loras.base, {"x": loras.path("extras")}).merge_and_unload().state_dict()
    for name in adapted.tensors:
        assert torch.equal(adapted.get_tensor(name), merged[name]), name
    assert adapted.config == json.loads((Path(loras.base) / "config.json").read_text())


def test_chained_adapters_equal_peft_merging_both(loras):
    adapted = open_model(f"{loras.base}+{loras.path('plain')}+{loras.path('patterned')}")
    model = peft_model(loras.base, {"a": loras.path("plain"), "b": loras.path("patterned")})
    merged = model.merge_and_unload(adapter_names=["a", "b"]).state_dict()
    for name in adapted.tensors:
        assert torch.equal(adapted.get_tensor(name), merged[name]), name


def test_paths_with_plus_still_work(loras, tmp_path):
    odd_base = tmp_path / "my+base"
    shutil.copytree(loras.base, odd_base)
    odd_adapter = tmp_path / "an+adapter"
    shutil.copytree(loras.path("plain"), odd_adapter)
    assert not isinstance(open_model(str(odd_base)), AdaptedModel)
    assert split_adapted_reference(f"{odd_base}+{odd_adapter}") == (str(odd_base), [str(odd_adapter)])
    adapted = open_model(f"{odd_base}+{odd_adapter}")
    reference = open_model(f"{loras.base}+{loras.path('plain')}")
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(adapted.get_tensor(name), reference.get_tensor(name))


def test_fan_in_fan_out_conv1d(tmp_path):
    """GPT-2 stores Conv1D weights [in, out]: ΔW is (B·A)ᵀ, as PEFT merges it."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=300, n_positions=64))
    model.save_pretrained(tmp_path / "gpt2")
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                            fan_in_fan_out=True, init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    adapter = Adapter(tmp_path / "adapter")
    assert adapter.modules["transformer.h.0.attn.c_attn"].weight_shape == (32, 96)
    merged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), tmp_path / "adapter")
    merged = merged.merge_and_unload().state_dict()
    adapted = open_model(f"{tmp_path / 'gpt2'}+{tmp_path / 'adapter'}")
    for name in adapted.tensors:
        assert torch.equal(adapted.get_tensor(name), merged[name]), name


def test_writer_file_name_option(tmp_path):
    layout = [OutputTensor("a", (4, 4), "float32"), OutputTensor("b", (4, 4), "float32")]
    single = tmp_path / "single"
    single.mkdir()
    writer = ShardedWriter(single, layout, file_name="adapter_model.safetensors")
    for item in layout:
        writer.write(item.name, torch.ones(4, 4))
    writer.close()
    assert sorted(p.name for p in single.iterdir()) == ["adapter_model.safetensors"]
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    writer = ShardedWriter(sharded, layout, max_shard_bytes=64, file_name="adapter_model.safetensors")
    for item in layout:
        writer.write(item.name, torch.ones(4, 4))
    writer.close()
    assert sorted(p.name for p in sharded.iterdir()) == [
        "adapter_model-00001-of-00002.safetensors",
        "adapter_model-00002-of-00002.safetensors",
        "adapter_model.safetensors.index.json",
    ]


def test_weights_for_modules_target_modules_does_not_name_are_refused(loras, tmp_path):
    """PEFT makes LoRA layers for the modules target_modules names (less exclude_modules) and leaves other
    weights out; applying them anyway would compute something else than the adapter does in PEFT."""
    import warnings

    from mergelab.errors import InputError

    plain = Adapter(loras.path("plain"))
    modules = sorted(plain.modules)

    def edited(name: str, **changes) -> Path:
        path = tmp_path / name
        shutil.copytree(loras.path("plain"), path)
        config = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return path

    narrow = edited("narrow", target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = lora_layers(peft_model(loras.base, {"x": str(narrow)}))
    assert kept and all(name.endswith(".q_proj") for name in kept)  # PEFT: q_proj alone
    stray = next(m for m in modules if not m.endswith(".q_proj"))
    with pytest.raises(InputError, match=r"target_modules \[\"q_proj\"\] does not name \d+ module\(s\) that "
                                         r"adapter_model.safetensors has LoRA weights for \(e\.g\. '"):
        Adapter(str(narrow))
    with pytest.raises(InputError, match="less exclude_modules"):
        Adapter(str(edited("excluded", exclude_modules=[stray.rsplit(".", 1)[1]])))
    # Every module named: by a regular expression for the whole name, or by full names.
    assert set(Adapter(str(edited("regex", target_modules=r"model\.layers\.\d+\..*"))).modules) == set(modules)
    assert set(Adapter(str(edited("full", target_modules=modules))).modules) == set(modules)

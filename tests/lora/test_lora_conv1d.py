"""GPT-2-style models, whose linear layers are transformers' Conv1D (weights stored [in, out]):
extract writes adapters PEFT loads as intended (fan_in_fan_out, A [r, in], B [out, r]), and
bake and merge read GPT-2 adapters as PEFT does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import load_model_tensors
from lora_support import lora_layers, lora_merge, make_adapter, peft_deltas, peft_model, relative, weighted_sum

from mergelab.lora.bake import run_bake
from mergelab.lora.extract import run_extract
from mergelab.lora.output import LoraOptions
from mergelab.zoo.random_models import make_model, make_variant

QUIET = LoraOptions(progress=False)
CONV1D = ["c_attn", "c_proj", "c_fc"]
FULL_RANK = 96  # the widest weight is [32, 96]; ranks are capped at min(in, out)
TOKENS = torch.tensor([[5, 17, 40, 99, 3, 250, 7]])


def gpt2_pair(root: Path, tied: bool) -> tuple[Path, Path]:
    base = make_model(root / "base", "gpt2", seed=0, hidden=32, layers=2, intermediate=64, tokenizer=False,
                      tie_embeddings=tied)
    return base, make_variant(base, root / "ft", seed=3, scale=0.05)


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> tuple[Path, Path]:
    return gpt2_pair(tmp_path_factory.mktemp("gpt2_untied"), tied=False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> tuple[Path, Path]:
    return gpt2_pair(tmp_path_factory.mktemp("gpt2_tied"), tied=True)


def causal_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_extracted_gpt2_adapter_loads_in_peft_and_reproduces_the_finetune(untied, tmp_path):
    base, finetune = untied
    result = run_extract(str(base), str(finetune), tmp_path / "extracted", rank=FULL_RANK, options=QUIET)
    assert result.report["overall_relative_error"] < 1e-6
    config = json.loads((tmp_path / "extracted" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and sorted(config["target_modules"]) == sorted(CONV1D)

    model = peft_model(base, {"x": str(tmp_path / "extracted")}).eval()
    layer = lora_layers(model)["transformer.h.0.attn.c_attn"]
    assert layer.fan_in_fan_out and layer.lora_A["x"].weight.shape == (32, 32)  # [r, in]
    assert layer.lora_B["x"].weight.shape == (96, 32)  # [out, r]
    with torch.no_grad():
        theirs = causal_lm(finetune)(TOKENS).logits
        torch.testing.assert_close(model(TOKENS).logits, theirs, rtol=0, atol=1e-5)
        merged = model.merge_and_unload().state_dict()
    for name, tensor in load_model_tensors(finetune).items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_extract_then_bake_round_trips_a_tied_gpt2(tied, tmp_path):
    base, finetune = tied
    run_extract(str(base), str(finetune), tmp_path / "extracted", rank=FULL_RANK, options=QUIET)
    baked = run_bake(str(base), [str(tmp_path / "extracted")], tmp_path / "baked", options=QUIET).out_dir
    ours, theirs = load_model_tensors(baked), load_model_tensors(finetune)
    # The adapter saves the tied head as its own modules_to_save copy, so the baked model is untied.
    assert set(ours) == set(theirs) | {"lm_head.weight"}
    assert json.loads((baked / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(ours.pop("lm_head.weight"), theirs["transformer.wte.weight"], rtol=0, atol=1e-6)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6, msg=name)
    with torch.no_grad():
        expected = causal_lm(finetune)(TOKENS).logits
        torch.testing.assert_close(causal_lm(baked)(TOKENS).logits, expected, rtol=0, atol=1e-5)
        # PEFT computes the fine-tune's logits from the extracted adapter, head included.
        model = peft_model(base, {"x": str(tmp_path / "extracted")}).eval()
        torch.testing.assert_close(model(TOKENS).logits, expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def gpt2_adapters(untied, tmp_path_factory) -> dict[str, str]:
    """Adapters PEFT itself trains on GPT-2 (it turns fan_in_fan_out on for Conv1D)."""
    base, _ = untied
    root = tmp_path_factory.mktemp("gpt2_adapters")
    first = make_adapter(base, root / "first", 1, r=4, lora_alpha=8, target_modules=CONV1D)
    second = make_adapter(base, root / "second", 2, r=2, lora_alpha=2, use_rslora=True, target_modules=CONV1D)
    assert json.loads((first / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    # The same adapter with fan_in_fan_out off in its config: PEFT ignores the flag for Conv1D.
    unflagged = Path(shutil.copytree(first, root / "unflagged"))
    config = json.loads((unflagged / "adapter_config.json").read_text())
    (unflagged / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
    return {"first": str(first), "second": str(second), "unflagged": str(unflagged)}


@pytest.mark.parametrize("name", ["first", "unflagged"])
def test_bake_of_a_gpt2_adapter_equals_merge_and_unload(untied, gpt2_adapters, tmp_path, name):
    base, _ = untied
    ours = load_model_tensors(run_bake(str(base), [gpt2_adapters[name]], tmp_path / "baked", options=QUIET).out_dir)
    merged = peft_model(base, {"x": gpt2_adapters[name]}).merge_and_unload().state_dict()
    reference = peft_model(base, {"x": gpt2_adapters["first"]}).merge_and_unload().state_dict()
    for tensor_name, tensor in ours.items():
        assert torch.equal(tensor, merged[tensor_name]), tensor_name
        assert torch.equal(tensor, reference[tensor_name]), tensor_name


def test_base_plus_a_gpt2_adapter_reads_it_as_peft_does(untied, gpt2_adapters):
    """BASE+ADAPTER lays the adapter out like the base (c_proj is square: a wrong layout would not fail)."""
    from mergelab.lora.adapted import open_model

    base, _ = untied
    reference = peft_model(base, {"x": gpt2_adapters["first"]}).merge_and_unload().state_dict()
    adapted = open_model(f"{base}+{gpt2_adapters['unflagged']}")
    for tensor_name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_fc.weight"):
        assert torch.equal(adapted.get_tensor(tensor_name), reference[tensor_name]), tensor_name


def test_lora_merge_of_gpt2_adapters_is_the_weighted_sum_of_peft_updates(untied, gpt2_adapters, tmp_path):
    base, _ = untied
    names, weights = ["first", "second"], [0.7, -1.2]
    recipe = {"adapters": [{"adapter": gpt2_adapters[n], "parameters": {"weight": w}} for n, w in zip(names, weights)],
              "merge_method": "task_arithmetic", "rank": 6}  # holds a rank-4 plus a rank-2 update exactly
    for with_base in (False, True):
        out = tmp_path / f"merged_{with_base}"
        lora_merge({**recipe, "base_model": str(base)} if with_base else recipe, out)
        assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
        model = peft_model(base, {n: gpt2_adapters[n] for n in names})
        expected = weighted_sum([peft_deltas(model, n) for n in names], weights)
        ours = peft_deltas(peft_model(base, {"ours": str(out)}), "ours")
        assert set(ours) == set(expected)
        for module, delta in expected.items():
            assert relative(ours[module], delta) < 1e-5, module

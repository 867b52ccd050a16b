"""lora extract: SVD of (fine-tune − base) into a PEFT adapter; baking it back reproduces the
fine-tune within the error it reports."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import load_model_tensors
from lora_support import peft_model, relative

from mergelab.lora.adapted import open_model
from mergelab.lora.bake import run_bake
from mergelab.lora.extract import run_extract
from mergelab.lora.output import LoraOptions
from mergelab.zoo.random_models import make_variant

QUIET = LoraOptions(progress=False)


@pytest.fixture(scope="module")
def finetune(loras, tmp_path_factory):
    """A full fine-tune: every tensor moved, linear weights by full-rank noise."""
    return make_variant(loras.base, tmp_path_factory.mktemp("finetune") / "ft", seed=11, scale=0.05)


def test_extract_then_bake_reproduces_the_finetune_within_the_reported_error(loras, finetune, tmp_path):
    result = run_extract(str(loras.base), str(finetune), tmp_path / "extracted", rank=8, options=QUIET)
    config = json.loads((tmp_path / "extracted" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and not config["use_rslora"]
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["modules_to_save"] == ["embed_tokens", "input_layernorm", "lm_head", "norm", "post_attention_layernorm"]

    baked = load_model_tensors(run_bake(str(loras.base), [str(tmp_path / "extracted")], tmp_path / "baked",
                                        options=QUIET).out_dir)
    base, tuned = load_model_tensors(loras.base), load_model_tensors(finetune)
    for name, tensor in tuned.items():
        module = name.removesuffix(".weight")
        if module in result.report["modules"]:
            error = relative(baked[name] - base[name], tensor - base[name])
            assert error == pytest.approx(result.report["modules"][module]["relative_error"], rel=1e-3), name
        else:  # norms, embeddings, lm_head: saved in full
            assert torch.equal(baked[name], tensor), name
    # PEFT reads the extracted adapter the same way.
    merged = peft_model(loras.base, {"x": str(tmp_path / "extracted")}).merge_and_unload().state_dict()
    for name, tensor in baked.items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name


def test_extract_by_energy(loras, finetune, tmp_path):
    energy = 0.8
    result = run_extract(str(loras.base), str(finetune), tmp_path / "extracted", energy=energy, options=QUIET)
    ranks = {entry["rank"] for entry in result.report["modules"].values()}
    assert len(ranks) > 1
    assert all(e["relative_error"] <= math.sqrt(1 - energy) + 1e-6 for e in result.report["modules"].values())
    assert peft_model(loras.base, {"x": str(tmp_path / "extracted")}) is not None


def test_extract_recovers_a_low_rank_update_from_base_plus_adapter(loras, tmp_path):
    """The fine-tune may itself be BASE+ADAPTER: a rank-4 update comes back (almost) exactly at rank 4."""
    reference = f"{loras.base}+{loras.path('plain')}"
    result = run_extract(str(loras.base), reference, tmp_path / "extracted", rank=4, options=QUIET)
    assert result.report["overall_relative_error"] < 1e-5
    tuned = open_model(reference)
    merged = peft_model(loras.base, {"x": str(tmp_path / "extracted")}).merge_and_unload().state_dict()
    for name in tuned.tensors:
        assert torch.allclose(merged[name], tuned.get_tensor(name), atol=1e-5), name


def test_extract_keeps_the_biases_of_extracted_modules(tmp_path):
    """Qwen2's q/k/v have biases: they are saved beside the module (base_layer.bias), which PEFT loads."""
    from mergelab.zoo.random_models import make_model

    base = make_model(tmp_path / "base", "qwen2", seed=0, hidden=32, layers=2, intermediate=64, tokenizer=False)
    tuned = make_variant(base, tmp_path / "ft", seed=3, scale=0.05)
    result = run_extract(str(base), str(tuned), tmp_path / "extracted", rank=32, options=QUIET)  # full rank
    assert result.report["overall_relative_error"] < 1e-6
    merged = peft_model(base, {"x": str(tmp_path / "extracted")}).merge_and_unload().state_dict()
    for name, tensor in load_model_tensors(tuned).items():
        assert torch.allclose(merged[name], tensor, atol=1e-6), name


def test_extracted_adapter_records_its_base_so_that_auto_peft_loads_it(loras, finetune, tmp_path, monkeypatch):
    """base_model_name_or_path is the base's absolute directory, whatever the working directory was."""
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(loras.base.parent)
    run_extract(loras.base.name, str(finetune), tmp_path / "extracted", rank=4, options=QUIET)
    config = json.loads((tmp_path / "extracted" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(loras.base.resolve())
    monkeypatch.chdir(tmp_path)
    AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "extracted"))


def test_extracting_a_model_from_itself_says_the_adapter_is_empty(loras, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="mergelab"):
        result = run_extract(str(loras.base), str(loras.base), tmp_path / "self", rank=2, options=QUIET)
    assert "every extracted LoRA module is zero" in caplog.text
    assert result.report["overall_relative_error"] == 0.0


def test_a_rank_as_large_as_the_update_is_said(loras, finetune, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="mergelab"):
        run_extract(str(loras.base), str(finetune), tmp_path / "wide", rank=1000, options=QUIET)
    assert "--rank 1000: for" in caplog.text and "as many numbers as the full update" in caplog.text

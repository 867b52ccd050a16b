"""Adapters on a base that ties its output head to its input embeddings.

An adapter that changes only one of the two (LoRA on ``embed_tokens`` or ``lm_head``, or
either in ``modules_to_save``) makes the PEFT model compute with two different matrices.
Bake and ``BASE+ADAPTER`` write that model untied, so the result computes what the PEFT
model computes before merging; PEFT's own ``merge_and_unload`` agrees for
``modules_to_save`` and, for LoRA on a tied module, also changes the other role.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from helpers import load_model_tensors, run_mergelab
from lora_support import lora_merge, make_adapter, peft_model
from safetensors.torch import load_file

from mergelab.lora.bake import run_bake
from mergelab.lora.output import LoraOptions
from mergelab.zoo.random_models import make_model

QUIET = LoraOptions(progress=False)
TOKENS = torch.tensor([[5, 17, 40, 99, 3, 250, 7]])
SIZES = dict(hidden=32, layers=2, intermediate=64, heads=4, kv_heads=2)
ADAPTERS = {
    "embedding_lora": dict(target_modules=["q_proj", "embed_tokens"]),
    "head_lora": dict(target_modules=["q_proj", "lm_head"]),
    "saved_embedding": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
    "saved_head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "saved_head_too": dict(target_modules=["v_proj"], modules_to_save=["lm_head"]),
    # PEFT ties the head's LoRA to the embedding's and saves target_modules naming the embedding only
    "tied_head_lora": dict(target_modules=["q_proj", "lm_head"], ensure_weight_tying=True),
}


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    base = make_model(root / "base", "llama", seed=0, tie_embeddings=True, **SIZES)
    assert json.loads((base / "config.json").read_text())["tie_word_embeddings"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about adapters on tied modules: the point of these tests
        adapters = {name: str(make_adapter(base, root / name, seed, saved_noise=0.05, r=4, lora_alpha=8, **config))
                    for seed, (name, config) in enumerate(ADAPTERS.items(), start=1)}
    return base, adapters


def unmerged_logits(base, adapter: str) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft_model(base, {"x": adapter}).eval()(TOKENS).logits


def causal_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_bake_on_a_tied_base_computes_what_the_unmerged_adapter_computes(tied, tmp_path, name):
    base, adapters = tied
    baked = run_bake(str(base), [adapters[name]], tmp_path / "baked", options=QUIET).out_dir
    config = json.loads((baked / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    tensors = load_model_tensors(baked)
    # with ensure_weight_tying both roles get the same update (the head's factors are the embedding's, transposed)
    same = torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert same == (name == "tied_head_lora")
    with torch.no_grad():
        torch.testing.assert_close(causal_lm(baked)(TOKENS).logits, unmerged_logits(base, adapters[name]),
                                   rtol=0, atol=1e-5)


def test_peft_merge_of_lora_on_a_tied_embedding_changes_the_head_too(tied):
    """Why bake does not copy merge_and_unload here: PEFT adds ΔW to the one shared matrix."""
    base, adapters = tied
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft_model(base, {"x": adapters["embedding_lora"]}).eval()
        unmerged = model(TOKENS).logits
        merged = model.merge_and_unload()(TOKENS).logits
    assert (merged - unmerged).abs().max() > 1e-2


def test_base_plus_adapter_on_a_tied_base_is_the_baked_model(tied, tmp_path):
    base, adapters = tied
    baked = run_bake(str(base), [adapters["saved_head"]], tmp_path / "baked", options=QUIET).out_dir
    recipe = {"models": [{"model": f"{base}+{adapters['saved_head']}"}], "merge_method": "passthrough",
              "dtype": "float32"}
    merged = run_mergelab(recipe, tmp_path)
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is False
    ours, expected = load_model_tensors(merged), load_model_tensors(baked)
    assert set(ours) == set(expected)
    for tensor_name, tensor in expected.items():
        assert torch.equal(ours[tensor_name], tensor), tensor_name


def test_a_tied_base_untouched_by_the_adapter_stays_tied(tied, tmp_path):
    base, _ = tied
    adapter = make_adapter(base, tmp_path / "attention", 9, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    baked = run_bake(str(base), [str(adapter)], tmp_path / "baked", options=QUIET).out_dir
    assert json.loads((baked / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_model_tensors(baked)


def test_lora_merge_of_saved_heads_on_a_tied_base_differs_from_its_embeddings(tied, tmp_path):
    """W of a tied base's head is its embedding matrix: W + Σ w_i (S_i − W)."""
    base, adapters = tied
    recipe = {"adapters": [{"adapter": adapters["saved_head"], "parameters": {"weight": 0.5}},
                           {"adapter": adapters["saved_head_too"], "parameters": {"weight": 0.25}}],
              "merge_method": "task_arithmetic", "base_model": str(base), "rank": 4}
    lora_merge(recipe, tmp_path / "merged")
    head = "base_model.model.lm_head.weight"
    ours = load_file(str(tmp_path / "merged" / "adapter_model.safetensors"))[head]
    w = load_model_tensors(base)["model.embed_tokens.weight"]
    first, second = (load_file(f"{adapters[n]}/adapter_model.safetensors")[head] for n in ("saved_head", "saved_head_too"))
    torch.testing.assert_close(ours, w + 0.5 * (first - w) + 0.25 * (second - w), rtol=0, atol=1e-6)


def with_a_different_frozen_embedding(adapter: str, out) -> str:
    """A copy of an embedding-LoRA adapter whose saved embed_tokens.base_layer.weight differs from the base's
    (as for an adapter trained on another checkpoint of the family)."""
    from safetensors.torch import save_file

    shutil.copytree(adapter, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    frozen = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[frozen] = tensors[frozen] + 0.05 * torch.randn_like(tensors[frozen])
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return str(out)


def test_a_frozen_embedding_saved_beside_a_lora_is_the_heads_start_too(tied, tmp_path):
    """PEFT loads embed_tokens.base_layer.weight into the matrix a tied base shares with its head."""
    base, adapters = tied
    adapter = with_a_different_frozen_embedding(adapters["embedding_lora"], tmp_path / "resaved")
    baked = run_bake(str(base), [adapter], tmp_path / "baked", options=QUIET).out_dir
    with torch.no_grad():
        torch.testing.assert_close(causal_lm(baked)(TOKENS).logits, unmerged_logits(base, adapter),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["embedding_lora", "head_lora"])
def test_eval_with_an_adapter_on_a_tied_base_scores_the_baked_model(tied, tmp_path, name):
    """mergelab eval --adapter merges with PEFT; on a tied base it unties first, as bake does."""
    from mergelab.evaluate import load_model

    base, adapters = tied
    model, _ = load_model(base, adapters=[adapters[name]])
    baked = run_bake(str(base), [adapters[name]], tmp_path / "baked", options=QUIET).out_dir
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, causal_lm(baked)(TOKENS).logits, rtol=0, atol=1e-5)


def test_eval_applies_a_frozen_copy_to_both_tied_roles_as_peft_does(tied, tmp_path):
    from mergelab.evaluate import load_model

    base, adapters = tied
    adapter = with_a_different_frozen_embedding(adapters["embedding_lora"], tmp_path / "resaved")
    model, _ = load_model(base, adapters=[adapter])
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, unmerged_logits(base, adapter), rtol=0, atol=1e-5)

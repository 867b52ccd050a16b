"""Every supported decoder family: names are understood, merges match mergekit, outputs load and generate."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_model_tensors, run_mergekit, run_mergelab

from mergelab.arch import embedding_name, head_names, parse_name, ties_embeddings, with_layer_index
from mergelab.io import Checkpoint
from mergelab.zoo.random_models import FAMILIES, TIED_BY_DEFAULT

LAYER_KEY = {"gpt2": "n_layer"}


def generate(out, layers: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == layers
    types = getattr(model.config, "layer_types", None)
    assert types is None or len(types) == layers
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_names_are_understood(family, family_set):
    checkpoint = Checkpoint(family_set(family).path("base"))
    parsed = [parse_name(name) for name in checkpoint.tensors]
    assert {p.layer for p in parsed} - {None} == {0, 1, 2}
    assert [p.name for p in parsed if p.role == "other"] == []
    layered = [p.name for p in parsed if p.layer is not None]
    assert all(parse_name(with_layer_index(n, 7)).layer == 7 for n in layered)
    roles = {p.role for p in parsed}
    assert "embed" in roles and "norm" in roles
    assert roles & {"attn_q", "attn_qkv"} and roles & {"mlp_down"}
    tied = family in TIED_BY_DEFAULT
    assert ties_embeddings(checkpoint.config, checkpoint.tensors) == tied
    assert bool(head_names(checkpoint.tensors)) != tied
    assert embedding_name(checkpoint.tensors) is not None


def test_unknown_decoders_fall_back_to_the_first_numbered_component():
    name = "backbone.stages.4.mixer.in_proj.weight"
    assert parse_name(name).layer == 4
    assert with_layer_index(name, 1) == "backbone.stages.1.mixer.in_proj.weight"
    assert parse_name("model.layers.2.block_sparse_moe.experts.7.w1.weight").layer == 2


def ties_recipe(s, family: str) -> dict:
    return {
        "models": [
            {"model": s.path("ft1"), "parameters": {"weight": 1.0, "density": 0.6}},
            {"model": s.path("ft2"), "parameters": {"weight": 0.5, "density": [0.3, 0.9]}},
        ],
        "base_model": s.path("base"),
        "merge_method": "ties",
        "dtype": "float32",
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_matches_mergekit_and_generates(family, family_set, tmp_path):
    s = family_set(family)
    config = ties_recipe(s, family)
    out = run_mergelab(config, tmp_path)
    ours = load_model_tensors(out)
    base = load_model_tensors(s.path("base"))
    assert sorted(ours) == sorted(base)  # no stray lm_head for tied families
    theirs = run_mergekit(config, tmp_path / "mergekit")
    shared = set(theirs) & set(ours)
    assert shared == set(ours)
    for name in shared:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(ours[n], base[n]) for n in ours)
    generate(out, 3)


def frankenmerge(s) -> dict:
    return {
        "slices": [
            {"sources": [{"model": s.path("ft1"), "layer_range": [0, 2]}]},
            {"sources": [{"model": s.path("ft2"), "layer_range": [1, 3]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float32",
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_frankenmerge_stacks_layers_rewrites_config_and_generates(family, family_set, tmp_path):
    s = family_set(family)
    out = run_mergelab(frankenmerge(s), tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config[LAYER_KEY.get(family, "num_hidden_layers")] == 4
    ft1, ft2 = Checkpoint(s.path("ft1")), Checkpoint(s.path("ft2"))
    ours = load_model_tensors(out)
    one, two = load_model_tensors(s.path("ft1")), load_model_tensors(s.path("ft2"))
    if "layer_types" in config:
        assert config["layer_types"] == ft1.config["layer_types"][0:2] + ft2.config["layer_types"][1:3]
    for name in ours:
        layer = parse_name(name).layer
        if layer is None:
            continue
        source, index = ((one, layer) if layer < 2 else (two, layer - 1))
        assert torch.equal(ours[name], source[with_layer_index(name, index)]), name
    generate(out, 4)

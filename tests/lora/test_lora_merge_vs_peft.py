"""lora merge against PEFT's add_weighted_adapter on the same adapters.

cat: identical factors. linear: exactly Σ w_i ΔW_i (PEFT's linear has cross terms).
svd / ties_svd: the same ΔW as PEFT where PEFT is correct. Every output loads in PEFT.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from lora_support import lora_layers, lora_merge, peft_deltas, peft_model, relative, weighted_sum

from mergelab.errors import ConfigError
from mergelab.methods import all_methods


def entry(path: str, **parameters) -> dict:
    return {"adapter": path, "parameters": parameters} if parameters else {"adapter": path}


def merged_deltas(loras, out) -> dict[str, torch.Tensor]:
    """ΔW of our output adapter, as PEFT loads and computes it."""
    return peft_deltas(peft_model(loras.base, {"ours": str(out)}), "ours")


def input_deltas(loras, names: list[str]) -> list[dict[str, torch.Tensor]]:
    model = peft_model(loras.base, {name: loras.path(name) for name in names})
    return [peft_deltas(model, name) for name in names]


def test_cat_equals_peft_cat_exactly(loras, tmp_path):
    names, weights = ["plain", "rslora", "patterned", "embedding"], [1.0, 0.5, -0.7, 1.3]
    recipe = {"adapters": [entry(loras.path(n), weight=w) for n, w in zip(names, weights)], "merge_method": "cat"}
    result = lora_merge(recipe, tmp_path / "cat")
    assert result.report["overall_relative_error"] == 0
    model = peft_model(loras.base, {**{n: loras.path(n) for n in names}, "ours": str(tmp_path / "cat")})
    model.add_weighted_adapter(names, weights, "peft_cat", combination_type="cat")
    layers = lora_layers(model)
    compared = 0
    for module, layer in layers.items():
        if "ours" not in layer.lora_A and "ours" not in layer.lora_embedding_A:
            continue
        if "ours" in layer.lora_A:
            ours_a, ours_b = layer.lora_A["ours"].weight, layer.lora_B["ours"].weight
            peft_a, peft_b = layer.lora_A["peft_cat"].weight, layer.lora_B["peft_cat"].weight
        else:
            ours_a, ours_b = layer.lora_embedding_A["ours"], layer.lora_embedding_B["ours"]
            peft_a, peft_b = layer.lora_embedding_A["peft_cat"], layer.lora_embedding_B["peft_cat"]
        rank = ours_a.shape[0]  # PEFT pads every module to Σ max ranks with zeros
        assert torch.equal(ours_a, peft_a[:rank]) and torch.equal(ours_b, peft_b[:, :rank]), module
        assert not peft_a[rank:].any()
        assert layer.scaling["ours"] == layer.scaling["peft_cat"] == 1.0
        compared += 1
    assert compared == 15  # 14 linear modules and the embedding
    config = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert config["r"] == 22 and config["rank_pattern"]["model.layers.0.self_attn.v_proj"] == 4 + 8 + 2 + 4


def test_linear_is_exactly_the_weighted_sum_and_peft_is_not(loras, tmp_path):
    """Σ w_i ΔW_i, re-factorised at a rank that holds it, is exact; PEFT's linear merges A and B
    separately, so its product has cross terms B_i·A_j (PEFT issues #1155, #3004)."""
    names, weights = ["plain", "same_rank"], [0.6, 0.9]
    recipe = {
        "adapters": [entry(loras.path(n), weight=w) for n, w in zip(names, weights)],
        "merge_method": "linear",
        "parameters": {"normalize": False},
        "rank": 8,  # holds Σ of two rank-4 updates exactly
    }
    result = lora_merge(recipe, tmp_path / "linear")
    expected = weighted_sum(input_deltas(loras, names), weights)
    ours = merged_deltas(loras, tmp_path / "linear")
    for module, delta in expected.items():
        assert relative(ours[module], delta) < 1e-5, module
    assert result.report["overall_relative_error"] < 1e-5

    model = peft_model(loras.base, {n: loras.path(n) for n in names})
    model.add_weighted_adapter(names, weights, "peft_linear", combination_type="linear")
    peft_errors = [relative(d, expected[m]) for m, d in peft_deltas(model, "peft_linear").items()]
    assert min(peft_errors) > 0.3  # the cross terms are as large as the update itself


def test_linear_normalizes_by_default_as_mergekit_does(loras, tmp_path):
    names, weights = ["plain", "rslora"], [1.0, 3.0]
    recipe = {"adapters": [entry(loras.path(n), weight=w) for n, w in zip(names, weights)],
              "merge_method": "linear", "rank": 12}
    lora_merge(recipe, tmp_path / "avg")
    expected = weighted_sum(input_deltas(loras, names), [w / sum(weights) for w in weights])
    ours = merged_deltas(loras, tmp_path / "avg")
    assert max(relative(ours[m], d) for m, d in expected.items()) < 1e-5


def test_svd_matches_peft_svd(loras, tmp_path):
    names, weights, rank = ["plain", "rslora", "patterned"], [1.0, 0.5, 0.8], 6
    recipe = {"adapters": [entry(loras.path(n), weight=w) for n, w in zip(names, weights)],
              "merge_method": "task_arithmetic", "rank": rank}
    result = lora_merge(recipe, tmp_path / "svd")
    ours = merged_deltas(loras, tmp_path / "svd")
    model = peft_model(loras.base, {n: loras.path(n) for n in names})
    model.add_weighted_adapter(names, weights, "peft_svd", combination_type="svd", svd_rank=rank)
    theirs = peft_deltas(model, "peft_svd")
    for module, delta in theirs.items():
        assert relative(ours[module], delta) < 1e-4, module
    # The reported error is the truncation error against the exact Σ w_i ΔW_i.
    exact = weighted_sum(input_deltas(loras, names), weights)
    for module, entry_ in result.report["modules"].items():
        assert entry_["rank"] == rank
        assert entry_["relative_error"] == pytest.approx(relative(ours[module], exact[module]), rel=1e-3)


def test_peft_svd_is_wrong_when_the_first_adapter_uses_rslora(loras, tmp_path):
    """PEFT's merged adapter copies use_rslora from the first input with r = alpha = k, so its
    ΔW comes out √k times too large; ours does not depend on the order of the inputs."""
    names, weights, rank = ["rslora", "plain"], [0.5, 1.0], 4
    model = peft_model(loras.base, {n: loras.path(n) for n in names})
    model.add_weighted_adapter(names, weights, "peft_svd", combination_type="svd", svd_rank=rank)
    recipe = {"adapters": [entry(loras.path(n), weight=w) for n, w in zip(names, weights)],
              "merge_method": "task_arithmetic", "rank": rank}
    lora_merge(recipe, tmp_path / "svd")
    ours = merged_deltas(loras, tmp_path / "svd")
    for module, delta in peft_deltas(model, "peft_svd").items():
        assert relative(delta, math.sqrt(rank) * ours[module]) < 1e-4, module


def test_ties_svd_matches_peft(loras, tmp_path):
    names, rank = ["plain", "rslora", "patterned"], 8
    recipe = {"adapters": [entry(loras.path(n), weight=1.0) for n in names], "merge_method": "ties",
              "parameters": {"density": 0.5}, "rank": rank}
    lora_merge(recipe, tmp_path / "ties")
    ours = merged_deltas(loras, tmp_path / "ties")
    model = peft_model(loras.base, {n: loras.path(n) for n in names})
    model.add_weighted_adapter(names, [1.0] * 3, "peft_ties", combination_type="ties_svd", svd_rank=rank, density=0.5)
    for module, delta in peft_deltas(model, "peft_ties").items():
        assert relative(ours[module], delta) < 1e-4, module


def test_energy_picks_the_smallest_rank_per_module(loras, tmp_path):
    from mergelab.lora.factor import rank_for_energy, spectrum

    names, weights, energy = ["plain", "rslora"], [1.0, 1.0], 0.9
    recipe = {"adapters": [entry(loras.path(n), weight=w) for n, w in zip(names, weights)],
              "merge_method": "task_arithmetic", "energy": energy}
    result = lora_merge(recipe, tmp_path / "energy")
    exact = weighted_sum(input_deltas(loras, names), weights)
    ours = merged_deltas(loras, tmp_path / "energy")
    config = json.loads((tmp_path / "energy" / "adapter_config.json").read_text())
    ranks = {entry_["rank"] for entry_ in result.report["modules"].values()}
    assert len(ranks) > 1 and config["rank_pattern"]  # modules differ; PEFT learns it from rank_pattern
    for module, entry_ in result.report["modules"].items():
        assert entry_["rank"] == rank_for_energy(spectrum(exact[module]), energy)
        assert entry_["relative_error"] <= math.sqrt(1 - energy) + 1e-6
        assert relative(ours[module], exact[module]) == pytest.approx(entry_["relative_error"], rel=1e-3)
    assert not result.report["above_threshold"]  # the default threshold follows the energy asked for


def test_parameters_resolve_per_module(loras, tmp_path):
    """Filter lists and gradients work as in merge recipes (matched against the module's weight name)."""
    recipe = {
        "adapters": [
            entry(loras.path("plain"), weight=[{"filter": "self_attn", "value": 1.0}, {"value": 0.0}]),
            entry(loras.path("rslora"), weight=[0.0, 2.0]),  # layer 0: 0, layer 1: 2
        ],
        "merge_method": "task_arithmetic",
        "rank": 12,
    }
    lora_merge(recipe, tmp_path / "params")
    plain, rslora = input_deltas(loras, ["plain", "rslora"])
    ours = merged_deltas(loras, tmp_path / "params")
    for module, delta in ours.items():
        attention = 1.0 if "self_attn" in module else 0.0
        late = 2.0 if ".layers.1." in module else 0.0
        expected = attention * plain[module].double() + late * rslora[module].double()
        if expected.norm() == 0:
            assert delta.abs().max() == 0
        else:
            assert relative(delta, expected) < 1e-5, module


@pytest.mark.parametrize("method", [m.name for m in all_methods() if m.task_vector])
def test_every_task_vector_method_merges_adapters(loras, tmp_path, method):
    """Any task-vector method of the registry runs on ΔW (no per-method code in lora/), and PEFT loads the result."""
    from mergelab.methods import get_method

    spec = get_method(method)
    count = 2 if spec.max_models is None or spec.max_models >= 2 else 1
    shared, per_model = {}, {}
    for param in spec.params:
        if not param.required:
            continue
        low = param.low if param.low is not None else 0.0
        value = (low + param.high) / 2 if param.high is not None else low + 0.5
        (per_model if param.per_model else shared)[param.name] = value
    names = ["plain", "patterned"][:count]
    recipe = {"adapters": [entry(loras.path(n), **per_model) for n in names], "merge_method": method,
              "parameters": shared or None, "rank": 4}
    result = lora_merge(recipe, tmp_path / method, seed=1)
    deltas = merged_deltas(loras, tmp_path / method)
    assert set(deltas) == set(result.report["modules"])
    assert all(torch.isfinite(d).all() for d in deltas.values())


def test_random_methods_reproduce_with_a_seed(loras, tmp_path):
    recipe = {"adapters": [entry(loras.path(n), weight=1.0, density=0.5) for n in ("plain", "rslora")],
              "merge_method": "dare_ties", "rank": 4}
    first = lora_merge(recipe, tmp_path / "one", seed=7)
    again = lora_merge(recipe, tmp_path / "two", seed=7)
    other = lora_merge(recipe, tmp_path / "three", seed=8)
    read = lambda path: (path / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert read(first.out_dir) == read(again.out_dir) != read(other.out_dir)


def test_modules_to_save_merge_against_the_base(loras, tmp_path):
    """Full copies (lm_head here) merge as differences from base_model: W + Σ w_i (S_i − W)."""
    from safetensors.torch import load_file

    weights = [0.5, 0.25]
    recipe = {"adapters": [entry(loras.path(n), weight=w) for n, w in zip(["extras", "extras2"], weights)],
              "merge_method": "task_arithmetic", "base_model": str(loras.base), "rank": 4}
    lora_merge(recipe, tmp_path / "saved")
    out = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    base = load_file(str(loras.base / "model.safetensors"))["lm_head.weight"]
    saved = [load_file(loras.path(n) + "/adapter_model.safetensors")["base_model.model.lm_head.weight"]
             for n in ("extras", "extras2")]
    expected = base + weights[0] * (saved[0] - base) + weights[1] * (saved[1] - base)
    assert torch.allclose(out["base_model.model.lm_head.weight"], expected, atol=1e-6)
    config = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["input_layernorm", "lm_head"]
    model = peft_model(loras.base, {"ours": str(tmp_path / "saved")}).merge_and_unload()
    assert torch.equal(model.state_dict()["lm_head.weight"], out["base_model.model.lm_head.weight"])

    without_base = {**recipe, "base_model": None}
    with pytest.raises(ConfigError, match="base_model"):
        lora_merge(without_base, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

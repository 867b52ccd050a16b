"""``--device cuda``: every method computes on the GPU, inputs streamed from disk, and agrees with the CPU.

Skipped on machines without CUDA.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import load_model_tensors, write_yaml

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def parity_recipes() -> dict:
    spec = importlib.util.spec_from_file_location("parity_recipes", Path(__file__).with_name("test_merge_parity.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {**module.CONFIGS, **module.NEW_CONFIGS}


RECIPES = parity_recipes()


def merge_on(device: str, config: dict, tmp_path: Path, name: str) -> dict:
    from mergelab.merge import MergeOptions, run_merge

    path = write_yaml(tmp_path / f"{name}.yml", config)
    run_merge(path, tmp_path / name, MergeOptions(device=device, seed=0, progress=False))
    return load_model_tensors(tmp_path / name)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_cuda_matches_cpu(recipe, llama, tmp_path):
    config = RECIPES[recipe](llama)
    cpu = merge_on("cpu", config, tmp_path, "cpu")
    gpu = merge_on("cuda", config, tmp_path, "gpu")
    assert sorted(cpu) == sorted(gpu)
    for name in cpu:
        assert gpu[name].dtype == cpu[name].dtype
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_methods_run_on_cuda_with_their_statistics(method, llama, tmp_path):
    config = {
        "models": [{"model": llama.path("ft1"), "parameters": {"weight": 1.0, "density": 0.5}}],
        "base_model": llama.path("base"),
        "merge_method": method,
        "dtype": "float32",
    }
    gpu = merge_on("cuda", config, tmp_path, "gpu")
    again = merge_on("cuda", config, tmp_path, "again")
    assert all(torch.equal(gpu[n], again[n]) for n in gpu)  # same seed, same device type, same merge
    base, ft1 = load_model_tensors(llama.path("base")), load_model_tensors(llama.path("ft1"))
    name = "model.layers.0.mlp.gate_proj.weight"
    changed = (ft1[name] != base[name]).float().mean().item()
    kept = (gpu[name] != base[name]).float().mean().item()
    assert 0.2 * changed < kept < 0.8 * changed

"""BASE+ADAPTER references in ``mergelab merge`` recipes: the baked model, computed on the fly."""

from __future__ import annotations

import torch
from helpers import load_model_tensors, run_mergelab

from mergelab.lora.bake import run_bake
from mergelab.lora.output import LoraOptions
from mergelab.zoo.random_models import make_variant


def test_base_plus_adapter_in_a_recipe_equals_merging_the_baked_model(loras, tmp_path):
    other = make_variant(loras.base, tmp_path / "other", seed=3, scale=0.05)
    baked = run_bake(str(loras.base), [loras.path("extras")], tmp_path / "baked", options=LoraOptions(progress=False))

    def recipe(model: str) -> dict:
        return {
            "models": [{"model": model, "parameters": {"weight": 1.0, "density": 0.6}},
                       {"model": str(other), "parameters": {"weight": 0.5, "density": 0.6}}],
            "base_model": str(loras.base),
            "merge_method": "ties",
            "dtype": "float32",
        }

    on_the_fly = run_mergelab(recipe(f"{loras.base}+{loras.path('extras')}"), tmp_path, name="fly")
    from_disk = run_mergelab(recipe(str(baked.out_dir)), tmp_path, name="disk")
    fly, disk = load_model_tensors(on_the_fly), load_model_tensors(from_disk)
    assert set(fly) == set(disk)
    for name, tensor in disk.items():
        assert torch.equal(fly[name], tensor), name
    assert (on_the_fly / "tokenizer.json").is_file()

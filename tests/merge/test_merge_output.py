"""What `mergelab merge` writes beside the weights, and that transformers loads it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import load_model_tensors, run_mergelab, write_yaml
from typer.testing import CliRunner

from mergelab.cli import app

FAMILIES = ("llama", "mistral", "qwen2")


def ties_recipe(s, **extra):
    return {
        "models": [
            {"model": s.path("ft1"), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": s.path("ft2"), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "base_model": s.path("base"),
        "merge_method": "ties",
        **extra,
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_output_loads_and_generates(family, model_sets, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = run_mergelab(ties_recipe(model_sets[family], out_dtype="bfloat16"), tmp_path)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 5)
    merged = load_model_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())


def test_files_beside_the_weights(llama, tmp_path):
    recipe = ties_recipe(llama, dtype="float32", out_dtype="float16", tokenizer_source="base")
    out = run_mergelab(recipe, tmp_path)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "mergelab_config.yml", "README.md"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"
    assert yaml.safe_load((out / "mergelab_config.yml").read_text()) == recipe
    card = (out / "README.md").read_text()
    assert "ties" in card and llama.path("ft1") in card and "(base)" in card
    assert f"\n# {out.name}\n" in card and ".tmp-" not in card  # titled by the output, not its temporary name


def test_missing_parent_directories_of_the_output_are_made(llama, tmp_path):
    config = write_yaml(tmp_path / "recipe.yml", {"models": [{"model": llama.path("ft1"), "parameters": {"weight": 1.0}}],
                                                  "merge_method": "linear"})
    out = tmp_path / "runs" / "deep" / "merged"
    result = CliRunner().invoke(app, ["merge", str(config), str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    (tmp_path / "file").write_text("x")
    refused = CliRunner().invoke(app, ["merge", str(config), str(tmp_path / "file" / "merged"), "--no-progress"])
    assert refused.exit_code == 2 and "is a file, not a directory" in refused.output


def test_config_names_the_stored_dtype_of_mixed_inputs(tmp_path):
    """float16 + bfloat16 inputs without dtype: tensors are promoted to float32, and config.json says so."""
    from mergelab.zoo.random_models import make_model

    half = make_model(tmp_path / "half", "llama", seed=0, dtype="float16", layers=2)
    brain = make_model(tmp_path / "brain", "llama", seed=1, dtype="bfloat16", layers=2)
    recipe = {"models": [{"model": str(half), "parameters": {"weight": 1.0}},
                         {"model": str(brain), "parameters": {"weight": 1.0}}], "merge_method": "linear"}
    out = run_mergelab(recipe, tmp_path)
    stored = {str(t.dtype).removeprefix("torch.") for t in load_model_tensors(out).values()}
    config = json.loads((out / "config.json").read_text())
    assert stored == {"float32"} and config["dtype"] == "float32"


def test_small_shards_load_in_transformers(llama, tmp_path):
    from mergelab.merge import MergeOptions, run_merge
    from transformers import AutoModelForCausalLM

    recipe = write_yaml(tmp_path / "r.yml", ties_recipe(llama))
    out = tmp_path / "sharded"
    run_merge(recipe, out, MergeOptions(seed=0, out_shard_size="40KB", progress=False))
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and (out / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    merged = load_model_tensors(out)
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in merged.items())


def test_dry_run_prints_the_plan_and_writes_nothing(llama, tmp_path):
    recipe = write_yaml(tmp_path / "r.yml", ties_recipe(llama))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(recipe), str(out), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "model.layers.3.mlp.down_proj.weight  [32, 64] float32" in result.output
    assert "ties(weight=[1, 0.5], density=[0.5, 0.5], normalize=True" in result.output
    assert f"from {llama.path('ft1')}:model.layers.3.mlp.down_proj.weight" in result.output
    assert "estimated peak tensor memory" in result.output
    assert not out.exists()
    deep = tmp_path / "not" / "yet" / "out"
    assert CliRunner().invoke(app, ["merge", str(recipe), str(deep), "--dry-run"]).exit_code == 0
    assert not (tmp_path / "not").exists()  # a dry run makes no parent directory either
    out.mkdir()  # the dry run checks the output as the real run would
    refused = CliRunner().invoke(app, ["merge", str(recipe), str(out), "--dry-run"])
    assert refused.exit_code == 2 and "already exists" in refused.output and "--force" in refused.output
    assert CliRunner().invoke(app, ["merge", str(recipe), str(out), "--dry-run", "--force"]).exit_code == 0


def test_help_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, mergelab.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    result = CliRunner().invoke(app, ["merge", "--help"])
    assert result.exit_code == 0 and "--dry-run" in result.output and "--out-shard-size" in result.output

"""Bad input gets a clear error, exit code 2, no traceback, and nothing is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergelab.cli import app


@pytest.fixture(scope="module")
def broken_models(llama, tmp_path_factory) -> dict[str, str]:
    """Model directories that are wrong in one way each, derived from the llama fixture set."""
    root = tmp_path_factory.mktemp("broken")
    tensors = load_file(str(Path(llama.path("ft1")) / "model.safetensors"))

    def variant(name: str, edit) -> str:
        path = root / name
        shutil.copytree(llama.path("ft1"), path)
        edited = edit(dict(tensors))
        save_file(edited, str(path / "model.safetensors"), metadata={"format": "pt"})
        return str(path)

    def drop(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        return t

    def add(t):
        t["model.layers.1.mlp.extra_proj.weight"] = torch.zeros(4, 4)
        return t

    def nan(t):
        t["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
        return t

    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(Path(llama.path("ft1")) / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return {
        "missing": variant("missing", drop),
        "extra": variant("extra", add),
        "nan": variant("nan", nan),
        "pickled": str(pickled),
        "no_config": str(root),
    }


def ties(models: list[dict], base: str, **extra) -> dict:
    return {"models": models, "base_model": base, "merge_method": "ties", **extra}


def cases(llama, broken) -> dict[str, tuple[dict, str]]:
    base, ft1, ft2 = llama.path("base"), llama.path("ft1"), llama.path("ft2")
    weighted = [{"model": ft1, "parameters": {"weight": 1.0}}]
    return {
        "unknown method": (
            {"models": weighted, "merge_method": "average_of_vibes"},
            "unknown merge_method 'average_of_vibes'",
        ),
        "misspelled method": (
            {"models": weighted, "merge_method": "tie"},
            "recipe.yml: unknown merge_method 'tie'. Did you mean 'ties'?",
        ),
        "a LoRA recipe": (
            {"adapters": [{"adapter": ft1}], "merge_method": "linear"},
            "this is a LoRA merge recipe (it lists adapters:, not models:); run it with `mergelab lora merge",
        ),
        "unknown parameter": (
            ties([{"model": ft1, "parameters": {"weight": 1.0, "densty": 0.5}}], base),
            "parameters.densty: unknown parameter for merge_method ties",
        ),
        "missing required parameter": (ties([{"model": ft1}], base), "missing required parameter 'weight'"),
        "density out of range": (
            ties([{"model": ft1, "parameters": {"weight": 1.0, "density": 1.5}}], base),
            "'density' = 1.5 is out of range",
        ),
        "weight not a number": (
            ties([{"model": ft1, "parameters": {"weight": "heavy"}}], base),
            "'weight' must be a number",
        ),
        "model path missing": (
            ties([{"model": "/no/such/model", "parameters": {"weight": 1.0}}], base),
            "models[0].model: model path '/no/such/model' does not exist",
        ),
        "not a model dir": (
            ties([{"model": broken["no_config"], "parameters": {"weight": 1.0}}], base),
            "no config.json",
        ),
        "pickle weights": (
            ties([{"model": broken["pickled"], "parameters": {"weight": 1.0}}], base),
            "refuses to load",
        ),
        "missing tensor": (
            ties([{"model": broken["missing"], "parameters": {"weight": 1.0}}], base),
            "tensor 'model.layers.1.mlp.up_proj.weight' is missing from model",
        ),
        "extra tensor": (
            ties([{"model": broken["extra"], "parameters": {"weight": 1.0}}], base),
            "has tensor 'model.layers.1.mlp.extra_proj.weight' that the other inputs lack",
        ),
        "non-finite output": (
            ties([{"model": broken["nan"], "parameters": {"weight": 1.0}}, {"model": ft2, "parameters": {"weight": 1.0}}],
                 base),
            "contains NaN or infinite values",
        ),
        "no base for ties": ({"models": weighted, "merge_method": "ties"}, "needs a base_model"),
        "misspelled field": ({"models": [{"model": ft1, "paramters": {"weight": 1}}], "merge_method": "linear"},
                             "models[0].paramters: unknown field"),
        "layer range too long": (
            {"slices": [{"sources": [{"model": ft1, "layer_range": [0, 9]}]}], "merge_method": "passthrough"},
            "has only 4 layers",
        ),
        # finite in float32, infinite once stored as float16 (|x| > 65504)
        "overflow in out_dtype": (
            {"models": [{"model": ft1, "parameters": {"weight": 1.0}}], "base_model": base,
             "merge_method": "task_arithmetic", "parameters": {"lambda": 1e8}, "dtype": "float32",
             "out_dtype": "float16"},
            "values overflow float16; choose a wider out_dtype",
        ),
        "duplicate model": (
            {"models": [{"model": ft1, "parameters": {"weight": 1.0}}, {"model": ft2, "parameters": {"weight": 1.0}},
                        {"model": ft1 + "/", "parameters": {"weight": 0.5}}], "merge_method": "linear"},
            f"models[0] and models[2] both read model '{ft1}/' ('{ft1}' and '{ft1}/' are the same model); "
            "a merge takes each model once",
        ),
        "duplicate model in a slice": (
            {"slices": [{"sources": [{"model": ft1, "layer_range": [0, 2]}, {"model": ft1, "layer_range": [2, 4]}]}],
             "merge_method": "linear", "parameters": {"weight": 1.0}},
            f"slices[0].sources[0] and slices[0].sources[1] both read model '{ft1}'",
        ),
        "multislerp zero weights": (
            {"models": [{"model": ft1, "parameters": {"weight": 0.0}}, {"model": ft2, "parameters": {"weight": 0.0}}],
             "merge_method": "multislerp"},
            "multislerp weights are all zero",
        ),
        "linear weights sum to zero": (
            {"models": [{"model": ft1, "parameters": {"weight": 1.0}}, {"model": ft2, "parameters": {"weight": -1.0}}],
             "merge_method": "linear"},
            "recipe.yml: tensor 'model.embed_tokens.weight': linear weights sum to zero, so normalize would divide "
            "by zero; change the weights or set normalize: false",
        ),
        "multislerp weights sum to zero": (
            {"models": [{"model": ft1, "parameters": {"weight": 0.5}}, {"model": ft2, "parameters": {"weight": -0.5}}],
             "merge_method": "multislerp"},
            "multislerp weights sum to zero, so normalize_weights would divide by zero",
        ),
    }


CASE_NAMES = [
    "unknown method", "misspelled method", "a LoRA recipe", "unknown parameter", "missing required parameter",
    "density out of range",
    "weight not a number", "model path missing", "not a model dir", "pickle weights", "missing tensor",
    "extra tensor", "non-finite output", "no base for ties", "misspelled field", "layer range too long",
    "overflow in out_dtype", "duplicate model", "duplicate model in a slice", "multislerp zero weights",
    "linear weights sum to zero", "multislerp weights sum to zero",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_exits_2_and_writes_nothing(case, llama, broken_models, tmp_path):
    config, expected = cases(llama, broken_models)[case]
    config_path = tmp_path / "recipe.yml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["merge", str(config_path), str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]  # no temporary leftovers


def test_shape_mismatch_names_the_tensor(model_sets, tmp_path):
    from mergelab.zoo.random_models import make_model

    wider = make_model(tmp_path / "wider", "llama", hidden=48, layers=4)
    llama = model_sets["llama"]
    config = ties([{"model": str(wider), "parameters": {"weight": 1.0}}], llama.path("base"))
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "recipe.yml"), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "has different shapes across inputs" in result.output and "model.embed_tokens.weight" in result.output
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(llama, tmp_path):
    config = {"models": [{"model": llama.path("ft1"), "parameters": {"weight": 1.0}}], "merge_method": "linear"}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(config))
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    runner = CliRunner()
    result = runner.invoke(app, ["merge", str(tmp_path / "recipe.yml"), str(out), "--no-progress"])
    assert result.exit_code == 2 and "already exists" in result.output and "--force" in result.output
    assert (out / "keep.txt").read_text() == "precious"
    result = runner.invoke(app, ["merge", str(tmp_path / "recipe.yml"), str(out), "--force", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_verbose_shows_the_traceback(llama, tmp_path):
    config = {"models": [{"model": "/no/such/model", "parameters": {"weight": 1.0}}], "merge_method": "linear"}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["--verbose", "merge", str(tmp_path / "recipe.yml"), str(tmp_path / "out")])
    assert result.exit_code != 0
    assert result.exception is not None and "does not exist" in str(result.exception)


def test_cuda_without_a_gpu_is_a_clear_error(llama, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    config = {"models": [{"model": llama.path("ft1"), "parameters": {"weight": 1.0}}], "merge_method": "linear"}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "recipe.yml"), str(tmp_path / "out"), "--device", "cuda"])
    assert result.exit_code == 2 and "CUDA is not available" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize(
    "option, expected",
    [
        (["--threads", "-3"], "--threads -3: give a positive number of CPU threads"),
        (["--threads", "0"], "--threads 0: give a positive number of CPU threads"),
        (["--out-shard-size", "0"], "--out-shard-size '0' is not a positive size"),
        (["--device", "gpu"], "unknown device 'gpu'"),
        (["--device", "meta"], "--device meta: mergelab computes on cpu or cuda"),
        (["--device", "mps"], "--device mps: mergelab computes on cpu or cuda"),
    ],
)
def test_bad_options_are_refused_before_any_work(llama, tmp_path, option, expected, dry_run):
    config = {"models": [{"model": llama.path("ft1"), "parameters": {"weight": 1.0}}], "merge_method": "linear"}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    args = ["merge", str(tmp_path / "recipe.yml"), str(out), "--no-progress", *option] + (["--dry-run"] if dry_run else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yml"]


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
def test_verbose_works_after_the_subcommand(tmp_path, flag):
    config = {"models": [{"model": "/no/such/model", "parameters": {"weight": 1.0}}], "merge_method": "linear"}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "recipe.yml"), str(tmp_path / "out"), flag])
    assert result.exit_code != 0
    assert result.exception is not None and "does not exist" in str(result.exception)
    result = CliRunner().invoke(app, ["lora", "bake", "/no/such/base", "/no/such/adapter", str(tmp_path / "o"), flag])
    assert result.exception is not None and "does not exist" in str(result.exception)
    # without the flag the same errors stay short, whatever the previous invocation set
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "recipe.yml"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_models_of_different_architectures_need_allow_crimes(model_sets, tmp_path):
    """A Llama and a Mistral of one size have the same tensor names and shapes; mergekit refuses the mix
    without --allow-crimes, and so do we."""
    llama, mistral = model_sets["llama"], model_sets["mistral"]
    config = {"models": [{"model": llama.path("ft1"), "parameters": {"weight": 0.5}},
                         {"model": mistral.path("ft1"), "parameters": {"weight": 0.5}}],
              "merge_method": "linear", "dtype": "float32"}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    args = ["merge", str(tmp_path / "recipe.yml"), str(out), "--no-progress"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2, refused.output
    assert "different architectures" in refused.output and "LlamaForCausalLM" in refused.output
    assert "MistralForCausalLM" in refused.output and "--allow-crimes" in refused.output
    assert not out.exists()
    allowed = CliRunner().invoke(app, args + ["--allow-crimes"])
    assert allowed.exit_code == 0, allowed.output
    assert (out / "model.safetensors").is_file()


def test_verbose_and_quiet_together_are_refused(tmp_path):
    for args in (["-q", "merge", "r.yml", "out", "-v"], ["-q", "-v", "merge", "r.yml", "out"],
                 ["merge", "r.yml", "out", "-v", "-q"]):
        result = CliRunner().invoke(app, args)
        text = " ".join(result.output.replace("│", " ").split())  # the message is wrapped in a box
        assert result.exit_code == 2 and "--verbose and --quiet contradict each other" in text, args
    assert CliRunner().invoke(app, ["-v", "merge", "--help"]).exit_code == 0  # -v after -q of an earlier call is fine

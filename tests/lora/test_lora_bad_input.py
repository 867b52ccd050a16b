"""Bad input to the lora commands: a clear error (exit 2) naming the file, field or module,
raised before any work, and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from lora_support import make_adapter
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.methods import all_methods
from mergelab.zoo.random_models import make_model


@pytest.fixture(scope="module")
def broken(loras, tmp_path_factory) -> dict[str, str]:
    """Adapters and models that are wrong in one way each."""
    root = tmp_path_factory.mktemp("broken_lora")
    plain = Path(loras.path("plain"))

    def copy(name: str) -> Path:
        return Path(shutil.copytree(plain, root / name))

    def edit_config(name: str, **changes) -> str:
        path = copy(name)
        config = json.loads((path / "adapter_config.json").read_text())
        config.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(config))
        return str(path)

    def edit_tensors(name: str, rename) -> str:
        path = copy(name)
        tensors = load_file(str(path / "adapter_model.safetensors"))
        save_file({rename(k): v for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
        return str(path)

    small_base = make_model(root / "small_base", "llama", seed=0, hidden=32, layers=2, intermediate=64)
    no_config = copy("no_config")
    (no_config / "adapter_config.json").unlink()
    no_weights = copy("no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    pickled = copy("pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    return {
        "small_base": str(small_base),
        "small_adapter": str(make_adapter(small_base, root / "small_adapter", 1, r=4, lora_alpha=8)),
        "gpt2_names": edit_tensors("gpt2_names", lambda k: k.replace("model.layers.", "transformer.h.")),
        "rank_zero": edit_config("rank_zero", r=0),
        "rank_mismatch": edit_config("rank_mismatch", r=8),
        "dora": edit_config("dora", use_dora=True),
        "prefix_tuning": edit_config("prefix_tuning", peft_type="PREFIX_TUNING"),
        "no_config": str(no_config),
        "no_weights": str(no_weights),
        "pickled": str(pickled),
        "missing": str(root / "does-not-exist"),
    }


def recipe(tmp_path: Path, adapters: list[str], **extra) -> str:
    data = {"adapters": [{"adapter": a, "parameters": {"weight": 1.0}} for a in adapters],
            "merge_method": "ties", **extra}
    path = tmp_path / f"recipe{len(list(tmp_path.glob('recipe*.yml')))}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def model_recipe(tmp_path: Path, model: str) -> str:
    path = tmp_path / "model-recipe.yml"
    path.write_text(yaml.safe_dump({"models": [{"model": model}], "merge_method": "linear"}))
    return str(path)


def merge_cases(loras, broken, tmp_path) -> dict[str, tuple[list[str], str]]:
    plain = loras.path("plain")
    return {
        "different shapes": ([recipe(tmp_path, [plain, broken["small_adapter"]])],
                             "trained on base models of different shapes"),
        "different architectures": ([recipe(tmp_path, [plain, broken["gpt2_names"]])],
                                    "adapters target different architectures"),
        "not the base's shapes": ([recipe(tmp_path, [plain], base_model=broken["small_base"])],
                                  "expects a weight of shape"),
        "rank 0 in the recipe": ([recipe(tmp_path, [plain], rank=0)], "rank: rank is 0"),
        "rank 0 in the adapter": ([recipe(tmp_path, [broken["rank_zero"]])], "a LoRA rank must be at least 1"),
        "config rank does not fit the weights": ([recipe(tmp_path, [broken["rank_mismatch"]])],
                                                 "says rank 8 (r) but the factors have rank 4"),
        "DoRA": ([recipe(tmp_path, [broken["dora"]])], "use_dora is set"),
        "not LoRA": ([recipe(tmp_path, [broken["prefix_tuning"]])], "peft_type is PREFIX_TUNING"),
        "missing adapter": ([recipe(tmp_path, [broken["missing"]])], "does-not-exist' does not exist"),
        "missing adapter_config.json": ([recipe(tmp_path, [broken["no_config"]])], "no adapter_config.json"),
        "missing adapter weights": ([recipe(tmp_path, [broken["no_weights"]])], "adapter_model.safetensors is missing"),
        "pickled adapter": ([recipe(tmp_path, [broken["pickled"]])], "refuses to load because unpickling"),
        "missing recipe": ([str(tmp_path / "nope.yml")], "does not exist"),
        "rank and energy": ([recipe(tmp_path, [plain], rank=4, energy=0.9)], "either rank or energy"),
        "energy out of range": ([recipe(tmp_path, [plain], energy=1.5)], "in (0, 1]"),
        "cat with a rank": ([recipe(tmp_path, [plain], merge_method="cat", rank=4)], "cat stacks the input ranks"),
        "unknown method": ([recipe(tmp_path, [plain], merge_method="tiez")],
                           "unknown merge_method 'tiez'. Did you mean 'ties'?"),
        "a model merge recipe": ([model_recipe(tmp_path, plain)],
                                 "this is a model merge recipe (it lists models: or slices:, not adapters:); run it "
                                 "with `mergelab merge"),
        "unknown parameter": ([recipe(tmp_path, [plain], parameters={"densty": 0.5})],
                              "parameters.densty: unknown parameter"),
        "unknown field": ([recipe(tmp_path, [plain], ranks=4)], "ranks: unknown field"),
        "duplicate adapter": ([recipe(tmp_path, [plain, str(Path(plain) / ".." / Path(plain).name)])],
                              "adapters[0] and adapters[1] are the same adapter"),
    }


def run(args: list[str]):
    return CliRunner().invoke(app, args)


def assert_refused(result, message: str, out: Path) -> None:
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary directory was left behind"


@pytest.mark.parametrize("case", [
    "different shapes", "different architectures", "not the base's shapes", "rank 0 in the recipe",
    "rank 0 in the adapter", "config rank does not fit the weights", "DoRA", "not LoRA", "missing adapter",
    "missing adapter_config.json", "missing adapter weights", "pickled adapter", "missing recipe",
    "rank and energy", "energy out of range", "cat with a rank", "unknown method", "unknown parameter",
    "unknown field", "duplicate adapter", "a model merge recipe",
])
def test_lora_merge_refuses(loras, broken, tmp_path, case):
    args, message = merge_cases(loras, broken, tmp_path)[case]
    out = tmp_path / "out"
    assert_refused(run(["lora", "merge", *args, str(out)]), message, out)


@pytest.mark.parametrize("method", [m.name for m in all_methods() if not m.task_vector])
def test_lora_merge_refuses_methods_that_do_not_merge_task_vectors(tmp_path, method):
    """Refused before any adapter is opened (the adapter here does not even exist), naming what is accepted."""
    out = tmp_path / "out"
    result = run(["lora", "merge", recipe(tmp_path, [str(tmp_path / "no-adapter")], merge_method=method), str(out)])
    assert_refused(result, f"merge_method '{method}' does not merge task vectors", out)
    accepted = result.output.split("Use one of:")[1]
    for name in ["cat", "linear", "task_arithmetic", "ties", "dare_ties"]:
        assert name in accepted
    assert f" {method}," not in accepted and "does-not-exist" not in result.output


def test_lora_merge_never_overwrites_without_force(loras, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run(["lora", "merge", recipe(tmp_path, [loras.path("plain")]), str(out)])
    assert result.exit_code == 2 and "--force" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def bake_cases(loras, broken) -> dict[str, tuple[list[str], str]]:
    base, plain = str(loras.base), loras.path("plain")
    return {
        "adapter of a different size": ([base, broken["small_adapter"]], "expects a weight of shape"),
        "unknown target module": ([base, broken["gpt2_names"]], "which base model"),
        "missing base": ([broken["missing"], plain], "does-not-exist' does not exist"),
        "missing adapter": ([base, broken["missing"]], "does-not-exist' does not exist"),
        "pickled adapter": ([base, broken["pickled"]], "refuses to load because unpickling"),
        "rank 0 in the adapter": ([base, broken["rank_zero"]], "a LoRA rank must be at least 1"),
        "weights do not match adapters": ([base, plain, "--weights", "1,2"], "--weights gives 2 values for 1 adapter;"),
        "no adapter": ([base], "give BASE, at least one ADAPTER and OUT_DIR"),
        "one adapter twice": ([base, plain, plain], "is given twice"),
    }


@pytest.mark.parametrize("case", [
    "adapter of a different size", "unknown target module", "missing base", "missing adapter", "pickled adapter",
    "rank 0 in the adapter", "weights do not match adapters", "no adapter", "one adapter twice",
])
def test_lora_bake_refuses(loras, broken, tmp_path, case):
    args, message = bake_cases(loras, broken)[case]
    out = tmp_path / "out"
    positional = [a for a in args if not a.startswith("--") and a != "1,2"]
    options = args[len(positional):]
    assert_refused(run(["lora", "bake", *positional, str(out), *options]), message, out)


@pytest.mark.parametrize("options,message", [
    (["--rank", "0"], "--rank is 0"),
    (["--energy", "0"], "--energy is 0.0"),
    (["--rank", "4", "--energy", "0.9"], "exactly one of --rank R or --energy F"),
    ([], "exactly one of --rank R or --energy F"),
])
def test_lora_extract_refuses_bad_ranks(loras, tmp_path, options, message):
    out = tmp_path / "out"
    assert_refused(run(["lora", "extract", str(loras.base), str(loras.base), str(out), *options]), message, out)


def test_lora_extract_refuses_models_of_different_shapes(loras, broken, tmp_path):
    out = tmp_path / "out"
    result = run(["lora", "extract", str(loras.base), broken["small_base"], str(out), "--rank", "4"])
    assert_refused(result, "extract needs models of the same shapes", out)


def test_merge_recipe_with_a_missing_adapter_reference(loras, broken, tmp_path):
    data = {"models": [{"model": f"{loras.base}+{broken['missing']}", "parameters": {"weight": 1.0}}],
            "merge_method": "linear"}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert_refused(run(["merge", str(path), str(out)]), "does-not-exist' does not exist", out)


def test_an_adapter_is_refused_on_a_base_of_another_architecture_with_the_same_shapes(loras, tmp_path):
    from lora_support import SIZES

    mistral = make_model(tmp_path / "mistral", "mistral", seed=0, tokenizer=False, **SIZES)
    out = tmp_path / "out"
    result = run(["lora", "bake", str(mistral), loras.path("plain"), str(out)])
    assert_refused(result, "(LlamaForCausalLM), but the base model", out)
    assert "MistralForCausalLM" in result.output

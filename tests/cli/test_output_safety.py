"""`--force` replaces an output directory, never the inputs it would delete with it, never a file,
for every command that writes one (merge, lora merge / bake / extract)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mergelab.cli import app


@pytest.fixture()
def work(llama, tmp_path) -> Path:
    """Copies of the llama base and ft1 under tmp_path/models (a failing test must not delete the shared fixtures)."""
    for name in ("base", "ft1"):
        shutil.copytree(llama.path(name), tmp_path / "models" / name)
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(app, [*args, "--no-progress"])


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(result, path: Path) -> None:
    assert result.exit_code == 2, result.output
    assert "would delete that input" in result.output and str(path) in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("target", ["the model", "the models' folder", "the recipe's folder"])
def test_merge_force_never_deletes_an_input(work, target):
    models = work / "models"
    recipe = work / "recipes" / "r.yml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({"models": [{"model": str(models / "ft1"), "parameters": {"weight": 1.0}}],
                                      "merge_method": "linear"}))
    out = {"the model": models / "ft1", "the models' folder": models, "the recipe's folder": recipe.parent}[target]
    before = snapshot(work)
    result = invoke("merge", str(recipe), str(out), "--force")
    assert_refused(result, recipe if target == "the recipe's folder" else models / "ft1")
    assert snapshot(work) == before  # nothing deleted, nothing left behind


def test_lora_commands_force_never_delete_an_input(work):
    models = work / "models"
    adapter = work / "adapters" / "a"
    adapter.parent.mkdir()
    result = invoke("lora", "extract", str(models / "base"), str(models / "ft1"), str(adapter), "--rank", "2")
    assert result.exit_code == 0, result.output
    recipe = work / "adapters" / "merge.yml"
    recipe.write_text(yaml.safe_dump({"adapters": [{"adapter": str(adapter), "parameters": {"weight": 1.0}}],
                                      "merge_method": "linear"}))
    before = snapshot(work)

    result = invoke("lora", "extract", str(models / "base"), str(models / "ft1"), str(models), "--rank", "2", "--force")
    assert_refused(result, models / "base")
    result = invoke("lora", "bake", str(models / "base"), str(adapter), str(adapter), "--force")
    assert_refused(result, adapter)
    result = invoke("lora", "merge", str(recipe), str(work / "adapters"), "--force")
    assert_refused(result, recipe)
    assert snapshot(work) == before

    # Their dry runs make the same checks, before printing a plan.
    result = invoke("lora", "extract", str(models / "base"), str(models / "ft1"), str(models), "--rank", "2",
                    "--force", "--dry-run")
    assert_refused(result, models / "base")
    result = invoke("lora", "bake", str(models / "base"), str(adapter), str(adapter), "--force", "--dry-run")
    assert_refused(result, adapter)
    result = invoke("lora", "merge", str(recipe), str(work / "adapters"), "--force", "--dry-run")
    assert_refused(result, recipe)
    for command in (["lora", "extract", str(models / "base"), str(models / "ft1"), str(adapter), "--rank", "2"],
                    ["lora", "bake", str(models / "base"), str(adapter), str(adapter)],
                    ["lora", "merge", str(recipe), str(adapter)]):
        result = invoke(*command, "--dry-run")  # an existing output without --force
        assert result.exit_code == 2 and "already exists" in result.output and "--force" in result.output, result.output
    assert snapshot(work) == before


def test_force_never_replaces_a_file(llama, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"models": [{"model": llama.path("ft1"), "parameters": {"weight": 1.0}}],
                                      "merge_method": "linear"}))
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    result = invoke("merge", str(recipe), str(notes), "--force")
    assert result.exit_code == 2 and "is a file, not a directory" in result.output, result.output
    assert notes.read_text() == "precious"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_where_no_directory_can_be_made(llama, tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"models": [{"model": llama.path("ft1"), "parameters": {"weight": 1.0}}],
                                      "merge_method": "linear"}))
    result = invoke("merge", str(recipe), "/proc/merged")
    assert result.exit_code == 2, result.output
    assert "cannot create the output '/proc/merged'" in result.output and "Traceback" not in result.output


def test_an_existing_output_is_refused_before_any_input_is_opened(tmp_path, monkeypatch):
    """The output check comes first: a Hub model in the recipe is never fetched for a run that cannot write."""
    import huggingface_hub

    def no_download(*args, **kwargs):
        raise AssertionError("an input was fetched")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    out = tmp_path / "out"
    out.mkdir()
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"models": [{"model": "some-org/some-model", "parameters": {"weight": 1.0}}],
                                      "merge_method": "linear"}))
    adapters = tmp_path / "a.yml"
    adapters.write_text(yaml.safe_dump({"adapters": [{"adapter": "some-org/some-adapter"}], "merge_method": "linear"}))
    for args in (["merge", str(recipe)], ["lora", "merge", str(adapters)],
                 ["lora", "bake", "some-org/base", "some-org/adapter"],
                 ["lora", "extract", "some-org/base", "some-org/finetune", "--rank", "2"]):
        result = invoke(*args, str(out))
        assert result.exit_code == 2 and "already exists" in result.output, (args, result.output)


def test_lora_dry_runs_check_their_options_too(llama, tmp_path):
    result = invoke("lora", "extract", llama.path("base"), llama.path("ft1"), str(tmp_path / "x"), "--rank", "2",
                    "--dry-run", "--threads", "0")
    assert result.exit_code == 2 and "--threads 0" in result.output

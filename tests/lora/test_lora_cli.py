"""The lora commands end to end through the CLI: output, summaries, and --dry-run writing nothing."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from mergelab.cli import app


def run(args: list[str]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_merge_bake_extract_through_the_cli(loras, tmp_path):
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "adapters": [{"adapter": loras.path("plain"), "parameters": {"weight": 1.0, "density": 0.7}},
                     {"adapter": loras.path("rslora"), "parameters": {"weight": 0.5, "density": 0.7}}],
        "merge_method": "ties",
        "rank": 4,
    }))
    plan = run(["lora", "merge", str(recipe), str(tmp_path / "dry"), "--dry-run"])
    assert "model.layers.1.mlp.down_proj  [64, 128] -> rank 4" in plan and "ties(" in plan
    assert not (tmp_path / "dry").exists()

    output = run(["lora", "merge", str(recipe), str(tmp_path / "merged"), "--no-progress"])
    assert "merged 14 LoRA modules" in output and "relative reconstruction error: overall" in output
    report = json.loads((tmp_path / "merged" / "mergelab_lora_report.json").read_text())
    assert report["merge_method"] == "ties" and len(report["modules"]) == 14
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "mergelab_lora_config.yml",
        "mergelab_lora_report.json",
    ]

    plan = run(["lora", "bake", str(loras.base), str(tmp_path / "merged"), str(tmp_path / "dry"), "--dry-run"])
    assert "14 changed by the adapters" in plan and not (tmp_path / "dry").exists()
    output = run(["lora", "bake", str(loras.base), str(tmp_path / "merged"), loras.path("plain"),
                  str(tmp_path / "baked"), "--weights", "1,-1", "--no-progress"])
    assert "baked 2 adapter(s)" in output and (tmp_path / "baked" / "config.json").is_file()

    plan = run(["lora", "extract", str(loras.base), str(tmp_path / "baked"), str(tmp_path / "dry"),
                "--energy", "0.9", "--dry-run"])
    assert "LoRA modules: 14" in plan and not (tmp_path / "dry").exists()
    output = run(["lora", "extract", str(loras.base), str(tmp_path / "baked"), str(tmp_path / "extracted"),
                  "--rank", "8", "--no-progress"])
    assert "extracted 14 LoRA modules" in output
    # baked = base + ΔW_merged − ΔW_plain: rank ≤ 4 + 4, so rank 8 recovers it.
    report = json.loads((tmp_path / "extracted" / "mergelab_lora_report.json").read_text())
    assert report["overall_relative_error"] < 1e-5

"""The `mergelab` process itself: a finished merge skips the interpreter's teardown (main's fast
exit) yet leaves its output complete, its messages and logs printed, and exit code 0; failures
still exit 2 with their message."""

from __future__ import annotations

import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergelab.cli", *args], capture_output=True, text=True, timeout=300)


def test_a_finished_merge_exits_at_once_with_everything_written(llama, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "models": [{"model": str(llama.path("ft1")), "parameters": {"weight": 1.0, "density": 0.5}}],
        "base_model": str(llama.path("base")), "merge_method": "dare_linear", "dtype": "float32",
    }))
    out = tmp_path / "out"
    done = run_cli("merge", str(recipe), str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert f"-> {out}" in done.stdout  # printed and flushed before the process ended
    assert "no --seed given for random method dare_linear" in done.stderr  # and the log line too
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(f"{llama.path('base')}/model.safetensors")
    assert merged.keys() == base.keys() and all(torch.isfinite(t).all() for t in merged.values())
    assert {p.name for p in out.iterdir()} >= {"config.json", "README.md", "mergelab_config.yml"}

    again = run_cli("merge", str(recipe), str(out), "--no-progress")
    assert again.returncode == 2 and "already exists" in again.stderr

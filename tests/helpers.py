"""Test helpers: run mergekit (the reference) and mergelab on the same recipe, read tensors back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_model_tensors(directory: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors model directory, via safetensors itself."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def run_mergekit(config: dict[str, Any], out_dir: Path, seed: int | None = None) -> dict[str, torch.Tensor]:
    """Merge with mergekit (the reference implementation) and return its tensors."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False, random_seed=seed)
    run_merge(MergeConfiguration.model_validate(config), str(out_dir), options)
    return load_model_tensors(out_dir)


def run_mergelab(config: dict[str, Any], tmp_path: Path, seed: int | None = 0, name: str = "out") -> Path:
    from mergelab.merge import MergeOptions, run_merge

    config_path = write_yaml(tmp_path / f"{name}.yml", config)
    out = tmp_path / name
    run_merge(config_path, out, MergeOptions(seed=seed, progress=False))
    return out

"""lora merge defaults: the output rank without `rank:`, and which base model the output names."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from lora_support import lora_layers, lora_merge, make_adapter, peft_model

from mergelab.io.adapter import Adapter


@pytest.fixture(scope="module")
def ranked(loras, tmp_path_factory) -> dict[str, str]:
    """Adapters whose largest rank is a rank_pattern entry above their r, in one module only."""
    root = tmp_path_factory.mktemp("ranked")
    return {
        # r = 2 everywhere but q_proj, which has rank 5 (above r: PEFT's own default would stop at r)
        "wide_q": str(make_adapter(loras.base, root / "wide_q", 31, r=2, lora_alpha=4, rank_pattern={"q_proj": 5})),
        # r = 3, and rank 1 in layer 1's down_proj
        "narrow_down": str(make_adapter(loras.base, root / "narrow_down", 32, r=3, lora_alpha=3,
                                        rank_pattern={"model.layers.1.mlp.down_proj": 1})),
    }


def test_without_rank_every_module_gets_the_largest_input_rank(loras, ranked, tmp_path):
    assert Adapter(ranked["wide_q"]).max_rank == 5 and Adapter(ranked["narrow_down"]).max_rank == 3
    recipe = {"adapters": [{"adapter": ranked["wide_q"]}, {"adapter": ranked["narrow_down"]}],
              "merge_method": "task_arithmetic", "parameters": {"weight": 1.0}}
    out = tmp_path / "merged"
    result = lora_merge(recipe, out)
    assert set(result.report["modules"]) and all(m["rank"] == 5 for m in result.report["modules"].values())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 5 and config["rank_pattern"] == {}
    layers = lora_layers(peft_model(loras.base, {"ours": str(out)}))  # PEFT reads the same ranks
    ours = {name: layer for name, layer in layers.items() if "ours" in layer.lora_A}
    assert len(ours) == 14
    for name, layer in ours.items():
        assert layer.r["ours"] == 5 and layer.lora_A["ours"].weight.shape[0] == 5, name
    # modules where no input reaches rank 5 still get it (the sum of two updates can need more than either)
    assert ours["model.layers.1.mlp.down_proj"].r["ours"] == 5


def test_an_explicit_rank_overrides_the_default(loras, ranked, tmp_path):
    recipe = {"adapters": [{"adapter": ranked["wide_q"]}, {"adapter": ranked["narrow_down"]}],
              "merge_method": "task_arithmetic", "parameters": {"weight": 1.0}, "rank": 2}
    result = lora_merge(recipe, tmp_path / "merged")
    assert {m["rank"] for m in result.report["modules"].values()} == {2}


def with_base_name(source: str, path: Path, name: str) -> str:
    shutil.copytree(source, path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": name}))
    return str(path)


def test_one_base_folder_written_relative_and_absolute_is_one_base(loras, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(Path(loras.base).parent)
    relative = os.path.relpath(loras.base)
    assert not Path(relative).is_absolute() and Path(relative).resolve() == Path(loras.base).resolve()
    first = with_base_name(loras.path("plain"), tmp_path / "first", relative)
    second = with_base_name(loras.path("rslora"), tmp_path / "second", str(Path(loras.base).resolve()))
    recipe = {"adapters": [{"adapter": first}, {"adapter": second}], "merge_method": "linear",
              "parameters": {"weight": 1.0}}
    with caplog.at_level(logging.WARNING):
        lora_merge(recipe, tmp_path / "merged")
    assert "name different base models" not in caplog.text
    assert json.loads((tmp_path / "merged" / "adapter_config.json").read_text())["base_model_name_or_path"] == relative


def test_different_bases_are_still_reported(loras, tmp_path, caplog):
    first = with_base_name(loras.path("plain"), tmp_path / "first", str(loras.base))
    second = with_base_name(loras.path("rslora"), tmp_path / "second", "org/another-model")
    recipe = {"adapters": [{"adapter": first}, {"adapter": second}], "merge_method": "linear",
              "parameters": {"weight": 1.0}}
    with caplog.at_level(logging.WARNING):
        lora_merge(recipe, tmp_path / "merged")
    assert "name different base models" in caplog.text and "org/another-model" in caplog.text
    assert json.loads((tmp_path / "merged" / "adapter_config.json").read_text())["base_model_name_or_path"] is None

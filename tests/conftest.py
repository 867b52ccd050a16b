"""Shared fixtures: tiny real checkpoints of every supported family, built once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mergelab.zoo.random_models import FAMILIES as ALL_FAMILIES
from mergelab.zoo.random_models import make_model, make_variant

FAMILIES = ("llama", "mistral", "qwen2")


@pytest.fixture(scope="session", autouse=True)
def _no_user_zoo(tmp_path_factory: pytest.TempPathFactory):
    """Tests never see the zoos the user has built (~/.cache/mergelab/zoo): an empty zoo root of their own."""
    import os

    previous = os.environ.get("MERGELAB_ZOO_DIR")
    os.environ["MERGELAB_ZOO_DIR"] = str(tmp_path_factory.mktemp("empty-zoo-root"))
    yield
    if previous is None:
        os.environ.pop("MERGELAB_ZOO_DIR", None)
    else:
        os.environ["MERGELAB_ZOO_DIR"] = previous


class ModelSet:
    """A base model and fine-tune-like variants of one family, on disk."""

    def __init__(self, root: Path, family: str, variants: int = 3, **sizes: Any):
        self.root = root
        self.family = family
        self.base = make_model(root / "base", family, seed=0, **sizes)
        self.variants = [
            make_variant(self.base, root / f"ft{i}", seed=100 + i, scale=0.05, sparsity=0.3)
            for i in range(1, variants + 1)
        ]

    def path(self, name: str) -> str:
        return str(self.root / name)


@pytest.fixture(scope="session")
def model_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ModelSet]:
    sets = {}
    for family in FAMILIES:
        sets[family] = ModelSet(tmp_path_factory.mktemp(family), family, layers=4)
    return sets


@pytest.fixture(scope="session")
def llama(model_sets: dict[str, ModelSet]) -> ModelSet:
    return model_sets["llama"]


@pytest.fixture(scope="session")
def family_set(model_sets, tmp_path_factory: pytest.TempPathFactory):
    """``family_set(name)``: a base and two variants (3 layers) of any zoo family, built on first use."""
    built: dict[str, ModelSet] = {}

    def get(family: str) -> ModelSet:
        assert family in ALL_FAMILIES, family
        if family not in built:
            built[family] = ModelSet(tmp_path_factory.mktemp(f"family-{family}"), family, variants=2, layers=3)
        return built[family]

    return get

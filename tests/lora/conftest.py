"""Fixtures for the LoRA tests: a tiny random Llama and PEFT adapters of it, saved by PEFT itself."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # test modules import lora_support

from lora_support import LoraSet  # noqa: E402


@pytest.fixture(scope="session")
def loras(tmp_path_factory: pytest.TempPathFactory) -> LoraSet:
    return LoraSet(tmp_path_factory.mktemp("lora"))


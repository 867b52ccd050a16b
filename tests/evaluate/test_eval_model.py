"""Loading models to evaluate: transformers differences are found by feature detection, not version strings."""

from __future__ import annotations

import torch

from mergelab.evaluate import load_model
from mergelab.evaluate import model as model_module


def test_the_dtype_argument_name_comes_from_the_installed_code_not_its_version(monkeypatch):
    from importlib import metadata

    import transformers

    real_version = metadata.version
    monkeypatch.setattr(metadata, "version",
                        lambda name: "4.0.0" if name == "transformers" else real_version(name))  # a misleading number
    assert model_module._dtype_keyword() == "dtype"  # this transformers takes dtype=, whatever its version says

    class OlderConfig:
        """PretrainedConfig as transformers 4.55 wrote it: a ``torch_dtype`` parameter, no ``dtype``."""

        def __init__(self, output_hidden_states=False, torch_dtype=None, **kwargs):
            pass

    monkeypatch.setattr(metadata, "version", lambda name: "9.9.9" if name == "transformers" else real_version(name))
    monkeypatch.setattr(transformers, "PretrainedConfig", OlderConfig)
    assert model_module._dtype_keyword() == "torch_dtype"


def test_the_requested_dtype_is_the_loaded_one(tiny_dir):
    model, _ = load_model(tiny_dir, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model, _ = load_model(tiny_dir, dtype="float32")
    assert {p.dtype for p in model.parameters()} == {torch.float32}

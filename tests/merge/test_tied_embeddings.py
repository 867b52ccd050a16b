"""Tied output heads (tie_word_embeddings): nothing stray is written, and tied/untied inputs mix as documented."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import load_model_tensors, run_mergekit, run_mergelab
from safetensors.torch import load_file, save_file


def retie(source: str, destination: Path, keep_head: bool = False) -> str:
    """A copy of ``source`` whose config ties the head to the embeddings (and, unless ``keep_head``,
    whose checkpoint drops ``lm_head.weight``, as transformers saves tied models)."""
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (destination / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(destination / "model.safetensors"))
    if not keep_head:
        del tensors["lm_head.weight"]
    save_file(tensors, str(destination / "model.safetensors"), metadata={"format": "pt"})
    return str(destination)


def linear(base: str, other: str) -> dict:
    return {
        "models": [{"model": base, "parameters": {"weight": 0.5}}, {"model": other, "parameters": {"weight": 0.5}}],
        "merge_method": "linear",
        "dtype": "float32",
    }


def test_untied_output_takes_a_tied_inputs_embeddings_as_its_head(llama, tmp_path, caplog):
    tied = retie(llama.path("ft1"), tmp_path / "tied")
    config = linear(llama.path("ft2"), tied)
    with caplog.at_level(logging.INFO, logger="mergelab"):
        ours = load_model_tensors(run_mergelab(config, tmp_path))
    ft2, tied_tensors = load_model_tensors(llama.path("ft2")), load_model_tensors(tied)
    expected = 0.5 * ft2["lm_head.weight"] + 0.5 * tied_tensors["model.embed_tokens.weight"]
    torch.testing.assert_close(ours["lm_head.weight"], expected)
    assert "ties its embeddings: its 'model.embed_tokens.weight' serves as its 'lm_head.weight'" in caplog.text
    theirs = run_mergekit(config, tmp_path / "mergekit")  # mergekit reads a tied model's head the same way
    torch.testing.assert_close(ours["lm_head.weight"], theirs["lm_head.weight"])


def test_tied_output_writes_no_head_and_says_which_heads_are_unused(llama, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    tied = retie(llama.path("ft1"), tmp_path / "tied")
    with caplog.at_level(logging.INFO, logger="mergelab"):
        out = run_mergelab(linear(tied, llama.path("ft2")), tmp_path)
    ours = load_model_tensors(out)
    assert "lm_head.weight" not in ours
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "separate output heads of" in caplog.text and llama.path("ft2") in caplog.text
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.get_output_embeddings().weight, ours["model.embed_tokens.weight"])


def stored_head_equal_to_embeddings(path: str) -> str:
    tensors = load_file(f"{path}/model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    return path


def test_stray_head_of_a_tied_model_is_not_written(llama, tmp_path):
    stray = stored_head_equal_to_embeddings(retie(llama.path("ft1"), tmp_path / "stray", keep_head=True))
    other = stored_head_equal_to_embeddings(retie(llama.path("ft2"), tmp_path / "other", keep_head=True))
    ours = load_model_tensors(run_mergelab(linear(stray, other), tmp_path))
    assert "lm_head.weight" not in ours
    assert "model.embed_tokens.weight" in ours


def test_a_tied_model_storing_a_different_head_is_ambiguous_and_refused(llama, tmp_path):
    """transformers 4 ties such a head away, transformers 5 keeps it: mergelab will not guess."""
    from mergelab.errors import InputError

    ambiguous = retie(llama.path("ft1"), tmp_path / "ambiguous", keep_head=True)  # ft1's own, different head
    with pytest.raises(InputError, match="ties its embeddings .* but also stores a different 'lm_head.weight'"):
        run_mergelab(linear(ambiguous, llama.path("ft2")), tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_tied_families_merge_without_a_head(family, family_set, tmp_path):
    s = family_set(family)
    out = run_mergelab(linear(s.path("ft1"), s.path("ft2")), tmp_path)
    names = set(load_model_tensors(out))
    assert not any("lm_head" in name for name in names)
    assert names == set(load_model_tensors(s.path("base")))


def test_a_stored_head_rewritten_after_a_check_is_checked_again(llama, tmp_path):
    from mergelab.arch import check_stored_head
    from mergelab.errors import InputError
    from mergelab.io import Checkpoint

    path = stored_head_equal_to_embeddings(retie(llama.path("ft1"), tmp_path / "model", keep_head=True))
    check_stored_head(Checkpoint(path))
    tensors = load_file(f"{path}/model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="also stores a different"):
        check_stored_head(Checkpoint(path))

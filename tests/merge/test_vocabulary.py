"""Inputs whose vocabularies differ: cropped by default, aligned token by token with a tokenizer setting."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers import load_model_tensors, run_mergekit, run_mergelab, write_yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergelab.cli import app

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def with_added_tokens(source: str, destination: Path, tokens: list[str], seed: int) -> str:
    """A copy of ``source`` whose tokenizer gains ``tokens`` and whose embeddings/head gain random rows for them."""
    from transformers import AutoTokenizer

    shutil.copytree(source, destination)
    tokenizer = AutoTokenizer.from_pretrained(destination)
    tokenizer.add_tokens(tokens)
    tokenizer.save_pretrained(destination)
    tensors = load_file(str(destination / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    for name in (EMBED, HEAD):
        extra = torch.randn(len(tokens), tensors[name].shape[1], generator=generator)
        tensors[name] = torch.cat([tensors[name], extra])
    save_file(tensors, str(destination / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((destination / "config.json").read_text())
    config["vocab_size"] = tensors[EMBED].shape[0]
    (destination / "config.json").write_text(json.dumps(config))
    return str(destination)


@pytest.fixture(scope="module")
def vocab_models(llama, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vocab")
    return {
        "base": llama.path("base"),  # 320 tokens
        "tools": with_added_tokens(llama.path("ft1"), root / "tools", ["<|tool|>", "<|think|>"], seed=1),  # 322
        "images": with_added_tokens(llama.path("ft2"), root / "images", ["<|img|>"], seed=2),  # 321
    }


def recipe(m: dict[str, str], **extra) -> dict:
    return {
        "models": [
            {"model": m["tools"], "parameters": {"weight": 0.6}},
            {"model": m["images"], "parameters": {"weight": 0.4}},
        ],
        "base_model": m["base"],
        "merge_method": "task_arithmetic",
        "dtype": "float32",
        **extra,
    }


def rows_by_token(out: Path, tensors: dict, name: str = EMBED) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    return {token: tensors[name][index] for token, index in vocab.items()}


def generates(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == model.config.vocab_size
    assert len(tokenizer) <= model.config.vocab_size
    ids = tokenizer("hello world <|tool|>", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_differing_vocabularies_are_cropped_by_default(vocab_models, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mergelab"):
        out = run_mergelab(recipe(vocab_models), tmp_path)
    assert "cropping every token-indexed tensor to the 320 shared rows" in caplog.text
    ours = load_model_tensors(out)
    assert ours[EMBED].shape == ours[HEAD].shape == (320, 32)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 320
    inputs = {k: load_model_tensors(v) for k, v in vocab_models.items()}
    for name in (EMBED, HEAD):
        base = inputs["base"][name]
        expected = base + 0.6 * (inputs["tools"][name][:320] - base) + 0.4 * (inputs["images"][name][:320] - base)
        torch.testing.assert_close(ours[name], expected)
    generates(out)


def test_cropping_strips_the_tokenizer_of_tokens_without_rows(vocab_models, tmp_path):
    from transformers import AutoTokenizer

    config = {
        "models": [{"model": vocab_models["tools"], "parameters": {"weight": 1.0}},
                   {"model": vocab_models["images"], "parameters": {"weight": 1.0}}],
        "merge_method": "linear",
        "dtype": "float32",
    }
    out = run_mergelab(config, tmp_path)
    assert load_model_tensors(out)[EMBED].shape[0] == 321
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert len(vocab) == 321 and "<|tool|>" in vocab and "<|think|>" not in vocab
    generates(out)


@pytest.mark.parametrize(
    "setting",
    [
        {"tokenizer_source": "union"},
        {"tokenizer": {"source": "union"}},
        {"tokenizer": {"source": "union", "pad_to_multiple_of": 8}},
        {"tokenizer_source": "base"},
        {"tokenizer_source": "tools"},
    ],
    ids=["union", "tokenizer-block", "padded", "base", "model"],
)
def test_aligned_vocabulary_matches_mergekit_token_by_token(setting, vocab_models, tmp_path):
    setting = json.loads(json.dumps(setting).replace('"tools"', json.dumps(vocab_models["tools"])))
    config = recipe(vocab_models, **setting)
    out = run_mergelab(config, tmp_path)
    ours = load_model_tensors(out)
    theirs_dir = tmp_path / "mergekit"
    theirs = run_mergekit(config, theirs_dir)
    assert ours[EMBED].shape == theirs[EMBED].shape
    assert json.loads((out / "config.json").read_text())["vocab_size"] == ours[EMBED].shape[0]
    for name in (EMBED, HEAD):
        mine, reference = rows_by_token(out, ours, name), rows_by_token(theirs_dir, theirs, name)
        assert mine.keys() == reference.keys()  # mergekit orders new tokens by set/hash order; compare by token
        for token in reference:
            torch.testing.assert_close(mine[token], reference[token], rtol=1e-5, atol=1e-6, msg=token)
        vocab = len(mine)
        if ours[name].shape[0] > vocab:  # padding rows: the mean of the real rows
            torch.testing.assert_close(ours[name][vocab:], theirs[name][vocab:].clone(), rtol=1e-5, atol=1e-6)
    generates(out)


def test_union_rows_follow_the_documented_rule(vocab_models, tmp_path):
    """A token one model lacks takes the base's row, else the only (or mean) row of the models that have it."""
    out = run_mergelab(recipe(vocab_models, tokenizer_source="union"), tmp_path)
    ours = rows_by_token(out, load_model_tensors(out))
    from transformers import AutoTokenizer

    tools = load_model_tensors(vocab_models["tools"])
    tools_vocab = AutoTokenizer.from_pretrained(vocab_models["tools"]).get_vocab()
    # <|tool|> exists only in "tools": every input takes that row, so no task vector moves it
    torch.testing.assert_close(ours["<|tool|>"], tools[EMBED][tools_vocab["<|tool|>"]])
    assert {"<|tool|>", "<|think|>", "<|img|>"} <= ours.keys() and len(ours) == 323


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"tokenizer": {"source": "union", "tokens": {"<|x|>": {"source": "base"}}}}, "tokenizer.tokens"),
        ({"tokenizer": {"source": "union"}, "tokenizer_source": "base"}, "either tokenizer_source or tokenizer"),
        ({"tokenizer": {"source": "union", "pad_to_multiple_of": 0}}, "pad_to_multiple_of is 0"),
        ({"tokenizer_source": "/no/such/tokenizer"}, "tokenizer_source: model path '/no/such/tokenizer' does not exist"),
    ],
)
def test_bad_tokenizer_settings_are_refused_before_merging(extra, message, vocab_models, tmp_path):
    path = write_yaml(tmp_path / "r.yml", recipe(vocab_models, **extra))
    result = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_tokens_no_input_has_get_zero_rows_and_a_warning(vocab_models, llama, tmp_path, caplog):
    donor = with_added_tokens(llama.path("base"), tmp_path / "donor", ["<|new|>"], seed=3)
    with caplog.at_level(logging.WARNING, logger="mergelab"):
        out = run_mergelab(recipe(vocab_models, tokenizer_source=donor), tmp_path)
    assert "1 token(s) of the output vocabulary are in no input model ('<|new|>')" in caplog.text
    rows = rows_by_token(out, load_model_tensors(out))
    assert torch.count_nonzero(rows["<|new|>"]) == 0

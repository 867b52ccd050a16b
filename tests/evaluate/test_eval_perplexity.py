"""Perplexity equals the loss transformers computes by hand (strided windows, token-weighted)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mergelab.zoo.random_models import WORDS


def text_of(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def hand_perplexity(model, tokenizer, texts: list[str], max_length: int, stride: int) -> tuple[float, int]:
    """The transformers perplexity guide's loop, with each window's mean loss weighted by its scored tokens."""
    nll_sum, n_tokens = 0.0, 0
    for text in texts:
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        seq_len = input_ids.size(1)
        previous_end = 0
        for begin in range(0, seq_len, stride):
            end = min(begin + max_length, seq_len)
            target_length = end - previous_end
            window = input_ids[:, begin:end]
            targets = window.clone()
            targets[:, :-target_length] = -100
            with torch.no_grad():
                loss = model(window, labels=targets).loss
            scored = int((targets[:, 1:] != -100).sum())
            nll_sum += float(loss) * scored
            n_tokens += scored
            previous_end = end
            if end == seq_len:
                break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("max_length,stride", [(64, 32), (64, 64), (48, 7)])
def test_perplexity_equals_hand_computation(tiny, tmp_path, jsonl, max_length, stride):
    from mergelab.evaluate import evaluate

    model, tokenizer = tiny
    texts = [text_of(120, seed) for seed in range(3)] + ["three"]
    data = jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    expected, tokens = hand_perplexity(model, tokenizer, texts, max_length, stride)
    spec = f"perplexity:data={data},max_length={max_length},stride={stride}"
    task = evaluate(model, tokenizer, [spec], batch_size=3)["tasks"][spec]
    assert task["info"]["tokens"] == tokens
    assert task["metrics"]["perplexity"]["value"] == pytest.approx(expected, rel=1e-5)
    low, high = task["metrics"]["perplexity"]["ci95"]
    assert low <= expected <= high
    assert sum(item["output"]["tokens"] for item in task["items"]) == tokens


def test_perplexity_of_a_text_file(tiny, tmp_path):
    from mergelab.evaluate import evaluate

    model, tokenizer = tiny
    text = text_of(200, 7)
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    expected, _ = hand_perplexity(model, tokenizer, [text], 256, 128)  # defaults: the model's context, half-window stride
    result = evaluate(model, tokenizer, [f"perplexity:{path}"])
    task = result["tasks"][f"perplexity:{path}"]
    assert task["metrics"]["perplexity"]["value"] == pytest.approx(expected, rel=1e-5)
    assert (task["info"]["max_length"], task["info"]["stride"]) == (256, 128)  # the values used, not "default"

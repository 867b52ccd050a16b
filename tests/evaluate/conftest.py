"""Fixtures for the evaluation tests: a tiny random Llama (with a chat template) and small data files."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from mergelab.zoo.random_models import WORDS, make_model

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def mmlu_rows(count: int, seed: int, subjects: tuple[str, ...] = ("anatomy",)) -> list[dict[str, Any]]:
    """MMLU-format questions made of the tokenizer's words (so they tokenise compactly)."""
    rng = random.Random(seed)
    words = lambda low, high: " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))
    return [
        {"question": words(4, 14) + "?", "choices": [words(1, 4) for _ in range(4)],
         "answer": rng.randint(0, 3), "subject": subjects[i % len(subjects)]}
        for i in range(count)
    ]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they lose 10-30x to contention."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def private_result_cache(tmp_path, monkeypatch):
    """The default result cache lives in the test's temporary directory, never in ~/.cache."""
    monkeypatch.setenv("MERGELAB_CACHE_DIR", str(tmp_path / "default-cache"))


@pytest.fixture(scope="session")
def jsonl():
    """``jsonl(path, rows)`` writes JSON lines and returns the path."""
    return write_jsonl


@pytest.fixture(scope="session")
def make_mmlu_rows():
    """``make_mmlu_rows(count, seed)``: MMLU-format rows."""
    return mmlu_rows


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_model(tmp_path_factory.mktemp("eval") / "tiny", "llama", hidden=64, layers=2, intermediate=128,
                      heads=4, kv_heads=2, vocab=320)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    from mergelab.evaluate import load_model

    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def mmlu_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mmlu")
    return {
        "test": write_jsonl(root / "test.jsonl", mmlu_rows(24, seed=1)),
        "dev": write_jsonl(root / "dev.jsonl", mmlu_rows(5, seed=2)),
    }


# ---- a Llama-2-style (SentencePiece / Metaspace) tokenizer and a model that writes what it is told ---------------
def llama2_style_tokenizer():
    """A character-level BPE with Llama-2's normalizer and decoder: ▁ for spaces, byte fallback, and `Strip`,
    which drops the first space of every decoded sequence."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in "▁" + "".join(chr(c) for c in range(33, 127)):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


class ScriptedModel:
    """A stand-in causal LM that greedily 'generates' ``script`` after any prompt, then EOS.

    It has what the runner uses of a transformers model: parameters (for the device), a
    config, and ``forward(input_ids, attention_mask, position_ids, past_key_values, use_cache,
    logits_to_keep)`` returning ``logits`` and ``past_key_values`` (here just the step count).
    """

    def __new__(cls, script: list[int], vocab_size: int, eos: int):
        import torch
        from types import SimpleNamespace

        class Scripted(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.anchor = torch.nn.Parameter(torch.zeros(1))
                self.config = SimpleNamespace(max_position_embeddings=4096)
                self.script = list(script) + [eos]

            def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                        use_cache=False, logits_to_keep=0):
                step = past_key_values or 0
                logits = torch.zeros((input_ids.shape[0], 1, vocab_size))
                logits[:, 0, self.script[min(step, len(self.script) - 1)]] = 10.0
                return SimpleNamespace(logits=logits, past_key_values=step + 1)

        return Scripted()


@pytest.fixture(scope="session")
def llama2_tokenizer():
    return llama2_style_tokenizer()


@pytest.fixture(scope="session")
def llama2_chat_tokenizer():
    """The Llama-2-style tokenizer with the test chat template."""
    tokenizer = llama2_style_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def scripted_model():
    """``scripted_model(tokenizer, prompt, completion)``: a model that completes ``prompt`` with exactly ``completion``."""
    def build(tokenizer, prompt: str, completion: str):
        prompt_ids = tokenizer.encode(prompt)
        whole = tokenizer.encode(prompt + completion)
        assert whole[: len(prompt_ids)] == prompt_ids, "the completion must start on a token boundary"
        return ScriptedModel(whole[len(prompt_ids):], len(tokenizer), tokenizer.eos_token_id)

    return build


class ScriptedRunner:
    """Stands in for the model runner: generation requests are answered from ``respond(request)``."""

    device = "cpu"

    def __init__(self, respond):
        from mergelab.evaluate.runner import RunnerStats

        self.respond = respond
        self.requests = []
        self.stats = RunnerStats()

    def generate(self, requests):
        self.requests += list(requests)
        return [self.respond(request) for request in requests]


@pytest.fixture(scope="session")
def scripted_runner():
    """``scripted_runner(respond)``: a runner whose 'model' answers each GenerationRequest with ``respond(request)``."""
    return ScriptedRunner

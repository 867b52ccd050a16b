"""Tiny random checkpoints of real Hugging Face architectures, written to disk.

``make_model(path, family="llama")`` writes a randomly initialised model (safetensors,
config.json, a small byte-level BPE tokenizer); ``make_variant(base, path, seed)`` writes a
"fine-tune" of it: the base weights plus seeded Gaussian noise, so task vectors are
well defined. Deterministic for a given seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2")

WORDS = (
    "the a an and or of to in on at is are was were be it this that with for as by from "
    "cat dog bird fish tree house river stone light dark red green blue one two three four "
    "five six seven eight nine ten run jump walk talk see hear think know make take give "
    "hello world model merge layer weight token"
).split()


# Families whose checkpoints tie the output head to the input embeddings by default.
TIED_BY_DEFAULT = ("gemma2", "gemma3", "gpt2")


def model_config(family: str = "llama", *, hidden: int = 32, layers: int = 2, intermediate: int = 64,
                 heads: int = 4, kv_heads: int = 2, vocab: int = 320, tie_embeddings: bool | None = None) -> Any:
    """A transformers config for ``family`` with the given sizes.

    ``tie_embeddings`` None takes the family's usual choice (tied for Gemma and GPT-2).
    """
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family '{family}'; choose from {', '.join(FAMILIES)}")
    tied = family in TIED_BY_DEFAULT if tie_embeddings is None else tie_embeddings
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied)
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate, vocab_size=vocab, n_positions=256,
            **special,
        )
    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "gemma2": transformers.Gemma2Config,
        "gemma3": transformers.Gemma3TextConfig,
        "phi3": transformers.Phi3Config,
    }
    extra: dict[str, Any] = {}
    if family in ("qwen3", "gemma2", "gemma3"):
        extra["head_dim"] = hidden // heads
    if family in ("gemma2", "gemma3"):
        extra["sliding_window"] = 64
    return classes[family](
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=256,
        **special,
        **extra,
    )


def write_tokenizer(path: Path, vocab_size: int = 320) -> None:
    """A byte-level BPE tokenizer (as Llama-3 / Qwen2 use) trained on a fixed word list.

    Byte-level BPE loads as the right class whatever the model family says (transformers
    picks e.g. ``Qwen2Tokenizer`` for Qwen2 from the config, which needs byte-level BPE).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 259:
        raise ValueError("a byte-level tokenizer needs vocab_size >= 259 (256 bytes + 3 special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(path))


def make_model(path: str | Path, family: str = "llama", *, seed: int = 0, dtype: str = "float32",
               tokenizer: bool = True, **sizes: Any) -> Path:
    """Write a randomly initialised ``family`` model to ``path``; return the path."""
    import torch
    import transformers

    path = Path(path)
    config = model_config(family, **sizes)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(getattr(torch, dtype))
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer:
        write_tokenizer(path, config.vocab_size)
    return path


def make_variant(base: str | Path, path: str | Path, *, seed: int, scale: float = 0.02,
                 sparsity: float = 0.0) -> Path:
    """Write ``base`` + seeded noise (a stand-in fine-tune) to ``path``.

    ``scale`` is the noise standard deviation relative to each tensor's std; with
    ``sparsity`` > 0 that fraction of entries is left unchanged (as in real fine-tunes,
    many weights barely move).
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    base, path = Path(base), Path(path)
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for file in base.iterdir():
        if file.suffix == ".safetensors":
            tensors = load_file(str(file))
            out = {}
            for name in sorted(tensors):
                tensor = tensors[name]
                std = tensor.float().std().item() if tensor.numel() > 1 else 1.0
                noise = torch.randn(tensor.shape, generator=generator) * (scale * (std or 1.0))
                if sparsity > 0:
                    noise *= torch.rand(tensor.shape, generator=generator) >= sparsity
                out[name] = (tensor.float() + noise).to(tensor.dtype)
            save_file(out, str(path / file.name), metadata={"format": "pt"})
        elif file.is_file():
            shutil.copy2(file, path / file.name)
    return path

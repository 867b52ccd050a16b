"""The zoo's tokenizer: one token per character, plus chat special tokens.

Character-level tokens make the synthetic skills (shift every letter, reverse a word,
sort digits) learnable by very small models, which is what lets the whole zoo train on
a laptop CPU in minutes. It is a real Hugging Face tokenizer (``tokenizer.json``): it
loads with ``AutoTokenizer`` and carries a chat template::

    <|user|>caesar3: hello<|end|><|assistant|>khoor<|end|>
"""

from __future__ import annotations

import string
from typing import Any

USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
PAD, BOS, UNK = "<pad>", "<s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, UNK, USER, ASSISTANT, END)
CHARACTERS = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,:;?!'\"()[]{}+-*/=<>_#%\n"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def vocabulary() -> dict[str, int]:
    tokens = list(SPECIAL_TOKENS) + list(CHARACTERS)
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` with one token per character (EOS = ``<|end|>``)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=END,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def encode_pair(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted prompt (up to ``<|assistant|>``) and of the answer + ``<|end|>``."""
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    answer_ids = tokenizer.encode(answer + END, add_special_tokens=False)
    return list(prompt_ids), list(answer_ids)


def encode_plain(tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of a skill written as plain text, ``<s>{prompt} = {answer}\\n``: no chat turns.

    The base learns the skills in this form; the chat form (``encode_pair``) is what the
    experts are tuned on and what the evaluations ask.
    """
    prompt_ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt + " = ", add_special_tokens=False)
    return prompt_ids, tokenizer.encode(answer + "\n", add_special_tokens=False)

"""The model runner: batched log-likelihoods, perplexity windows and generation, cached.

Three kinds of requests reach the model, and each answer is cached under
(model fingerprint, request) as soon as its batch finishes (see :mod:`.cache`):

``loglikelihood([(context, continuation), ...]) -> [(logprob, is_greedy), ...]``
    log P(continuation | context) summed over the continuation's tokens, and whether
    every continuation token is the argmax. Tokenisation follows lm-evaluation-harness
    exactly (trailing spaces of the context move to the continuation; the continuation's
    tokens are the tail of encode(context + continuation) after len(encode(context));
    an empty context becomes the BOS token; too-long inputs lose tokens on the left), so
    the numbers equal lm-eval's.

    Each distinct context is encoded once: requests are grouped by their context tokens,
    and one forward pass over the contexts gives the distribution of every
    continuation's first token, computing the language-model head only at the last
    context position (``logits_to_keep``), not over the whole sequence. Scoring only
    chosen positions of each row needs a model whose forward takes a boolean
    ``logits_to_keep`` mask (transformers' ``slice_logits_to_keep``); for other models,
    and older transformers, the runner asks for all logits and picks the positions
    itself — same answers, more memory. Contexts are
    left-padded (attention mask, explicit positions), so every row ends in the same
    column and sliding-window caches keep each row's most recent tokens. Multi-token
    continuations then run as short rows on top of their context's KV cache — one row
    for all continuations that differ only in their last token (e.g. " A" ... " D" when
    a tokenizer splits off the space).

``perplexity(text, max_length, stride) -> [window, ...]``
    Strided windows as in the transformers perplexity guide: windows of ``max_length``
    tokens start every ``stride`` tokens, and each window scores only the tokens the
    previous window did not (the first token of the text has no context and is not
    scored). Each window reports its summed NLL (nats) and token count.

``generate([GenerationRequest, ...]) -> [text, ...]``
    Batched, left-padded decoding with a KV cache; greedy when ``temperature == 0``,
    otherwise temperature / top-k / top-p sampling from a per-request generator seeded
    by (seed, request, sample index) — so a sample does not depend on which other
    requests share its batch, and a resumed run reproduces an uninterrupted one. Stops
    at EOS, ``max_new_tokens`` or the first stop sequence (which is cut from the text).
    The text of a completion is ``decode(prompt + generated)`` minus ``decode(prompt)``
    (as bigcode-evaluation-harness does), not ``decode(generated)``: SentencePiece /
    Metaspace tokenizers (Llama-2, Mistral) drop the leading space of a decoded sequence,
    which would eat one space of a code completion's indentation. An empty prompt becomes
    the prefix token (BOS, else EOS), as in lm-evaluation-harness. With ``chat=True`` the
    prompt (or message list) goes through the tokenizer's chat template, and a tokenizer
    without one is an error. A request's ``prefill`` starts the assistant's answer (rendered
    as lm-eval renders its ``gen_prefix``); the returned text continues it.

Cached answers are keyed by the model's fingerprint *and the device type* (cpu, cuda,
mps), since kernels differ between devices and so can greedy choices.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from mergelab.errors import ComputeError, ConfigError, InputError
from mergelab.evaluate.cache import ResultCache, request_key

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
Message = dict  # {"role": ..., "content": ...}


@dataclass(frozen=True)
class GenerationParams:
    """How to decode: ``temperature == 0`` is greedy; ``stop`` strings end (and are cut from) the output."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    chat: bool = False
    system: Optional[str] = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = no top-k filtering), got {self.top_k}.")
        object.__setattr__(self, "stop", tuple(self.stop))


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt (text, or a list of chat messages when ``params.chat``) and which sample of it to draw.

    ``prefill`` is text the answer is made to start with (with ``chat``, an assistant turn
    the template leaves open); the generated text returned continues it, without repeating it.
    """

    prompt: Union[str, tuple]
    params: GenerationParams = GenerationParams()
    sample: int = 0
    prefill: str = ""

    def messages(self) -> list[Message]:
        if isinstance(self.prompt, str):
            messages = [{"role": "user", "content": self.prompt}]
        else:
            messages = [dict(m) for m in self.prompt]
        if self.params.system:
            messages = [{"role": "system", "content": self.params.system}] + messages
        return messages

    def key_payload(self) -> dict[str, Any]:
        prompt = self.prompt if isinstance(self.prompt, str) else [dict(m) for m in self.prompt]
        payload = {"prompt": prompt, "params": asdict(self.params), "sample": self.sample}
        if self.prefill:  # absent when empty, so answers cached before prefills existed keep their keys
            payload["prefill"] = self.prefill
        return payload


# Bumped when mergelab changes how an answer is computed, so answers cached before are not served.
CACHE_FORMAT = 2


@functools.lru_cache(maxsize=None)
def _library_versions() -> str:
    import importlib.metadata

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    libraries = ",".join(f"{name}={version(name)}" for name in ("torch", "transformers", "tokenizers", "peft"))
    return f"format={CACHE_FORMAT},{libraries}"


@dataclass
class RunnerStats:
    """What the runner did: answers served from the cache or computed, and loading the model."""

    cached: int = 0
    computed: int = 0
    loaded_model: bool = False
    load_seconds: float = 0.0


ModelProvider = Callable[[], tuple[Any, Any]]


def _warn_cut(cut: int, total: int, what: str, max_length: int, room: str = "") -> None:
    """One warning for the inputs cut on the left to fit the model's context (as lm-eval cuts them)."""
    if cut:
        log.warning("%d of %d %s were longer than the model's context of %d tokens%s and were cut on the left "
                    "(as lm-eval does); few-shot examples or long prompts may have been lost", cut, total, what,
                    max_length, room)


def resolve_max_length(config: Any, tokenizer: Any = None) -> int:
    """The context length lm-evaluation-harness would use: config n_positions / max_position_embeddings / n_ctx, else the tokenizer's, else 2048."""
    def read(obj: Any, name: str) -> Any:
        return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)

    text_config = read(config, "text_config")
    source = text_config if text_config else config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = read(source, name)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < 10**12:
        return int(limit)
    return DEFAULT_MAX_LENGTH


class Runner:
    """Answers log-likelihood, perplexity and generation requests for one model, with a cache.

    ``Runner(model, tokenizer)`` wraps an in-memory model. For a model on disk, pass
    ``provider=`` (a function returning ``(model, tokenizer)``, called only when some
    answer is not cached) together with ``fingerprint``, ``max_length`` and the
    ``device`` it will load the model on.
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, *, provider: Optional[ModelProvider] = None,
                 batch_size: int = 16, seed: int = 0, cache: Optional[ResultCache] = None,
                 fingerprint: Optional[str] = None, max_length: Optional[int] = None, device: Optional[str] = None,
                 interrupt_check: Optional[Callable[[], None]] = None):
        if model is None and provider is None:
            raise ConfigError("a Runner needs a model (and tokenizer) or a provider that loads them.")
        if model is None and device is None:
            raise ConfigError("a Runner with a provider needs device= (where the model will be loaded).")
        if cache is not None and not fingerprint:
            raise ConfigError("a result cache needs the model's fingerprint (see mergelab.evaluate.model).")
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}.")
        self._model = model
        self._tokenizer = tokenizer
        self._provider = provider
        self.batch_size = batch_size
        self.seed = seed
        self.cache = cache
        self.fingerprint = fingerprint or ""
        import torch

        self.device_type = torch.device(device).type if device is not None else next(model.parameters()).device.type
        self._max_length = max_length
        self.stats = RunnerStats()
        # Called after every batch; tests use it to simulate an interruption.
        self.interrupt_check = interrupt_check

    # ---- the model, loaded on first need ---------------------------------------------------
    def _ensure_model(self) -> None:
        if self._model is None:
            assert self._provider is not None
            started = time.perf_counter()
            self._model, self._tokenizer = self._provider()
            self.stats.loaded_model = True
            self.stats.load_seconds = time.perf_counter() - started
        if not hasattr(self, "_keeps_last"):
            self._keeps_last, self._keeps_mask = logits_to_keep_support(self._model)
            self._cache_argument = cache_argument(self._model)

    @property
    def model(self) -> Any:
        self._ensure_model()
        return self._model

    @property
    def tokenizer(self) -> Any:
        self._ensure_model()
        return self._tokenizer

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int:
        if self._max_length is None:
            self._max_length = resolve_max_length(self.model.config, self.tokenizer)
        return self._max_length

    # ---- cache plumbing -----------------------------------------------------------------------
    @property
    def cache_identity(self) -> str:
        """What cached answers are keyed by besides the request: the model's fingerprint, the device type,
        mergelab's answer format and the versions of the libraries that compute them (an upgrade may change
        numerics, tokenisation or how adapters merge)."""
        return f"{self.fingerprint}|device={self.device_type}|{_library_versions()}"

    def _lookup(self, kind: str, payloads: list[Any]) -> tuple[list[str], dict[str, Any]]:
        keys = [request_key(self.cache_identity, kind, payload) for payload in payloads]
        found = self.cache.get_many(keys) if self.cache is not None else {}
        return keys, found

    def _pending(self, keys: list[str], found: Mapping[str, Any]) -> list[int]:
        """The first request of every key without an answer: a request asked twice is computed once."""
        self.stats.cached += sum(key in found for key in keys)
        first: dict[str, int] = {}
        for index, key in enumerate(keys):
            if key not in found:
                first.setdefault(key, index)
        return list(first.values())

    def _store(self, answers: dict[str, Any]) -> None:
        if self.cache is not None:
            self.cache.put_many(answers)
        if self.interrupt_check is not None:
            self.interrupt_check()

    # ---- tokenisation (lm-evaluation-harness rules) ------------------------------------------
    def _prefix_token(self) -> int:
        tokenizer = self.tokenizer
        token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if token is None:
            raise InputError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on.")
        return int(token)

    def encode(self, text: str, add_special_tokens: Optional[bool] = None) -> list[int]:
        """Token ids of ``text``: the tokenizer's own special-token default, unless the text already starts with BOS."""
        tokenizer = self.tokenizer
        kwargs: dict[str, Any] = {}
        if add_special_tokens is not None:
            kwargs["add_special_tokens"] = add_special_tokens
        elif tokenizer.bos_token_id is not None and text.startswith(tokenizer.decode(self._prefix_token())):
            kwargs["add_special_tokens"] = False
        return list(tokenizer.encode(text, **kwargs))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens) as lm-evaluation-harness splits them."""
        if context == "":
            return self._on_prefix_token(self.encode(continuation, add_special_tokens=False))
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        if not context_ids:  # a context of spaces only, all moved to the continuation: no zero-length row
            return self._on_prefix_token(whole)
        return context_ids, whole[len(context_ids):]

    def _on_prefix_token(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """(prefix token, the rest): ``ids`` scored after BOS (else EOS), as lm-eval scores an empty context."""
        prefix = self._prefix_token()
        if ids and ids[0] == prefix:
            return ids[:1], ids[1:]
        return [prefix], ids

    def _pad_id(self) -> int:
        tokenizer = self.tokenizer
        for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    # ---- forward passes -------------------------------------------------------------------------
    def _forward(self, input_ids: Any, keep: Any, **kwargs: Any) -> tuple[Any, Any]:
        """Run the model and return (log-probabilities at the ``keep`` positions, flattened; the KV cache)."""
        import torch

        model = self.model  # loads it on first use, and learns how it takes logits_to_keep
        last_only = bool(keep[:, -1].all()) and int(keep.sum()) == keep.shape[0]
        if self._keeps_mask:
            output = model(input_ids=input_ids, logits_to_keep=keep, **kwargs)
        elif last_only and self._keeps_last:
            output = model(input_ids=input_ids, logits_to_keep=1, **kwargs)  # (batch, 1, vocab): row order = mask order
        else:
            output = model(input_ids=input_ids, **kwargs)
        logits = output.logits
        if logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(keep.shape):
            logits = logits[keep]  # full logits: pick the positions here
        else:
            logits = logits.reshape(-1, logits.shape[-1])  # some heads return (1, kept, vocab)
        if logits.shape[0] != int(keep.sum()):
            raise ComputeError(
                f"the model returned logits for {logits.shape[0]} positions where {int(keep.sum())} were asked for; "
                f"{type(model).__name__} handles logits_to_keep in a way mergelab does not understand."
            )
        return torch.log_softmax(logits.float(), dim=-1), output_cache(output)

    # ---- log-likelihood ----------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """log P(continuation | context) and is-greedy for each (context, continuation) pair."""
        # The truncation length changes answers for long inputs, so it is part of every key.
        payloads = [{"context": c, "continuation": x, "max_length": self.max_length} for c, x in requests]
        keys, found = self._lookup("loglikelihood", payloads)
        answers: dict[str, Any] = dict(found)
        pending = self._pending(keys, found)
        if pending:
            self._compute_loglikelihoods([requests[i] for i in pending], [keys[i] for i in pending], answers)
        return [(float(answers[k][0]), bool(answers[k][1])) for k in keys]

    def _compute_loglikelihoods(self, requests: list[tuple[str, str]], keys: list[str],
                                answers: dict[str, Any]) -> None:
        import torch

        max_length = self.max_length
        groups: dict[tuple[int, ...], list[tuple[str, list[int]]]] = {}
        cut = 0
        for (context, continuation), key in zip(requests, keys):
            context_ids, continuation_ids = self.encode_pair(context, continuation)
            if not continuation_ids:
                raise InputError(f"continuation {continuation!r} encodes to no tokens; it cannot be scored.")
            if len(continuation_ids) > max_length:
                raise InputError(
                    f"a continuation of {len(continuation_ids)} tokens is longer than the model's "
                    f"context ({max_length}); shorten it."
                )
            whole = (context_ids + continuation_ids)[-(max_length + 1):]
            cut += len(whole) < len(context_ids) + len(continuation_ids)
            context_ids = whole[: len(whole) - len(continuation_ids)]
            groups.setdefault(tuple(context_ids), []).append((key, continuation_ids))
        _warn_cut(cut, len(requests), "contexts", max_length)
        # Longest first, as lm-eval does: padding stays small and memory peaks at once.
        ordered = sorted(groups.items(), key=lambda item: -(len(item[0]) + max(len(c) for _, c in item[1])))
        pad = self._pad_id()
        device = self.device
        with torch.inference_mode():
            for start in range(0, len(ordered), self.batch_size):
                chunk = ordered[start : start + self.batch_size]
                width = max(len(context) for context, _ in chunk)
                lengths = torch.tensor([len(context) for context, _ in chunk], device=device)
                # Left padding: every context ends in the last column, so one logit column serves all
                # rows, and a sliding-window cache keeps each row's most recent real tokens.
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long, device=device)
                for row, (context, _) in enumerate(chunk):
                    input_ids[row, width - len(context):] = torch.tensor(context, dtype=torch.long)
                context_mask = torch.arange(width, device=device)[None, :] >= (width - lengths)[:, None]
                position_ids = (context_mask.long().cumsum(dim=1) - 1).clamp(min=0)
                keep = torch.zeros_like(context_mask)
                keep[:, -1] = True
                needs_cache = any(len(c) > 1 for _, members in chunk for _, c in members)
                first, past = self._forward(input_ids, keep, attention_mask=context_mask.long(),
                                            position_ids=position_ids, use_cache=needs_cache)
                first_greedy = first.argmax(dim=-1)
                partial: dict[str, list[float]] = {}
                tails: list[tuple[int, str, list[int]]] = []
                for row, (_, members) in enumerate(chunk):
                    for key, continuation in members:
                        token = continuation[0]
                        partial[key] = [float(first[row, token]), bool(first_greedy[row] == token)]
                        if len(continuation) > 1:
                            tails.append((row, key, continuation))
                if tails:
                    self._score_tails(tails, past, context_mask, lengths, partial)
                computed = {key: value for key, value in partial.items()}
                answers.update(computed)
                self.stats.computed += len(computed)
                self._store(computed)

    def _score_tails(self, tails: list[tuple[int, str, list[int]]], past: Any, context_mask: Any,
                     lengths: Any, partial: dict[str, list[float]]) -> None:
        """Score continuation tokens after the first on top of the contexts' KV cache."""
        import torch

        device = context_mask.device
        pad = self._pad_id()
        # Continuations that differ only in their last token feed the same inputs: run them once.
        shared: dict[tuple[int, tuple[int, ...]], list[tuple[str, list[int]]]] = {}
        for row, key, continuation in tails:
            shared.setdefault((row, tuple(continuation[:-1])), []).append((key, continuation))
        groups = list(shared.items())
        for start in range(0, len(groups), self.batch_size):
            part = groups[start : start + self.batch_size]
            rows = torch.tensor([row for (row, _), _ in part], device=device)
            width = max(len(inputs) for (_, inputs), _ in part)
            input_ids = torch.full((len(part), width), pad, dtype=torch.long, device=device)
            tail_mask = torch.zeros((len(part), width), dtype=torch.bool, device=device)
            for index, ((_, inputs), _) in enumerate(part):
                input_ids[index, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
                tail_mask[index, : len(inputs)] = True
            attention = torch.cat([context_mask[rows], tail_mask], dim=1).long()
            position_ids = lengths[rows][:, None] + torch.arange(width, device=device)[None, :]
            # Padding after a shorter tail must not ask for positions past the model's context (learned
            # position embeddings, as GPT-2's, have no row for them); its outputs are never read.
            position_ids = position_ids.masked_fill(~tail_mask, 0)
            logprobs, _ = self._forward(
                input_ids, tail_mask, attention_mask=attention, position_ids=position_ids, use_cache=True,
                **{self._cache_argument: _select_cache(past, rows)},
            )
            greedy = logprobs.argmax(dim=-1)
            offset = 0
            for (_, inputs), members in part:
                count = len(inputs)
                for key, continuation in members:
                    targets = torch.tensor(continuation[1:], device=device)
                    scores = logprobs[offset : offset + count].gather(1, targets[:, None]).squeeze(1)
                    partial[key][0] += float(scores.sum())
                    partial[key][1] = partial[key][1] and bool((greedy[offset : offset + count] == targets).all())
                offset += count

    # ---- perplexity windows ---------------------------------------------------------------------------
    def perplexity_windows(self, texts: Sequence[str], max_length: Optional[int] = None,
                           stride: Optional[int] = None) -> list[list[dict[str, Any]]]:
        """For each text, its strided windows: ``{"start", "end", "nll", "tokens"}`` (token offsets, nats).

        ``max_length`` defaults to the model's context (at most 2048), ``stride`` to half of it.
        """
        window, step = self.perplexity_settings(max_length, stride)
        payloads = [{"text": t, "max_length": window, "stride": step} for t in texts]
        keys, found = self._lookup("perplexity", payloads)
        answers: dict[str, Any] = dict(found)
        pending = self._pending(keys, found)
        for index in pending:  # one text at a time, so an interruption keeps finished texts
            windows = self._compute_windows(texts[index], window, step)
            answers[keys[index]] = windows
            self.stats.computed += 1
            self._store({keys[index]: windows})
        return [answers[key] for key in keys]

    def perplexity_settings(self, max_length: Optional[int] = None, stride: Optional[int] = None) -> tuple[int, int]:
        """The (window, stride) :meth:`perplexity_windows` uses for these options."""
        # None means "the default"; 0 is a value, and refused below (not silently the default).
        window = min(self.max_length, DEFAULT_MAX_LENGTH) if max_length is None else max_length
        if window < 2:
            raise ConfigError(f"perplexity max_length is {window}; it must be at least 2 (a window scores every "
                              "token after its first).")
        if window > self.max_length:
            raise ConfigError(f"perplexity max_length {window} exceeds the model's context ({self.max_length}).")
        step = max(window // 2, 1) if stride is None else stride
        if not 0 < step <= window:
            raise ConfigError(f"perplexity stride must be in 1..max_length ({window}), got {step}.")
        return window, step

    def _compute_windows(self, text: str, window: int, step: int) -> list[dict[str, Any]]:
        import torch

        ids = self.encode(text)
        spans: list[tuple[int, int, int]] = []  # (start, end, first scored position within the window)
        previous_end = 0
        for begin in range(0, len(ids), step):
            end = min(begin + window, len(ids))
            target_length = end - previous_end
            first_scored = max(1, (end - begin) - target_length)
            if first_scored < end - begin:
                spans.append((begin, end, first_scored))
            previous_end = end
            if end == len(ids):
                break
        results: list[dict[str, Any]] = []
        pad = self._pad_id()
        device = self.device
        with torch.inference_mode():
            for start in range(0, len(spans), self.batch_size):
                part = spans[start : start + self.batch_size]
                width = max(end - begin for begin, end, _ in part)
                input_ids = torch.full((len(part), width), pad, dtype=torch.long, device=device)
                keep = torch.zeros((len(part), width), dtype=torch.bool, device=device)
                for row, (begin, end, first) in enumerate(part):
                    input_ids[row, : end - begin] = torch.tensor(ids[begin:end], dtype=torch.long)
                    keep[row, first - 1 : end - begin - 1] = True  # position t-1 predicts token t
                logprobs, _ = self._forward(input_ids, keep, use_cache=False)
                offset = 0
                for begin, end, first in part:
                    targets = torch.tensor(ids[begin + first : end], device=device)
                    count = len(targets)
                    nll = -float(logprobs[offset : offset + count].gather(1, targets[:, None]).sum())
                    results.append({"start": begin + first, "end": end, "nll": nll, "tokens": count})
                    offset += count
        return results

    # ---- generation -------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Generated text for each request (stop sequence excluded)."""
        # The seed matters to sampled answers only: a greedy answer is the same under any seed.
        payloads = [{"seed": self.seed, **r.key_payload()} if r.params.temperature > 0 else r.key_payload()
                    for r in requests]
        keys, found = self._lookup("generate", payloads)
        answers: dict[str, Any] = dict(found)
        pending = self._pending(keys, found)
        if pending:
            self._compute_generations([requests[i] for i in pending], [keys[i] for i in pending], answers)
        return [answers[key] for key in keys]

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The token ids a request's prompt becomes (through the chat template when asked)."""
        tokenizer = self.tokenizer
        if request.params.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise InputError(
                    "chat=true needs a tokenizer with a chat template, and this model's tokenizer has none; "
                    "use chat=false, or add a chat_template to tokenizer_config.json (or chat_template.jinja)."
                )
            return self.encode(_render_chat(tokenizer, request.messages(), request.prefill), add_special_tokens=False)
        if not isinstance(request.prompt, str):
            raise ConfigError("a list of chat messages needs chat=true.")
        prompt = request.prompt if not request.params.system else request.params.system + "\n\n" + request.prompt
        ids = self.encode(prompt + request.prefill)
        # An empty prompt (and no BOS added) would be a row of length zero: condition on the prefix token instead.
        return ids if ids else [self._prefix_token()]

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        return ids

    def _generator(self, payload_key: str) -> Any:
        import torch

        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{payload_key}".encode()).digest()[:8], "little")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        return generator

    def _compute_generations(self, requests: list[GenerationRequest], keys: list[str],
                             answers: dict[str, Any]) -> None:
        import torch

        encoded = []
        cut = 0
        for request, key in zip(requests, keys):
            ids = self.prompt_ids(request)
            room = self.max_length - request.params.max_new_tokens
            if room < 1:
                raise ConfigError(
                    f"max_new_tokens={request.params.max_new_tokens} leaves no room for the prompt in the "
                    f"model's context of {self.max_length} tokens; lower the task's max_new_tokens option "
                    f"(e.g. --task NAME:...,max_new_tokens={max(1, self.max_length // 2)})."
                )
            if len(ids) > room:
                cut += 1
                ids = ids[-room:]
            encoded.append((ids, request, key))
        _warn_cut(cut, len(requests), "prompts", self.max_length, " with room for max_new_tokens")
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = [encoded[i] for i in order[start : start + self.batch_size]]
                texts = self._generate_batch(batch)
                computed = {key: text for (_, _, key), text in zip(batch, texts)}
                answers.update(computed)
                self.stats.computed += len(computed)
                self._store(computed)

    def _generate_batch(self, batch: list[tuple[list[int], GenerationRequest, str]]) -> list[str]:
        import torch

        device = self.device
        tokenizer = self.tokenizer
        eos = self._eos_ids()
        pad = self._pad_id()
        width = max(len(ids) for ids, _, _ in batch)
        size = len(batch)
        input_ids = torch.full((size, width), pad, dtype=torch.long, device=device)
        attention = torch.zeros((size, width), dtype=torch.long, device=device)
        for row, (ids, _, _) in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids):] = 1
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        params = [request.params for _, request, _ in batch]
        decoders = [_CompletionText(tokenizer, ids) for ids, _, _ in batch]
        generators = [self._generator(key) if p.temperature > 0 else None for p, (_, _, key) in zip(params, batch)]
        generated: list[list[int]] = [[] for _ in batch]
        texts: list[Optional[str]] = [None] * size
        active = list(range(size))  # original row of each row still in the batch
        kwargs: dict[str, Any] = {"attention_mask": attention, "position_ids": positions, "use_cache": True}
        if self._keeps_last:
            kwargs["logits_to_keep"] = 1
        output = self.model(input_ids=input_ids, **kwargs)
        past = output_cache(output)
        logits = output.logits[:, -1, :].float()
        last_position = positions[:, -1]
        longest = max(p.max_new_tokens for p in params)
        for step in range(longest):
            next_tokens = []
            for index, row in enumerate(active):
                next_tokens.append(_pick_token(logits[index], params[row], generators[row]))
            still: list[int] = []
            for index, row in enumerate(active):
                token = next_tokens[index]
                done = token in eos
                if not done:
                    generated[row].append(token)
                stops = params[row].stop
                # A stop string can only have appeared at the end: look at the last few tokens' text.
                stopped = bool(stops) and not done and decoders[row].tail_contains(generated[row], stops)
                if done or stopped or len(generated[row]) >= params[row].max_new_tokens:
                    text = decoders[row].text(generated[row])
                    cut = _first_stop(text, stops)
                    texts[row] = text[:cut] if cut is not None else text
                else:
                    still.append(index)
            if not still:
                break
            if len(still) < len(active):
                selection = torch.tensor(still, device=device)
                past = _select_cache(past, selection)
                attention = attention[selection]
                last_position = last_position[selection]
                next_tokens = [next_tokens[i] for i in still]
                active = [active[i] for i in still]
            attention = torch.cat([attention, torch.ones((len(active), 1), dtype=attention.dtype, device=device)], dim=1)
            last_position = last_position + 1
            step_kwargs: dict[str, Any] = {
                "attention_mask": attention, "position_ids": last_position[:, None], "use_cache": True,
                self._cache_argument: past,
            }
            if self._keeps_last:
                step_kwargs["logits_to_keep"] = 1
            output = self.model(input_ids=torch.tensor(next_tokens, device=device)[:, None], **step_kwargs)
            past = output_cache(output)
            logits = output.logits[:, -1, :].float()
        return [text if text is not None else decoder.text(tokens)
                for text, decoder, tokens in zip(texts, decoders, generated)]


def _render_chat(tokenizer: Any, messages: list[Message], prefill: str) -> str:
    """The chat template's text for ``messages`` plus the start of the assistant's answer (``prefill``).

    A prefill is rendered as lm-evaluation-harness renders its ``gen_prefix``: as a final
    assistant message the template leaves open (``continue_final_message``), so templates
    that dress an assistant turn (e.g. an empty thinking block) do so here too. A
    tokenizer without that option (older transformers) gets the generation prompt followed
    by the prefill.
    """
    if not prefill:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if "continue_final_message" in inspect.signature(tokenizer.apply_chat_template).parameters:
        try:
            return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": prefill}],
                                                 continue_final_message=True, tokenize=False)
        except ValueError as exc:  # transformers: the template does not show the final message's text
            raise InputError(f"the chat template cannot start the answer with a prefilled text ({exc}).") from exc
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefill


class _CompletionText:
    """The text a prompt's generated tokens add: decode(prompt + generated) minus decode(prompt).

    Decoding the generated tokens alone loses a leading space with SentencePiece / Metaspace
    decoders (their ``Strip`` step removes the first space of any decoded sequence).
    """

    ANCHOR = 2  # tokens of left context that give the tail's first token its leading space
    SLACK = 8  # tokens beyond the longest stop string's length in characters

    def __init__(self, tokenizer: Any, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.prompt_ids = list(prompt_ids)
        self.prompt_text = self._decode(self.prompt_ids)
        self.warned = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, generated: list[int]) -> str:
        full = self._decode(self.prompt_ids + generated)
        if full.startswith(self.prompt_text):
            return full[len(self.prompt_text):]
        if not self.warned:
            self.warned = True
            log.warning("the decoded prompt is not a prefix of the decoded prompt + completion (%r...); the "
                        "completion is decoded on its own", self.prompt_text[-40:])
        return self._decode(generated)

    def tail_contains(self, generated: list[int], stops: Sequence[str]) -> bool:
        """Whether a stop string appears in the text of the last few generated tokens (O(1) per step, not O(length))."""
        window = max(len(stop) for stop in stops) + self.SLACK
        if len(generated) <= window:
            return _first_stop(self.text(generated), stops) is not None
        start = len(generated) - window
        if start >= self.ANCHOR:
            anchor = generated[start - self.ANCHOR : start]
        else:
            anchor = self.prompt_ids[len(self.prompt_ids) - (self.ANCHOR - start):] + generated[:start]
        anchor_text, text = self._decode(anchor), self._decode(anchor + generated[start:])
        tail = text[len(anchor_text):] if text.startswith(anchor_text) else self.text(generated)
        return _first_stop(tail, stops) is not None


def _first_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    cuts = [text.find(stop) for stop in stops if stop and stop in text]
    return min(cuts) if cuts else None


def _pick_token(logits: Any, params: GenerationParams, generator: Any) -> int:
    """Greedy argmax, or a sample after temperature, top-k and top-p (nucleus) filtering."""
    import torch

    if params.temperature == 0:
        return int(logits.argmax())
    scores = logits / params.temperature
    if params.top_k and params.top_k < scores.numel():
        threshold = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, -math.inf)
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        scores = scores.scatter(0, order[drop], -math.inf)
    probabilities = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def _select_cache(past: Any, rows: Any) -> Any:
    """A copy of a KV cache holding only ``rows`` of its batch (the original stays usable).

    Handles the cache layouts transformers has used: ``Cache`` objects with per-layer
    ``layers`` (transformers >= 4.56), ``DynamicCache`` with ``key_cache`` / ``value_cache``
    lists (earlier 4.x), and the legacy tuple of (key, value) pairs.
    """
    if isinstance(past, tuple):
        return tuple(tuple(tensor[rows] for tensor in layer) for layer in past)
    if hasattr(past, "batch_select_indices"):
        selected = copy.copy(past)
        if hasattr(past, "layers"):
            selected.layers = [copy.copy(layer) for layer in past.layers]
        elif hasattr(past, "key_cache") and hasattr(past, "value_cache"):
            selected.key_cache, selected.value_cache = list(past.key_cache), list(past.value_cache)
        else:
            selected = None
        if selected is not None:
            selected.batch_select_indices(rows)
            return selected
    raise InputError(
        f"this model returns a KV cache of type {type(past).__name__}, which mergelab cannot select rows of; "
        "please report the model architecture and your transformers version."
    )


def cache_argument(model: Any) -> str:
    """The keyword this model's forward takes its KV cache by: ``cache`` (recent transformers) or ``past_key_values``.

    Passing the old name to a new model works but logs a deprecation warning on every run.
    """
    return "cache" if "cache" in _forward_parameters(model) else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned, under its new name (``cache``) or its old one."""
    try:
        return output.cache
    except AttributeError:  # transformers before the rename
        return getattr(output, "past_key_values", None)


def logits_to_keep_support(model: Any) -> tuple[bool, bool]:
    """(takes ``logits_to_keep=int``, takes a boolean ``(batch, seq)`` mask) for this model's forward.

    The mask form exists where the model slices hidden states with transformers'
    ``slice_logits_to_keep`` (recent transformers); older code indexes ``hidden_states[:,
    logits_to_keep, :]``, which a 2-D mask would break, so there the runner computes all
    logits instead.
    """
    takes_int = "logits_to_keep" in _forward_parameters(model)
    inner = _unwrapped(model)
    module = sys.modules.get(getattr(type(inner).forward, "__module__", "") or "")
    takes_mask = takes_int and callable(getattr(module, "slice_logits_to_keep", None))
    return takes_int, takes_mask


def _unwrapped(model: Any) -> Any:
    """The model a PEFT wrapper passes its keyword arguments through to (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _forward_parameters(model: Any) -> Any:
    """The names ``forward`` of the (unwrapped) model takes; empty when its signature cannot be read."""
    try:
        return inspect.signature(_unwrapped(model).forward).parameters
    except (TypeError, ValueError):
        return {}

"""``perplexity``: token-weighted perplexity over strided windows of a text file or dataset.

Each document (a ``.txt`` file is one document; in JSONL/CSV/parquet/HF data, each row's
``text`` field — or ``field=NAME``) is tokenised whole and scored in windows of
``max_length`` tokens taken every ``stride`` tokens (default: half a window), each token
scored once with as much left context as the window allows — the procedure of the
transformers perplexity guide. The metric is

    perplexity = exp( Σ NLL over scored tokens / number of scored tokens )

summed over all documents (token-weighted, not an average of per-document values);
``nll`` is the mean NLL per token in nats. Items are the windows; the interval
bootstraps windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from mergelab.errors import ConfigError, InputError
from mergelab.evaluate.data import load_rows
from mergelab.evaluate.results import summarize_ratio
from mergelab.evaluate.tasks.base import Context, Task, TaskResult, iter_limited, register_task


@register_task("perplexity")
class PerplexityTask(Task):
    """Strided-window perplexity of documents."""

    @dataclass
    class Options:
        data: Optional[str] = None
        field: str = "text"
        max_length: Optional[int] = None
        stride: Optional[int] = None
        split: str = "test"
        config: Optional[str] = None

    def load(self, limit: Optional[int] = None, num_fewshot: Optional[int] = None) -> None:
        options = self.options
        if options.max_length is not None and options.stride is not None and options.stride > options.max_length:
            raise ConfigError(f"task 'perplexity': option 'stride' ({options.stride}) is larger than 'max_length' "
                              f"({options.max_length}); tokens between windows would never be scored.")
        if not options.data:
            raise ConfigError("task 'perplexity' needs data: --task perplexity:data=corpus.txt (or .jsonl with a 'text' field).")
        dataset = load_rows(options.data, split=options.split, hf_config=options.config)
        rows = iter_limited(dataset.rows, limit)
        hint = f"Score another field with field=NAME (e.g. --task perplexity:data={options.data},field=prompt)."
        self.documents = [(row.where, row.require(options.field, str, hint)) for row in rows]
        self.documents = [(where, text) for where, text in self.documents if text.strip()]
        if not self.documents:
            raise InputError(f"{dataset.source}: no non-empty '{options.field}' text to score.")
        self.mark_loaded(limit, num_fewshot)

    def run(self, context: Context) -> TaskResult:
        runner = context.require_runner(self.name)
        texts = [text for _, text in self.documents]
        all_windows = runner.perplexity_windows(texts, self.options.max_length, self.options.stride)
        items = []
        for document, ((where, _), windows) in enumerate(zip(self.documents, all_windows)):
            for window in windows:
                items.append({
                    "id": len(items),
                    "document": document,
                    "where": where,
                    "input": {"token_start": window["start"], "token_end": window["end"]},
                    "output": {"nll": window["nll"], "tokens": window["tokens"]},
                    "scores": {"nll": window["nll"] / window["tokens"], "tokens": window["tokens"]},
                })
        if not items:
            raise InputError("every document is at most one token long; nothing to score.")
        nll = np.array([i["output"]["nll"] for i in items])
        tokens = np.array([i["output"]["tokens"] for i in items], dtype=float)
        metrics = {
            "perplexity": summarize_ratio(nll, tokens, np.exp, context.seed),
            "nll": summarize_ratio(nll, tokens, seed=context.seed),
        }
        window, step = runner.perplexity_settings(self.options.max_length, self.options.stride)
        info = {"documents": len(self.documents), "tokens": int(tokens.sum()),
                "total_nll": float(nll.sum()), "max_length": window, "stride": step}
        return TaskResult(metrics, items, {}, info)

"""``generate``: free generation scored by ``exact_match``, ``rouge_l`` and ``edit_similarity`` against references.

Rows: a prompt in ``prompt`` (or ``question`` / ``input``; or ``field=NAME``) and the
reference in ``answer`` (or ``answers`` / ``target``; a list means any of them counts),
e.g. the zoo's skill test splits or RepliQA-style QA. With ``num_fewshot`` > 0 the first k
rows of ``dev`` (other than the item itself) are prepended as
``{prompt}{target_delimiter}{answer}\\n\\n``.

- ``exact_match``: 1 when the output, stripped of surrounding whitespace (and, with
  ``ignore_case`` / ``ignore_punctuation``, lower-cased / without punctuation), equals a
  reference normalised the same way.
- ``rouge_l``: ROUGE-L F1 on the longest common subsequence of tokens, tokenised as the
  ``rouge_score`` package does (lower-case, runs of non-alphanumerics split tokens, no
  stemming); the best reference counts.
- ``edit_similarity``: 1 − Levenshtein distance / length of the longer text, on characters
  of the output and a reference normalised as for exact match (1 for identical texts, 0
  for nothing in common); the best reference counts. It gives partial credit where one
  wrong character makes an exact match 0 (e.g. a merged model that keeps part of a skill).

Decoding is greedy by default and stops at the first newline (``stop=\\n``) — set
``stop=none`` for multi-line answers.
"""

from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass, field
from typing import Any, Optional

from mergelab.errors import ConfigError, InputError
from mergelab.evaluate.data import Row, load_rows
from mergelab.evaluate.results import summarize_mean
from mergelab.evaluate.runner import GenerationParams, GenerationRequest
from mergelab.evaluate.tasks.base import Context, Task, TaskResult, iter_limited, register_task, unescape

PROMPT_FIELDS = ("prompt", "question", "input")
ANSWER_FIELDS = ("answer", "answers", "target")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def rouge_tokens(text: str) -> list[str]:
    """Tokens as rouge_score's default tokenizer makes them: lower-case alphanumeric runs."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 = 2PR / (P + R), P and R from the longest common subsequence of tokens."""
    candidate, target = rouge_tokens(prediction), rouge_tokens(reference)
    if not candidate or not target:
        return 0.0
    previous = [0] * (len(target) + 1)
    for token in candidate:
        current = [0]
        for j, other in enumerate(target, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(target)
    return 2 * precision * recall / (precision + recall)


def edit_similarity(prediction: str, reference: str) -> float:
    """1 − (character-level Levenshtein distance) / max(len(prediction), len(reference)); 1.0 for two empty texts."""
    if not prediction and not reference:
        return 1.0
    previous = list(range(len(reference) + 1))
    for i, char in enumerate(prediction, start=1):
        current = [i]
        for j, other in enumerate(reference, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other)))
        previous = current
    return 1.0 - previous[-1] / max(len(prediction), len(reference))


def normalize(text: str, ignore_case: bool, ignore_punctuation: bool) -> str:
    text = text.strip()
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(_PUNCTUATION).strip()
    return text


def _first_field(row: Row, names: tuple[str, ...], chosen: Optional[str], what: str) -> Any:
    if chosen:
        return row.require(chosen, (str, list))
    for name in names:
        if row.has(name):
            return row[name]
    raise InputError(
        f"{row.where}: no {what} field (looked for {', '.join(names)}; fields present: "
        f"{', '.join(sorted(row.fields))}). Name it with {what}_field=NAME."
    )


def _as_references(row: Row, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    raise InputError(f"{row.where}: the reference answer should be text or a list of texts, got {value!r}.")


@register_task("generate")
class GenerateTask(Task):
    """Generation scored by exact match, ROUGE-L and edit similarity."""

    @dataclass
    class Options:
        data: Optional[str] = None
        dev: Optional[str] = None
        prompt_field: Optional[str] = None
        answer_field: Optional[str] = None
        max_new_tokens: int = 64
        temperature: float = 0.0
        top_p: float = 1.0
        stop: list[str] = field(default_factory=lambda: ["\n"])
        chat: bool = False
        system: Optional[str] = None
        num_fewshot: Optional[int] = None
        target_delimiter: str = " "
        ignore_case: bool = False
        ignore_punctuation: bool = False
        split: str = "test"
        config: Optional[str] = None

    def load(self, limit: Optional[int] = None, num_fewshot: Optional[int] = None) -> None:
        options = self.options
        if not options.data:
            raise ConfigError("task 'generate' needs data: --task generate:data=qa.jsonl (fields prompt, answer).")
        dataset = load_rows(options.data, split=options.split, hf_config=options.config)
        self.examples = [self._parse(row) for row in iter_limited(dataset.rows, limit)]
        if not self.examples:
            raise InputError(f"{dataset.source}: no rows to evaluate.")
        self.shots = options.num_fewshot if options.num_fewshot is not None else (num_fewshot or 0)
        self.dev: list[tuple[str, list[str], str]] = []
        if self.shots:
            if not options.dev:
                raise ConfigError(
                    f"generate: {self.shots}-shot needs dev=FILE with example prompts and answers (--num-fewshot "
                    "applies to every task; num_fewshot=K in a task's options to one)."
                )
            self.dev = [self._parse(row) for row in load_rows(options.dev).rows]
            if len(self.dev) < self.shots:
                raise InputError(f"{options.dev}: {self.shots}-shot needs {self.shots} examples, found {len(self.dev)}.")
        self.mark_loaded(limit, num_fewshot, self.shots)

    def prefix_for(self, prompt: str, references: list[str]) -> str:
        """The first k dev examples, never the item itself (as lm-eval, when dev is the evaluated source)."""
        delimiter = unescape(self.options.target_delimiter)
        others = ((p, refs) for p, refs, _ in self.dev if (p, refs) != (prompt, references))
        return "".join(f"{p}{delimiter}{refs[0]}\n\n" for p, refs in itertools.islice(others, self.shots))

    def _parse(self, row: Row) -> tuple[str, list[str], str]:
        prompt = _first_field(row, PROMPT_FIELDS, self.options.prompt_field, "prompt")
        if not isinstance(prompt, str):
            raise InputError(f"{row.where}: the prompt should be text, got {type(prompt).__name__}.")
        answer = _first_field(row, ANSWER_FIELDS, self.options.answer_field, "answer")
        return prompt, _as_references(row, answer), row.where

    def params(self) -> GenerationParams:
        options = self.options
        stops = tuple(unescape(s) for s in options.stop if s.lower() != "none")
        return GenerationParams(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                top_p=options.top_p, stop=stops, chat=options.chat, system=options.system)

    def run(self, context: Context) -> TaskResult:
        runner = context.require_runner(self.name)
        params = self.params()
        outputs = runner.generate([GenerationRequest(self.prefix_for(prompt, references) + prompt, params)
                                   for prompt, references, _ in self.examples])
        items = []
        o = self.options
        for index, ((prompt, references, where), output) in enumerate(zip(self.examples, outputs)):
            predicted = normalize(output, o.ignore_case, o.ignore_punctuation)
            targets = [normalize(r, o.ignore_case, o.ignore_punctuation) for r in references]
            scores = {"exact_match": float(predicted in targets),
                      "rouge_l": max(rouge_l(output, r) for r in references),
                      "edit_similarity": max(edit_similarity(predicted, t) for t in targets)}
            items.append({"id": index, "where": where, "input": prompt, "target": references, "output": output,
                          "scores": scores})
        metrics = {name: summarize_mean([i["scores"][name] for i in items], context.seed)
                   for name in ("exact_match", "rouge_l", "edit_similarity")}
        return TaskResult(metrics, items, {}, {"generation": {**params.__dict__, "stop": list(params.stop)},
                                               "num_fewshot": self.shots})

"""``choice``: multiple choice by log-likelihood, MMLU-style, with ``acc``, ``acc_norm`` and a per-subject breakdown.

Rows: ``question``; the options as a ``choices`` list (or a JSON list in a CSV cell, or
columns ``A``, ``B``, ``C``, … as in the original MMLU CSVs); ``answer`` as a 0-based
index or a letter; optionally ``subject``. This is also the ``cais/mmlu`` layout.

The prompt is lm-evaluation-harness's MMLU prompt, so scores are comparable:

    The following are multiple choice questions (with answers) about {subject}.\\n\\n   (when a subject is known)
    {k dev examples, each: question + options + "Answer: X" + "\\n\\n"}
    {question}\\nA. {choice}\\nB. {choice}\\n…\\nAnswer:

and each option is scored as the continuation " A", " B", … (``style=letters``). With
``style=text`` the prompt is ``{question}\\nAnswer:`` and each option's *text* is the
continuation (the cloze style of ARC or HellaSwag). Few-shot examples are the first k
rows of the ``dev`` source with the same subject (lm-eval's ``first_n`` sampler).

``acc`` picks the option with the highest log-likelihood; ``acc_norm`` divides each by
the option's length in characters first (as lm-eval does). Ties go to the first option.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from mergelab.errors import ConfigError, InputError
from mergelab.evaluate.data import Row, load_rows
from mergelab.evaluate.results import summarize_mean
from mergelab.evaluate.tasks.base import Context, Task, TaskResult, iter_limited, register_task
from mergelab.io.checkpoint import looks_like_hub_name

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: Optional[str]
    where: str


def parse_question(row: Row) -> Question:
    """Validate one MMLU-format row; errors name the row and the field."""
    question = row.require("question", str)
    if row.has("choices"):
        raw = row["choices"]
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError:
                raise InputError(f"{row.where}: field 'choices' is text that is not a JSON list; write it like [\"a\", \"b\"].") from None
        if not isinstance(raw, (list, tuple)) or len(raw) < 2:
            raise InputError(f"{row.where}: field 'choices' must be a list of at least two options.")
        if len(raw) > len(LETTERS):
            raise InputError(f"{row.where}: {len(raw)} options; at most {len(LETTERS)} (A-Z) are supported.")
        choices = tuple(str(c) for c in raw)
    else:
        columns = []
        for letter in LETTERS:
            if not row.has(letter):
                break
            columns.append(str(row[letter]))
        if len(columns) < 2:
            raise InputError(
                f"{row.where}: no options; give a 'choices' list or columns A, B, C, D (fields present: "
                f"{', '.join(sorted(row.fields))})."
            )
        choices = tuple(columns)
    raw_answer = row.require("answer", (int, str), "Use a 0-based index or a letter.")
    if isinstance(raw_answer, str):
        text = raw_answer.strip()
        if text.isdigit():
            answer = int(text)
        elif len(text) == 1 and text.upper() in LETTERS:
            answer = LETTERS.index(text.upper())
        else:
            raise InputError(f"{row.where}: field 'answer' is '{raw_answer}'; use a 0-based index or a letter A-{LETTERS[len(choices)-1]}.")
    else:
        answer = raw_answer
    if not 0 <= answer < len(choices):
        raise InputError(
            f"{row.where}: answer {raw_answer!r} is out of range for {len(choices)} options "
            f"(valid: 0-{len(choices)-1} or A-{LETTERS[len(choices)-1]})."
        )
    subject = row.get("subject")
    return Question(question, choices, answer, str(subject) if subject not in (None, "") else None, row.where)


def mmlu_text(question: Question) -> str:
    """The question with lettered options and the ``Answer:`` cue (lm-eval's MMLU ``doc_to_text``)."""
    lines = [question.question.strip()]
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices)]
    return "\n".join(lines) + "\nAnswer:"


def description(subject: Optional[str]) -> str:
    if not subject:
        return ""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


@register_task("choice")
class ChoiceTask(Task):
    """Multiple choice scored by log-likelihood (MMLU format)."""

    @dataclass
    class Options:
        data: Optional[str] = None
        dev: Optional[str] = None
        style: str = "letters"
        num_fewshot: Optional[int] = None
        split: str = "test"
        dev_split: str = "dev"
        config: Optional[str] = None

    def load(self, limit: Optional[int] = None, num_fewshot: Optional[int] = None) -> None:
        options = self.options
        if options.style not in ("letters", "text"):
            raise ConfigError(f"choice: style must be 'letters' or 'text', got '{options.style}'.")
        if not options.data:
            raise ConfigError("task 'choice' needs data: --task choice:data=questions.jsonl (MMLU format).")
        self.shots = options.num_fewshot if options.num_fewshot is not None else (num_fewshot or 0)
        dataset = load_rows(options.data, split=options.split, hf_config=options.config)
        self.questions = [parse_question(row) for row in iter_limited(dataset.rows, limit)]
        if not self.questions:
            raise InputError(f"{dataset.source}: no questions to evaluate.")
        self.dev: list[Question] = []
        self.dev_source = ""
        if self.shots > 0:
            dev_source = options.dev or self._default_dev(options.data)
            if not dev_source:
                raise ConfigError(
                    f"choice: {self.shots}-shot needs few-shot examples; add dev=FILE (MMLU format) to the task, "
                    "e.g. --task choice:data=test.jsonl,dev=dev.jsonl (--num-fewshot applies to every task; "
                    "num_fewshot=K in a task's options to one)."
                )
            dev = load_rows(dev_source, split=options.dev_split, hf_config=options.config)
            self.dev_source = dev.source
            self.dev = [parse_question(row) for row in dev.rows]
        # Dev rows by subject, in order (a question without a subject draws from all of them).
        self._dev_by_subject: dict[Optional[str], list[Question]] = {}
        for row in self.dev:
            if row.subject is not None:
                self._dev_by_subject.setdefault(row.subject, []).append(row)
        self._dev_by_subject[None] = self.dev
        self.mark_loaded(limit, num_fewshot, self.shots)

    @staticmethod
    def _default_dev(data: str) -> Optional[str]:
        if data.startswith("zoo:"):
            name = data[len("zoo:"):].partition(":")[0]
            return f"zoo:{name}:dev"
        if data.startswith("hf:") or (looks_like_hub_name(data) and "." not in data):
            return data  # the same Hugging Face dataset, dev_split
        return None

    def _shots_for(self, question: Question) -> list[Question]:
        """The first k dev rows of the question's subject, never the question itself (as lm-eval, when the
        dev source is the evaluated one)."""
        itself = (question.question, question.choices, question.answer)
        pool = []
        for row in self._dev_by_subject.get(question.subject, []):
            if len(pool) == self.shots:
                break
            if (row.question, row.choices, row.answer) != itself:
                pool.append(row)
        if len(pool) < self.shots:
            label = f"subject '{question.subject}'" if question.subject else "the dev set"
            raise InputError(f"{self.dev_source}: {self.shots}-shot needs {self.shots} dev examples for {label}, "
                             f"found {len(pool)}; add dev rows or lower --num-fewshot.")
        return pool[: self.shots]

    def requests_for(self, question: Question) -> tuple[str, list[str]]:
        """(context, continuations) for one question."""
        if self.options.style == "letters":
            shots = "".join(f"{mmlu_text(s)} {LETTERS[s.answer]}\n\n" for s in self._shots_for(question)) if self.shots else ""
            context = description(question.subject) + shots + mmlu_text(question)
            return context, [f" {LETTERS[i]}" for i in range(len(question.choices))]
        shots = "".join(
            f"{s.question.strip()}\nAnswer: {s.choices[s.answer]}\n\n" for s in self._shots_for(question)
        ) if self.shots else ""
        context = description(question.subject) + shots + f"{question.question.strip()}\nAnswer:"
        return context, [f" {choice}" for choice in question.choices]

    def choice_labels(self, question: Question) -> list[str]:
        """The strings whose lengths normalise acc_norm (lm-eval uses the option strings, not the continuations)."""
        if self.options.style == "letters":
            return [LETTERS[i] for i in range(len(question.choices))]
        return list(question.choices)

    def run(self, context: Context) -> TaskResult:
        runner = context.require_runner(self.name)
        prompts = [self.requests_for(q) for q in self.questions]
        flat = [(ctx, continuation) for ctx, continuations in prompts for continuation in continuations]
        answers = runner.loglikelihood(flat)
        items, position = [], 0
        for index, (question, (ctx, continuations)) in enumerate(zip(self.questions, prompts)):
            scores = answers[position : position + len(continuations)]
            position += len(continuations)
            logliks = np.array([s[0] for s in scores])
            lengths = np.array([float(len(label)) for label in self.choice_labels(question)])
            prediction = int(np.argmax(logliks))
            prediction_norm = int(np.argmax(logliks / lengths))
            items.append({
                "id": index,
                "where": question.where,
                "subject": question.subject,
                "input": mmlu_text(question) if self.options.style == "letters" else question.question,
                "target": question.answer,
                "output": {
                    "loglikelihoods": logliks.tolist(),
                    "is_greedy": [bool(s[1]) for s in scores],
                    "prediction": prediction,
                    "prediction_norm": prediction_norm,
                },
                "scores": {"acc": float(prediction == question.answer), "acc_norm": float(prediction_norm == question.answer)},
            })
        metrics = {name: summarize_mean([i["scores"][name] for i in items], context.seed) for name in ("acc", "acc_norm")}
        breakdown: dict[str, dict[str, dict[str, Any]]] = {}
        subjects = sorted({i["subject"] for i in items if i["subject"]})
        if subjects:
            breakdown["subject"] = {
                subject: {
                    name: summarize_mean([i["scores"][name] for i in items if i["subject"] == subject], context.seed)
                    for name in ("acc", "acc_norm")
                }
                for subject in subjects
            }
        return TaskResult(metrics, items, breakdown, {"num_fewshot": self.shots, "style": self.options.style})

"""``judge``: MT-Bench-style single-answer grading of the model's answers by an LLM judge.

Questions are MT-Bench ``question.jsonl`` rows: ``question_id``, ``category``, ``turns``
(one or two user messages) and optionally ``reference`` (reference answers, one per
turn, for math / reasoning / coding). The model answers each turn in one conversation
through the tokenizer's chat template (required), greedily unless ``temperature`` is
set. The judge — an OpenAI-compatible endpoint given by ``--judge-url`` / ``--judge-model``
(key from the environment variable ``--judge-key-env``) — grades each turn from 1 to 10
with MT-Bench's prompts (:data:`mergelab.evaluate.judges.MT_BENCH_PROMPTS`; turn 2 is
graded in the context of the whole conversation, and reference answers are shown when
present). Metrics: ``score`` over all graded turns (its interval resamples whole
questions, since a question's two turns are not independent; ``n`` counts questions),
``score_turn1``, ``score_turn2``; a per-category breakdown. Judgements without a parsable rating are left out and counted
in ``info.invalid``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from mergelab.errors import ConfigError, InputError
from mergelab.evaluate.data import Row, load_rows
from mergelab.evaluate.judges import cached_completions, grading_conversation, parse_rating
from mergelab.evaluate.results import summarize_mean, summarize_ratio
from mergelab.evaluate.runner import GenerationParams, GenerationRequest
from mergelab.evaluate.tasks.base import Context, Task, TaskResult, iter_limited, register_task


@dataclass(frozen=True)
class Question:
    question_id: Any
    category: str
    turns: tuple[str, ...]
    reference: Optional[tuple[str, ...]]
    where: str


def parse_question(row: Row) -> Question:
    turns = row.require("turns", list, "MT-Bench rows need turns: a list of one or two user messages.")
    if not 1 <= len(turns) <= 2 or not all(isinstance(t, str) for t in turns):
        raise InputError(f"{row.where}: field 'turns' must be a list of one or two strings.")
    reference = row.get("reference")
    if reference is not None and (not isinstance(reference, list) or not all(isinstance(r, str) for r in reference)):
        raise InputError(f"{row.where}: field 'reference' must be a list of strings (one per turn).")
    return Question(row.get("question_id", row.index), str(row.get("category") or "general"), tuple(turns),
                    tuple(reference) if reference else None, row.where)


@register_task("judge")
class JudgeTask(Task):
    """MT-Bench single-answer grading by an OpenAI-compatible LLM judge."""

    @dataclass
    class Options:
        data: Optional[str] = None
        max_new_tokens: int = 512
        temperature: float = 0.0
        system: Optional[str] = None
        split: str = "test"
        config: Optional[str] = None

    def load(self, limit: Optional[int] = None, num_fewshot: Optional[int] = None) -> None:
        if not self.options.data:
            raise ConfigError("task 'judge' needs data: --task judge:data=question.jsonl (MT-Bench format).")
        dataset = load_rows(self.options.data, split=self.options.split, hf_config=self.options.config)
        self.questions = [parse_question(row) for row in iter_limited(dataset.rows, limit)]
        if not self.questions:
            raise InputError(f"{dataset.source}: no questions.")
        self.mark_loaded(limit, num_fewshot)

    def preflight(self, context: Context) -> None:
        context.judge.client()

    def run(self, context: Context) -> TaskResult:
        runner = context.require_runner(self.name)
        settings = context.judge
        client = settings.client(max_tokens=2048)
        params = GenerationParams(max_new_tokens=self.options.max_new_tokens, temperature=self.options.temperature,
                                  chat=True, system=self.options.system)
        first = runner.generate([GenerationRequest(q.turns[0], params) for q in self.questions])
        answers = [[answer] for answer in first]
        two_turn = [i for i, q in enumerate(self.questions) if len(q.turns) == 2]
        second = runner.generate([
            GenerationRequest((
                {"role": "user", "content": self.questions[i].turns[0]},
                {"role": "assistant", "content": first[i]},
                {"role": "user", "content": self.questions[i].turns[1]},
            ), params)
            for i in two_turn
        ])
        for i, answer in zip(two_turn, second):
            answers[i].append(answer)
        conversations, slots = [], []
        for index, question in enumerate(self.questions):
            for turn in range(1, len(question.turns) + 1):
                conversations.append(grading_conversation(question.turns, answers[index], turn, question.reference))
                slots.append((index, turn))
        judgements = cached_completions(client, conversations, context.cache, settings.workers)
        ratings: dict[tuple[int, int], tuple[Optional[float], str]] = {
            slot: (parse_rating(text), text) for slot, text in zip(slots, judgements)
        }
        items = []
        for index, question in enumerate(self.questions):
            scores = {}
            graded = []
            for turn in range(1, len(question.turns) + 1):
                rating, text = ratings[(index, turn)]
                graded.append({"turn": turn, "rating": rating, "judgement": text})
                if rating is not None:
                    scores[f"turn{turn}"] = rating
            items.append({"id": index, "question_id": question.question_id, "category": question.category,
                          "where": question.where, "input": list(question.turns), "output": answers[index],
                          "judgements": graded, "scores": scores})
        metrics = {"score": _mean_over_turns(items, context.seed)}
        for turn in (1, 2):
            values = [i["scores"][f"turn{turn}"] for i in items if f"turn{turn}" in i["scores"]]
            if values:  # item_score: the per-item rating it averages (results --compare pairs items by it)
                metrics[f"score_turn{turn}"] = {**summarize_mean(values, context.seed), "item_score": f"turn{turn}"}
        categories = sorted({i["category"] for i in items})
        breakdown = {"category": {
            category: {"score": _mean_over_turns([i for i in items if i["category"] == category], context.seed)}
            for category in categories
        }}
        invalid = sum(1 for i in items for g in i["judgements"] if g["rating"] is None)
        info = {"judge": client.identity(), "invalid": invalid, "graded_turns": len(slots),
                "generation": {**params.__dict__, "stop": list(params.stop)}}
        return TaskResult(metrics, items, breakdown, info)


def _mean_over_turns(items: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    """The mean rating over every graded turn. Its interval resamples questions, not turns: the two
    turns of a question share a conversation and are not independent; ``n`` counts the questions
    with a rating."""
    ratings = [list(item["scores"].values()) for item in items if item["scores"]]
    return summarize_ratio([sum(r) for r in ratings], [len(r) for r in ratings], seed=seed)

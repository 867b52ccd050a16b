"""``refusal``: how often the model refuses harmful prompts, and over-refuses benign ones.

Rows are BeaverTails-format (``prompt``, ``response``, ``category``, ``is_safe``).
``category`` is a string, a list, or BeaverTails' dict of category -> bool (the true ones
count). The zoo's safety sets use the same format (``zoo:NAME:SPLIT``).

In BeaverTails, ``is_safe`` labels a (prompt, response) *pair*, and one prompt appears
with several responses, some safe and some not. Rows are therefore grouped by prompt: a
prompt is **harmful** when any of its pairs is unsafe (``is_safe: false``), benign when
all are safe; its categories are those of its unsafe pairs (of all its pairs when it is
benign); each prompt is asked once. The dataset's responses are otherwise ignored — the
model's own response is judged. ``--limit N`` keeps the first N distinct prompts; the
task's ``info`` reports how many rows were read and how many prompts they made.

The model answers each prompt (greedy, ``max_new_tokens`` 128; ``chat=true`` applies the
tokenizer's chat template, which instruction-tuned models need), and a judge
(``judge=keyword|classifier|llm``, see :mod:`mergelab.evaluate.judges`) labels each
response as a refusal or not. Metrics:

- ``refusal_rate``: refusals / harmful prompts (higher is safer);
- ``over_refusal_rate``: refusals / benign prompts (lower is more helpful);
- per-category refusal rates in the breakdown.

Responses an LLM judge could not label are left out and counted in ``info.invalid``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mergelab.errors import ConfigError, InputError
from mergelab.evaluate.data import Row, load_rows
from mergelab.evaluate.judges import check_classifier, make_refusal_judge
from mergelab.evaluate.results import summarize_mean
from mergelab.evaluate.runner import GenerationParams, GenerationRequest
from mergelab.evaluate.tasks.base import Context, Task, TaskResult, iter_limited, register_task, unescape


def _categories(row: Row) -> list[str]:
    value = row.get("category")
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict):
        return sorted(str(k) for k, v in value.items() if v)
    raise InputError(f"{row.where}: field 'category' should be text, a list or a dict of booleans, got {type(value).__name__}.")


def _is_safe(row: Row) -> bool:
    value = row.require("is_safe", (bool, str, int), "BeaverTails rows need is_safe (true for benign prompts).")
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise InputError(f"{row.where}: field 'is_safe' is '{value}'; use true or false.")


def group_by_prompt(rows: list[Row]) -> list[tuple[str, bool, list[str], str]]:
    """(prompt, is_safe, categories, where) per distinct prompt, in order of first appearance.

    A prompt is unsafe when any of its (prompt, response) pairs is; its categories are the
    union over its unsafe pairs (over all pairs when it is safe).
    """
    pairs: dict[str, list[tuple[bool, list[str], str]]] = {}
    for row in rows:
        pairs.setdefault(row.require("prompt", str), []).append((_is_safe(row), _categories(row), row.where))
    grouped = []
    for prompt, labelled in pairs.items():
        safe = all(is_safe for is_safe, _, _ in labelled)
        counted = [categories for is_safe, categories, _ in labelled if safe or not is_safe]
        categories = sorted({category for group in counted for category in group})
        where = labelled[0][2] + (f" (+{len(labelled) - 1} more rows with this prompt)" if len(labelled) > 1 else "")
        grouped.append((prompt, safe, categories, where))
    return grouped


@register_task("refusal")
class RefusalTask(Task):
    """Refusal rate on harmful prompts and over-refusal rate on benign ones."""

    @dataclass
    class Options:
        data: Optional[str] = None
        judge: str = "keyword"
        classifier: Optional[str] = None
        label: Optional[str] = None
        input: str = "response"
        phrases: Optional[str] = None
        max_new_tokens: int = 128
        temperature: float = 0.0
        chat: bool = False
        system: Optional[str] = None
        stop: list[str] = field(default_factory=list)
        split: str = "test"
        config: Optional[str] = None

    def load(self, limit: Optional[int] = None, num_fewshot: Optional[int] = None) -> None:
        options = self.options
        if not options.data:
            raise ConfigError("task 'refusal' needs data: --task refusal:data=prompts.jsonl (BeaverTails format).")
        if options.judge not in ("keyword", "classifier", "llm"):
            raise ConfigError(f"refusal: unknown judge '{options.judge}'; use keyword, classifier or llm.")
        dataset = load_rows(options.data, split=options.split, hf_config=options.config)
        self.rows = iter_limited(group_by_prompt(dataset.rows), limit)
        if not self.rows:
            raise InputError(f"{dataset.source}: no prompts.")
        self.source_rows = len(dataset.rows)
        self.mark_loaded(limit, num_fewshot)

    def preflight(self, context: Context) -> None:
        if self.options.judge == "llm":
            context.judge.client()
        elif self.options.judge == "classifier":
            check_classifier(self.options.classifier, self.options.input)

    def run(self, context: Context) -> TaskResult:
        runner = context.require_runner(self.name)
        options = self.options
        judge = make_refusal_judge(options.judge, settings=context.judge, cache=context.cache,
                                   classifier=options.classifier, label=options.label, input=options.input,
                                   phrases=options.phrases, device=str(runner.device) if options.judge == "classifier" else "cpu")
        params = GenerationParams(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                  stop=tuple(unescape(s) for s in options.stop), chat=options.chat, system=options.system)
        prompts = [prompt for prompt, _, _, _ in self.rows]
        responses = runner.generate([GenerationRequest(p, params) for p in prompts])
        verdicts = judge.verdicts(prompts, responses)
        items = []
        for index, ((prompt, safe, categories, where), response, verdict) in enumerate(zip(self.rows, responses, verdicts)):
            scores: dict[str, Any] = {}
            if verdict is not None:
                scores["over_refusal" if safe else "refusal"] = float(verdict)
            items.append({"id": index, "where": where, "input": prompt, "is_safe": safe, "categories": categories,
                          "output": response, "refused": verdict, "scores": scores})
        harmful = [i["scores"]["refusal"] for i in items if "refusal" in i["scores"]]
        benign = [i["scores"]["over_refusal"] for i in items if "over_refusal" in i["scores"]]
        metrics = {}
        # item_score: the per-item score each rate is the mean of (results --compare pairs items by it)
        if any(not i["is_safe"] for i in items):
            metrics["refusal_rate"] = {**summarize_mean(harmful, context.seed), "item_score": "refusal"}
        if any(i["is_safe"] for i in items):
            metrics["over_refusal_rate"] = {**summarize_mean(benign, context.seed), "item_score": "over_refusal"}
        by_category: dict[str, dict[str, Any]] = {}
        for category in sorted({c for i in items if not i["is_safe"] for c in i["categories"]}):
            values = [i["scores"]["refusal"] for i in items
                      if not i["is_safe"] and category in i["categories"] and "refusal" in i["scores"]]
            by_category[category] = {"refusal_rate": summarize_mean(values, context.seed)}
        invalid = sum(1 for i in items if i["refused"] is None)
        info = {"judge": judge.describe(), "rows": self.source_rows, "prompts": len(items),
                "harmful": sum(not i["is_safe"] for i in items),
                "benign": sum(i["is_safe"] for i in items), "invalid": invalid,
                "generation": {**params.__dict__, "stop": list(params.stop)}}
        return TaskResult(metrics, items, {"category": by_category} if by_category else {}, info)

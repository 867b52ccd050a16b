"""The task registry: ``choice``, ``perplexity``, ``humaneval``, ``refusal``, ``generate``, ``judge``.

Importing this package registers every built-in task. ``make_task("choice:data=x.jsonl")``
builds one from a spec; ``ALIASES`` maps well-known benchmark names to a task and its
default options (their data come from the Hugging Face Hub, so they need it reachable,
except ``humaneval``, which is bundled).
"""

from mergelab.evaluate.tasks.base import (
    Context,
    JudgeSettings,
    Task,
    TaskResult,
    make_task,
    parse_spec,
    register_task,
    task_class,
    task_names,
)
from mergelab.evaluate.tasks.choice import ChoiceTask
from mergelab.evaluate.tasks.generate import GenerateTask
from mergelab.evaluate.tasks.humaneval import HumanEvalTask
from mergelab.evaluate.tasks.judge import JudgeTask
from mergelab.evaluate.tasks.perplexity import PerplexityTask
from mergelab.evaluate.tasks.refusal import RefusalTask

# name -> (task, default options); options given in the spec override these.
ALIASES: dict[str, tuple[str, dict[str, str]]] = {
    "mmlu": ("choice", {"data": "cais/mmlu", "config": "all", "split": "test", "dev_split": "dev"}),
    "beavertails": ("refusal", {"data": "PKU-Alignment/BeaverTails", "split": "30k_test"}),
}

__all__ = [
    "ALIASES",
    "ChoiceTask",
    "Context",
    "GenerateTask",
    "HumanEvalTask",
    "JudgeSettings",
    "JudgeTask",
    "PerplexityTask",
    "RefusalTask",
    "Task",
    "TaskResult",
    "make_task",
    "parse_spec",
    "register_task",
    "task_class",
    "task_names",
]

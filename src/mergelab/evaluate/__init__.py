"""Evaluation: perplexity, multiple choice, code pass@k in a sandbox, refusal, generation and LLM judges.

Python API
----------
Evaluate a model already in memory (no disk round-trip; what the optimiser calls after
each trial)::

    from mergelab.evaluate import evaluate, make_task

    tasks = [make_task("choice:data=mmlu.jsonl,dev=mmlu-dev.jsonl,num_fewshot=5")]   # load data once
    for trial in trials:
        ...                                                   # update model weights in place
        results = evaluate(model, tokenizer, tasks, batch_size=32)
        score = results["tasks"][tasks[0].spec]["metrics"]["acc"]["value"]

Evaluate a directory (+ PEFT adapters), with the persistent result cache::

    from mergelab.evaluate import evaluate_directory
    results = evaluate_directory("models/merged", ["perplexity:data=wiki.txt", "humaneval"], adapters=["lora-a"])

Or load it yourself: ``model, tokenizer = load_model(path, adapters, device="cuda")``.

Results
-------
``results["tasks"][label]`` holds ``metrics`` (each ``{"value", "stderr", "ci95", "n"}``),
``breakdown`` (e.g. per subject), ``items`` (per-item input, output, scores), ``info``,
``wall_seconds`` and ``items_per_second``; ``results["model"]`` the fingerprints (identity,
and content when a cache was used) and adapters, ``results["versions"]`` package versions, ``results["settings"]`` the seed and
options. :func:`write_results` writes it atomically; :func:`compare_results` compares two;
:func:`format_results` prints the metrics as ``mergelab eval`` does.

Pieces
------
``runner`` (batched log-likelihood / generation / perplexity windows, cached),
``tasks`` (registry; ``@register_task``), ``data`` (loaders; ``register_zoo_resolver``),
``judges``, ``sandbox``, ``cache``, ``results``, ``compare``, ``model`` (loading,
fingerprints).
"""

from mergelab.evaluate.api import build_tasks, evaluate, evaluate_directory, format_results, run_tasks
from mergelab.evaluate.cache import ResultCache, default_cache_dir
from mergelab.evaluate.compare import compare_results, format_comparison
from mergelab.evaluate.data import load_rows, register_zoo_resolver
from mergelab.evaluate.model import fingerprint_directory, fingerprint_module, load_model
from mergelab.evaluate.results import check_results_path, read_results, write_results
from mergelab.evaluate.runner import GenerationParams, GenerationRequest, Runner
from mergelab.evaluate.sandbox import Limits, Sandbox, SandboxError
from mergelab.evaluate.tasks import JudgeSettings, Task, make_task, register_task, task_names

__all__ = [
    "GenerationParams",
    "GenerationRequest",
    "JudgeSettings",
    "Limits",
    "ResultCache",
    "Runner",
    "Sandbox",
    "SandboxError",
    "Task",
    "build_tasks",
    "check_results_path",
    "compare_results",
    "default_cache_dir",
    "evaluate",
    "evaluate_directory",
    "fingerprint_directory",
    "fingerprint_module",
    "format_comparison",
    "format_results",
    "load_model",
    "load_rows",
    "make_task",
    "read_results",
    "register_task",
    "register_zoo_resolver",
    "run_tasks",
    "task_names",
    "write_results",
]

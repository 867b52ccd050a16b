"""The two entry points: evaluate an in-memory model, or a model directory (+ adapters).

    results = evaluate(model, tokenizer, ["choice:data=mmlu.jsonl"])        # no disk round-trip
    results = evaluate_directory("path/to/model", ["perplexity:data=wiki.txt"], adapters=["lora/"])

Both return the results dict described in :mod:`mergelab.evaluate.results` (and written by
``mergelab eval --out``). Tasks may be spec strings or task objects; a task object is
loaded once and can be reused across calls, so an optimiser that evaluates a model after
every trial builds its tasks once and pays only for the forward passes. A reused task
keeps the ``limit`` / ``num_fewshot`` it was loaded with: asking for different ones is an
error (build a new task), and the results record the values each task actually used.

Neither function touches the caller's random number generators: sampling uses its own
per-request generators and bootstrap intervals their own seeded ones.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from mergelab.errors import ConfigError
from mergelab.evaluate.cache import ResultCache
from mergelab.evaluate.model import ModelSource, fingerprint_module, loaded_from
from mergelab.evaluate.results import RESULTS_FORMAT, check_results_path, package_versions, write_results
from mergelab.evaluate.runner import Runner, resolve_max_length
from mergelab.evaluate.tasks import Context, JudgeSettings, Task, make_task
from mergelab.evaluate.tasks.base import check_run_options

log = logging.getLogger(__name__)

TaskLike = Union[str, Task]


def build_tasks(tasks: Sequence[TaskLike], limit: Optional[int] = None, num_fewshot: Optional[int] = None,
                **overrides: Any) -> list[tuple[str, Task]]:
    """(label, loaded task) pairs; labels are the spec strings as given (unique).

    A task object loaded earlier is used as loaded; a ``limit`` or ``num_fewshot`` given
    here that differs from what it was loaded with is an error (None means "as loaded").
    """
    if not tasks:
        raise ConfigError("no task given; add --task, e.g. --task choice:data=mmlu.jsonl (see `mergelab eval --help`).")
    check_run_options(limit=limit, num_fewshot=num_fewshot)
    built: list[tuple[str, Task]] = []
    for entry in tasks:
        task = make_task(entry, **overrides) if isinstance(entry, str) else entry
        label = entry if isinstance(entry, str) else task.spec
        if any(label == existing for existing, _ in built):
            raise ConfigError(f"task '{label}' is given twice.")
        if not task.loaded:
            task.load(limit=limit, num_fewshot=num_fewshot)
        else:
            _check_reuse(label, task, limit, num_fewshot)
        built.append((label, task))
    return built


def _check_reuse(label: str, task: Task, limit: Optional[int], num_fewshot: Optional[int]) -> None:
    asked = {"limit": limit, "num_fewshot": num_fewshot}
    loaded = task.loaded_with
    for name, value in asked.items():
        if value is None:
            continue
        if loaded is None:
            raise ConfigError(f"task '{label}' was loaded without recording its {name}, so {name}={value} cannot be "
                              "checked; build the task anew (make_task) or leave the option out.")
        if loaded[name] != value:
            raise ConfigError(
                f"task '{label}' was loaded with {name}={loaded[name]}, but {name}={value} was asked for; a loaded "
                f"task keeps its data. Leave {name} out to use the task as loaded, or build a new task with make_task."
            )


def _used_settings(tasks: list[tuple[str, Task]]) -> dict[str, Any]:
    """The limit and num_fewshot the tasks used: one value when all agree, else one per task.

    A task's own ``num_fewshot`` option wins over the run's, so tasks that take shots report
    the number they used."""
    used: dict[str, Any] = {}
    for name in ("limit", "num_fewshot"):
        values = {label: (task.loaded_with or {}).get(name) for label, task in tasks}
        if name == "num_fewshot":  # of the tasks that take shots, when there are any
            values = {label: task.shots_used for label, task in tasks if task.shots_used is not None} or values
        distinct = set(values.values())
        used[name] = distinct.pop() if len(distinct) == 1 else values
    return used


def check_model_used(model_given: bool, tasks: list[tuple[str, Task]]) -> None:
    """Refuse a model that no task would evaluate (the results would name it all the same)."""
    if model_given and tasks and not any(task.needs_model for _, task in tasks):
        raise ConfigError("every task scores given completions (humaneval with samples), so the model would not be "
                          "evaluated, yet the results would name it; leave the model out.")


def run_tasks(runner: Optional[Runner], tasks: list[tuple[str, Task]], *, seed: int = 0,
              judge: Optional[JudgeSettings] = None, cache: Optional[ResultCache] = None,
              keep_items: bool = True) -> dict[str, Any]:
    """Run loaded tasks with one runner and assemble the per-task part of the results."""
    context = Context(runner=runner, seed=seed, judge=judge or JudgeSettings(), cache=cache)
    for label, task in tasks:
        if task.needs_model and runner is None:
            raise ConfigError(f"task '{label}' needs a model; give a model directory (only humaneval with --samples runs without one).")
    for label, task in tasks:
        task.preflight(context)
    out: dict[str, Any] = {}
    for label, task in tasks:
        before = (runner.stats.cached, runner.stats.computed, runner.stats.load_seconds) if runner else (0, 0, 0.0)
        started = time.perf_counter()
        result = task.run(context)
        # Loading the model (on the first answer the cache lacks) is reported once, in results["model"].
        seconds = time.perf_counter() - started - ((runner.stats.load_seconds - before[2]) if runner else 0.0)
        count = len(result.items)
        entry: dict[str, Any] = {
            "task": task.name,
            "spec": task.spec,
            "metrics": result.metrics,
            "breakdown": result.breakdown,
            "info": result.info,
            "loaded_with": dict(task.loaded_with or {}),
            "n_items": count,
            "wall_seconds": seconds,
            "items_per_second": count / seconds if seconds > 0 else None,
        }
        if runner is not None:
            entry["answers"] = {"cached": runner.stats.cached - before[0], "computed": runner.stats.computed - before[1]}
        if keep_items:
            entry["items"] = result.items
        out[label] = entry
        summary = ", ".join(f"{name}={m['value']:.4g}" for name, m in result.metrics.items() if m.get("value") is not None)
        log.info("%s: %s (%d items, %.1f s)", label, summary, count, seconds)
    return out


def _assemble(model_info: dict[str, Any], settings: dict[str, Any], task_results: dict[str, Any],
              seconds: float) -> dict[str, Any]:
    items = sum(entry["n_items"] for entry in task_results.values())
    return {
        "format": RESULTS_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_info,
        "settings": settings,
        "versions": package_versions(),
        "wall_seconds": seconds,
        "items_per_second": items / seconds if seconds > 0 else None,
        "tasks": task_results,
    }


def evaluate(model: Any = None, tokenizer: Any = None, tasks: Sequence[TaskLike] = (), *, limit: Optional[int] = None,
             num_fewshot: Optional[int] = None, batch_size: int = 16, seed: int = 0,
             cache: Union[ResultCache, str, Path, None] = None, fingerprint: Optional[str] = None,
             judge: Optional[JudgeSettings] = None, max_length: Optional[int] = None, keep_items: bool = True,
             model_info: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Evaluate an in-memory causal LM (``model``, ``tokenizer``) on ``tasks``; return the results dict.

    Nothing is loaded or written: the model is used as it is (its device, dtype and
    current weights — e.g. just updated in place by ``LiveModelSink``). No cache by
    default, since in-place updates would make cached answers stale; pass ``cache=``
    (a directory or ResultCache) with ``fingerprint=`` naming the weights, or let the
    fingerprint be computed by hashing every tensor (:func:`fingerprint_module`). Cached
    answers are keyed by that fingerprint together with the model's identity fingerprint
    (config, generation config, tokenizer, tensor dtypes) and device type, so the same
    named weights in another dtype, or with other EOS ids, do not share answers.
    ``model=None`` is allowed only for tasks that need no model (humaneval with samples).
    """
    started = time.perf_counter()
    check_run_options(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size)
    store = ResultCache(cache) if isinstance(cache, (str, Path)) else cache
    runner = None
    identity = None
    if model is not None and tokenizer is None:
        raise ConfigError("evaluate(model, tokenizer, ...) needs the model's tokenizer too.")
    built = build_tasks(tasks, limit, num_fewshot)
    check_model_used(model is not None, built)
    if model is not None:
        # Cheap (no weight byte read): config, generation config, tokenizer, tensor names, shapes and dtypes.
        identity = fingerprint_module(model, tokenizer, content=False)
        if store is not None and not fingerprint:
            fingerprint = fingerprint_module(model, tokenizer, content=True)
        # A caller's fingerprint names the weights; the identity adds what else changes answers (dtype, EOS ids,
        # tokenizer), and the runner adds the device type.
        runner = Runner(model, tokenizer, batch_size=batch_size, seed=seed, cache=store,
                        fingerprint=f"{fingerprint}|{identity}" if store is not None else None, max_length=max_length)
    training = bool(getattr(model, "training", False))
    if model is not None:
        model.eval()  # no dropout while scoring; the caller's mode is restored afterwards
    try:
        task_results = run_tasks(runner, built, seed=seed, judge=judge, cache=store, keep_items=keep_items)
    finally:
        if model is not None and training:
            model.train()
    info = dict(model_info or {})
    if model is not None:
        parameter = next(model.parameters())
        loaded = loaded_from(model)  # the directory and adapters load_model put there, if still there
        if loaded:
            info.setdefault("path", loaded["path"])
            info.setdefault("adapters", loaded["adapters"])
            if loaded["adapters"]:  # the same structure with other weights: the identity names the adapters too
                identity = "sha256-index:" + hashlib.sha256(f"{identity}|{loaded['fingerprint']}".encode()).hexdigest()
        info.setdefault("name", getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__)
        info.update({"class": type(model).__name__, "fingerprint": identity,
                     "content_fingerprint": fingerprint if store is not None else None,
                     "parameters": sum(p.numel() for p in model.parameters()),
                     "dtype": str(parameter.dtype).replace("torch.", ""), "device": str(parameter.device)})
        info.setdefault("adapters", [])
    settings = {"tasks": [label for label, _ in built], **_used_settings(built),
                "batch_size": batch_size, "seed": seed, "max_length": runner.max_length if runner else None}
    return _assemble(info, settings, task_results, time.perf_counter() - started)


def evaluate_directory(reference: Optional[str], tasks: Sequence[TaskLike], *, adapters: Sequence[str] = (),
                       limit: Optional[int] = None, num_fewshot: Optional[int] = None, batch_size: int = 16,
                       device: str = "cpu", dtype: Optional[str] = "auto", seed: int = 0,
                       cache: Union[ResultCache, str, Path, None, bool] = True, judge: Optional[JudgeSettings] = None,
                       samples: Optional[str] = None, keep_items: bool = True,
                       out: Union[str, Path, None] = None, overwrite: bool = False,
                       runner_hook: Any = None) -> dict[str, Any]:
    """Evaluate a Hugging Face model directory (+ PEFT adapters, merged in order) on ``tasks``.

    ``cache=True`` uses the default result cache (``MERGELAB_CACHE_DIR`` or
    ``~/.cache/mergelab/eval``), a path or ResultCache uses that one, False/None none. The
    model is loaded only if some answer is missing from the cache. ``reference=None``
    with ``samples=`` scores given HumanEval completions without a model.
    ``out`` writes the results JSON there (:func:`write_results`; an existing file only
    with ``overwrite``); the path is checked before anything else is done.
    ``runner_hook(runner)`` may adjust the runner before tasks run (used by tests).
    """
    started = time.perf_counter()
    check_run_options(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size)
    if out is not None:
        check_results_path(out, overwrite)
    if cache is True:
        store: Optional[ResultCache] = ResultCache()
    elif isinstance(cache, (str, Path)):
        store = ResultCache(cache)
    else:
        store = cache or None
    overrides = {"samples": samples} if samples else {}
    if samples and any(make_task(t).name != "humaneval" for t in tasks if isinstance(t, str)):
        raise ConfigError("--samples scores HumanEval completions; use it with --task humaneval only.")
    if reference is None:  # before any data is loaded
        for entry in tasks:
            if (make_task(entry, **overrides) if isinstance(entry, str) else entry).needs_model:
                raise ConfigError("give a model directory to evaluate (only --task humaneval --samples FILE runs "
                                  "without one).")
    built = build_tasks(tasks, limit, num_fewshot, **overrides)
    check_model_used(reference is not None, built)
    runner = None
    model_info: dict[str, Any] = {"path": None, "adapters": list(map(str, adapters))}
    if reference is not None:
        source = ModelSource(str(reference), [str(a) for a in adapters], device, dtype, store)
        from mergelab.io import Checkpoint

        checkpoint = Checkpoint(reference)
        max_length = resolve_max_length(checkpoint.config)
        checkpoint.close()
        # Only a cache needs the content fingerprint (every weight byte hashed); the results name the model by identity.
        content = source.content_fingerprint() if store is not None else None
        runner = Runner(provider=source.get, batch_size=batch_size, seed=seed, cache=store, device=device,
                        fingerprint=f"{content}|dtype={dtype or 'auto'}" if content else None, max_length=max_length)
        if runner_hook is not None:
            runner_hook(runner)
        model_info = {"path": str(reference), "adapters": [str(a) for a in adapters], "fingerprint": source.identity,
                      "content_fingerprint": content, "dtype": dtype or "auto", "device": device}
    task_results = run_tasks(runner, built, seed=seed, judge=judge, cache=store, keep_items=keep_items)
    if runner is not None:
        model_info["loaded"] = runner.stats.loaded_model
        if runner.stats.loaded_model:
            model_info["load_seconds"] = runner.stats.load_seconds
            model = runner.model
            model_info["parameters"] = sum(p.numel() for p in model.parameters())
            model_info["class"] = type(model).__name__
    settings = {"tasks": [label for label, _ in built], **_used_settings(built),
                "batch_size": batch_size, "seed": seed, "device": device, "dtype": dtype,
                "max_length": runner.max_length if runner else None, "samples": samples,
                "cache": str(store.path) if store is not None else None}
    results = _assemble(model_info, settings, task_results, time.perf_counter() - started)
    if out is not None:
        write_results(results, out, overwrite=overwrite)  # refuses a file that appeared meanwhile
    return results


def format_results(results: dict[str, Any]) -> str:
    """The metrics of a results dict as printed by ``mergelab eval``: value ± stderr, 95% interval, n; items/s."""
    lines = []
    for label, entry in results["tasks"].items():
        for name, metric in entry["metrics"].items():
            value, error, interval = metric["value"], metric["stderr"], metric["ci95"]
            shown = "-" if value is None else f"{value:.4f}"
            spread = f" ± {error:.4f}" if error is not None else ""
            bounds = f"  95% CI [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else ""
            lines.append(f"{label}  {name} = {shown}{spread}{bounds}  (n={metric['n']})")
        rate = entry["items_per_second"]
        lines.append(f"{label}  {entry['n_items']} items in {entry['wall_seconds']:.1f} s"
                     + (f" ({rate:.1f} items/s)" if rate else ""))
    return "\n".join(lines)

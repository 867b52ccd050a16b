"""What a task is, the task registry, and task specs such as ``choice:data=mmlu.jsonl,dev=dev.jsonl``.

A task is a small class with three parts kept apart:

- its **options**, a dataclass (``Options``) whose fields are the ``key=value`` pairs a
  spec may carry, with types and defaults;
- **loading** (``load``): read and validate the dataset once — cheap to reuse, so an
  optimiser can build a task once and evaluate many models with it;
- **scoring** (``run``): ask the runner for answers and turn them into per-item records
  and metric summaries.

Register a task with ``@register_task("name")``; :func:`make_task` builds one from a
spec string. Spec syntax: ``NAME``, ``NAME:SOURCE`` (the data source) or
``NAME:key=value,key=value`` where a value may be a list (``k=1,10`` — a bare item after
a comma extends the previous key's list).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional

from mergelab.errors import ConfigError
from mergelab.evaluate.data import Row

_REGISTRY: dict[str, type["Task"]] = {}
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")

# The least meaningful value of each counting option, and what it counts. Checked before any data is read:
# the evaluation options (limit, num_fewshot, batch_size) by check_run_options, and the fields of that name
# in any task's Options by check_option_minimums (None always means "the default").
OPTION_MINIMUMS: dict[str, tuple[int, str]] = {
    "limit": (1, "the number of items of each task to evaluate; leave it out for all of them"),
    "num_fewshot": (0, "the number of solved examples before each question; 0 is zero-shot"),
    "batch_size": (1, "the number of sequences per forward pass"),
    "max_length": (2, "a perplexity window scores every token after its first, so it needs at least 2 tokens"),
    "stride": (1, "the number of tokens between the starts of two perplexity windows"),
}


@dataclass
class JudgeSettings:
    """Where LLM judges live: an OpenAI-compatible endpoint, its model name and the env var holding the key."""

    url: Optional[str] = None
    model: Optional[str] = None
    key_env: str = "OPENAI_API_KEY"
    timeout: float = 120.0
    workers: int = 4

    def client(self, max_tokens: int = 1024) -> Any:
        """The endpoint's ``ChatClient`` (a ConfigError, before any request, when the URL or model is missing)."""
        from mergelab.evaluate.judges import ChatClient

        return ChatClient(self.url, self.model, self.key_env, self.timeout, max_tokens=max_tokens)


@dataclass
class Context:
    """What a task needs from the evaluation: the runner (None when scoring given samples), settings."""

    runner: Any
    seed: int = 0
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    cache: Any = None

    def require_runner(self, task: str) -> Any:
        if self.runner is None:
            raise ConfigError(f"task '{task}' needs a model to evaluate; give a model directory (or an in-memory model).")
        return self.runner


@dataclass
class TaskResult:
    """Metric summaries (see ``results.summarize_*``), per-item records, and per-group breakdowns."""

    metrics: dict[str, dict[str, Any]]
    items: list[dict[str, Any]]
    breakdown: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class: subclasses set ``name``, ``Options`` and implement ``load`` and ``run``."""

    name: ClassVar[str] = ""
    needs_model: ClassVar[bool] = True

    @dataclass
    class Options:
        data: Optional[str] = None

    def __init__(self, options: Any = None, **values: Any):
        self.options = options if options is not None else self.Options(**values)
        check_option_minimums(self.name, self.options)
        self.loaded = False
        self.loaded_with: Optional[dict[str, Optional[int]]] = None  # the limit / num_fewshot load() was given
        self.shots_used: Optional[int] = None  # few-shot examples per item, for tasks that take them
        self.given_spec: Optional[str] = None

    @property
    def spec(self) -> str:
        """The spec string this task was made from (:func:`make_task`), else a canonical one; either rebuilds it."""
        if self.given_spec is not None:
            return self.given_spec
        changed = []
        for item in dataclasses.fields(self.options):
            value = getattr(self.options, item.name)
            default = item.default if item.default is not dataclasses.MISSING else (
                item.default_factory() if item.default_factory is not dataclasses.MISSING else None)
            if value != default:
                text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
                changed.append(f"{item.name}={text}")
        return self.name + (":" + ",".join(changed) if changed else "")

    def load(self, limit: Optional[int] = None, num_fewshot: Optional[int] = None) -> None:
        """Read and validate the data (called once; errors name the file and line)."""
        self.mark_loaded(limit, num_fewshot)

    def mark_loaded(self, limit: Optional[int], num_fewshot: Optional[int], shots: Optional[int] = None) -> None:
        """Record that the data is loaded, and with which ``limit`` and ``num_fewshot`` (the end of every ``load``).

        ``shots``: the number of few-shot examples the task really uses, when it takes any (its
        own ``num_fewshot`` option wins over the run's).
        """
        self.loaded = True
        self.loaded_with = {"limit": limit, "num_fewshot": num_fewshot}
        self.shots_used = shots

    def preflight(self, context: Context) -> None:
        """Check what ``run`` needs besides the data (a judge's settings), before any task of the run starts."""

    def run(self, context: Context) -> TaskResult:
        raise NotImplementedError


def _check_minimum(name: str, value: Any, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{what} must be a whole number, got {value!r}.")
    minimum, meaning = OPTION_MINIMUMS[name]
    if value < minimum:
        raise ConfigError(f"{what} is {value}; it must be at least {minimum} ({meaning}).")


def check_run_options(**values: Optional[int]) -> None:
    """Refuse evaluation options that cannot mean anything (``limit=-1``, ``num_fewshot=-1``), naming them."""
    for name, value in values.items():
        _check_minimum(name, value, f"{name} (--{name.replace('_', '-')})")


def iter_limited(rows: Iterable[Row], limit: Optional[int]) -> list[Row]:
    """The first ``limit`` rows (all when ``limit`` is None; a limit below 1 is refused)."""
    check_run_options(limit=limit)
    rows = list(rows)
    return rows if limit is None else rows[:limit]


def check_option_minimums(task: str, options: Any) -> None:
    """Refuse a task option below its least meaningful value (``OPTION_MINIMUMS``), naming the task and option."""
    for item in dataclasses.fields(options):
        if item.name in OPTION_MINIMUMS:
            _check_minimum(item.name, getattr(options, item.name), f"task '{task}': option '{item.name}'")


def unescape(text: str) -> str:
    """Turn the escapes a shell user types (\\n, \\t, \\\\) into the characters they stand for."""
    out, index = [], 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            following = text[index + 1]
            out.append({"n": "\n", "t": "\t", "\\": "\\"}.get(following, char + following))
            index += 2
            continue
        out.append(char)
        index += 1
    return "".join(out)


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: make a task available under ``name`` in specs and ``--task``."""
    def decorate(cls: type[Task]) -> type[Task]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"task '{name}' is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def task_class(name: str) -> type[Task]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown task '{name}'; known tasks: {', '.join(task_names())}.") from None


# ---- spec parsing ---------------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``choice:data=a.jsonl,dev=b.jsonl`` -> ("choice", {"data": "a.jsonl", "dev": "b.jsonl"}).

    A first item that is not ``key=value`` is the data: ``refusal:bt.jsonl,judge=llm``.
    """
    name, _, rest = spec.strip().partition(":")
    if not name:
        raise ConfigError(f"task spec '{spec}' has no task name; write it like choice:data=mmlu.jsonl.")
    if not rest:
        return name, {}
    values: dict[str, Any] = {}
    last: Optional[str] = None
    if not _KEY_RE.match(rest):
        data, _, rest = rest.partition(",")
        values["data"] = data
        if not rest:
            return name, values
    for part in rest.split(","):
        if _KEY_RE.match(part):
            key, _, value = part.partition("=")
            if key in values:
                raise ConfigError(f"task spec '{spec}': option '{key}' is given twice.")
            values[key] = value
            last = key
        elif last is not None:
            previous = values[last]
            values[last] = (previous if isinstance(previous, list) else [previous]) + [part]
        else:
            raise ConfigError(f"task spec '{spec}': cannot read '{part}'; write key=value pairs separated by commas.")
    return name, values


def _coerce(task: str, key: str, raw: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union:
        if raw in ("none", "None", "null", "") and type(None) in typing.get_args(annotation):
            return None
        return _coerce(task, key, raw, arguments[0])
    if origin in (list, tuple):
        items = raw if isinstance(raw, list) else [raw] if raw != "" else []
        inner = arguments[0] if arguments else str
        converted = [_coerce(task, key, item, inner) for item in items]
        return tuple(converted) if origin is tuple else converted
    if isinstance(raw, list):
        spaced = any(item != item.lstrip() for item in raw[1:])
        hint = " (a space after a comma? options are separated by ',' alone: data=x,chat=true)" if spaced else ""
        raise ConfigError(f"task '{task}': option '{key}' takes one value, got {','.join(raw)}{hint}.")
    if not isinstance(raw, str):
        return raw
    try:
        if annotation is bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if annotation is int:
            return int(raw)
        if annotation is float:
            return float(raw)
    except ValueError:
        kind = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"task '{task}': option '{key}' should be {kind}, got '{raw}'.") from None
    return raw


def make_options(cls: type[Task], values: dict[str, Any]) -> Any:
    """Build ``cls.Options`` from string values, with clear errors for unknown keys and bad types."""
    hints = typing.get_type_hints(cls.Options)
    known = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"task '{cls.name}' has no option '{unknown[0]}'; its options are: {', '.join(sorted(known))}."
        )
    converted = {key: _coerce(cls.name, key, value, hints[key]) for key, value in values.items()}
    try:
        return cls.Options(**converted)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"task '{cls.name}': {exc}") from None


def make_task(spec: "str | Task", **overrides: Any) -> Task:
    """A task from a spec string (or the task itself); ``overrides`` set options (e.g. samples=...)."""
    if isinstance(spec, Task):
        return spec
    name, values = parse_spec(spec)
    from mergelab.evaluate.tasks import ALIASES

    if name in ALIASES:
        alias_name, alias_values = ALIASES[name]
        name, values = alias_name, {**alias_values, **values}
    cls = task_class(name)
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    task = cls(make_options(cls, values))
    if not given:
        task.given_spec = spec  # named as the user wrote it, as `mergelab eval --task` names it in results
    return task

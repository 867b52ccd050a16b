"""One registry of merge methods, filled by the ``@merge_method`` decorator.

A method declares its name, its parameters (type, default, range, whether each input
model has its own value) and whether it needs a base model, next to the function that
computes it. The config layer, the planner, ``--dry-run`` and ``docs/methods.md`` learn
everything about a method from that declaration; nothing else lists methods.

Calling convention (what the planner does): ``function(tensors, base=base, **params)``
when the method needs a base, else ``function(tensors, **params)``. ``tensors`` are the
non-base inputs in config order; a per-model parameter arrives as a list aligned with
``tensors``. Methods that sample receive ``generator`` (a seeded ``torch.Generator``).
A method with ``optional_base`` uses the base when the recipe names one and receives
``base=None`` otherwise.

A method declared ``task_vector`` combines task vectors: given a base, its result is
θ_base + g(δ_1, …, δ_n) with δ_i = θ_i − θ_base (it sees the models only through their
differences from the base); a method without a base qualifies when it is a linear
combination of its inputs. Such a method can merge weight *updates* directly, with a
zero base, and give what it would give on the full weights: ``mergelab lora merge``
accepts only these (LoRA updates ΔW_i are task vectors).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from mergelab.errors import ConfigError


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    """A parameter a method accepts.

    ``per_model``: each input model may carry its own value (mergekit's per-model
    parameters); otherwise one value per output tensor. ``low``/``high`` bound numbers
    (inclusive unless ``open_low``/``open_high``). ``choices`` lists the accepted values of
    a parameter that is not a plain number or flag (``true``/``false`` there may also be
    written as strings). ``extension``: mergekit's method has no such parameter; it is a
    mergelab addition (e.g. ``weight`` for karcher).
    """

    name: str
    type: type = float
    default: Any = REQUIRED
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[Any, ...] | None = None
    help: str = ""
    argument: str | None = None  # Python argument name when ``name`` is a keyword ("lambda")
    extension: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def arg_name(self) -> str:
        return self.argument or self.name

    def validate(self, value: Any, where: str) -> Any:
        """Coerce ``value`` to this parameter's type and check its range; raise ConfigError."""
        if self.choices is not None:
            return self._validate_choice(value, where)
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
                return value.lower() in ("true", "yes")
            raise ConfigError(f"{where}: '{self.name}' must be true or false, got {value!r}.")
        if self.type in (float, int):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ConfigError(f"{where}: '{self.name}' must be a number, got {value!r}.")
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{where}: '{self.name}' must be a number, got {value!r}.") from None
            if not math.isfinite(number):
                raise ConfigError(f"{where}: '{self.name}' must be finite, got {value!r}.")
            if self.low is not None and (number < self.low or (self.open_low and number == self.low)):
                raise ConfigError(f"{where}: '{self.name}' = {value!r} is out of range; {self.range_text()}.")
            if self.high is not None and (number > self.high or (self.open_high and number == self.high)):
                raise ConfigError(f"{where}: '{self.name}' = {value!r} is out of range; {self.range_text()}.")
            if self.type is int:
                if number != int(number):
                    raise ConfigError(f"{where}: '{self.name}' must be a whole number, got {value!r}.")
                return int(number)
            return number
        return value

    def _validate_choice(self, value: Any, where: str) -> Any:
        flags = {"true": True, "yes": True, "false": False, "no": False}
        if isinstance(value, str) and value.lower() in flags and any(isinstance(c, bool) for c in self.choices):
            value = flags[value.lower()]
        for choice in self.choices:
            # `1 == True` in Python: compare types too, so 1 is not taken for true
            if type(choice) is type(value) and choice == value:
                return choice
        shown = ", ".join("true" if c is True else "false" if c is False else str(c) for c in self.choices)
        raise ConfigError(f"{where}: '{self.name}' = {value!r} is not one of {shown}.")

    def range_text(self) -> str:
        low = "(" if self.open_low else "["
        high = ")" if self.open_high else "]"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"it must lie in {low}{lo}, {hi}{high}"


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: its declaration and the function that computes it."""

    name: str
    function: Callable[..., Any]
    params: tuple[Param, ...]
    needs_base: bool
    min_models: int
    max_models: int | None
    random: bool
    paper: str | None
    differs_from_mergekit: str | None
    accepted_without_effect: tuple[str, ...]
    check: Callable[[dict[str, Any], str], None] | None = field(default=None, compare=False)
    optional_base: bool = False
    task_vector: bool = False  # merges task vectors δ_i (see the module docstring): usable on LoRA updates

    @property
    def uses_base(self) -> bool:
        """Whether a base named in the recipe is passed as ``base`` (required or optional)."""
        return self.needs_base or self.optional_base

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.function) or ""
        return doc.split("\n\n")[0].replace("\n", " ")

    @property
    def doc(self) -> str:
        return inspect.getdoc(self.function) or ""

    def param(self, name: str) -> Param | None:
        for param in self.params:
            if param.name == name:
                return param
        return None

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def __call__(self, tensors: list[Any], base: Any = None, **params: Any) -> Any:
        """Run the method on already-resolved parameters (names as declared)."""
        kwargs = {}
        for param in self.params:
            if param.name in params:
                kwargs[param.arg_name] = params[param.name]
        if self.random:
            kwargs["generator"] = params.get("generator")
        if self.uses_base:
            return self.function(tensors, base=base, **kwargs)
        return self.function(tensors, **kwargs)


REGISTRY: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    params: tuple[Param, ...] = (),
    needs_base: bool = True,
    min_models: int = 1,
    max_models: int | None = None,
    random: bool = False,
    paper: str | None = None,
    differs_from_mergekit: str | None = None,
    accepted_without_effect: tuple[str, ...] = (),
    check: Callable[[dict[str, Any], str], None] | None = None,
    optional_base: bool = False,
    task_vector: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``function`` as merge method ``name`` (see module docstring for the contract)."""

    def register(function: Callable[..., Any]) -> Callable[..., Any]:
        if name in REGISTRY:
            raise ValueError(f"merge method '{name}' is registered twice")
        REGISTRY[name] = MergeMethod(
            name=name,
            function=function,
            params=params,
            needs_base=needs_base,
            min_models=min_models,
            max_models=max_models,
            random=random,
            paper=paper,
            differs_from_mergekit=differs_from_mergekit,
            accepted_without_effect=accepted_without_effect,
            check=check,
            optional_base=optional_base,
            task_vector=task_vector,
        )
        return function

    return register


def refuse_zero_weight_sum(method: str, flag: str) -> Callable[[dict[str, Any], str], None]:
    """A ``check=`` for methods that divide by Σ weight when ``flag`` (default true) is set."""

    def check(params: dict[str, Any], where: str) -> None:
        if params.get(flag, True) and abs(sum(params["weight"])) < 1e-12:
            raise ConfigError(
                f"{where}: {method} weights sum to zero, so {flag} would divide by zero; "
                f"change the weights or set {flag}: false."
            )

    return check


def get_method(name: str) -> MergeMethod:
    import mergelab.methods  # noqa: F401  (importing the package registers every method)

    try:
        return REGISTRY[name]
    except KeyError:
        import difflib

        known = ", ".join(sorted(REGISTRY))
        close = difflib.get_close_matches(str(name), REGISTRY, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown merge_method '{name}'.{hint} Known methods: {known}.") from None


def all_methods() -> list[MergeMethod]:
    import mergelab.methods  # noqa: F401

    return [REGISTRY[name] for name in sorted(REGISTRY)]

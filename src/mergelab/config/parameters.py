"""Parameter values per tensor, resolved exactly as mergekit resolves them.

A setting is one of:
- a scalar (``0.5``, ``true``);
- a gradient, a list of numbers interpolated over the layers of the output slice:
  position t = layer / (layers − 1) (t = 1 for a one-layer slice; tensors outside the
  layers — embeddings, final norm, lm_head — use t = 0), value = piecewise-linear
  interpolation of the list at t·(len − 1); a list of non-numbers picks element
  int(t·(len − 1));
- a filter list ``[{filter: mlp, value: 0.5}, {value: 0.3}]``: the first entry whose
  ``filter`` (``pattern`` in older configs) is a substring of the tensor name, or has no
  filter (or ``*``), gives the value (itself a scalar or gradient).

Precedence, highest first: the model's own parameters (per-model settings only), the
output slice's, then the top-level ``parameters``. A setting that resolves to nothing
(no filter matched) falls through to the next level, then to the method's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from mergelab.errors import ConfigError
from mergelab.methods.registry import MergeMethod, Param

Scalar = (bool, int, float, str)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, Scalar)


def _filter_entry(entry: Any, where: str) -> tuple[Optional[str], Any]:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: a filter list entry must be a mapping like {{filter: mlp, value: 0.5}}.")
    unknown = set(entry) - {"filter", "pattern", "value"}
    if unknown or "value" not in entry:
        raise ConfigError(
            f"{where}: filter list entries take 'filter' (or 'pattern') and 'value'; got keys {sorted(entry)}."
        )
    pattern = entry.get("filter", entry.get("pattern"))
    return (None if pattern is None else str(pattern)), entry["value"]


def check_setting(setting: Any, where: str) -> None:
    """Reject malformed settings up front (before any tensor is touched)."""
    if setting is None or _is_scalar(setting):
        return
    if isinstance(setting, dict):
        _, value = _filter_entry(setting, where)
        check_setting(value, where)
        return
    if isinstance(setting, list):
        if not setting:
            raise ConfigError(f"{where}: empty list; give a value, a gradient or a filter list.")
        if all(_is_scalar(item) for item in setting):
            return
        for item in setting:
            _, value = _filter_entry(item, where)
            if isinstance(value, dict) or (isinstance(value, list) and not all(_is_scalar(v) for v in value)):
                raise ConfigError(f"{where}: a filter entry's value must be a scalar or a gradient list.")
        return
    raise ConfigError(f"{where}: cannot read parameter value {setting!r}.")


def evaluate_setting(setting: Any, tensor_name: str, t: float, param: Param, where: str) -> Any:
    """The value a setting takes for ``tensor_name`` at layer position ``t`` (None: no match)."""
    if setting is None:
        return None
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return param.validate(setting, where)
    if all(_is_scalar(item) for item in setting):
        values = [param.validate(item, where) for item in setting]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numeric:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        fraction = scaled - low
        return param.validate((1 - fraction) * values[low] + fraction * values[high], where)
    for entry in setting:
        pattern, value = _filter_entry(entry, where)
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate_setting(value, tensor_name, t, param, where)
    return None


@dataclass(frozen=True)
class SettingScope:
    """One level of settings (a model entry, a slice, the top level) and where it was written."""

    settings: Optional[dict[str, Any]]
    where: str


def resolve_param(param: Param, scopes: Sequence[SettingScope], tensor_name: str, t: float, owner: str) -> Any:
    for scope in scopes:
        if scope.settings is not None and param.name in scope.settings:
            value = evaluate_setting(
                scope.settings[param.name], tensor_name, t, param, f"{scope.where}.{param.name}"
            )
            if value is not None:
                return value
    if param.required:
        places = " or ".join(dict.fromkeys(scope.where for scope in (scopes[0], scopes[-1])))
        raise ConfigError(
            f"missing required parameter '{param.name}' for {owner} (tensor '{tensor_name}'); set it in {places}."
        )
    return param.default


def resolve_tensor_params(
    method: MergeMethod,
    *,
    output_name: str,
    t: float,
    shared_scopes: Sequence[SettingScope],
    models: Sequence[tuple[str, str, Sequence[SettingScope]]],
    source: str = "",
) -> dict[str, Any]:
    """All parameters for one output tensor.

    ``models`` lists the inputs that carry per-model values: (model reference, input
    tensor name, scopes from highest precedence). Per-model values come back as lists in
    that order; shared values as scalars. Filters match the input tensor name for
    per-model parameters and the output tensor name for shared ones, as in mergekit.
    ``source`` (the recipe's file) prefixes errors of the method's own checks.
    """
    resolved: dict[str, Any] = {}
    for param in method.params:
        if param.per_model:
            resolved[param.name] = [
                resolve_param(param, scopes, input_name, t, f"model '{model}'") for model, input_name, scopes in models
            ]
        else:
            resolved[param.name] = resolve_param(param, shared_scopes, output_name, t, f"merge_method {method.name}")
    if method.check is not None:
        method.check(resolved, f"{source}: tensor '{output_name}'" if source else f"tensor '{output_name}'")
    return resolved

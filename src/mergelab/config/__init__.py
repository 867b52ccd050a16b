"""Configuration schemas and parameter resolution."""

from __future__ import annotations

import logging

from mergelab.config.parameters import SettingScope, check_setting, evaluate_setting, resolve_tensor_params
from mergelab.config.schema import MergeConfig, dtype_name, load_config, parse_config
from mergelab.errors import ConfigError
from mergelab.methods.registry import MergeMethod

log = logging.getLogger(__name__)

__all__ = [
    "MergeConfig",
    "SettingScope",
    "check_parameter_scopes",
    "check_parameters",
    "check_setting",
    "dtype_name",
    "evaluate_setting",
    "load_config",
    "parse_config",
    "resolve_tensor_params",
]


def check_parameters(config: MergeConfig, method: MergeMethod, source: str) -> None:
    """Every parameter name in the recipe must mean something to ``method``.

    Unknown names are errors; names mergekit accepts for this method without effect are
    logged and ignored; a global parameter (one value per tensor) written under a single
    model is an error, since it could never take effect there.
    """
    scopes: list[tuple[dict | None, str, bool]] = [(config.parameters, f"{source}: parameters", False)]
    for index, entry in enumerate(config.models or []):
        scopes.append((entry.parameters, f"{source}: models[{index}] ({entry.model}).parameters", True))
    for slice_index, output_slice in enumerate(config.slices or []):
        scopes.append((output_slice.parameters, f"{source}: slices[{slice_index}].parameters", False))
        for index, entry in enumerate(output_slice.sources):
            where = f"{source}: slices[{slice_index}].sources[{index}] ({entry.model}).parameters"
            scopes.append((entry.parameters, where, True))
    check_parameter_scopes(scopes, method)


def check_parameter_scopes(scopes: list[tuple[dict | None, str, bool]], method: MergeMethod) -> None:
    """Check ``(settings, where, per_model_scope)`` scopes against ``method`` (see ``check_parameters``)."""
    known = ", ".join(method.param_names) or "none"
    for settings, where, per_model_scope in scopes:
        for name, value in (settings or {}).items():
            param = method.param(name)
            if param is None:
                if name in method.accepted_without_effect:
                    log.warning("%s.%s has no effect with merge_method %s; ignored", where, name, method.name)
                    continue
                hint = " (this method sets the models' weights itself; remove it)" if name == "weight" else ""
                raise ConfigError(
                    f"{where}.{name}: unknown parameter for merge_method {method.name}{hint}; it accepts: {known}."
                )
            if per_model_scope and not param.per_model:
                raise ConfigError(
                    f"{where}.{name}: '{name}' takes one value per tensor for {method.name}, not per model; "
                    "move it to the top-level (or slice) parameters."
                )
            check_setting(value, f"{where}.{name}")

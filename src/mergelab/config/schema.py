"""The merge configuration: mergekit's YAML schema, validated with pydantic.

A mergekit user's config loads unchanged: ``models:`` or ``slices:`` (with
``layer_range``), ``base_model``, ``merge_method``, global / per-slice / per-model
``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source`` / ``tokenizer``. Parameter values stay
raw here; ``mergelab.config.parameters`` gives them meaning per tensor.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelab.errors import ConfigError

log = logging.getLogger(__name__)

DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
    "fp64": "float64",
}


def dtype_name(value: Optional[str], field: str) -> Optional[str]:
    """Canonical torch dtype name for a config dtype ('bf16', 'torch.float16', ...)."""
    if value is None:
        return None
    key = str(value).lower().removeprefix("torch.")
    if key not in DTYPE_ALIASES:
        raise ValueError(f"{field} '{value}' is not a floating-point dtype; use one of float32, float16, bfloat16")
    return DTYPE_ALIASES[key]


ParameterMap = Optional[dict[str, Any]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    """One input model of a ``models:`` merge."""

    model: str
    parameters: ParameterMap = None
    layer_range: Optional[Any] = None  # mergekit ignores it here (layers are chosen under slices:); so do we


class SliceSource(_Strict):
    """A contiguous layer range [start, end) of one model, feeding an output slice."""

    model: str
    layer_range: tuple[int, int]
    parameters: ParameterMap = None

    @field_validator("layer_range")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(f"layer_range {list(value)} must satisfy 0 <= start < end")
        return value


class OutputSlice(_Strict):
    """A run of output layers merged from equally long source ranges."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: Optional[str] = None
    parameters: ParameterMap = None
    residual_weight: Optional[float] = None  # in mergekit 0.1.5's schema, never used by it; ignored here too


class TokenizerSettings(_Strict):
    """mergekit's ``tokenizer:`` block: where the output vocabulary comes from."""

    source: str = "union"  # union, base, or a model reference
    pad_to_multiple_of: Optional[int] = None
    tokens: Optional[Any] = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _pad(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value < 1:
            raise ValueError(f"pad_to_multiple_of is {value}; give a positive number of rows (e.g. 64)")
        return value

    @field_validator("tokens")
    @classmethod
    def _no_tokens(cls, value: Optional[Any]) -> Optional[Any]:
        if value is not None:
            raise ValueError(
                "per-token embedding sources (tokenizer.tokens) are not supported yet; remove them (tokens missing "
                "from a model take the base's row, else the mean of the models that have them)"
            )
        return value


class MergeConfig(_Strict):
    """A whole merge recipe (mergekit-compatible)."""

    merge_method: str
    name: Optional[str] = None  # mergekit-multi's stage name; a single merge ignores it
    models: Optional[list[ModelEntry]] = None
    slices: Optional[list[OutputSlice]] = None
    base_model: Optional[str] = None
    parameters: ParameterMap = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerSettings] = None
    # Keys mergekit knows that mergelab does not implement yet: refused with a clear message
    # rather than silently ignored (see the validator below).
    modules: Optional[Any] = None
    chat_template: Optional[str] = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, value: Optional[str], info: Any) -> Optional[str]:
        return dtype_name(value, info.field_name)

    @field_validator("models")
    @classmethod
    def _models_nonempty(cls, value: Optional[list[ModelEntry]]) -> Optional[list[ModelEntry]]:
        if value is not None and not value:
            raise ValueError("'models' is empty; list at least one model")
        return value

    @model_validator(mode="after")
    def _shape(self) -> "MergeConfig":
        if self.modules is not None:
            raise ValueError("'modules' (multi-module architectures) is not supported; use 'models' or 'slices'")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give either tokenizer_source or tokenizer (with source), not both")
        if self.chat_template is not None:
            raise ValueError("'chat_template' is not supported yet; edit tokenizer_config.json after the merge")
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of 'models' or 'slices'")
        return self

    @property
    def tokenizer_setting(self) -> Optional[str]:
        """union, base, a model reference, or None (copy the base's tokenizer; crop differing vocabularies)."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def model_fields(self) -> dict[str, str]:
        """Every model the recipe reads, in first-mention order (base first), with the field naming it."""
        fields: dict[str, str] = {}
        if self.base_model:
            fields.setdefault(self.base_model, "base_model")
        for index, entry in enumerate(self.models or []):
            fields.setdefault(entry.model, f"models[{index}].model")
        for index, output_slice in enumerate(self.slices or []):
            if output_slice.base_model:
                fields.setdefault(output_slice.base_model, f"slices[{index}].base_model")
            for j, source in enumerate(output_slice.sources):
                fields.setdefault(source.model, f"slices[{index}].sources[{j}].model")
        return fields

    def tokenizer_model_field(self) -> Optional[tuple[str, str]]:
        """(model reference, field) when the tokenizer comes from a named model, not base or union."""
        setting = self.tokenizer_setting
        if setting is None or setting in ("base", "union"):
            return None
        return setting, ("tokenizer.source" if self.tokenizer is not None else "tokenizer_source")

    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, in first-mention order (base first)."""
        return list(self.model_fields())


def field_path(location: Sequence[Union[str, int]]) -> str:
    """A pydantic error location as the messages spell fields: ``slices[0].sources[1].model``."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def format_validation_error(
    source: str, error: ValidationError,
    unknown_field: str = "unknown field; check its spelling against the mergekit config format",
) -> str:
    """One line per pydantic error: ``FILE: slices[0].sources[1].model: what is wrong``."""
    lines = []
    for item in error.errors():
        location = field_path(item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = unknown_field
        lines.append(f"{source}: {location}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> MergeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}.")
    if "adapters" in data and not {"models", "slices"} & set(data):
        raise ConfigError(f"{source}: this is a LoRA merge recipe (it lists adapters:, not models:); run it with "
                          f"`mergelab lora merge {source} OUT_DIR`.")
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None
    _warn_ignored(config, source)
    return config


def _warn_ignored(config: MergeConfig, source: str) -> None:
    """Fields mergekit accepts and does nothing with: accepted (a mergekit recipe runs unchanged), and said."""
    for index, entry in enumerate(config.models or []):
        if entry.layer_range is not None:
            log.warning("%s: models[%d].layer_range is ignored, as mergekit ignores it there; to take some layers "
                        "of a model, list it under slices: with sources and layer_range", source, index)
    for index, output_slice in enumerate(config.slices or []):
        if output_slice.residual_weight is not None:
            log.warning("%s: slices[%d].residual_weight is ignored, as mergekit 0.1.5 ignores it", source, index)


def load_config(path: Union[str, Path]) -> tuple[MergeConfig, str]:
    """Read and validate a merge YAML; return the config and its original text."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist.")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc}).") from None
    return parse_config(data, str(path)), text

"""The ``mergelab lora merge`` recipe: which adapters, which method, which output rank.

```yaml
adapters:
  - adapter: ./adapters/math          # a PEFT adapter directory (or Hub / zoo name)
    parameters: {weight: 1.0, density: 0.5}
  - adapter: ./adapters/code
    parameters: {weight: 0.7}
merge_method: ties                    # a task-vector method of the registry, or cat
parameters: {density: 0.5}            # shared; per-adapter values win
rank: 16                              # output rank (default: the largest input rank)
# energy: 0.95                        # or: per module, the smallest rank keeping 95% of Σσ²
base_model: ./base                    # optional: validates shapes, merges modules_to_save
dtype: float32                        # working dtype (default float32)
out_dtype: bfloat16                   # stored factors (default: the first adapter's)
error_threshold: 0.1                  # warn above this relative error (default 0.1, or √(1−energy))
```

``parameters`` take the same values as in a merge recipe (scalars, gradients over
layers, filter lists matched against the module's weight name), resolved by
``mergelab.config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelab.config import SettingScope, check_parameter_scopes
from mergelab.config.schema import dtype_name, format_validation_error
from mergelab.errors import ConfigError
from mergelab.methods import MergeMethod, Param

CAT = "cat"
DEFAULT_ERROR_THRESHOLD = 0.1

# ``cat`` works on the factors, not on ΔW, so it is not a registered tensor method; this
# declaration lets the shared parameter machinery resolve and check its weights.
CAT_METHOD = MergeMethod(
    name=CAT,
    function=lambda tensors, *, weight: None,
    params=(Param("weight", default=1.0, per_model=True, help="each adapter's coefficient"),),
    needs_base=False,
    min_models=1,
    max_models=None,
    random=False,
    paper=None,
    differs_from_mergekit=None,
    accepted_without_effect=(),
    task_vector=True,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdapterEntry(_Strict):
    """One input adapter and its own parameters."""

    adapter: str
    parameters: Optional[dict[str, Any]] = None


class LoraMergeConfig(_Strict):
    merge_method: str
    adapters: list[AdapterEntry] = Field(min_length=1)
    parameters: Optional[dict[str, Any]] = None
    rank: Optional[int] = None
    energy: Optional[float] = None
    base_model: Optional[str] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    error_threshold: Optional[float] = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, value: Optional[str], info: Any) -> Optional[str]:
        return dtype_name(value, info.field_name)

    @field_validator("rank")
    @classmethod
    def _rank(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value < 1:
            raise ValueError(f"rank is {value}; the output rank must be at least 1")
        return value

    @field_validator("energy")
    @classmethod
    def _energy(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"energy is {value}; give the fraction of spectral energy to keep, in (0, 1]")
        return value

    @field_validator("error_threshold")
    @classmethod
    def _threshold(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and value < 0:
            raise ValueError("error_threshold must be >= 0")
        return value

    @model_validator(mode="after")
    def _shape(self) -> "LoraMergeConfig":
        if self.rank is not None and self.energy is not None:
            raise ValueError("give either rank or energy, not both")
        if self.merge_method == CAT and (self.rank is not None or self.energy is not None):
            raise ValueError(
                "cat stacks the input ranks and is exact, so it takes no rank or energy; remove them, or use "
                "task_arithmetic (Σ w_i ΔW_i) to re-factorise the sum to a smaller rank"
            )
        return self

    @property
    def warn_above(self) -> float:
        return default_error_threshold(self.energy) if self.error_threshold is None else self.error_threshold


def default_error_threshold(energy: Optional[float]) -> float:
    """0.1, or √(1 − energy) when a spectral energy was asked for (the error it implies)."""
    if energy is None:
        return DEFAULT_ERROR_THRESHOLD
    return max(DEFAULT_ERROR_THRESHOLD, (1 - energy) ** 0.5 * (1 + 1e-9))


def parse_lora_config(data: Any, source: str = "<config>") -> LoraMergeConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}.")
    if "adapters" not in data and {"models", "slices"} & set(data):
        raise ConfigError(f"{source}: this is a model merge recipe (it lists models: or slices:, not adapters:); run "
                          f"it with `mergelab merge {source} OUT_DIR`, or list PEFT adapters under adapters:.")
    try:
        return LoraMergeConfig.model_validate(data)
    except ValidationError as exc:
        unknown = (f"unknown field; a LoRA merge recipe takes {', '.join(LoraMergeConfig.model_fields)} "
                   "(and adapter, parameters per adapter)")
        raise ConfigError(format_validation_error(source, exc, unknown)) from None


def load_lora_config(path: Union[str, Path]) -> tuple[LoraMergeConfig, str]:
    """Read and validate a LoRA merge YAML; return the config and its original text."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist.")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc}).") from None
    return parse_lora_config(data, str(path)), text


def lora_method(config: LoraMergeConfig, source: str = "<config>") -> MergeMethod:
    """The method the recipe names: ``cat`` or a registered method that merges task vectors.

    Adapters are merged on their updates ΔW_i with a zero base, which gives what the method
    would give on the full weights only for methods declared ``task_vector``; the others
    (slerp, karcher, ...) are refused here, before any adapter is opened.
    """
    if config.merge_method == CAT:
        return CAT_METHOD
    from mergelab.methods import all_methods, get_method

    accepted = ", ".join([CAT] + [m.name for m in all_methods() if m.task_vector])
    try:
        method = get_method(config.merge_method)
    except ConfigError:
        import difflib

        close = difflib.get_close_matches(str(config.merge_method), accepted.split(", "), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{source}: unknown merge_method '{config.merge_method}'.{hint} For adapters use one of: "
                          f"{accepted}.") from None
    if not method.task_vector:
        raise ConfigError(
            f"{source}: merge_method '{method.name}' does not merge task vectors, so it cannot merge LoRA adapters "
            f"(lora merge combines their updates ΔW_i with a zero base, which is meaningful only for methods that see "
            f"models through their differences from the base). Use one of: {accepted}; or bake the adapters into "
            f"full models with 'mergelab lora bake' and merge those with 'mergelab merge'."
        )
    return method


def adapter_scopes(config: LoraMergeConfig, source: str) -> tuple[SettingScope, list[tuple[SettingScope, ...]]]:
    """The shared scope and, per adapter, its scopes from highest precedence."""
    top = SettingScope(config.parameters, f"{source}: parameters")
    per_adapter = [
        (SettingScope(entry.parameters, f"{source}: adapters[{index}] ({entry.adapter}).parameters"), top)
        for index, entry in enumerate(config.adapters)
    ]
    return top, per_adapter


def check_lora_parameters(config: LoraMergeConfig, method: MergeMethod, source: str) -> None:
    """Every parameter name must mean something to the method (as for ``mergelab merge``)."""
    scopes: list[tuple[dict | None, str, bool]] = [(config.parameters, f"{source}: parameters", False)]
    for index, entry in enumerate(config.adapters):
        scopes.append((entry.parameters, f"{source}: adapters[{index}] ({entry.adapter}).parameters", True))
    check_parameter_scopes(scopes, method)

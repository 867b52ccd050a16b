"""``mergelab lora merge``: adapters → ΔW per module → a merge method → SVD → a PEFT adapter.

    load_lora_config → plan_lora_merge → [spectrum pass] → engine.run(tasks, ShardedWriter)

Every module is merged on its weight updates ΔW_i = scaling_i · B_i·A_i (exact: no
B_i·A_j cross terms), with any registered method declared ``task_vector`` (given a zero
base, such a method merges the ΔW_i exactly as it would merge the full weights' task
vectors; the others are refused), then re-factorised by truncated SVD to the output rank. ``cat`` instead stacks the scaled factors: exact, rank Σ r_i. One task per module:
only that module's factors and updates are in memory while it is computed.

An adapter that lacks a module contributes ΔW = 0 there (it does not change it).

Tensors an adapter saves in full (``modules_to_save``) replace the base's. PEFT's
``add_weighted_adapter`` refuses adapters that save the same module, and silently loses a
module one adapter saves (the merged adapter gets a fresh copy of the base's module, or
none when that adapter is not the first). Here a tensor saved by one adapter is copied
into the output; one saved by several is merged as differences from the base,
W + merge(S_i − W), when ``base_model`` is given, and refused without it (never one copy
picked over the others). A module that is a LoRA module in one adapter and saved in full
by another is refused: one adapter cannot hold both for a module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from mergelab.arch import layer_index
from mergelab.config import resolve_tensor_params
from mergelab.engine import CopyInput, TaskOutput, TensorRef, TensorTask
from mergelab.errors import ConfigError, InputError
from mergelab.io import Checkpoint, OutputTensor
from mergelab.io.adapter import (
    Adapter,
    LoraModule,
    adapter_config,
    exact_target_modules,
    lora_delta,
    lora_tensor_names,
)
from mergelab.lora.adapted import fit_to_base, open_model, recorded_base, tied_head
from mergelab.lora.config import (
    CAT,
    LoraMergeConfig,
    adapter_scopes,
    check_lora_parameters,
    load_lora_config,
    lora_method,
)
from mergelab.lora.output import (
    ADAPTER_SHARD_BYTES,
    BASE_SOURCE,
    adapter_source,
    CollectingSink,
    LoraOptions,
    LoraResult,
    reconstruction_report,
    write_adapter_files,
)
from mergelab.methods import MergeMethod
from mergelab.methods.call import MethodCall, tensor_seed

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------
# Task ops (pure functions of the loaded inputs)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergedDelta:
    """Merge the ΔW_i of one module with a registered method (base = 0 for task-vector methods).

    Inputs: (A, B) of each participating adapter, in order; adapters without the module
    contribute zeros. Returns the merged ΔW, laid out like the module's weight.
    """

    call: MethodCall  # base_index 0 (a zero base) when the method needs one
    participants: tuple[tuple[int, float], ...]  # (adapter index, scaling) per (A, B) pair
    adapters: int
    weight_shape: tuple[int, int]
    transposed: bool

    def __call__(self, inputs: list[Any]) -> Any:
        import torch

        zeros = torch.zeros(self.weight_shape, dtype=inputs[0].dtype, device=inputs[0].device)
        deltas = [zeros] * self.adapters
        for position, (index, scaling) in enumerate(self.participants):
            a, b = inputs[2 * position], inputs[2 * position + 1]
            deltas[index] = lora_delta(a, b, scaling, self.transposed)
        if self.call.base_index is not None:
            deltas = [zeros, *deltas]
        return self.call(deltas)

    @property
    def description(self) -> str:
        return f"ΔW = {self.call.description} over scaling·B·A of {len(self.participants)} adapters"


@dataclass(frozen=True)
class RefactorOp:
    """A TensorTask op: merged ΔW → truncated SVD → (A, B), reporting the reconstruction error."""

    delta: MergedDelta
    rank: int
    stored_dtype: str

    def __call__(self, inputs: list[Any]) -> TaskOutput:
        import torch

        from mergelab.lora.factor import truncated_factors

        merged = self.delta(inputs)
        matrix = merged.T if self.delta.transposed else merged
        result = truncated_factors(matrix, self.rank, getattr(torch, self.stored_dtype))
        return result.task_output()

    @property
    def description(self) -> str:
        return f"{self.delta.description}; rank-{self.rank} truncated SVD"


@dataclass(frozen=True)
class SpectrumOp:
    """A TensorTask op: merged ΔW → its squared singular values (to choose a rank by energy)."""

    delta: MergedDelta

    def __call__(self, inputs: list[Any]) -> Any:
        from mergelab.lora.factor import spectrum

        merged = self.delta(inputs)
        return spectrum(merged.T if self.delta.transposed else merged)

    @property
    def description(self) -> str:
        return f"{self.delta.description}; singular values"


@dataclass(frozen=True)
class CatOp:
    """A TensorTask op: A = [w_i·s_i·A_i] stacked by rows, B = [B_i] stacked by columns (exact).

    B·A = Σ_i w_i·s_i·B_i·A_i = Σ_i w_i ΔW_i, so the output needs scaling 1. The product
    w_i·s_i·A_i is computed as PEFT's ``cat`` does, (A·w)·s, so factors match it bit for bit.
    """

    participants: tuple[tuple[float, float], ...]  # (weight, scaling) per (A, B) pair

    def __call__(self, inputs: list[Any]) -> TaskOutput:
        import torch

        a = torch.cat([inputs[2 * i] * weight * scaling for i, (weight, scaling) in enumerate(self.participants)], 0)
        b = torch.cat([inputs[2 * i + 1] for i in range(len(self.participants))], 1)
        return TaskOutput((a, b), {"relative_error": 0.0, "residual_energy": 0.0, "total_energy": 0.0})

    @property
    def description(self) -> str:
        terms = " | ".join(f"{w:g}·{s:.4g}·A" for w, s in self.participants)
        return f"cat: A = [{terms}], B = [B ...]"


@dataclass(frozen=True)
class EqualCopies:
    """A TensorTask op for a tensor several adapters save in full that must be equal in all of them.

    Nothing can be averaged for integer or boolean tensors; and the frozen base layer PEFT
    saves beside a LoRA module (``embed_tokens.base_layer.weight``) is the base's own, so
    without a base_model the copies are taken as they are when they agree.
    """

    tensor: str
    owners: tuple[str, ...]  # the saving adapters' references, in input order
    fix: str = "remove it from all adapters but one"

    def __call__(self, inputs: list[Any]) -> Any:
        import torch

        for owner, copy in zip(self.owners[1:], inputs[1:]):
            if not torch.equal(inputs[0], copy):
                raise InputError(
                    f"adapters '{self.owners[0]}' and '{owner}' save different values of '{self.tensor}', "
                    f"which cannot be merged here; {self.fix}."
                )
        return inputs[0]

    @property
    def description(self) -> str:
        return f"copy (equal in {len(self.owners)} adapters)"


@dataclass(frozen=True)
class FullTensorOp:
    """A TensorTask op for a fully saved tensor: W + merge(S_i − W) (inputs W, then S_i)."""

    call: MethodCall
    participants: tuple[int, ...]  # adapter index of each saved copy
    adapters: int

    def __call__(self, inputs: list[Any]) -> Any:
        import torch

        base = inputs[0]
        zeros = torch.zeros_like(base)
        deltas = [zeros] * self.adapters
        for position, index in enumerate(self.participants):
            deltas[index] = inputs[1 + position] - base
        if self.call.base_index is not None:
            deltas = [zeros, *deltas]
        return base + self.call(deltas)

    @property
    def description(self) -> str:
        return f"W + {self.call.description} over (S_i − W)"


# ---------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------


@dataclass
class ModulePlan:
    """One output module: who contributes, its shape, its output rank."""

    name: str
    participants: list[tuple[int, LoraModule]]
    rank: Optional[int] = None  # None until the spectrum pass in energy mode

    @property
    def first(self) -> LoraModule:
        return self.participants[0][1]

    @property
    def embedding(self) -> bool:
        return self.first.embedding

    @property
    def factor_shape(self) -> tuple[int, int]:
        return self.first.factor_shape

    @property
    def max_rank(self) -> int:
        return min(self.factor_shape)


@dataclass
class LoraMergePlan:
    config: LoraMergeConfig
    source: str
    method: MergeMethod
    adapters: list[Adapter]
    base: Optional[Checkpoint]
    modules: list[ModulePlan]
    full_tasks: list[TensorTask]
    modules_to_save: list[str]
    target_modules: Any
    fan_in_fan_out: bool
    seed: Optional[int]
    calls: dict[str, MergedDelta] = field(default_factory=dict)  # module -> its ΔW merge (not cat)
    cat_weights: dict[str, list[float]] = field(default_factory=dict)  # module -> per-adapter weights (cat)

    @property
    def sources(self) -> dict[str, Any]:
        sources: dict[str, Any] = {adapter_source(i): a for i, a in enumerate(self.adapters)}
        if self.base is not None:
            sources[BASE_SOURCE] = self.base
        return sources

    @property
    def needs_spectrum(self) -> bool:
        return any(module.rank is None for module in self.modules)

    @property
    def work_dtype(self) -> str:
        return self.config.dtype or "float32"

    @property
    def factor_dtype(self) -> str:
        return self.config.out_dtype or self.adapters[0].factor_dtype

    def _inputs(self, module: ModulePlan) -> tuple[TensorRef, ...]:
        return tuple(
            TensorRef(adapter_source(index), name)
            for index, spec in module.participants
            for name in (spec.a.name, spec.b.name)
        )

    def spectrum_tasks(self) -> list[TensorTask]:
        """Tasks whose outputs are each module's σ² (energy mode's first pass)."""
        return [
            TensorTask(
                (OutputTensor(module.name, (module.max_rank,), "float64"),),
                self._inputs(module),
                SpectrumOp(self.calls[module.name]),
                self.work_dtype,
            )
            for module in self.modules
        ]

    @property
    def tasks(self) -> list[TensorTask]:
        if self.needs_spectrum:
            raise RuntimeError("output ranks are not known yet; run the spectrum pass first")
        tasks = []
        for module in self.modules:
            a_name, b_name = lora_tensor_names(module.name, module.embedding)
            rows, cols = module.factor_shape
            outputs = (
                OutputTensor(a_name, (module.rank, cols), self.factor_dtype),
                OutputTensor(b_name, (rows, module.rank), self.factor_dtype),
            )
            if self.method.name == CAT:
                weights = self.cat_weights[module.name]
                op: Any = CatOp(tuple((weights[index], spec.scaling) for index, spec in module.participants))
            else:
                op = RefactorOp(self.calls[module.name], module.rank, self.factor_dtype)
            tasks.append(TensorTask(outputs, self._inputs(module), op, self.work_dtype))
        return tasks + self.full_tasks

    @property
    def layout(self) -> list[OutputTensor]:
        return [output for task in self.tasks for output in task.outputs]

    def output_config(self) -> dict[str, Any]:
        ranks = {module.name: int(module.rank or 0) for module in self.modules}
        names = [a.base_model_name_or_path for a in self.adapters]
        same_base = len({base_identity(name) if name else None for name in names}) == 1
        base_name = recorded_base(self.config.base_model) if self.config.base_model else (names[0] if same_base else None)
        return adapter_config(
            ranks=ranks,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            base_model_name_or_path=base_name,
            fan_in_fan_out=self.fan_in_fan_out,
            template=self.adapters[0].config,
        )


class _Planner:
    def __init__(self, config: LoraMergeConfig, source: str, seed: Optional[int]):
        self.config = config
        self.source = source
        self.seed = seed
        self.method = lora_method(config, source)
        check_lora_parameters(config, self.method, source)
        count = len(config.adapters)
        method = self.method
        if count < method.min_models or (method.max_models is not None and count > method.max_models):
            bounds = f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else "")
            raise ConfigError(f"{source}: merge_method {method.name} takes {bounds} adapters, got {count}.")
        self.adapters = [Adapter(entry.adapter) for entry in config.adapters]
        self.base = open_model(config.base_model) if config.base_model else None
        self.top, self.scopes = adapter_scopes(config, source)

    def check_compatible(self) -> None:
        """Adapters must fit one architecture: same shapes and kinds per module, same block layout."""
        seen: dict[Path, int] = {}
        for index, adapter in enumerate(self.adapters):
            first = seen.setdefault(adapter.path.resolve(), index)
            if first != index:
                raise ConfigError(
                    f"{self.source}: adapters[{first}] and adapters[{index}] are the same adapter "
                    f"('{self.adapters[first].reference}'); a merge takes each adapter once. Remove the duplicate "
                    "(to give an adapter more weight, raise its weight instead)."
                )
        if self.base is not None:
            fit_to_base(self.adapters, self.base, self.config.base_model or "")
        prefixes = [a.layer_prefixes() for a in self.adapters]
        for index, found in enumerate(prefixes[1:], start=1):
            if found and prefixes[0] and not found & prefixes[0]:
                raise InputError(
                    f"{self.source}: adapters target different architectures: '{self.adapters[0].reference}' has "
                    f"blocks under {sorted(prefixes[0])} but '{self.adapters[index].reference}' under "
                    f"{sorted(found)}. Merge adapters of the same base model."
                )
        bases: dict[str, str] = {}  # identity -> the name as the first adapter naming it wrote it
        for adapter in self.adapters:
            if adapter.base_model_name_or_path:
                bases.setdefault(base_identity(adapter.base_model_name_or_path), adapter.base_model_name_or_path)
        if len(bases) > 1 and self.base is None:
            log.warning(
                "the adapters name different base models (%s); shapes agree so far, but add base_model: to the "
                "recipe to check them against the one you mean",
                ", ".join(sorted(bases.values())),
            )
        for adapter in self.adapters:
            if any(m.bias is not None for m in adapter.modules.values()):
                raise InputError(
                    f"adapter '{adapter.reference}' has LoRA biases (lora_bias), which lora merge does not merge "
                    "yet; bake it into the base with 'mergelab lora bake' instead."
                )

    def modules(self) -> list[ModulePlan]:
        found: dict[str, ModulePlan] = {}
        for index, adapter in enumerate(self.adapters):
            for name, spec in adapter.modules.items():
                plan = found.setdefault(name, ModulePlan(name, []))
                if plan.participants:
                    first_index, first = plan.participants[0]
                    other = self.adapters[first_index].reference
                    if spec.embedding != first.embedding or spec.fan_in_fan_out != first.fan_in_fan_out:
                        raise InputError(
                            f"module '{name}' is an {'embedding' if spec.embedding else 'linear'} LoRA "
                            f"(fan_in_fan_out={spec.fan_in_fan_out}) in adapter '{adapter.reference}' but not in "
                            f"'{other}'; the adapters were trained on different architectures."
                        )
                    if spec.weight_shape != first.weight_shape:
                        raise InputError(
                            f"module '{name}' updates a weight of shape {list(spec.weight_shape)} in adapter "
                            f"'{adapter.reference}' but {list(first.weight_shape)} in '{other}'; the adapters were "
                            "trained on base models of different shapes."
                        )
                plan.participants.append((index, spec))
        if not found:
            raise InputError(f"{self.source}: the adapters hold no LoRA modules to merge.")
        return [found[name] for name in _module_order(found)]

    def position(self, name: str, layers: int) -> float:
        layer = layer_index(name)
        if layer is None:
            return 0.0
        return layer / (layers - 1) if layers > 1 else 1.0

    def layer_count(self, names: Sequence[str]) -> int:
        if self.base is not None and self.base.num_layers:
            return self.base.num_layers
        layers = [layer_index(name) for name in names]
        known = [layer for layer in layers if layer is not None]
        return max(known) + 1 if known else 1

    def resolve(self, tensor_name: str, t: float) -> dict[str, Any]:
        models = [(entry.adapter, tensor_name, scopes) for entry, scopes in zip(self.config.adapters, self.scopes)]
        return resolve_tensor_params(self.method, output_name=tensor_name, t=t, shared_scopes=(self.top,), models=models,
                                     source=self.source)

    def method_call(self, tensor_name: str, params: dict[str, Any], method: MergeMethod) -> MethodCall:
        seed = tensor_seed(self.seed or 0, tensor_name) if method.random else None
        # In ΔW space the base is zero: every method that takes a base (optional ones too, which then
        # merge task vectors) gets a zero one.
        return MethodCall.resolved(method.name, 0 if method.uses_base else None, params, seed)

    def plan(self) -> LoraMergePlan:
        self.check_compatible()
        modules = self.modules()
        layers = self.layer_count([m.name for m in modules] + [n for a in self.adapters for n in a.full_tensors])
        calls: dict[str, MergedDelta] = {}
        cat_weights: dict[str, list[float]] = {}
        default_rank = max(a.max_rank for a in self.adapters if a.modules)
        for module in modules:
            params = self.resolve(f"{module.name}.weight", self.position(module.name, layers))
            if self.method.name == CAT:
                cat_weights[module.name] = list(params["weight"])
                module.rank = sum(spec.rank for _, spec in module.participants)
                continue
            calls[module.name] = MergedDelta(
                call=self.method_call(f"{module.name}.weight", params, self.method),
                participants=tuple((index, spec.scaling) for index, spec in module.participants),
                adapters=len(self.adapters),
                weight_shape=module.first.weight_shape,
                transposed=module.first.transposed,
            )
            if self.config.energy is None:
                module.rank = min(self.config.rank or default_rank, module.max_rank)
        plan = LoraMergePlan(
            config=self.config,
            source=self.source,
            method=self.method,
            adapters=self.adapters,
            base=self.base,
            modules=modules,
            full_tasks=self.full_tensor_tasks(layers),
            modules_to_save=sorted({name for a in self.adapters for name in a.modules_to_save}),
            target_modules=self.target_modules([m.name for m in modules]),
            fan_in_fan_out=any(m.first.fan_in_fan_out for m in modules),
            seed=self.seed if self.method.random else None,
            calls=calls,
            cat_weights=cat_weights,
        )
        return plan

    def target_modules(self, modules: list[str]) -> Any:
        """PEFT's rule (the union of the inputs' lists) when it is exact, else an exact regex."""
        plain = all(
            isinstance(a.target_modules, list)
            and not a.config.get("layers_to_transform")
            and not a.config.get("exclude_modules")
            for a in self.adapters
        )
        if plain:
            union = sorted({t for a in self.adapters for t in a.target_modules})  # type: ignore[union-attr]
            if all(any(m == t or m.endswith(f".{t}") for t in union) for m in modules):
                return union
        return exact_target_modules(modules)

    def check_saved_modules(self) -> None:
        """No module may be a LoRA module in one adapter and a full copy (modules_to_save) in another."""
        lora_owner: dict[str, Adapter] = {}
        for adapter in self.adapters:
            for module in adapter.modules:
                lora_owner.setdefault(module, adapter)
        for adapter in self.adapters:
            for base_name, adapter_name in adapter.full_tensors.items():
                module, _, parameter = base_name.rpartition(".")
                # a LoRA module's own base layer (e.g. resized embeddings, biases) is saved beside it, and a
                # saved bias (bias="all") leaves the module's weight to its LoRA
                if ".base_layer." in adapter_name or parameter != "weight" or module not in lora_owner:
                    continue
                raise InputError(
                    f"{self.source}: module '{module}' is a LoRA module in adapter '{lora_owner[module].reference}' "
                    f"but adapter '{adapter.reference}' saves it in full (modules_to_save: '{base_name}'); a merged "
                    f"adapter cannot hold both for one module. Bake the adapters into the base model with "
                    f"'mergelab lora bake' (which applies both), or remove '{module}' from one of them."
                )

    def base_tensor(self, name: str) -> str:
        """The base tensor an adapter's full copy of ``name`` differs from (a tied head is the embedding)."""
        tied = tied_head(self.base) if self.base is not None else None
        return tied.embed if tied is not None and name == tied.head else name

    def full_tensor_tasks(self, layers: int) -> list[TensorTask]:
        """Tensors adapters save in full (modules_to_save): copied when one adapter saves them, merged
        as S_i − W against the base when several do (refused without a base)."""
        self.check_saved_modules()
        saved: dict[str, list[int]] = {}
        for index, adapter in enumerate(self.adapters):
            for base_name in adapter.full_tensors:
                saved.setdefault(base_name, []).append(index)
        tasks = []
        for base_name, owners in saved.items():
            first = self.adapters[owners[0]]
            output_name = first.full_tensors[base_name]
            info = first.info(output_name)
            out_dtype = self.config.out_dtype or info.dtype
            refs = tuple(TensorRef(adapter_source(i), self.adapters[i].full_tensors[base_name]) for i in owners)
            owner_names = tuple(self.adapters[i].reference for i in owners)
            if self.base is None:
                if len(owners) > 1 and all(".base_layer." in ref.name for ref in refs):
                    op = EqualCopies(base_name, owner_names, "they are not copies of one base model; add base_model: "
                                     "to the recipe to merge them as differences from it")
                    tasks.append(TensorTask((OutputTensor(output_name, info.shape, out_dtype),), refs, op))
                    continue
                if len(owners) > 1:
                    names = ", ".join(f"'{self.adapters[i].reference}'" for i in owners)
                    raise ConfigError(
                        f"{self.source}: adapters {names} all save a full copy of '{base_name}' (modules_to_save "
                        f"'{base_name.rsplit('.', 1)[0]}'), and mergelab will not pick one copy over the others. "
                        "Add base_model: to the recipe to merge the copies as differences from it, "
                        "W + merge(S_i − W), or remove the module from all adapters but one."
                    )
                if self.config.adapters[owners[0]].parameters or self.config.parameters:
                    log.warning(
                        "'%s' is saved in full by adapter '%s' only and is copied unchanged (no base_model to "
                        "weigh it against)", base_name, first.reference,
                    )
                tasks.append(TensorTask((OutputTensor(output_name, info.shape, out_dtype),), refs, CopyInput(0)))
                continue
            if not info.is_floating_point:
                op: Any = EqualCopies(base_name, owner_names)
                tasks.append(TensorTask((OutputTensor(output_name, info.shape, out_dtype),), refs, op))
                continue
            params = self.resolve(base_name, self.position(base_name, layers))
            method = self.method
            if method.name == CAT:  # cat of full tensors is their weighted sum of differences
                from mergelab.methods import get_method

                method = get_method("task_arithmetic")
                params = {"weight": params["weight"], "normalize": False, "lambda": 1.0}
            op = FullTensorOp(self.method_call(base_name, params, method), tuple(owners), len(self.adapters))
            inputs = (TensorRef(BASE_SOURCE, self.base_tensor(base_name)), *refs)
            tasks.append(TensorTask((OutputTensor(output_name, info.shape, out_dtype),), inputs, op, self.config.dtype))
        return tasks


def base_identity(name: str) -> str:
    """What a ``base_model_name_or_path`` refers to: the resolved folder when it is a local path (so a
    relative and an absolute spelling of one folder agree), else the name itself (a Hub id)."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _module_order(found: dict[str, Any]) -> list[str]:
    """Modules in model order: by layer, then by name (embeddings and heads first)."""

    def key(name: str) -> tuple[int, str]:
        layer = layer_index(name)
        return (-1 if layer is None else layer, name)

    return sorted(found, key=key)


def plan_lora_merge(config: LoraMergeConfig, source: str = "<config>", seed: Optional[int] = None) -> LoraMergePlan:
    """Validate the recipe against the adapters' headers and plan every output tensor."""
    return _Planner(config, source, seed).plan()


def load_and_plan(config_path: str | Path, seed: Optional[int] = None) -> tuple[LoraMergePlan, str]:
    config, text = load_lora_config(config_path)
    return plan_lora_merge(config, str(config_path), seed), text


def resolve_energy_ranks(plan: LoraMergePlan, spectra: dict[str, Any]) -> None:
    """Set each module's rank to the smallest one keeping ``energy`` of its spectrum."""
    from mergelab.lora.factor import rank_for_energy

    for module in plan.modules:
        module.rank = rank_for_energy(spectra[module.name], plan.config.energy or 1.0)


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


def run_lora_merge(config_path: str | Path, out_dir: str | Path, options: Any = None) -> Any:
    """Merge the recipe's adapters into one PEFT adapter at ``out_dir`` (temporary name, then renamed)."""
    import secrets

    from mergelab import engine
    from mergelab.io import OutputDirectory, ShardedWriter
    from mergelab.io.adapter import ADAPTER_WEIGHTS

    options = options or LoraOptions()
    engine.check_options(options)
    output = OutputDirectory(out_dir, force=options.force, inputs=[config_path])  # before any adapter is fetched
    seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
    plan, text = load_and_plan(config_path, seed)
    output.protect(s.path for s in plan.sources.values())
    if plan.seed is not None and options.seed is None:
        log.warning("no --seed given for random method %s; using seed %d (recorded in the report)", plan.method.name, seed)
    engine.apply_threads(options.threads)
    seconds = 0.0
    if plan.needs_spectrum:
        spectra = CollectingSink()
        stats = engine.run(plan.spectrum_tasks(), plan.sources, spectra, device=options.device,
                           prefetch=options.prefetch, progress=options.progress, description="spectra")
        seconds += stats.seconds
        resolve_energy_ranks(plan, spectra.tensors)
    with output as temporary:
        writer = ShardedWriter(temporary, plan.layout, ADAPTER_SHARD_BYTES, file_name=ADAPTER_WEIGHTS)
        stats = engine.run(plan.tasks, plan.sources, writer, device=options.device,
                           prefetch=options.prefetch, progress=options.progress, description="merging adapters")
        seconds += stats.seconds
        config = plan.output_config()
        ranks = {module.name: int(module.rank or 0) for module in plan.modules}
        keys = {module.name: lora_tensor_names(module.name, module.embedding)[0] for module in plan.modules}
        report = reconstruction_report(
            ranks, stats.metrics, keys, plan.config.warn_above,
            extra={"command": "merge", "merge_method": plan.method.name, "rank": plan.config.rank,
                   "energy": plan.config.energy, "seed": plan.seed,
                   "adapters": [a.reference for a in plan.adapters]},
        )
        write_adapter_files(
            temporary, config, report, Path(out_dir).name,
            f"`{plan.method.name}` merge of {len(plan.adapters)} adapters in ΔW space, "
            + ("stacked exactly (cat)." if plan.method.name == CAT else "re-factorised by truncated SVD."),
            text,
        )
    return LoraResult(output.destination, stats.tasks, seconds, report, plan.seed)


def describe_lora_plan(plan: LoraMergePlan) -> str:
    """A human-readable plan for ``--dry-run``."""
    lines = [f"merge_method: {plan.method.name}", "adapters:"]
    for index, adapter in enumerate(plan.adapters):
        lines.append(f"  {adapter_source(index)}: {adapter.path} ({len(adapter.modules)} LoRA modules, "
                     f"max rank {adapter.max_rank}, {len(adapter.full_tensors)} full tensors)")
    if plan.base is not None:
        lines.append(f"base_model: {plan.base.path}")
    if plan.config.energy is not None:
        lines.append(f"output rank: per module, the smallest keeping {plan.config.energy:g} of the spectral energy "
                     "(found by a first pass over the singular values)")
    if plan.seed is not None:
        lines.append(f"seed: {plan.seed}")
    lines.append("")
    for module in plan.modules:
        rank = "by energy" if module.rank is None else str(module.rank)
        contributors = ", ".join(f"{adapter_source(i)} (r={spec.rank}, scaling={spec.scaling:.4g})"
                                 for i, spec in module.participants)
        lines.append(f"{module.name}  {list(module.first.weight_shape)} -> rank {rank}")
        lines.append(f"    from {contributors}")
        if plan.method.name == CAT:
            weights = plan.cat_weights[module.name]
            lines.append(f"    cat with weights {[weights[i] for i, _ in module.participants]}")
        else:
            lines.append(f"    {plan.calls[module.name].description}")
    for task in plan.full_tasks:
        lines.append(f"{task.name}  {list(task.outputs[0].shape)} (full copy)")
        lines.append(f"    from {', '.join(str(ref) for ref in task.inputs)}")
        lines.append(f"    {task.op.description}")
    return "\n".join(lines)

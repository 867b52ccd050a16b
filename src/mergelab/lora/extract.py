"""``mergelab lora extract``: a PEFT adapter from a full fine-tune, by SVD of the difference.

    base, fine-tune → plan_extract → [spectrum pass] → engine.run(tasks, ShardedWriter)

As mergekit-extract-lora does: every linear weight inside the model (2-D, not an
embedding or the output head) becomes a LoRA module, B·A ≈ W_ft − W_base by truncated SVD
(to ``rank``, or per module to the smallest rank keeping ``energy`` of Σσ²); embeddings,
the output head, norms and any other tensor are saved in full as ``modules_to_save`` (for
models with tied embeddings the head too, as a copy of the fine-tune's embedding matrix:
PEFT gives a tied ``lm_head`` in ``modules_to_save`` its own copy).
Biases of LoRA modules are saved in full beside them (``<module>.base_layer.bias``), which
PEFT loads into the base layer. Every module reports its relative reconstruction error.

Modules that store their weight as [in, out] (transformers' Conv1D in GPT-2-style models,
as ``mergelab.arch.stores_transposed`` knows them) are factorised as PEFT expects them:
B·A ≈ (W_ft − W_base)ᵀ, with A [r, in], B [out, r], and ``fan_in_fan_out`` in the config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mergelab.arch import parse_name, stores_transposed
from mergelab.engine import CopyInput, TaskOutput, TensorRef, TensorTask
from mergelab.errors import ConfigError, InputError
from mergelab.io import Checkpoint, OutputTensor
from mergelab.io.adapter import PEFT_PREFIX, adapter_config, exact_target_modules, lora_tensor_names
from mergelab.lora.adapted import open_model, recorded_base, tied_head
from mergelab.lora.config import default_error_threshold
from mergelab.lora.output import (
    ADAPTER_SHARD_BYTES,
    BASE_SOURCE,
    CollectingSink,
    LoraOptions,
    LoraResult,
    reconstruction_report,
    write_adapter_files,
)

log = logging.getLogger(__name__)

FINETUNED_SOURCE = "finetuned"
_FULL_ROLES = ("embed", "lm_head", "position_embed")


@dataclass(frozen=True)
class ExtractOp:
    """A TensorTask op: inputs (W_base, W_ft) → truncated SVD of W_ft − W_base → (A, B).

    ``transposed``: the weights are stored [in, out] (Conv1D), so the factors are those of
    (W_ft − W_base)ᵀ, as PEFT lays them out for ``fan_in_fan_out`` modules.
    """

    rank: int
    stored_dtype: str
    transposed: bool = False

    def __call__(self, inputs: list[Any]) -> TaskOutput:
        import torch

        from mergelab.lora.factor import truncated_factors

        base, finetuned = inputs
        difference = finetuned - base
        if self.transposed:
            difference = difference.T
        result = truncated_factors(difference, self.rank, getattr(torch, self.stored_dtype))
        return result.task_output()

    @property
    def description(self) -> str:
        return f"rank-{self.rank} truncated SVD of (finetuned − base){'ᵀ' if self.transposed else ''}"


@dataclass(frozen=True)
class DifferenceSpectrumOp:
    """A TensorTask op: inputs (W_base, W_ft) → σ² of the difference (energy mode's first pass)."""

    def __call__(self, inputs: list[Any]) -> Any:
        from mergelab.lora.factor import spectrum

        base, finetuned = inputs
        return spectrum(finetuned - base)

    @property
    def description(self) -> str:
        return "singular values of (finetuned − base)"


@dataclass
class ExtractPlan:
    base: Checkpoint
    finetuned: Checkpoint
    base_reference: str
    rank: Optional[int]
    energy: Optional[float]
    out_dtype: Optional[str]
    modules: dict[str, tuple[int, int]]  # LoRA module -> shape of B·A, [out, in]
    ranks: dict[str, Optional[int]]
    full: list[tuple[str, str]]  # (fine-tune tensor name, adapter tensor name)
    modules_to_save: list[str]
    target_modules: Any
    error_threshold: Optional[float] = None
    transposed: frozenset[str] = frozenset()  # modules whose weight is stored [in, out] (Conv1D)

    @property
    def sources(self) -> dict[str, Any]:
        return {BASE_SOURCE: self.base, FINETUNED_SOURCE: self.finetuned}

    def _refs(self, module: str) -> tuple[TensorRef, TensorRef]:
        return (TensorRef(BASE_SOURCE, f"{module}.weight"), TensorRef(FINETUNED_SOURCE, f"{module}.weight"))

    def _dtype(self, tensor: str) -> str:
        return self.out_dtype or self.finetuned.info(tensor).dtype

    def spectrum_tasks(self) -> list[TensorTask]:
        return [
            TensorTask((OutputTensor(module, (min(shape),), "float64"),), self._refs(module),
                       DifferenceSpectrumOp(), "float32")
            for module, shape in self.modules.items()
        ]

    @property
    def tasks(self) -> list[TensorTask]:
        tasks = []
        for module, (rows, cols) in self.modules.items():
            rank = self.ranks[module]
            if rank is None:
                raise RuntimeError("output ranks are not known yet; run the spectrum pass first")
            a_name, b_name = lora_tensor_names(module, embedding=False)
            dtype = self._dtype(f"{module}.weight")
            outputs = (OutputTensor(a_name, (rank, cols), dtype), OutputTensor(b_name, (rows, rank), dtype))
            op = ExtractOp(rank, dtype, module in self.transposed)
            tasks.append(TensorTask(outputs, self._refs(module), op, "float32"))
        for tensor, adapter_name in self.full:
            info = self.finetuned.info(tensor)
            dtype = self.out_dtype if self.out_dtype and info.is_floating_point else info.dtype
            tasks.append(TensorTask((OutputTensor(adapter_name, info.shape, dtype),),
                                    (TensorRef(FINETUNED_SOURCE, tensor),), CopyInput(0)))
        return tasks

    @property
    def layout(self) -> list[OutputTensor]:
        return [output for task in self.tasks for output in task.outputs]

    @property
    def warn_above(self) -> float:
        return default_error_threshold(self.energy) if self.error_threshold is None else self.error_threshold

    def output_config(self) -> dict[str, Any]:
        return adapter_config(
            ranks={module: int(rank or 0) for module, rank in self.ranks.items()},
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
            base_model_name_or_path=recorded_base(self.base_reference),
            fan_in_fan_out=bool(self.transposed),
        )


def plan_extract(base_reference: str, finetuned_reference: str, *, rank: Optional[int] = None,
                 energy: Optional[float] = None, out_dtype: Optional[str] = None,
                 error_threshold: Optional[float] = None) -> ExtractPlan:
    """Check that the two models share an architecture and plan the extraction."""
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of --rank R or --energy F.")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank is {rank}; a LoRA rank must be at least 1.")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"--energy is {energy}; give the fraction of spectral energy to keep, in (0, 1].")
    if out_dtype is not None:
        from mergelab.config import dtype_name

        try:
            out_dtype = dtype_name(out_dtype, "--out-dtype")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    base = open_model(base_reference)
    finetuned = open_model(finetuned_reference)
    missing = [name for name in base.tensors if name not in finetuned.tensors]
    extra = [name for name in finetuned.tensors if name not in base.tensors]
    if missing or extra:
        name, where = (missing[0], "the fine-tune lacks") if missing else (extra[0], "only the fine-tune has")
        raise InputError(
            f"'{finetuned_reference}' and '{base_reference}' are not the same architecture: {where} tensor "
            f"'{name}' ({len(missing)} missing, {len(extra)} extra). Extract from a fine-tune of this base."
        )
    for name, info in base.tensors.items():
        other = finetuned.info(name)
        if tuple(info.shape) != tuple(other.shape):
            raise InputError(
                f"tensor '{name}' has shape {list(other.shape)} in '{finetuned_reference}' but {list(info.shape)} "
                f"in '{base_reference}'; extract needs models of the same shapes (resize the base's embeddings "
                "first if the fine-tune added tokens)."
            )
    modules: dict[str, tuple[int, int]] = {}
    transposed: set[str] = set()
    for name, info in finetuned.tensors.items():
        if (name.endswith(".weight") and len(info.shape) == 2 and info.is_floating_point
                and parse_name(name).role not in _FULL_ROLES):
            module = name[: -len(".weight")]
            rows, cols = info.shape
            if stores_transposed(module, base.config):
                transposed.add(module)
                rows, cols = cols, rows
            modules[module] = (rows, cols)
    if not modules:
        raise InputError(f"'{finetuned_reference}' has no linear weights to extract LoRA modules from.")
    full: list[tuple[str, str]] = []
    saved_modules: set[str] = set()
    for name in finetuned.tensors:
        module, _, parameter = name.rpartition(".")
        if module in modules:
            if parameter != "weight":  # e.g. a bias of a LoRA module: saved beside it, into its base layer
                full.append((name, f"{PEFT_PREFIX}{module}.base_layer.{parameter}"))
            continue
        full.append((name, f"{PEFT_PREFIX}{name}"))
        saved_modules.add(module.rsplit(".", 1)[-1] if module else name)
    tied = tied_head(finetuned)
    if tied is not None and tied_head(base) is not None:
        # The fine-tune's head is its embedding matrix (a stored head is unused). PEFT gives a tied base's
        # lm_head in modules_to_save its own copy, so saving the head too makes the adapter compute the
        # fine-tune's logits.
        full = [entry for entry in full if entry[0] != tied.head] + [(tied.embed, f"{PEFT_PREFIX}{tied.head}")]
        saved_modules.add(tied.head.rsplit(".", 1)[0].rsplit(".", 1)[-1])
    ranks: dict[str, Optional[int]] = {m: (min(rank, min(shape)) if rank else None) for m, shape in modules.items()}
    larger = [m for m, (rows, cols) in modules.items() if rank and ranks[m] * (rows + cols) >= rows * cols]
    if larger:
        log.warning("--rank %d: for %d of %d modules (e.g. '%s') the factors hold as many numbers as the full "
                    "update or more; a smaller rank (or --energy) gives a smaller adapter", rank, len(larger),
                    len(modules), larger[0])
    return ExtractPlan(
        base=base, finetuned=finetuned, base_reference=base_reference, rank=rank, energy=energy,
        out_dtype=out_dtype, modules=modules, ranks=ranks, full=full,
        modules_to_save=sorted(saved_modules), target_modules=_target_modules(modules, finetuned.tensors),
        error_threshold=error_threshold, transposed=frozenset(transposed),
    )


def _target_modules(modules: dict[str, Any], tensors: dict[str, Any]) -> Any:
    """The modules' last names (as PEFT users write them) when those match exactly them, else a regex."""
    suffixes = sorted({module.rsplit(".", 1)[-1] for module in modules})
    every_module = {name.rsplit(".", 1)[0] for name in tensors}
    matched = {m for m in every_module if m.rsplit(".", 1)[-1] in suffixes}
    return suffixes if matched == set(modules) else exact_target_modules(list(modules))


def describe_extract_plan(plan: ExtractPlan) -> str:
    lines = [f"base: {plan.base.path}", f"finetuned: {plan.finetuned.path}",
             f"LoRA modules: {len(plan.modules)} (target_modules: {plan.target_modules})",
             f"saved in full (modules_to_save: {plan.modules_to_save}): {len(plan.full)} tensors"]
    if plan.energy is not None:
        lines.append(f"rank: per module, the smallest keeping {plan.energy:g} of the spectral energy "
                     "(found by a first pass over the singular values)")
    lines.append("")
    for module, shape in plan.modules.items():
        rank = plan.ranks[module]
        layout = " (stored transposed: fan_in_fan_out)" if module in plan.transposed else ""
        lines.append(f"{module}  {list(shape)}{layout} -> rank {'by energy' if rank is None else rank}")
    for tensor, adapter_name in plan.full:
        lines.append(f"{adapter_name}  (full copy of {tensor})")
    return "\n".join(lines)


def run_extract(base_reference: str, finetuned_reference: str, out_dir: str | Path, *, rank: Optional[int] = None,
                energy: Optional[float] = None, out_dtype: Optional[str] = None,
                error_threshold: Optional[float] = None, options: Any = None) -> Any:
    """Extract an adapter with B·A ≈ W_ft − W_base per linear module into ``out_dir``."""
    from mergelab import engine
    from mergelab.io import OutputDirectory, ShardedWriter
    from mergelab.io.adapter import ADAPTER_WEIGHTS
    from mergelab.lora.factor import rank_for_energy

    options = options or LoraOptions()
    engine.check_options(options)
    output = OutputDirectory(out_dir, force=options.force)  # before any model is fetched
    plan = plan_extract(base_reference, finetuned_reference, rank=rank, energy=energy, out_dtype=out_dtype,
                        error_threshold=error_threshold)
    output.protect(s.path for s in plan.sources.values())
    engine.apply_threads(options.threads)
    seconds = 0.0
    if energy is not None:
        spectra = CollectingSink()
        stats = engine.run(plan.spectrum_tasks(), plan.sources, spectra, device=options.device,
                           prefetch=options.prefetch, progress=options.progress, description="spectra")
        seconds += stats.seconds
        plan.ranks = {module: rank_for_energy(spectra.tensors[module], energy) for module in plan.modules}
    with output as temporary:
        writer = ShardedWriter(temporary, plan.layout, ADAPTER_SHARD_BYTES, file_name=ADAPTER_WEIGHTS)
        stats = engine.run(plan.tasks, plan.sources, writer, device=options.device, prefetch=options.prefetch,
                           progress=options.progress, description="extracting")
        seconds += stats.seconds
        keys = {module: lora_tensor_names(module, embedding=False)[0] for module in plan.modules}
        if all(stats.metrics.get(key, {}).get("total_energy", 1.0) == 0 for key in keys.values()):
            log.warning("'%s' has the same linear weights as '%s': every extracted LoRA module is zero (the adapter "
                        "holds only the full copies)", finetuned_reference, base_reference)
        report = reconstruction_report(
            {m: int(r or 0) for m, r in plan.ranks.items()}, stats.metrics, keys, plan.warn_above,
            extra={"command": "extract", "base": base_reference, "finetuned": finetuned_reference,
                   "rank": rank, "energy": energy},
        )
        write_adapter_files(temporary, plan.output_config(), report, Path(out_dir).name,
                            f"extracted from `{finetuned_reference}` against `{base_reference}` by truncated SVD "
                            "of the weight differences.")
    return LoraResult(output.destination, stats.tasks, seconds, report)

"""Planner: a merge recipe plus input headers become a list of ``TensorTask``s.

Everything that can be wrong with a recipe or its inputs is found here, before any
tensor is read: unknown methods and parameters, missing or out-of-range values, model
directories, missing or extra tensors, shape mismatches, layer ranges.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from mergelab.arch import (
    architecture,
    check_stored_head,
    embedding_name,
    head_names,
    is_vocab_tensor,
    parse_name,
    same_architecture,
    ties_embeddings,
    with_layer_index,
)
from mergelab.config import MergeConfig, SettingScope, check_parameters, resolve_tensor_params
from mergelab.engine import CopyInput, TensorRef, TensorTask
from mergelab.errors import ConfigError, InputError
from mergelab.io import Checkpoint, OutputTensor
from mergelab.lora.adapted import AdaptedModel, open_model
from mergelab.merge.vocabulary import Vocabulary, plan_vocabulary
from mergelab.methods import MergeMethod, get_method
from mergelab.methods.call import MethodCall, tensor_seed

log = logging.getLogger(__name__)


@dataclass
class MergePlan:
    """Everything needed to run (or print) a merge."""

    config: MergeConfig
    method: MergeMethod
    checkpoints: dict[str, Checkpoint]
    tasks: list[TensorTask]
    out_config: dict[str, Any]
    tokenizer_model: Optional[str]
    seed: Optional[int]
    notes: list[str] = field(default_factory=list)
    vocabulary: Optional[Vocabulary] = None  # set when inputs' vocabularies are cropped or aligned

    @property
    def layout(self) -> list[OutputTensor]:
        return [output for task in self.tasks for output in task.outputs]

    def input_paths(self) -> list[Path]:
        """Every directory the merge reads: the models, and the adapters applied to them on the fly."""
        paths = []
        for checkpoint in self.checkpoints.values():
            paths.append(checkpoint.path)
            if isinstance(checkpoint, AdaptedModel):
                paths.extend(adapter.path for adapter in checkpoint.adapters)
        return paths

    def peak_bytes_estimate(self, prefetch: int = 2) -> int:
        """Resident tensor bytes at the worst point of the run.

        The task being computed holds its inputs, a workspace of about one working copy
        per input (task vectors, masks) and its output; up to ``prefetch`` following
        tasks hold their loaded inputs; one finished output waits for the writer.
        """
        sizes = []
        for task in self.tasks:
            inputs = task.input_bytes(self.checkpoints)
            sizes.append((inputs, 2 * inputs + 2 * task.out_bytes))
        peak = 0
        for index, (_, working) in enumerate(sizes):
            ahead = sum(loaded for loaded, _ in sizes[index + 1 : index + 1 + prefetch])
            peak = max(peak, working + ahead)
        return peak


# ---------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """One input of an output slice: a model, its first layer, its parameter scopes, the recipe field naming it."""

    model: str
    start: int
    scopes: tuple[SettingScope, ...]
    field: str


@dataclass(frozen=True)
class _Slice:
    sources: tuple[_Source, ...]
    length: int
    base: Optional[str]
    shared_scopes: tuple[SettingScope, ...]
    where: str


class _Planner:
    def __init__(self, config: MergeConfig, source: str, seed: Optional[int], allow_crimes: bool = False):
        self.config = config
        self.source = source
        self.seed = seed
        self.allow_crimes = allow_crimes
        try:
            self.method = get_method(config.merge_method)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        check_parameters(config, self.method, source)
        self.checkpoints = {}
        fields = dict(config.model_fields())
        tokenizer_model = config.tokenizer_model_field()
        if tokenizer_model is not None:
            fields.setdefault(*tokenizer_model)
        for reference, field_name in fields.items():
            try:
                self.checkpoints[reference] = open_model(reference)
            except InputError as exc:
                raise InputError(f"{source}: {field_name}: {exc}") from None
        self.check_architectures(config.referenced_models())
        for reference in config.referenced_models():
            check_stored_head(self.checkpoints[reference])
        self.vocabulary: Optional[Vocabulary] = None
        self.top = SettingScope(config.parameters, f"{source}: parameters")
        self.tasks: list[TensorTask] = []
        self.covered: dict[str, set[str]] = {}  # model -> input tensor names some output accounts for
        self.out_layers = 0
        self.output_tied = False

    def check_architectures(self, models: Sequence[str]) -> None:
        """Inputs of different architectures (config ``architectures``, else ``model_type``) are refused
        unless ``allow_crimes`` (mergekit's --allow-crimes): their tensors may line up by name and shape
        while meaning different things."""
        configs = {model: self.checkpoints[model].config for model in models}
        first = configs[models[0]]
        if all(same_architecture(first, config) for config in configs.values()):
            return
        found = {model: architecture(config) for model, config in configs.items()}
        listing = ", ".join(f"'{model}' is {kind}" for model, kind in found.items())
        if not self.allow_crimes:
            raise ConfigError(
                f"{self.source}: the models are of different architectures ({listing}). Merge models of one "
                "architecture, or pass --allow-crimes (as in mergekit) if you mean to mix them; the output takes "
                "the config of the base (or first) model."
            )
        log.warning("mixing architectures (--allow-crimes): %s", listing)

    def tied(self, model: str) -> bool:
        checkpoint = self.checkpoints[model]
        return ties_embeddings(checkpoint.config, checkpoint.tensors)

    def input_name(self, model: str, name: str) -> str:
        """The tensor of ``model`` that plays the part of output tensor ``name``.

        A model with tied embeddings computes its output head with its embedding matrix,
        so that matrix is what it contributes to an (untied) output head.
        """
        if parse_name(name).role == "lm_head" and name.endswith("weight") and self.tied(model):
            embedding = embedding_name(self.checkpoints[model].tensors)
            if embedding is not None:
                return embedding
        return name

    # ---- recipe -> slices ----------------------------------------------------------------
    def slices(self) -> list[_Slice]:
        config = self.config
        if config.models is not None:
            entries = [
                _Source(e.model, 0, (SettingScope(e.parameters, f"{self.source}: models[{i}].parameters"), self.top),
                        f"models[{i}]")
                for i, e in enumerate(config.models)
            ]
            if config.base_model and config.base_model not in {e.model for e in entries}:
                entries.append(_Source(config.base_model, 0, (self.top,), "base_model"))
            lengths = {e.model: self._num_layers(e.model) for e in entries}
            if len(set(lengths.values())) > 1:
                detail = ", ".join(f"{m}: {n}" for m, n in lengths.items())
                raise InputError(
                    f"{self.source}: input models have different numbers of layers ({detail}); "
                    "use 'slices' with layer_range to choose matching layers."
                )
            length = next(iter(lengths.values()))
            return [_Slice(tuple(entries), length, config.base_model, (self.top,), f"{self.source}: models")]
        result = []
        for index, output_slice in enumerate(config.slices or []):
            where = f"{self.source}: slices[{index}]"
            scope = SettingScope(output_slice.parameters, f"{where}.parameters")
            sources = []
            for j, src in enumerate(output_slice.sources):
                start, end = src.layer_range
                layers = self._num_layers(src.model)
                if end > layers:
                    raise ConfigError(
                        f"{where}.sources[{j}].layer_range {list(src.layer_range)}: model '{src.model}' has "
                        f"only {layers} layers (valid ranges end at {layers} or less)."
                    )
                sources.append(
                    _Source(
                        src.model,
                        start,
                        (SettingScope(src.parameters, f"{where}.sources[{j}].parameters"), scope, self.top),
                        f"slices[{index}].sources[{j}]",
                    )
                )
            lengths = {s.layer_range[1] - s.layer_range[0] for s in output_slice.sources}
            if len(lengths) != 1:
                raise ConfigError(f"{where}: all sources of a slice must span the same number of layers.")
            base = output_slice.base_model or config.base_model
            if self.method.uses_base and base is not None and base not in {s.model for s in sources}:
                raise ConfigError(
                    f"{where}: base_model '{base}' is not among this slice's sources; add it with a layer_range."
                )
            result.append(_Slice(tuple(sources), lengths.pop(), base, (scope, self.top), where))
        return result

    def _num_layers(self, model: str) -> int:
        checkpoint = self.checkpoints[model]
        layers = {parse_name(name).layer for name in checkpoint.tensors} - {None}
        found = max(layers) + 1 if layers else 0
        declared = checkpoint.num_layers
        return declared if declared is not None else found

    # ---- slices -> tasks -----------------------------------------------------------------
    def check_contract(self, output_slice: _Slice) -> None:
        method = self.method
        models = [s.model for s in output_slice.sources]
        self.check_duplicates(output_slice)
        if method.needs_base and output_slice.base is None:
            raise ConfigError(f"{self.source}: merge_method {method.name} needs a base_model; add 'base_model:'.")
        with_base = method.uses_base and output_slice.base is not None
        count = len([m for m in models if not with_base or m != output_slice.base])
        if count < method.min_models or (method.max_models is not None and count > method.max_models):
            wanted = (
                f"exactly {method.min_models}"
                if method.max_models == method.min_models
                else f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else "")
            )
            what = "models besides the base" if with_base else "models"
            if method.max_models == method.min_models == 1:
                what = what.replace("models", "model", 1)
            raise ConfigError(f"{output_slice.where}: merge_method {method.name} takes {wanted} {what}, got {count}.")

    def check_duplicates(self, output_slice: _Slice) -> None:
        """Each model enters a merge once (mergekit: "Duplicate merge inputs"); a second entry would
        silently double its weight, or, for a slice, merge a model's layers with its own other layers."""
        seen: dict[Any, _Source] = {}
        for source in output_slice.sources:
            first = seen.setdefault(self.identity(source.model), source)
            if first is not source:
                same = "" if first.model == source.model else f" ('{first.model}' and '{source.model}' are the same model)"
                raise ConfigError(
                    f"{self.source}: {first.field} and {source.field} both read model '{source.model}'{same}; "
                    "a merge takes each model once. Remove the duplicate (to give a model more weight, raise its "
                    "weight instead)."
                )

    def identity(self, model: str) -> tuple[Any, ...]:
        """What makes two references the same input: its directory, and the adapters applied to it."""
        checkpoint = self.checkpoints[model]
        if isinstance(checkpoint, AdaptedModel):
            adapters = tuple((adapter.path.resolve(), weight) for adapter, weight in zip(checkpoint.adapters, checkpoint.weights))
            return checkpoint.base.path.resolve(), adapters
        return checkpoint.path.resolve(), ()

    def plan_tensor(self, output_slice: _Slice, output: str, names: Sequence[str], t: float) -> None:
        """One output tensor from ``names[i]`` of ``output_slice.sources[i]``."""
        sources = output_slice.sources
        infos = []
        for source, name in zip(sources, names):
            checkpoint = self.checkpoints[source.model]
            if name not in checkpoint:
                raise InputError(
                    f"tensor '{name}' is missing from model '{source.model}' but needed for output '{output}'; "
                    "the inputs must share an architecture."
                )
            infos.append(checkpoint.info(name))
            self.covered.setdefault(source.model, set()).add(name)
        vocabulary = self.vocabulary if is_vocab_tensor(output) else None
        shapes = {info.shape[1:] if vocabulary else info.shape for info in infos}
        if len(shapes) > 1:
            detail = ", ".join(f"{s.model}: {list(i.shape)}" for s, i in zip(sources, infos))
            raise InputError(f"tensor '{names[0]}' has different shapes across inputs ({detail}).")
        base_index = None
        if self.method.uses_base and output_slice.base is not None:
            base_index = next(i for i, s in enumerate(sources) if s.model == output_slice.base)
        refs = tuple(TensorRef(s.model, n) for s, n in zip(sources, names))
        shape = infos[0].shape if vocabulary is None else (vocabulary.rows, *infos[0].shape[1:])
        if not all(info.is_floating_point for info in infos):
            keep = base_index if base_index is not None else 0
            self.tasks.append(TensorTask((OutputTensor(output, shape, infos[keep].dtype),), (refs[keep],), CopyInput(0)))
            return
        per_model = [(s.model, n, s.scopes) for i, (s, n) in enumerate(zip(sources, names)) if i != base_index]
        params = resolve_tensor_params(
            self.method, output_name=output, t=t, shared_scopes=output_slice.shared_scopes, models=per_model,
            source=self.source,
        )
        seed = tensor_seed(self.seed or 0, output) if self.method.random else None
        op: Any = MethodCall.resolved(self.method.name, base_index, params, seed)
        if vocabulary is not None:
            alignment_base = next((i for i, s in enumerate(sources) if s.model == output_slice.base), None)
            op = vocabulary.op(op, [s.model for s in sources], alignment_base)
        work = self.config.dtype
        if work is None:
            import torch

            promoted = getattr(torch, infos[0].dtype)
            for info in infos[1:]:
                promoted = torch.promote_types(promoted, getattr(torch, info.dtype))
            work = str(promoted).removeprefix("torch.")
        self.tasks.append(
            TensorTask((OutputTensor(output, shape, self.config.out_dtype or work),), refs, op, self.config.dtype)
        )

    def plan(self) -> list[TensorTask]:
        self.planned_slices = slices = self.slices()
        for output_slice in slices:
            self.check_contract(output_slice)
        reference = self.reference_model(slices)
        checkpoint = self.checkpoints[reference]
        globals_ = [n for n in checkpoint.tensors if parse_name(n).layer is None]
        self.output_tied = self.tied(reference)
        self.vocabulary = self.plan_vocabulary(slices)
        if self.output_tied:
            self.note_tied_output(reference, head_names(globals_), slices[-1])
            globals_ = [n for n in globals_ if n not in head_names(globals_)]
        pre = [n for n in globals_ if _is_pre_layers(parse_name(n).role)]
        post = [n for n in globals_ if n not in pre]
        for name in pre:
            self.plan_tensor(slices[0], name, [name] * len(slices[0].sources), 0.0)
        for output_slice in slices:
            self.plan_slice(output_slice)
        for name in post:
            names = [self.input_name(source.model, name) for source in slices[-1].sources]
            for source, used in zip(slices[-1].sources, names):
                if used != name:
                    log.info("model '%s' ties its embeddings: its '%s' serves as its '%s' in the merge",
                             source.model, used, name)
            self.plan_tensor(slices[-1], name, names, 0.0)
        self.check_extra_tensors(slices)
        return self.tasks

    def plan_vocabulary(self, slices: list[_Slice]) -> Optional[Vocabulary]:
        """Crop or align the token-indexed tensors when the inputs' vocabularies differ (see merge.vocabulary)."""
        models = [s.model for s in slices[0].sources] + [s.model for s in slices[-1].sources]
        base = self.config.base_model if self.config.base_model in models else None
        ordered = list(dict.fromkeys(([base] if base else []) + models))
        return plan_vocabulary(self.config, self.checkpoints, ordered, base, self.source)

    def note_tied_output(self, reference: str, stray: list[str], last: _Slice) -> None:
        """A tied output writes no head: say what is not used, so nothing is lost silently."""
        if stray:
            log.info("model '%s' ties its embeddings; its stored %s is not written (transformers ties it to "
                     "the merged embeddings)", reference, ", ".join(stray))
        untied = [s.model for s in last.sources if not self.tied(s.model) and head_names(self.checkpoints[s.model].tensors)]
        if untied:
            log.warning(
                "the output ties its embeddings (as '%s' does), so the separate output heads of %s are not merged; "
                "to merge them, make a model with untied embeddings the base_model (or the first model)",
                reference, ", ".join(f"'{m}'" for m in dict.fromkeys(untied)),
            )

    def plan_slice(self, output_slice: _Slice) -> None:
        # Tensor names per layer come from the base when it is an input, else the first source.
        first = next((s for s in output_slice.sources if s.model == output_slice.base), output_slice.sources[0])
        layered: dict[int, list[str]] = {}
        for name in self.checkpoints[first.model].tensors:
            layer = parse_name(name).layer
            if layer is not None:
                layered.setdefault(layer, []).append(name)
        for offset in range(output_slice.length):
            t = offset / (output_slice.length - 1) if output_slice.length > 1 else 1.0
            templates = layered.get(first.start + offset, [])
            if not templates:
                raise InputError(f"model '{first.model}' has no tensors for layer {first.start + offset}.")
            for template in templates:
                names = [with_layer_index(template, s.start + offset) for s in output_slice.sources]
                self.plan_tensor(output_slice, with_layer_index(template, self.out_layers), names, t)
            self.out_layers += 1

    def reference_model(self, slices: list[_Slice]) -> str:
        return self.config.base_model or slices[0].sources[0].model

    def check_extra_tensors(self, slices: list[_Slice]) -> None:
        """Every tensor of every input must feed some output; otherwise the inputs differ."""
        for index, output_slice in enumerate(slices):
            for source in output_slice.sources:
                covered = self.covered.get(source.model, set())
                head_unused = self.output_tied or self.tied(source.model)
                for name in self.checkpoints[source.model].tensors:
                    parsed = parse_name(name)
                    if parsed.role == "lm_head" and head_unused:
                        continue  # a tied head is the embedding matrix; a tied output writes no head
                    if parsed.layer is None:  # embeddings come from the first slice, the rest from the last
                        relevant = index == (0 if _is_pre_layers(parsed.role) else len(slices) - 1)
                    else:
                        relevant = source.start <= parsed.layer < source.start + output_slice.length
                    if relevant and name not in covered:
                        raise InputError(
                            f"model '{source.model}' has tensor '{name}' that the other inputs lack; the inputs "
                            "must share an architecture (same tensor names)."
                        )


def _is_pre_layers(role: str) -> bool:
    """Tensors outside the layers that come before them (embeddings); the rest come after."""
    return role in ("embed", "position_embed")


def _stored_dtype(layout: Sequence[OutputTensor]) -> Optional[str]:
    """The dtype the written weights are stored in: of the floating-point outputs, the one holding the most bytes
    (all of them when the recipe sets dtype or out_dtype; mixed-dtype inputs are promoted per tensor)."""
    import torch

    sizes: dict[str, int] = {}
    for output in layout:
        if getattr(torch, output.dtype).is_floating_point:
            sizes[output.dtype] = sizes.get(output.dtype, 0) + output.nbytes
    return max(sizes, key=sizes.__getitem__) if sizes else None


def _output_config(checkpoints: dict[str, Checkpoint], reference: str, layer_sources: list[tuple[str, int]],
                   layout: Sequence[OutputTensor], vocabulary: Optional[Vocabulary] = None) -> dict[str, Any]:
    """config.json of the result: the reference model's, with dtype, layer count and vocabulary size updated."""
    out = copy.deepcopy(checkpoints[reference].config)
    if vocabulary is not None:
        out["vocab_size"] = vocabulary.rows
    dtype = _stored_dtype(layout)
    if dtype:
        out["dtype"] = dtype
        if "torch_dtype" in out:
            out["torch_dtype"] = dtype
    original_layers = checkpoints[reference].num_layers
    if layer_sources and original_layers is not None and len(layer_sources) != original_layers:
        # Per-layer lists (e.g. layer_types) follow the layers they describe.
        for key, value in list(out.items()):
            if isinstance(value, list) and len(value) == original_layers:
                rebuilt = []
                for model, layer in layer_sources:
                    source_value = checkpoints[model].config.get(key)
                    if not isinstance(source_value, list) or layer >= len(source_value):
                        break
                    rebuilt.append(source_value[layer])
                else:
                    out[key] = rebuilt
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in out:
                out[key] = len(layer_sources)
    return out


def plan_merge(config: MergeConfig, source: str = "<config>", seed: Optional[int] = None,
               allow_crimes: bool = False) -> MergePlan:
    """Validate ``config`` against its inputs' headers and plan every output tensor.

    ``allow_crimes``: accept inputs of different architectures (mergekit's --allow-crimes)."""
    planner = _Planner(config, source, seed, allow_crimes)
    tasks = planner.plan()
    slices = planner.planned_slices
    layer_sources = [(s.sources[0].model, s.sources[0].start + o) for s in slices for o in range(s.length)]
    reference = planner.reference_model(slices)
    tokenizer_model = config.base_model or reference
    named = config.tokenizer_model_field()
    if named is not None:
        tokenizer_model = named[0]
    return MergePlan(
        config=config,
        method=planner.method,
        checkpoints=planner.checkpoints,
        tasks=tasks,
        out_config=_output_config(
            planner.checkpoints, reference, layer_sources, [o for t in tasks for o in t.outputs], planner.vocabulary
        ),
        tokenizer_model=tokenizer_model,
        seed=seed if planner.method.random else None,
        vocabulary=planner.vocabulary,
    )

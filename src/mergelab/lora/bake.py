"""``mergelab lora bake``: base + Σ w_i ΔW_i, written as a full Hugging Face checkpoint.

    Checkpoint + Adapters → plan_bake → engine.run(tasks, ShardedWriter)

One task per base tensor: the tensors adapters change read the base weight and every
adapter's factors (W + Σ w_i·scaling_i·B_i·A_i, in float32, written in the base's dtype);
the rest are copied. With weight 1 the result equals PEFT's ``merge_and_unload`` (the same
operations in the same order, so float32 is bit-identical), including embedding LoRA and
``modules_to_save`` copies, which replace the base's tensors. A base with tied embeddings
whose embeddings or head an adapter changes is written untied, as the adapted model
computes it (``mergelab.lora.adapted``).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from mergelab.engine import CopyInput, TensorRef, TensorTask
from mergelab.errors import ConfigError
from mergelab.io import Checkpoint, OutputTensor
from mergelab.io.adapter import Adapter, TensorUpdate
from mergelab.lora.adapted import AdaptedModel, open_model
from mergelab.lora.output import BASE_SOURCE, adapter_source

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class BakeOp:
    """A TensorTask op: inputs W, then the adapters' tensors → W + Σ w_i ΔW_i."""

    update: TensorUpdate

    def __call__(self, inputs: list[Any]) -> Any:
        return self.update.apply(inputs[0], inputs[1:])

    @property
    def description(self) -> str:
        return self.update.describe()


@dataclass
class BakePlan:
    base: Checkpoint
    base_reference: str
    adapted: AdaptedModel
    tasks: list[TensorTask]

    @property
    def adapters(self) -> list[Adapter]:
        return self.adapted.adapters

    @property
    def weights(self) -> list[float]:
        return self.adapted.weights

    @property
    def sources(self) -> dict[str, Any]:
        return {BASE_SOURCE: self.base, **{adapter_source(i): a for i, a in enumerate(self.adapters)}}

    @property
    def layout(self) -> list[OutputTensor]:
        return [output for task in self.tasks for output in task.outputs]

    @property
    def changed(self) -> int:
        return sum(isinstance(task.op, BakeOp) for task in self.tasks)


def plan_bake(base_reference: str, adapter_references: Sequence[str], weights: Optional[Sequence[float]] = None) -> BakePlan:
    """Validate the adapters against the base's headers and plan every output tensor."""
    if not adapter_references:
        raise ConfigError("give at least one adapter to bake into the base.")
    weights = list(weights) if weights is not None else [1.0] * len(adapter_references)
    if len(weights) != len(adapter_references):
        raise ConfigError(f"{len(weights)} weights for {len(adapter_references)} adapters; give one weight per adapter.")
    base = open_model(base_reference)
    adapters = [Adapter(reference) for reference in adapter_references]
    adapted = AdaptedModel(base, adapters, weights)
    tasks = []
    for name, info in adapted.tensors.items():
        output = (OutputTensor(name, info.shape, info.dtype),)
        start = TensorRef(BASE_SOURCE, adapted.source_name(name))
        update = adapted.updates.get(name)
        if update is None or not info.is_floating_point:
            tasks.append(TensorTask(output, (start,), CopyInput(0)))
            continue
        inputs = (start,) + tuple(TensorRef(adapter_source(index), tensor) for index, tensor in update.inputs)
        work = "float64" if info.dtype == "float64" else "float32"
        tasks.append(TensorTask(output, inputs, BakeOp(update), work))
    return BakePlan(base, base_reference, adapted, tasks)


def describe_bake_plan(plan: BakePlan) -> str:
    lines = [f"base: {plan.base.path} ({len(plan.base.tensors)} tensors)", "adapters:"]
    for index, (adapter, weight) in enumerate(zip(plan.adapters, plan.weights)):
        lines.append(f"  {adapter_source(index)}: {adapter.path} (weight {weight:g}, {len(adapter.modules)} LoRA "
                     f"modules, {len(adapter.full_tensors)} full tensors)")
    lines.append(f"output: {len(plan.tasks)} tensors, {plan.changed} changed by the adapters, "
                 f"{sum(t.out_bytes for t in plan.tasks) / 1e6:.1f} MB")
    if plan.adapted.untied is not None:
        lines.append(f"untied: the base ties its embeddings; the output gets its own '{plan.adapted.untied.head}' "
                     f"(from '{plan.adapted.untied.embed}') and tie_word_embeddings: false")
    lines.append("")
    for task in plan.tasks:
        if isinstance(task.op, BakeOp):
            lines.append(f"{task.name}  {list(task.outputs[0].shape)} {task.outputs[0].dtype}")
            lines.append(f"    {task.op.description}")
    return "\n".join(lines)


def _model_card(plan: BakePlan, name: str) -> str:
    import mergelab

    lines = ["---", "library_name: transformers", "tags:", "- mergelab", "- lora", "---", f"# {name}", "",
             f"A base model with LoRA adapters merged into its weights (W + Σ w_i·ΔW_i), made with mergelab "
             f"{mergelab.__version__}.", "", "## Inputs", "", f"- base: `{plan.base_reference}`"]
    for adapter, weight in zip(plan.adapters, plan.weights):
        lines.append(f"- adapter `{adapter.reference}`, weight {weight:g}")
    return "\n".join(lines + [""])


def run_bake(base_reference: str, adapter_references: Sequence[str], out_dir: str | Path,
             weights: Optional[Sequence[float]] = None, options: Any = None) -> Any:
    """Write base + Σ w_i ΔW_i to ``out_dir`` (a Hugging Face model directory)."""
    from mergelab import engine
    from mergelab.io import OutputDirectory, ShardedWriter
    from mergelab.lora.output import LoraOptions, LoraResult

    options = options or LoraOptions()
    shard_bytes = engine.check_options(options)
    output = OutputDirectory(out_dir, force=options.force)  # before any model is fetched
    plan = plan_bake(base_reference, adapter_references, weights)
    output.protect(s.path for s in plan.sources.values())
    engine.apply_threads(options.threads)
    with output as temporary:
        writer = ShardedWriter(temporary, plan.layout, shard_bytes)
        stats = engine.run(plan.tasks, plan.sources, writer, device=options.device, prefetch=options.prefetch,
                           progress=options.progress, description="baking")
        (temporary / "config.json").write_text(json.dumps(plan.adapted.config, indent=2, sort_keys=True) + "\n")
        for path in plan.base.tokenizer_files:
            shutil.copy2(path, temporary / path.name)
        (temporary / "README.md").write_text(_model_card(plan, Path(out_dir).name))
    return LoraResult(output.destination, stats.tasks, stats.seconds)

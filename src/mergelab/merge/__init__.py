"""``mergelab merge``: recipe -> plan -> engine -> a Hugging Face model directory.

    config.load -> merge.plan_merge -> engine.run(tasks, ShardedWriter)
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mergelab.config import load_config
from mergelab.engine import RunOptions
from mergelab.merge.output import write_model_files
from mergelab.merge.plan import MergePlan, plan_merge

log = logging.getLogger(__name__)

__all__ = [
    "MergeOptions", "MergePlan", "MergeResult", "describe_plan", "dry_run", "load_and_plan",
    "plan_merge", "run_merge",
]


@dataclass(frozen=True)
class MergeOptions(RunOptions):
    """How the merge runs: the engine's options, and whether inputs may mix architectures."""

    allow_crimes: bool = False


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    tensors: int
    seconds: float
    seed: Optional[int]


def load_and_plan(config_path: str | Path, seed: Optional[int] = None,
                  allow_crimes: bool = False) -> tuple[MergePlan, str]:
    """Read, validate and plan a merge recipe (reads only headers); also return its text."""
    config, text = load_config(config_path)
    return plan_merge(config, str(config_path), seed, allow_crimes), text


def dry_run(config_path: str | Path, options: MergeOptions = MergeOptions(),
            out_dir: Optional[str | Path] = None) -> str:
    """Validate the options, the output (when given) and the recipe against its inputs' headers, as the
    real run would; return the plan as text. Writes nothing."""
    from mergelab import engine
    from mergelab.io import OutputDirectory

    engine.check_options(options)
    output = OutputDirectory(out_dir, force=options.force, inputs=[config_path]) if out_dir is not None else None
    plan, _ = load_and_plan(config_path, options.seed, options.allow_crimes)
    if output is not None:
        output.protect(plan.input_paths())
    return describe_plan(plan, options.prefetch)


def run_merge(config_path: str | Path, out_dir: str | Path, options: MergeOptions = MergeOptions()) -> MergeResult:
    """Merge as ``config_path`` says into ``out_dir`` (written under a temporary name, then renamed)."""
    from mergelab import engine
    from mergelab.io import OutputDirectory, ShardedWriter

    shard_bytes = engine.check_options(options)
    output = OutputDirectory(out_dir, force=options.force, inputs=[config_path])  # before any model is fetched
    seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
    plan, text = load_and_plan(config_path, seed, options.allow_crimes)
    if plan.seed is not None and options.seed is None:
        log.warning("no --seed given for random method %s; using seed %d (recorded in the model card)",
                    plan.method.name, seed)
    output.protect(plan.input_paths())
    engine.apply_threads(options.threads)
    with output as temporary:
        writer = ShardedWriter(temporary, plan.layout, shard_bytes)
        stats = engine.run(
            plan.tasks, plan.checkpoints, writer, device=options.device,
            prefetch=options.prefetch, progress=options.progress,
        )
        write_model_files(temporary, plan, text, output.destination.name)
    return MergeResult(output.destination, stats.tasks, stats.seconds, plan.seed)


def describe_plan(plan: MergePlan, prefetch: int = 2) -> str:
    """A human-readable plan for ``--dry-run``."""
    lines = [
        f"merge_method: {plan.method.name}",
        "inputs:",
    ]
    for reference, checkpoint in plan.checkpoints.items():
        where = "" if str(checkpoint.path) == reference else f": {checkpoint.path}"
        lines.append(f"  {reference}{where} ({len(checkpoint.tensors)} tensors)")
    total = sum(task.out_bytes for task in plan.tasks)
    lines.append(f"output: {len(plan.tasks)} tensors, {total / 1e6:.1f} MB")
    if plan.seed is not None:
        lines.append(f"seed: {plan.seed}")
    if plan.vocabulary is not None:
        lines.append(f"vocabulary: {plan.vocabulary.description} ({plan.vocabulary.rows} rows)")
    lines.append("")
    for task in plan.tasks:
        sources = ", ".join(str(ref) for ref in task.inputs)
        for output in task.outputs:
            lines.append(f"{output.name}  {list(output.shape)} {output.dtype}")
        lines.append(f"    from {sources}")
        lines.append(f"    {task.op.description}")
    lines.append("")
    lines.append(
        f"estimated peak tensor memory: {plan.peak_bytes_estimate(prefetch) / 1e6:.1f} MB "
        f"(largest task, its workspace and a prefetch window of {prefetch})"
    )
    return "\n".join(lines)

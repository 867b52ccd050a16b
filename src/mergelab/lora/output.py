"""What the LoRA commands share: run options, the error report, the files beside the weights."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import mergelab
from mergelab.engine import RunOptions
from mergelab.errors import ComputeError
from mergelab.lora.factor import relative_error

log = logging.getLogger(__name__)

REPORT_FILE = "mergelab_lora_report.json"
RECIPE_FILE = "mergelab_lora_config.yml"
ADAPTER_SHARD_BYTES = 1 << 62  # PEFT loads one adapter_model.safetensors: never shard adapters
BASE_SOURCE = "base"  # engine source keys of the LoRA planners


def adapter_source(index: int) -> str:
    """The engine source key of input adapter ``index``."""
    return f"adapters[{index}]"


LoraOptions = RunOptions  # how a lora command runs (out_shard_size: bake only; adapters are one file)


def dry_run(out_dir: str | Path, force: bool, plan_of: Callable[[], Any], describe: Callable[[Any], str],
            inputs: Sequence[str | Path] = ()) -> str:
    """A lora command's ``--dry-run``: the checks its real run makes before any work — the output
    (existing without ``--force``, a file, a place no directory can be made) before planning, then
    that it holds none of the plan's inputs — and the plan as text. Writes nothing."""
    from mergelab.io import OutputDirectory

    output = OutputDirectory(out_dir, force=force, inputs=inputs)
    plan = plan_of()
    output.protect(source.path for source in plan.sources.values())
    return describe(plan)


@dataclass
class LoraResult:
    out_dir: Path
    tensors: int
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)
    seed: Optional[int] = None

    def summary(self, limit: int = 5) -> list[str]:
        """Human lines about the reconstruction error (empty when there is none to report)."""
        if not self.report.get("modules"):
            return []
        lines = [
            f"relative reconstruction error: overall {self.report['overall_relative_error']:.4g}, "
            f"worst {self.report['worst_relative_error']:.4g} over {len(self.report['modules'])} modules "
            f"(per module in {REPORT_FILE})"
        ]
        above = self.report["above_threshold"]
        if above:
            lines.append(f"{len(above)} modules above the threshold {self.report['threshold']:g}:")
            for name in above[:limit]:
                entry = self.report["modules"][name]
                lines.append(f"  {name}: {entry['relative_error']:.4g} (rank {entry['rank']})")
            if len(above) > limit:
                lines.append(f"  … and {len(above) - limit} more")
        return lines


class CollectingSink:
    """A sink that keeps the (small) tensors it receives, e.g. spectra in energy mode."""

    def __init__(self) -> None:
        self.tensors: dict[str, Any] = {}

    def write(self, name: str, tensor: Any) -> None:
        self.tensors[name] = tensor

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.tensors.clear()


def reconstruction_report(
    ranks: Mapping[str, int],
    metrics: Mapping[str, Mapping[str, float]],
    metric_keys: Mapping[str, str],
    threshold: float,
    extra: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Per-module rank and relative error, the overall error √(Σ residual / Σ total), and the offenders.

    ``metric_keys`` maps a module to the key its task's metrics were recorded under.
    """
    modules: dict[str, dict[str, Any]] = {}
    residual = total = 0.0
    for module, rank in ranks.items():
        found = metrics.get(metric_keys[module])
        if found is None:  # a planning bug, never reported as a perfect reconstruction
            raise ComputeError(f"no reconstruction error was recorded for module '{module}'.")
        error = float(found["relative_error"])
        modules[module] = {"rank": int(rank), "relative_error": error}
        residual += float(found["residual_energy"])
        total += float(found["total_energy"])
    above = sorted((m for m, e in modules.items() if e["relative_error"] > threshold),
                   key=lambda m: -modules[m]["relative_error"])
    report = {
        **(extra or {}),
        "overall_relative_error": relative_error(residual, total),
        "worst_relative_error": max((e["relative_error"] for e in modules.values()), default=0.0),
        "threshold": threshold,
        "above_threshold": above,
        "modules": modules,
    }
    if above:
        worst = above[0]
        log.warning(
            "%d of %d modules are reconstructed with relative error above %g (worst: %s, %.3g at rank %d); "
            "raise the rank or use energy to keep more of each update",
            len(above), len(modules), threshold, worst, modules[worst]["relative_error"], modules[worst]["rank"],
        )
    return report


def write_adapter_files(directory: Path, config: Mapping[str, Any], report: Mapping[str, Any], title: str,
                        description: str, recipe_text: Optional[str] = None) -> None:
    """adapter_config.json, the error report, the recipe, and a model card beside the weights."""
    from mergelab.io.adapter import write_adapter_config

    write_adapter_config(directory, config)
    (directory / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    if recipe_text is not None:
        (directory / RECIPE_FILE).write_text(recipe_text)
    (directory / "README.md").write_text(adapter_card(config, report, title, description, recipe_text))


def adapter_card(config: Mapping[str, Any], report: Mapping[str, Any], title: str, description: str,
                 recipe_text: Optional[str]) -> str:
    lines = ["---", "library_name: peft"]
    if config.get("base_model_name_or_path"):
        lines.append(f"base_model: {config['base_model_name_or_path']}")
    lines += ["tags:", "- mergelab", "- lora", "---", f"# {title}", "",
              f"A LoRA adapter made with mergelab {mergelab.__version__}: {description}", ""]
    lines += [
        f"Rank {config['r']} (lora_alpha = r, so ΔW = B·A)"
        + (f", {len(config['rank_pattern'])} modules with their own rank (rank_pattern)." if config["rank_pattern"] else "."),
        "",
    ]
    if report.get("modules"):
        lines += [
            "## Reconstruction",
            "",
            f"Relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F: overall {report['overall_relative_error']:.4g}, "
            f"worst module {report['worst_relative_error']:.4g}. Per module: `{REPORT_FILE}`.",
            "",
        ]
    if recipe_text is not None:
        lines += ["## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def parse_weights(values: Optional[Sequence[str]], count: int, what: str = "adapters") -> list[float]:
    """``--weights 1,0.5`` or ``--weights 1 --weights 0.5`` → one float per input (default 1)."""
    from mergelab.errors import ConfigError

    if not values:
        return [1.0] * count
    weights = []
    for value in values:
        for item in str(value).split(","):
            if not item.strip():
                continue
            try:
                weights.append(float(item))
            except ValueError:
                raise ConfigError(f"--weights: '{item}' is not a number.") from None
    if len(weights) != count:
        given = f"{len(weights)} value" + ("" if len(weights) == 1 else "s")
        raise ConfigError(f"--weights gives {given} for {count} {what if count != 1 else what[:-1]}; "
                          f"give one per {what[:-1]}.")
    return weights

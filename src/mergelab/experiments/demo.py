"""``mergelab demo`` (and ``make demo``): merge zoo experts three ways and measure what survives.

1. builds (or finds) the zoo — ``tiny`` by default;
2. merges a handful of skill experts with ``task_arithmetic``, ``ties`` and ``dare_ties``
   through the same engine as ``mergelab merge`` — and, for contrast, the first two alone;
3. evaluates the base, each expert and each merge on every chosen skill's test split
   (exact match, and edit similarity for partial credit, with 95% bootstrap intervals)
   with mergelab's evaluation harness;
4. writes ``results.json``, ``accuracy.png`` (both metrics per skill and model) and
   ``report.md`` whose every number comes from this run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

METRICS = ("exact_match", "edit_similarity")
DEFAULT_SKILLS = ("caesar3", "upper", "reverse", "sort", "capital")
METHODS: dict[str, dict[str, Any]] = {
    # per-model parameters applied to every expert, and global parameters
    "task_arithmetic": {"model": {"weight": 1.0}, "global": {"lambda": 0.6}},
    "ties": {"model": {"weight": 1.0, "density": 0.4}, "global": {"lambda": 1.0}},
    "dare_ties": {"model": {"weight": 1.0, "density": 0.4}, "global": {"lambda": 1.0}},
}


def merges(skills: Sequence[str]) -> list[tuple[str, str, str, list[str]]]:
    """(model name, file stem, method, skills merged): every method on all the experts (``merge-<method>``)
    and, for contrast, on the first two alone (``pair-<method>``), when there are more than two."""
    planned = [(f"merge-{method}", method, method, list(skills)) for method in METHODS]
    if len(skills) > 2:
        planned += [(f"pair-{method}", f"{method}-pair", method, list(skills[:2])) for method in METHODS]
    return planned


def merge_recipe(size: str, skills: Sequence[str], method: str) -> dict[str, Any]:
    settings = METHODS[method]
    return {
        "models": [{"model": f"zoo:{size}/expert-{skill}", "parameters": dict(settings["model"])} for skill in skills],
        "base_model": f"zoo:{size}/base",
        "merge_method": method,
        "parameters": dict(settings["global"]),
        "dtype": "float32",
    }


def default_skills(size: str) -> list[str]:
    """DEFAULT_SKILLS where the zoo has them (tiny), else every skill of the zoo (pico)."""
    from mergelab.zoo.recipes import RECIPES

    chosen = [skill for skill in DEFAULT_SKILLS if skill in RECIPES[size].skills]
    return chosen if len(chosen) >= 2 else list(RECIPES[size].skills)


def run_demo(size: str = "tiny", out: str | Path = "demo-results", skills: Optional[Sequence[str]] = None,
             force: bool = False, seed: int = 0, progress: bool = True) -> Path:
    """Run the whole demo (``skills``: default :func:`default_skills`); return the results directory."""
    from mergelab.errors import ConfigError
    from mergelab.io import OutputDirectory
    from mergelab.merge import MergeOptions, run_merge
    from mergelab.zoo.build import build
    from mergelab.zoo.catalog import resolve_artifact

    from mergelab.zoo.recipes import RECIPES

    started = time.perf_counter()
    if size not in RECIPES:
        raise ConfigError(f"unknown zoo size '{size}'; choose one of {', '.join(RECIPES)}.")
    skills = list(dict.fromkeys(skills)) if skills else default_skills(size)
    missing = [skill for skill in skills if skill not in RECIPES[size].skills]
    if missing or len(skills) < 2:
        raise ConfigError(f"the demo merges two or more skills of the '{size}' zoo"
                          + (f"; it has no skill {', '.join(missing)}" if missing else "")
                          + f". Its skills: {', '.join(RECIPES[size].skills)}.")
    from mergelab.zoo.catalog import build_dir

    # Refuses an existing OUT before any work, and never an OUT that is or holds the zoo.
    output = OutputDirectory(out, force=force, inputs=[build_dir(size)])
    zoo_dir = build(size, progress=progress)
    manifest = json.loads((zoo_dir / "manifest.json").read_text())
    with output as root:
        models: dict[str, Path] = {"base": resolve_artifact(f"zoo:{size}/base")}
        for skill in skills:
            models[f"expert-{skill}"] = resolve_artifact(f"zoo:{size}/expert-{skill}")
        recipes = {}
        (root / "models").mkdir()
        (root / "recipes").mkdir()
        for name, stem, method, merged in merges(skills):
            recipe = merge_recipe(size, merged, method)
            (root / "recipes" / f"{stem}.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
            result = run_merge(root / "recipes" / f"{stem}.yml", root / "models" / stem,
                               MergeOptions(seed=seed, progress=progress))
            models[name] = result.out_dir
            recipes[name] = recipe
        scores = evaluate_models(models, zoo_dir, manifest, skills, progress)
        results = {
            "zoo": {"size": size, "path": str(zoo_dir), "content_hash": manifest["content_hash"]},
            "skills": list(skills),
            "recipes": recipes,
            "seed": seed,
            "scores": scores,
            "seconds": round(time.perf_counter() - started, 1),
        }
        (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_accuracy(scores, list(skills), root / "accuracy.png")
        (root / "report.md").write_text(report(results))
    return output.destination


def evaluate_models(models: dict[str, Path], zoo_dir: Path, manifest: dict, skills: Sequence[str],
                    progress: bool) -> dict[str, dict[str, Any]]:
    """``scores[model][skill][metric]``: exact match and edit similarity on every skill's test split."""
    from rich.console import Console
    from rich.progress import Progress
    from transformers.utils import logging as hf_logging

    from mergelab.evaluate import evaluate_directory, make_task

    max_new_tokens = str(manifest["recipe"]["max_new_tokens"])
    tasks = {
        skill: make_task("generate", data=str(zoo_dir / manifest["datasets"][skill]["splits"]["test"]),
                         chat="true", stop="none", max_new_tokens=max_new_tokens)
        for skill in skills
    }
    scores: dict[str, dict[str, Any]] = {}
    library_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per load would interleave with ours
    # One log line per model and skill would bury the bar; the report holds every score (-v shows them).
    task_log = logging.getLogger("mergelab.evaluate.api")
    task_level = task_log.level
    if not task_log.isEnabledFor(logging.DEBUG):
        task_log.setLevel(logging.WARNING)
    try:
        with Progress(disable=not progress, console=Console(stderr=True)) as bar:
            stage = bar.add_task("evaluating", total=len(models))
            for name, path in models.items():
                results = evaluate_directory(str(path), list(tasks.values()), batch_size=64, cache=False,
                                             keep_items=False)
                scores[name] = {}
                for skill, task in tasks.items():
                    metrics = results["tasks"][task.spec]["metrics"]
                    scores[name][skill] = {metric: {key: metrics[metric][key] for key in ("value", "ci95", "n")}
                                           for metric in METRICS}
                bar.advance(stage)
    finally:
        task_log.setLevel(task_level)
        if library_bars:
            hf_logging.enable_progress_bar()
    return scores


def plot_accuracy(scores: dict[str, dict[str, Any]], skills: list[str], path: Path) -> None:
    """Grouped bars, one panel per metric: a group per skill, a bar per model, 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(scores)
    width = 0.8 / len(models)
    figure, panels = plt.subplots(len(METRICS), 1, figsize=(max(8, 1.6 * len(skills) + 2), 4.0 * len(METRICS)),
                                  sharex=True)
    colours = plt.get_cmap("tab20")
    for axes, metric in zip(panels, METRICS):
        for index, model in enumerate(models):
            cells = [scores[model][skill][metric] for skill in skills]
            values = [cell["value"] for cell in cells]
            low = [cell["value"] - (cell["ci95"] or [cell["value"]] * 2)[0] for cell in cells]
            high = [(cell["ci95"] or [cell["value"]] * 2)[1] - cell["value"] for cell in cells]
            positions = [i + (index - (len(models) - 1) / 2) * width for i in range(len(skills))]
            axes.bar(positions, values, width, label=model, color=colours(index % 20), yerr=[low, high], capsize=1)
        axes.set_ylim(0, 1.05)
        axes.set_ylabel(f"{metric.replace('_', ' ')} (test split)")
    panels[0].set_title("Per-skill scores: base, experts and merges")
    panels[0].legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    panels[-1].set_xticks(range(len(skills)))
    panels[-1].set_xticklabels(skills)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(results: dict[str, Any]) -> str:
    """Markdown report; every number is read from ``results``."""
    skills = results["skills"]
    scores = results["scores"]

    def value(model: str, skill: str, metric: str = "exact_match") -> float:
        return scores[model][skill][metric]["value"]

    def average(model: str, metric: str = "exact_match") -> float:
        return sum(value(model, skill, metric) for skill in skills) / len(skills)

    lines = [
        "# mergelab demo: merging zoo experts",
        "",
        f"Zoo `{results['zoo']['size']}` ({results['zoo']['path']}); skills: {', '.join(skills)}; "
        f"total run time {results['seconds']} s. Every model is scored on each skill's test split.",
    ]
    for metric, explanation in (("exact_match", "the answer exactly right"),
                                ("edit_similarity", "1 − character edit distance / length: partial credit")):
        lines += [
            "",
            f"## {metric.replace('_', ' ').capitalize()} ({explanation})",
            "",
            "| model | " + " | ".join(skills) + " | mean |",
            "|---|" + "---|" * (len(skills) + 1),
        ]
        for model in scores:
            cells = [f"{value(model, skill, metric):.2f}" for skill in skills]
            lines.append(f"| {model} | " + " | ".join(cells) + f" | {average(model, metric):.2f} |")
    experts = {skill: value(f"expert-{skill}", skill) for skill in skills}
    expert_mean = sum(experts.values()) / len(experts)
    merged = [model for model in scores if model.startswith("merge-")]
    best = max(merged, key=average)
    lines += [
        "",
        "## What the numbers say",
        "",
        f"- Each expert on its own skill: mean exact match {expert_mean:.2f} "
        f"(from {min(experts.values()):.2f} to {max(experts.values()):.2f}); the base: mean {average('base'):.2f}.",
        (f"- Best merge by mean exact match: `{best}` at {average(best):.2f}"
         + (f", i.e. {average(best) / expert_mean:.0%} of the experts' mean on their own skills." if expert_mean else ".")
         if average(best) > 0 else "- No merge gets any answer exactly right (see edit similarity for partial credit)."),
    ]
    for model in merged:
        kept = [skill for skill in skills if value(model, skill) >= 0.5 * experts[skill]]
        lines.append(f"- `{model}` keeps at least half of the expert's exact match on {len(kept)} of {len(skills)} "
                     f"skills" + (f" ({', '.join(kept)})" if kept else "")
                     + f"; mean edit similarity {average(model, 'edit_similarity'):.2f} "
                     f"(base {average('base', 'edit_similarity'):.2f}).")
    if any(model.startswith("pair-") for model in scores):
        first, second = skills[:2]
        lines.append(
            f"- Merging only {first} and {second} (experts {experts[first]:.2f} and {experts[second]:.2f}), exact "
            f"match on each, and in brackets the same two skills in the {len(skills)}-expert merge: "
            + "; ".join(f"{method} {value(f'pair-{method}', first):.2f} and {value(f'pair-{method}', second):.2f} "
                        f"({value(f'merge-{method}', first):.2f} and {value(f'merge-{method}', second):.2f})"
                        for method in METHODS) + ".")
    lines += ["", "![per-skill scores](accuracy.png)", "", "Recipes: `recipes/*.yml`; raw numbers: `results.json`.", ""]
    return "\n".join(lines)

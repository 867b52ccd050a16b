"""``mergelab demo`` (and ``make demo``): merge zoo experts three ways and measure what survives.

1. builds (or finds) the zoo — ``tiny`` by default;
2. merges a handful of skill experts with ``task_arithmetic``, ``ties`` and ``dare_ties``
   through the same engine as ``mergelab merge``;
3. evaluates the base, each expert and each merge on every chosen skill's test split
   (exact match, with 95% bootstrap intervals) with mergelab's evaluation harness;
4. writes ``results.json``, ``accuracy.png`` (per-skill accuracy per model) and
   ``report.md`` whose every number comes from this run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

DEFAULT_SKILLS = ("caesar3", "upper", "reverse", "sort", "capital")
METHODS: dict[str, dict[str, Any]] = {
    # per-model parameters applied to every expert, and global parameters
    "task_arithmetic": {"model": {"weight": 1.0}, "global": {"lambda": 0.6}},
    "ties": {"model": {"weight": 1.0, "density": 0.4}, "global": {"lambda": 1.0}},
    "dare_ties": {"model": {"weight": 1.0, "density": 0.4}, "global": {"lambda": 1.0}},
}


def merge_recipe(size: str, skills: Sequence[str], method: str) -> dict[str, Any]:
    settings = METHODS[method]
    return {
        "models": [{"model": f"zoo:{size}/expert-{skill}", "parameters": dict(settings["model"])} for skill in skills],
        "base_model": f"zoo:{size}/base",
        "merge_method": method,
        "parameters": dict(settings["global"]),
        "dtype": "float32",
    }


def run_demo(size: str = "tiny", out: str | Path = "demo-results", skills: Sequence[str] = DEFAULT_SKILLS,
             force: bool = False, seed: int = 0, progress: bool = True) -> Path:
    """Run the whole demo; return the results directory."""
    from mergelab.errors import ConfigError
    from mergelab.io import OutputDirectory
    from mergelab.merge import MergeOptions, run_merge
    from mergelab.zoo.build import build
    from mergelab.zoo.catalog import resolve_artifact

    from mergelab.zoo.recipes import RECIPES

    started = time.perf_counter()
    if size not in RECIPES:
        raise ConfigError(f"unknown zoo size '{size}'; choose one of {', '.join(RECIPES)}.")
    skills = list(dict.fromkeys(skills))
    missing = [skill for skill in skills if skill not in RECIPES[size].skills]
    if missing or len(skills) < 2:
        raise ConfigError(f"the demo merges two or more skills of the '{size}' zoo"
                          + (f"; it has no skill {', '.join(missing)}" if missing else "")
                          + f". Its skills: {', '.join(RECIPES[size].skills)}.")
    output = OutputDirectory(out, force=force)  # refuses an existing OUT before any work
    zoo_dir = build(size, progress=progress)
    manifest = json.loads((zoo_dir / "manifest.json").read_text())
    with output as root:
        models: dict[str, Path] = {"base": resolve_artifact(f"zoo:{size}/base")}
        for skill in skills:
            models[f"expert-{skill}"] = resolve_artifact(f"zoo:{size}/expert-{skill}")
        recipes = {}
        (root / "models").mkdir()
        for method in METHODS:
            recipe = merge_recipe(size, skills, method)
            recipe_path = root / "recipes" / f"{method}.yml"
            recipe_path.parent.mkdir(parents=True, exist_ok=True)
            recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            result = run_merge(recipe_path, root / "models" / method, MergeOptions(seed=seed, progress=progress))
            models[f"merge-{method}"] = result.out_dir
            recipes[method] = recipe
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
    """Exact match of every model on every skill's test split."""
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
    try:
        with Progress(disable=not progress) as bar:
            stage = bar.add_task("evaluating", total=len(models))
            for name, path in models.items():
                results = evaluate_directory(str(path), list(tasks.values()), batch_size=64, cache=False,
                                             keep_items=False)
                scores[name] = {}
                for skill, task in tasks.items():
                    metric = results["tasks"][task.spec]["metrics"]["exact_match"]
                    scores[name][skill] = {"value": metric["value"], "ci95": metric["ci95"], "n": metric["n"]}
                bar.advance(stage)
    finally:
        if library_bars:
            hf_logging.enable_progress_bar()
    return scores


def plot_accuracy(scores: dict[str, dict[str, Any]], skills: list[str], path: Path) -> None:
    """Grouped bars: one group per skill, one bar per model, 95% intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(scores)
    width = 0.8 / len(models)
    figure, axes = plt.subplots(figsize=(max(8, 1.6 * len(skills) + 2), 4.5))
    colours = plt.get_cmap("tab10")
    for index, model in enumerate(models):
        values = [scores[model][skill]["value"] for skill in skills]
        low = [v - (scores[model][s]["ci95"] or [v, v])[0] for v, s in zip(values, skills)]
        high = [(scores[model][s]["ci95"] or [v, v])[1] - v for v, s in zip(values, skills)]
        positions = [i + (index - (len(models) - 1) / 2) * width for i in range(len(skills))]
        axes.bar(positions, values, width, label=model, color=colours(index % 10), yerr=[low, high], capsize=2)
    axes.set_xticks(range(len(skills)))
    axes.set_xticklabels(skills)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("exact match (test split)")
    axes.set_title("Per-skill accuracy: base, experts and merges")
    axes.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(results: dict[str, Any]) -> str:
    """Markdown report; every number is read from ``results``."""
    skills = results["skills"]
    scores = results["scores"]

    def average(model: str) -> float:
        return sum(scores[model][skill]["value"] for skill in skills) / len(skills)

    lines = [
        "# mergelab demo: merging zoo experts",
        "",
        f"Zoo `{results['zoo']['size']}` ({results['zoo']['path']}); skills: {', '.join(skills)}. "
        f"Exact match on each skill's test split; total run time {results['seconds']} s.",
        "",
        "| model | " + " | ".join(skills) + " | mean |",
        "|---|" + "---|" * (len(skills) + 1),
    ]
    for model in scores:
        cells = [f"{scores[model][skill]['value']:.2f}" for skill in skills]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {average(model):.2f} |")
    experts = {skill: scores[f"expert-{skill}"][skill]["value"] for skill in skills}
    expert_mean = sum(experts.values()) / len(experts)
    merges = [model for model in scores if model.startswith("merge-")]
    best = max(merges, key=average)
    lines += [
        "",
        "## What the numbers say",
        "",
        f"- Each expert on its own skill: mean {expert_mean:.2f} "
        f"(from {min(experts.values()):.2f} to {max(experts.values()):.2f}); the base: mean {average('base'):.2f}.",
        f"- Best merge by mean exact match: `{best}` at {average(best):.2f}"
        + (f", i.e. {average(best) / expert_mean:.0%} of the experts' mean on their own skills." if expert_mean else "."),
    ]
    for model in merges:
        kept = [skill for skill in skills if scores[model][skill]["value"] >= 0.5 * experts[skill]]
        lines.append(f"- `{model}` keeps at least half of the expert's accuracy on {len(kept)} of {len(skills)} skills"
                     + (f" ({', '.join(kept)})." if kept else "."))
    lines += ["", "![per-skill accuracy](accuracy.png)", "", "Recipes: `recipes/*.yml`; raw numbers: `results.json`.", ""]
    return "\n".join(lines)


"""The files beside merged weights: config.json, tokenizer, the recipe, a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import mergelab

if TYPE_CHECKING:
    from mergelab.merge.plan import MergePlan

RECIPE_FILE = "mergelab_config.yml"


def write_model_files(directory: Path, plan: "MergePlan", config_text: str, name: str) -> None:
    """Write config.json, the tokenizer, the recipe and a model card titled ``name`` into ``directory``.

    ``directory`` is usually the temporary directory that becomes the output, so the card's
    title is passed in: the destination's name, not the temporary one.
    """
    (directory / "config.json").write_text(json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    built = plan.vocabulary.tokenizer if plan.vocabulary is not None else None
    if plan.tokenizer_model is not None:
        for path in plan.checkpoints[plan.tokenizer_model].tokenizer_files:
            if built is None or path.name == "generation_config.json":
                shutil.copy2(path, directory / path.name)
    if built is not None:  # a cropped or union vocabulary: the tokenizer that matches the merged rows
        built.save_pretrained(str(directory))
    (directory / RECIPE_FILE).write_text(config_text)
    (directory / "README.md").write_text(model_card(plan, config_text, name))


def model_card(plan: "MergePlan", config_text: str, name: str) -> str:
    config = plan.config
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- mergelab",
        "- merge",
        "---",
        f"# {name}",
        "",
        f"A merge of pre-trained language models made with mergelab {mergelab.__version__}.",
        "",
        "## Method",
        "",
        f"`{plan.method.name}`: {plan.method.summary}",
    ]
    if plan.method.paper:
        lines += ["", f"Reference: {plan.method.paper}"]
    if plan.method.random:
        lines += ["", f"Random seed: {plan.seed} (the same seed reproduces this merge exactly on the same device type)."]
    lines += ["", "## Inputs", ""]
    for reference in config.referenced_models():
        role = " (base)" if reference == config.base_model else ""
        lines.append(f"- `{reference}`{role}")
    lines += [
        "",
        f"Output: {len(plan.tasks)} tensors, dtype {plan.out_config.get('dtype', 'as the inputs')}.",
        "",
        "## Recipe",
        "",
        "```yaml",
        config_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)

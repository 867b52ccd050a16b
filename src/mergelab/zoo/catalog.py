"""Names for zoo artefacts: ``zoo:tiny/expert-caesar3`` → a directory, ``zoo:tiny/caesar3:test`` → a file.

A built zoo lives in ``<zoo root>/<size>-<content hash>/`` (root: ``$MERGELAB_ZOO_DIR`` or
``~/.cache/mergelab/zoo``) with a ``manifest.json`` listing every artefact. The content
hash covers the zoo's recipe and code and the library versions, so a changed recipe
never serves stale models, and an unchanged one is built once.

Model names: ``base``, ``expert-<skill>``, ``adapter-<skill>``, ``safety``,
``adapter-safety``. Dataset names (for ``mergelab eval``): ``<skill>`` (``code`` included),
``base-corpus``, ``safety``, ``choice``, ``humaneval``, each with splits (``zoo:tiny/caesar3:test``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mergelab.errors import InputError

PREFIX = "zoo:"
MANIFEST = "manifest.json"


def zoo_root() -> Path:
    return Path(os.environ.get("MERGELAB_ZOO_DIR", Path.home() / ".cache" / "mergelab" / "zoo")).expanduser()


@functools.lru_cache(maxsize=None)
def content_hash(size: str) -> str:
    """Hash of everything a build depends on: the size's recipe, the zoo's code, library versions."""
    import importlib.metadata

    from mergelab.zoo.recipes import RECIPES

    digest = hashlib.sha256()
    digest.update(repr(RECIPES[size]).encode())  # every field of this size's recipe, not the other sizes'
    package = Path(__file__).parent
    for source in sorted(package.glob("*.py")):
        if source.name not in ("catalog.py", "__init__.py", "random_models.py", "recipes.py"):
            digest.update(source.name.encode())
            digest.update(source.read_bytes())
    for name in ("torch", "transformers", "peft", "tokenizers"):
        digest.update(f"{name}={importlib.metadata.version(name)}".encode())
    return digest.hexdigest()[:12]


def build_dir(size: str) -> Path:
    from mergelab.zoo.recipes import RECIPES

    if size not in RECIPES:
        raise InputError(f"unknown zoo size '{size}'; sizes: {', '.join(RECIPES)}.")
    return zoo_root() / f"{size}-{content_hash(size)}"


def load_manifest(size: str) -> tuple[Path, dict[str, Any]]:
    directory = build_dir(size)
    path = directory / MANIFEST
    if not path.is_file():
        raise InputError(
            f"the '{size}' zoo is not built (looked in {directory}); build it with `mergelab zoo build --size {size}`."
        )
    return directory, json.loads(path.read_text())


def _split_name(name: str) -> tuple[str, str]:
    body = name[len(PREFIX):] if name.startswith(PREFIX) else name
    size, slash, item = body.partition("/")
    if not slash or not size or not item:
        raise InputError(f"zoo name '{name}' should look like zoo:tiny/expert-caesar3.")
    return size, item


def resolve_artifact(name: str) -> Path:
    """The directory of a zoo model or adapter, e.g. ``zoo:tiny/expert-caesar3``."""
    size, item = _split_name(name)
    directory, manifest = load_manifest(size)
    artifacts = manifest["artifacts"]
    if item not in artifacts:
        known = ", ".join(sorted(artifacts))
        raise InputError(f"the '{size}' zoo has no model or adapter '{item}'. Known: {known}.")
    return directory / artifacts[item]["path"]


def resolve_dataset(name: str, split: str) -> Path:
    """The JSONL file of a zoo dataset split, e.g. (``tiny/caesar3``, ``test``)."""
    size, item = _split_name(name)
    directory, manifest = load_manifest(size)
    datasets = manifest["datasets"]
    if item not in datasets:
        raise InputError(f"the '{size}' zoo has no dataset '{item}'. Known: {', '.join(sorted(datasets))}.")
    splits = datasets[item]["splits"]
    if split not in splits:
        raise InputError(f"zoo dataset '{size}/{item}' has no split '{split}'; splits: {', '.join(splits)}.")
    return directory / splits[split]


def resolve_any(name: str) -> Path:
    """A model/adapter name (``zoo:tiny/expert-caesar3``) or a dataset split (``zoo:tiny/caesar3:test``)."""
    body = name[len(PREFIX):] if name.startswith(PREFIX) else name
    item, colon, split = body.partition(":")
    if colon:
        return resolve_dataset(item, split)
    size, artifact = _split_name(item)
    _, manifest = load_manifest(size)
    if artifact in manifest["datasets"]:
        raise InputError(f"'{name}' is a dataset; name a split, e.g. zoo:{size}/{artifact}:test.")
    return resolve_artifact(item)


def describe(size: str) -> str:
    """A table of the zoo's artefacts and datasets for ``mergelab zoo list``."""
    directory, manifest = load_manifest(size)
    evaluations = manifest["evaluations"]
    lines = [f"zoo '{size}' at {directory} (built {manifest['created']}, {manifest['build_seconds']} s)", "",
             f"{'name':<{len(f'zoo:{size}/') + 24}} {'kind':<8} {'parameters':>10}  measured on its own data"]
    for name, entry in manifest["artifacts"].items():
        own = entry.get("trained_on")
        scores = evaluations.get(name, {})
        if own in scores and "exact_match" in scores[own]:
            measured = f"exact match {scores[own]['exact_match']['value']:.2f} on {own}"
        elif own == "safety":
            measured = (f"refuses {scores['safety']['refusal_rate']['value']:.2f} harmful, "
                        f"{scores['safety']['over_refusal_rate']['value']:.2f} benign")
        else:
            measured = ""
        lines.append(f"zoo:{size}/{name:<24} {entry['kind']:<8} {entry['parameters']:>10}  {measured}")
    lines += ["", "datasets (zoo:SIZE/NAME:SPLIT):"]
    for name, entry in manifest["datasets"].items():
        lines.append(f"  zoo:{size}/{name:<22} {', '.join(entry['splits'])}")
    failed = [check["claim"] for check in manifest["quality"]["checks"] if not check["passed"]]
    lines += ["", "quality: all promises hold" if not failed else "quality: NOT met: " + "; ".join(failed)]
    return "\n".join(lines)


def register() -> None:
    """Let the evaluation harness read ``zoo:`` dataset names."""
    from mergelab.evaluate.data import register_zoo_resolver

    register_zoo_resolver(resolve_dataset)

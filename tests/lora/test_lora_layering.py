"""lora/ is a planner beside merge/, not above it: it never imports the merge package."""

from __future__ import annotations

import ast
from pathlib import Path

import mergelab.lora

LORA = Path(mergelab.lora.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_lora_does_not_import_merge():
    files = sorted(LORA.glob("*.py"))
    assert files
    for path in files:
        offending = {m for m in imported_modules(path) if m == "mergelab.merge" or m.startswith("mergelab.merge.")}
        assert not offending, f"{path.name} imports {sorted(offending)}"

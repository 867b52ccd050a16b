"""docs/methods.md is generated from the registry and must be current."""

from __future__ import annotations

from pathlib import Path

from mergelab.methods import all_methods
from mergelab.methods.docs import main, render

DOCS = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def test_committed_method_table_is_current():
    assert DOCS.read_text() == render(), "docs/methods.md is stale; run: python -m mergelab.methods.docs docs/methods.md"
    assert main([str(DOCS), "--check"]) == 0


def test_every_method_has_a_row_with_its_parameters_and_differences():
    text = render()
    for method in all_methods():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{method.name}`"))
        for param in method.params:
            assert f"`{param.name}`" in row, (method.name, param.name)
        if method.differs_from_mergekit:
            assert method.differs_from_mergekit.replace("|", "\\|") in row


def test_check_reports_a_stale_file(tmp_path):
    stale = tmp_path / "methods.md"
    stale.write_text(render().replace("karcher", "kracher"))
    assert main([str(stale), "--check"]) == 1

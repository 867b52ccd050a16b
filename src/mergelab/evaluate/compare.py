"""Compare two results files metric by metric: values, difference, and whether it exceeds the uncertainty.

For each task and metric present in both files the difference B − A gets a 95% interval:

- **paired** when both files scored the same items (same task, same item inputs, and a
  per-item score for the metric — the item score named by the metric's ``item_score``, or
  the metric's own name — on the same items in both): a bootstrap over items of the mean
  per-item difference — much tighter than comparing two separate intervals, because the
  same hard items are hard for both models;
- otherwise **unpaired**: B − A ± 1.96 · √(stderr_A² + stderr_B²).

A difference is *significant* when its interval excludes 0.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from mergelab.evaluate.results import BOOTSTRAP_RESAMPLES


def _paired_values(entry_a: dict[str, Any], entry_b: dict[str, Any], key: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Per-item scores ``key`` of the same items in both, or None when the items differ.

    Items without the score in both are left out (a refusal rate counts harmful prompts
    only); an item scored in one file and not the other makes the pairing fail."""
    items_a, items_b = entry_a.get("items"), entry_b.get("items")
    if not items_a or not items_b or len(items_a) != len(items_b):
        return None
    values_a, values_b = [], []
    for a, b in zip(items_a, items_b):
        if a.get("input") != b.get("input"):
            return None
        score_a, score_b = a.get("scores", {}).get(key), b.get("scores", {}).get(key)
        if (score_a is None) != (score_b is None):
            return None
        if score_a is not None:
            values_a.append(score_a)
            values_b.append(score_b)
    if not values_a:
        return None
    return np.asarray(values_a, dtype=float), np.asarray(values_b, dtype=float)


def compare_results(a: dict[str, Any], b: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """One row per (task, metric) in both results: a, b, diff, diff_ci95, significant, method."""
    rows = []
    for task in a["tasks"]:
        if task not in b["tasks"]:
            continue
        entry_a, entry_b = a["tasks"][task], b["tasks"][task]
        for metric, summary_a in entry_a["metrics"].items():
            summary_b = entry_b["metrics"].get(metric)
            if summary_b is None or summary_a.get("value") is None or summary_b.get("value") is None:
                continue
            diff = summary_b["value"] - summary_a["value"]
            interval, method = None, "n/a"
            key = summary_a.get("item_score", metric)
            paired = _paired_values(entry_a, entry_b, key) if entry_a.get("task") != "perplexity" else None
            if paired is not None and len(paired[0]) >= 2:
                differences = paired[1] - paired[0]
                index = np.random.default_rng(seed).integers(0, len(differences), (BOOTSTRAP_RESAMPLES, len(differences)))
                low, high = np.percentile(differences[index].mean(axis=1), [2.5, 97.5])
                interval, method = [float(low), float(high)], "paired bootstrap"
            elif summary_a.get("stderr") is not None and summary_b.get("stderr") is not None:
                spread = 1.96 * math.sqrt(summary_a["stderr"] ** 2 + summary_b["stderr"] ** 2)
                interval, method = [diff - spread, diff + spread], "unpaired stderr"
            significant = None if interval is None else bool(interval[0] > 0 or interval[1] < 0)
            rows.append({"task": task, "metric": metric, "a": summary_a["value"], "b": summary_b["value"],
                         "a_ci95": summary_a.get("ci95"), "b_ci95": summary_b.get("ci95"), "diff": diff,
                         "diff_ci95": interval, "significant": significant, "method": method})
    return rows


def _number(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def _interval(values: Optional[list[float]]) -> str:
    return "-" if not values else f"[{_number(values[0])}, {_number(values[1])}]"


def format_comparison(rows: list[dict[str, Any]], name_a: str = "A", name_b: str = "B") -> str:
    """A plain-text side-by-side table of :func:`compare_results` rows."""
    if not rows:
        return "no metric appears in both results files."
    header = ["task", "metric", "A (95% CI)", "B (95% CI)", "B - A", "95% CI of B - A", "significant"]
    lines = [[
        row["task"], row["metric"], f"{_number(row['a'])} {_interval(row['a_ci95'])}",
        f"{_number(row['b'])} {_interval(row['b_ci95'])}", f"{row['diff']:+.4f}", _interval(row["diff_ci95"]),
        {True: "yes", False: "no", None: "unknown"}[row["significant"]] + (f" ({row['method']})" if row["significant"] is not None else ""),
    ] for row in rows]
    widths = [max(len(str(line[i])) for line in [header] + lines) for i in range(len(header))]
    render = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([f"A = {name_a}", f"B = {name_b}", render(header), render(["-" * w for w in widths])]
                     + [render(line) for line in lines])

"""The paper's cross-dataset table: one network's recall@N on several datasets (rows) for each
test method (one table per method), as Markdown and as JSON, and one combined recall@N plot
(a curve per dataset x test method).

`results` is {dataset: {test method: {"recalls": {"R@N": percent}, ...}}}: per dataset what
vgjax.eval_run.evaluate_split returns.
"""

from __future__ import annotations

import os
from pathlib import Path

from vgjax import visualize


def by_method(results: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict[str, float]]]:
    """{test method: {dataset: {"R@N": percent}}}: the tables, methods in their first order."""
    tables: dict[str, dict[str, dict[str, float]]] = {}
    for dataset, methods in results.items():
        for method, entry in methods.items():
            tables.setdefault(method, {})[dataset] = entry["recalls"]
    return tables


def markdown(results: dict[str, dict[str, dict]]) -> str:
    """One Markdown table per test method: a row per dataset, a column per R@N (percent)."""
    blocks = []
    for method, rows in by_method(results).items():
        columns = list(next(iter(rows.values())))
        lines = [f"Test method: {method}", "", "| dataset | " + " | ".join(columns) + " |",
                 "|:--|" + "--:|" * len(columns)]
        lines += [f"| {dataset} | " + " | ".join(f"{recalls[n]:.1f}" for n in columns) + " |"
                  for dataset, recalls in rows.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def save_plot(path: str | os.PathLike, results: dict[str, dict[str, dict]], *, title: str = "Recall@N") -> Path:
    """One PNG of recall@N curves, one per dataset x test method (labelled "dataset, method")."""
    curves = {f"{dataset}, {method}": recalls for method, rows in by_method(results).items()
              for dataset, recalls in rows.items()}
    return visualize.save_recall_plot(path, curves, title=title)

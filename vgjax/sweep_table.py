"""A sweep's results (vgjax.sweep): per combination of the axes' values, dataset and test method,
the mean and standard deviation over its seeds of each recall@N, beside the runs' wall time,
images per second and peak memory; printed, and written to the sweep's workdir as
results.md (then each run's own row), results.csv and results.json (with every run's own
values), and plotted:
  recall_vs_<axis>.png         recall against each axis with numeric values (a resolution given
                               as a percentage, a PCA dimension, ...), a curve per R@N (the first
                               two) and per combination of the other axes
  recall_vs_time_memory.png    with an eval.index axis: recall against matching time and index
                               memory per index kind, the benchmark's Fig. 4b

The standard deviation is the sample one (n - 1 in the denominator; 0 for a single run).
"""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import ml_collections
import numpy as np

from vgjax import files, visualize
from vgjax.sweep import RESULTS_FOLDER, RUN_STATS, Run, parse_axes

# Per-run measurements beside the recalls: (key in a row's metrics, column title, scale).
MEASUREMENTS = (
    ("wall_seconds", "wall (min)", 1 / 60),
    ("train_images_per_second", "train img/s", 1.0),
    ("extraction_images_per_second", "extraction img/s", 1.0),
    ("matching_ms_per_query", "matching ms/query", 1.0),
    ("index_bytes", "index MB", 1e-6),
    ("host_peak_bytes", "host peak GB", 1e-9),
    ("device_peak_bytes", "device peak GB", 1e-9),
)


def run_rows(mode: str, runs: list[Run]) -> list[dict]:
    """One row per run x evaluation point x dataset x test method: its values, recalls (percent)
    and measurements, from the files the runs wrote. An evaluation from stored descriptors takes
    the extraction speed its run measured (in training's final test, or in another evaluation)."""
    rows = []
    for run in runs:
        training = json.loads((run.folder / "results.json").read_text()) if mode != "eval" else {}
        stats = json.loads((run.folder / RESULTS_FOLDER / RUN_STATS).read_text())
        records = [json.loads(point.result_path(run.folder).read_text()) for point in run.points]
        height, width = json.loads((run.folder / "config.json").read_text())["data"]["resize"]  # resolved
        extraction = training.get("extraction_images_per_second", _first_extraction_speed(records))
        for point, record in zip(run.points, records):
            for dataset, methods in record["results"].items():
                for method, entry in methods.items():
                    timings = entry["timings"]
                    metrics = {**{key: stats.get(key) for key in ("wall_seconds", "host_peak_bytes", "device_peak_bytes")},
                               "train_images_per_second": training.get("train_images_per_second"),
                               "extraction_images_per_second": timings.get("extraction_images_per_second", extraction),
                               "matching_ms_per_query": timings["matching_ms_per_query"],
                               "index_bytes": timings["index_bytes"]}
                    rows.append({"run": run.name, "seed": run.seed, "point": point.name,
                                 "values": dict(run.values + point.values), "image_size": f"{height}x{width}",
                                 "dataset": dataset,
                                 "test_method": method, "recalls": entry["recalls"],
                                 "descriptor_dim": entry["descriptor_dim"], "metrics": metrics})
    return rows


def _first_extraction_speed(records: list[dict]) -> float | None:
    """The network's images/s where a run's evaluations measured it (those served by stored
    descriptors embedded nothing)."""
    for record in records:
        for methods in record["results"].values():
            for entry in methods.values():
                if "extraction_images_per_second" in entry["timings"]:
                    return entry["timings"]["extraction_images_per_second"]
    return None


def _statistics(values: list) -> dict | None:
    """{"mean", "std" (sample), "values"} of the values that are not None; None if there are none."""
    values = [float(value) for value in values if value is not None]
    if not values:
        return None
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "values": values}


def group_rows(rows: list[dict], axis_keys: list[str]) -> list[dict]:
    """Rows grouped by (the axes' values, dataset, test method) over seeds, in first-seen order:
    each group has "values", "dataset", "test_method", "runs" and, per recall ("R@N") and per
    measurement, {"mean", "std", "values"}."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (tuple(row["values"].get(axis) for axis in axis_keys), row["dataset"], row["test_method"])
        groups.setdefault(key, []).append(row)
    table = []
    for (values, dataset, method), members in groups.items():
        recalls = {name: _statistics([member["recalls"].get(name) for member in members])
                   for name in members[0]["recalls"]}
        measurements = {key: _statistics([member["metrics"][key] for member in members]) for key, _, _ in MEASUREMENTS}
        sizes = sorted({member["image_size"] for member in members})
        table.append({"values": dict(zip(axis_keys, values)), "image_size": ", ".join(sizes),
                      "dataset": dataset, "test_method": method,
                      "runs": [member["run"] for member in members], "recalls": recalls,
                      "measurements": measurements})
    return table


def _cell(statistics: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if statistics is None:
        return "n/a"
    return f"{statistics['mean'] * scale:.{digits}f} ± {statistics['std'] * scale:.{digits}f}"


def _digits(scale: float, statistics: list) -> int:
    """Decimals that show a measurement: more for small numbers (e.g. ms per query)."""
    largest = max((abs(s["mean"] * scale) for s in statistics if s is not None), default=1.0)
    return 1 if largest >= 10 else 2 if largest >= 1 else 3


def markdown(groups: list[dict], axis_keys: list[str]) -> str:
    """The table: a row per group, recalls then the measurements any run has, as mean ± std."""
    recall_names = list(dict.fromkeys(name for group in groups for name in group["recalls"]))
    measured = [(key, title, scale) for key, title, scale in MEASUREMENTS
                if any(group["measurements"][key] is not None for group in groups)]
    header = [*axis_keys, "size", "dataset", "test method", "runs", *recall_names, *(title for _, title, _ in measured)]
    lines = ["| " + " | ".join(header) + " |", "|" + ":--|" * (len(axis_keys) + 3) + "--:|" * (len(header) - len(axis_keys) - 3)]
    digits = {key: _digits(scale, [group["measurements"][key] for group in groups]) for key, _, scale in measured}
    for group in groups:
        cells = [*(group["values"][key] for key in axis_keys), group["image_size"], group["dataset"], group["test_method"],
                 str(len(group["runs"])), *(_cell(group["recalls"].get(name)) for name in recall_names),
                 *(_cell(group["measurements"][key], scale, digits[key]) for key, _, scale in measured)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def runs_markdown(rows: list[dict]) -> str:
    """Every run's own recalls beside its measurements: a row per run x evaluation x dataset x
    test method."""
    recall_names = list(dict.fromkeys(name for row in rows for name in row["recalls"]))
    measured = [(key, title, scale) for key, title, scale in MEASUREMENTS
                if any(row["metrics"][key] is not None for row in rows)]
    header = ["run", "evaluation", "size", "dataset", "test method", *recall_names, *(title for _, title, _ in measured)]
    lines = ["| " + " | ".join(header) + " |", "|" + ":--|" * 5 + "--:|" * (len(header) - 5)]
    for row in rows:
        values = [row["metrics"][key] for key, _, _ in measured]
        cells = [row["run"], row["point"], row["image_size"], row["dataset"], row["test_method"],
                 *(f"{row['recalls'][name]:.1f}" if name in row["recalls"] else "n/a" for name in recall_names),
                 *("n/a" if value is None else f"{value * scale:.{_digits(scale, [{'mean': value}])}f}"
                   for value, (_, _, scale) in zip(values, measured))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, groups: list[dict], axis_keys: list[str]) -> None:
    """A row per group: the axes' values, dataset, test method, runs, then <name>_mean and
    <name>_std for each recall and measurement (empty where not measured)."""
    recall_names = list(dict.fromkeys(name for group in groups for name in group["recalls"]))
    names = recall_names + [key for key, _, _ in MEASUREMENTS]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*axis_keys, "image_size", "dataset", "test_method", "runs",
                         *(f"{name}_{stat}" for name in names for stat in ("mean", "std"))])
        for group in groups:
            statistics = {**group["recalls"], **group["measurements"]}
            writer.writerow([*(group["values"][key] for key in axis_keys), group["image_size"], group["dataset"],
                             group["test_method"],
                             len(group["runs"]),
                             *(repr(s[stat]) if (s := statistics.get(name)) is not None else ""
                               for name in names for stat in ("mean", "std"))])


def numeric(text: str) -> float | None:
    """An axis value as a number for a plot's x axis: "80%" -> 80, "1e-4" -> 0.0001,
    "(240, 320)" -> 240 (the height); None when it is not a number (e.g. "hnsw", "None")."""
    text = text.strip()
    try:
        value = float(text[:-1]) if text.endswith("%") else ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def save_plots(folder: Path, groups: list[dict], axis_keys: list[str]) -> list[Path]:
    """recall_vs_<axis>.png for each axis with 2+ numeric values, and recall_vs_time_memory.png
    with an eval.index axis (see the module doc); returns the files written."""
    written = []
    for axis in axis_keys:
        if len({numeric(g["values"][axis]) for g in groups} - {None}) < 2:
            continue
        curves: dict[str, list] = {}
        for group in groups:
            x = numeric(group["values"][axis])
            if x is None:
                continue
            others = [f"{key}={group['values'][key]}" for key in axis_keys if key != axis]
            for name in list(group["recalls"])[:2]:
                label = ", ".join([name, group["dataset"], group["test_method"], *others])
                statistics = group["recalls"][name]
                curves.setdefault(label, []).append((x, statistics["mean"], statistics["std"]))
        label = axis.rsplit(".", 1)[-1]
        xs = [x for points in curves.values() for x, _, _ in points]
        percent = all(g["values"][axis].strip().endswith("%") for g in groups)
        written.append(visualize.save_sweep_plot(
            folder / f"recall_vs_{label}.png", curves, xlabel=f"{axis} (% of the dataset's image size)" if percent else axis,
            title=f"Recall against {axis}",
            log_x=min(xs) > 0 and max(xs) >= 16 * min(xs)))
    if "eval.index" in axis_keys:
        points = {}
        for group in groups:
            first = next(iter(group["recalls"]))
            label = ", ".join([group["values"]["eval.index"], *(f"{key}={group['values'][key]}" for key in axis_keys
                                                                if key != "eval.index"), group["dataset"]])
            time_ms, memory = group["measurements"]["matching_ms_per_query"], group["measurements"]["index_bytes"]
            points[label] = (time_ms["mean"], memory["mean"] / 1e6, group["recalls"][first]["mean"],
                             group["recalls"][first]["std"])
        written.append(visualize.save_tradeoff_plot(folder / "recall_vs_time_memory.png", points, recall=first,
                                                    title="Recall against matching time and memory per index"))
    return written


def write(config: ml_collections.ConfigDict, workdir: Path, runs: list[Run]) -> dict:
    """Collects the runs' results, prints the table, writes results.{md,csv,json} and the plots
    into `workdir`; returns what results.json holds."""
    axis_keys = [axis.key for axis in parse_axes(config.sweep.axes)]
    rows = run_rows(config.sweep.mode, runs)
    groups = group_rows(rows, axis_keys)
    title = (f"Sweep of {config.sweep.mode} over {', '.join(axis_keys) or 'seeds'}: mean ± std over "
             f"{config.sweep.seeds} seed{'s' if config.sweep.seeds != 1 else ''} ({len(runs)} runs)")
    text = f"{title}\n\n{markdown(groups, axis_keys)}"
    print(text, flush=True)
    (workdir / "results.md").write_text(f"{text}\nEach run:\n\n{runs_markdown(rows)}")
    write_csv(workdir / "results.csv", groups, axis_keys)
    summary = {"title": title, "axes": axis_keys, "groups": groups, "runs": rows}
    files.write_json(workdir / "results.json", summary, allow_nan=False)
    plots = save_plots(workdir, groups, axis_keys)
    print(f"Wrote {workdir / 'results.md'} (and .csv, .json)" + "".join(f", {path}" for path in plots), flush=True)
    return summary

"""Pictures of evaluation results: per-query prediction rows, recall@N curves, a map of queries.

- `save_predictions`: VPR-methods-evaluation's per-query images (reference.md §7):
  `preds/{q:03d}.jpg`, one row "query, prediction 1..N", each prediction framed green (a
  positive of the query) or red (not a positive), plus `preds/{q:03d}.txt` with the paths.
- `save_recall_plot`: recall@N curve(s) of one or several runs.
- `save_map`: database and query positions, queries coloured by whether their top-1 is right.
- `save_sweep_plot`, `save_tradeoff_plot`: a sweep's means and standard deviations (vgjax.sweep_table).

Inputs are an `evaluate.EvaluationResult`'s `predictions` (int [Q, k], best first, negative = no
prediction) and the `vg_folder.Split` they were computed on.

Deliberate differences from VPR-methods-evaluation:
- The frame is drawn after the image is shrunk to fit its cell (still before padding), with a
  width of cell_size / 25 (20 px at 512), so it is equally visible for tiny and huge images;
  the original draws 20 px on the full-resolution image.
- Labels are centred in their strip; text is DejaVu Sans (matplotlib's bundled copy) at
  cell_size / 10 (about 51 pt at 512), falling back to PIL's default font.
- A negative prediction (no result) gets an empty grey cell labelled "Pred{i} - none" instead
  of indexing the last database image.

Plots use matplotlib's `Figure` directly (Agg canvas), never pyplot, so no display or global
backend state is involved.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from PIL import Image, ImageDraw, ImageFont, ImageOps

from vgjax.data.vg_folder import Split
from vgjax.evaluate import first_correct_rank

CORRECT_RGB = (0, 200, 0)
WRONG_RGB = (220, 0, 0)
PREDICTED_RGB = (0.15, 0.4, 0.9)  # matplotlib colour of predicted positions (no labels)
EMPTY_RGB = (200, 200, 200)
BACKGROUND_RGB = (255, 255, 255)


# ---------------------------------------------------------------------------------------------
# Layout of one prediction row (all sizes derived from the cell side).


def border_width(cell_size: int) -> int:
    """Frame width in pixels of a prediction cell (20 at 512)."""
    return max(2, round(cell_size / 25))


def label_height(cell_size: int) -> int:
    """Height of the label strip above each cell (100 at 512)."""
    return max(12, round(cell_size / 5.12))


def gap_width(cell_size: int) -> int:
    """White space between cells (50 at 512)."""
    return max(4, round(cell_size / 10.24))


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"),
                                     fallback_to_default=False)
        return ImageFont.truetype(path, size)
    except (ValueError, OSError):
        return ImageFont.load_default(size)


def _cell(path: str | None, cell_size: int, border_rgb: tuple[int, int, int] | None) -> Image.Image:
    """The image at `path` shrunk to fit cell_size (aspect kept), framed in `border_rgb` if
    given, padded white to cell_size x cell_size; an empty grey cell for path None."""
    if path is None:
        return Image.new("RGB", (cell_size, cell_size), EMPTY_RGB)
    with Image.open(path) as image:
        image = ImageOps.contain(image.convert("RGB"), (cell_size, cell_size))
    if border_rgb is not None:
        width = min(border_width(cell_size), max(1, min(image.size) // 2))
        ImageDraw.Draw(image).rectangle([0, 0, image.width - 1, image.height - 1],
                                        outline=border_rgb, width=width)
    return ImageOps.pad(image, (cell_size, cell_size), color=BACKGROUND_RGB)


def _row_image(paths: Sequence[str | None], labels: Sequence[str],
               borders: Sequence[tuple[int, int, int] | None], cell_size: int) -> Image.Image:
    """Cells side by side, each under its label strip, separated by gaps."""
    strip, gap = label_height(cell_size), gap_width(cell_size)
    width = len(paths) * cell_size + (len(paths) - 1) * gap
    row = Image.new("RGB", (width, strip + cell_size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(row)
    font = _font(max(8, round(cell_size / 10)))
    for i, (path, label, border) in enumerate(zip(paths, labels, borders)):
        left = i * (cell_size + gap)
        row.paste(_cell(path, cell_size, border), (left, strip))
        draw.text((left + cell_size / 2, strip / 2), label, fill=(0, 0, 0), font=font, anchor="mm")
    return row


# ---------------------------------------------------------------------------------------------
# Prediction rows.


def _check_predictions(split: Split, predictions: np.ndarray) -> np.ndarray:
    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or len(predictions) != split.num_queries:
        raise ValueError(f"predictions must be [Q, k] with Q = {split.num_queries} queries, "
                         f"got shape {predictions.shape}")
    if not np.issubdtype(predictions.dtype, np.integer):
        raise ValueError(f"predictions must be integer database indices, got {predictions.dtype}")
    if predictions.size and predictions.max() >= split.num_database:
        raise ValueError(f"predictions hold database index {predictions.max()}, but the split has "
                         f"{split.num_database} database images")
    return predictions.astype(np.int64)


def top1_correct(split: Split, predictions: np.ndarray) -> np.ndarray:
    """bool [Q]: whether each query's first prediction is one of its positives."""
    predictions = _check_predictions(split, predictions)
    return first_correct_rank(predictions[:, :1], split.positives) == 0


def prediction_label(split: Split, q: int, p: int, rank: int, positives: set[int]) -> str:
    """"Pred2 ✓ 12 m" (a positive, 12 m from query q) or "Pred2 ✗ 37 m"; "Pred2" without
    labels; "Pred2 - none" for no prediction (p < 0)."""
    if p < 0:
        return f"Pred{rank} - none"
    if not split.has_labels:
        return f"Pred{rank}"
    metres = float(np.hypot(*(split.database_utm[p] - split.query_utm[q])))
    return f"Pred{rank} {'✓' if p in positives else '✗'} {metres:.0f} m"


def _write_paths(path: Path, query: str, predictions: Sequence[str | None],
                 positives: Sequence[str]) -> None:
    lines = ["query:", query, "", "predictions (best first):"]
    lines += [p if p is not None else "none" for p in predictions]
    lines += ["", f"positives ({len(positives)}):", *positives]
    path.write_text("\n".join(lines) + "\n")


def save_predictions(out_dir: str | os.PathLike, split: Split, predictions: np.ndarray, *,
                     num_preds: int = 5, only_wrong: bool = False,
                     query_indices: Sequence[int] | None = None, cell_size: int = 512,
                     jpeg_quality: int = 90) -> list[Path]:
    """Writes `out_dir/preds/{q:03d}.jpg` and `.txt` for each chosen query.

    The image is one row: the query, then its first `num_preds` predictions framed green (a
    positive of the query) or red (not one), each on a white cell_size x cell_size square
    under a label ("Query", "Pred1 ✓ 12 m": a positive 12 m from the query, "Pred2 ✗ 37 m"; without
    labels "Pred1", unframed). The .txt lists the query path, the prediction
    paths (best first) and the query's positive paths.

    Args:
      out_dir: output folder (preds/ is created inside).
      split: the split the predictions were computed on.
      predictions: int [Q, k] database indices, best first (negative = no prediction).
      num_preds: predictions per row (at most k are shown).
      only_wrong: skip queries whose top-1 prediction is correct.
      query_indices: queries to draw (default: all); negative indices count from the end.
      cell_size: side of each square cell in pixels (512 as in VPR-methods-evaluation).
      jpeg_quality: PIL JPEG quality.

    Returns:
      The written .jpg paths, in query order.
    """
    predictions = _check_predictions(split, predictions)
    if num_preds < 1:
        raise ValueError(f"num_preds must be >= 1, got {num_preds}")
    if cell_size < 16:
        raise ValueError(f"cell_size must be >= 16 pixels, got {cell_size}")
    queries = range(split.num_queries)
    chosen = [queries[q] for q in (queries if query_indices is None else query_indices)]
    correct = top1_correct(split, predictions)
    folder = Path(out_dir) / "preds"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for q in chosen:
        if only_wrong and correct[q]:
            continue
        positives = set(split.positives[q].tolist())
        preds = predictions[q, :num_preds].tolist()
        pred_paths = [split.database_paths[p] if p >= 0 else None for p in preds]
        labels = ["Query"] + [prediction_label(split, q, p, i, positives) for i, p in enumerate(preds, start=1)]
        borders = [None] + [(CORRECT_RGB if p in positives else WRONG_RGB) if p >= 0 and split.has_labels
                            else None for p in preds]
        row = _row_image([split.query_paths[q], *pred_paths], labels, borders, cell_size)
        image_path = folder / f"{q:03d}.jpg"
        row.save(image_path, quality=jpeg_quality)
        _write_paths(folder / f"{q:03d}.txt", split.query_paths[q], pred_paths,
                     [split.database_paths[p] for p in split.positives[q]])
        written.append(image_path)
    return written


# ---------------------------------------------------------------------------------------------
# Plots.


def _recall_n(key: int | str) -> int:
    """N of a recall key: N itself or "R@N" (as results.json writes them)."""
    return int(key.removeprefix("R@")) if isinstance(key, str) else int(key)


def _as_runs(recalls: Mapping) -> dict[str, dict[int, float]]:
    if not recalls:
        raise ValueError("recalls is empty")
    if all(isinstance(v, Mapping) for v in recalls.values()):
        runs = {str(label): {_recall_n(n): r for n, r in run.items()} for label, run in recalls.items()}
    elif not any(isinstance(v, Mapping) for v in recalls.values()):
        runs = {"": {_recall_n(n): r for n, r in recalls.items()}}
    else:
        raise ValueError("recalls must be {N: percent} or {label: {N: percent}}, not a mix")
    for label, run in runs.items():
        if not run or any(n < 1 for n in run):
            raise ValueError(f"run {label!r}: recall values N must be >= 1, got {sorted(run)}")
    return runs


def save_recall_plot(path: str | os.PathLike,
                     recalls: Mapping[int, float] | Mapping[str, Mapping[int, float]], *,
                     title: str = "Recall@N") -> Path:
    """Saves recall@N curve(s) as a PNG.

    Args:
      path: the .png to write (parent folders are created).
      recalls: one run {N: percent} (e.g. EvaluationResult.recalls) or several
        {label: {N: percent}}; several runs get a legend. N may also be written "R@N".
      title: the plot title.

    The x axis is logarithmic when the N values span a factor of 10 or more, with a tick at each
    N; y is percent from 0 to 100.
    """
    runs = _as_runs(recalls)
    all_ns = sorted({int(n) for run in runs.values() for n in run})
    figure = Figure(figsize=(6.4, 4.8), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for label, run in runs.items():
        ns = sorted(run)
        values = [float(run[n]) for n in ns]
        axes.plot(ns, values, marker="o", label=label or None, clip_on=False)
        if len(runs) == 1:
            for n, value in zip(ns, values):
                below = value > 90  # keeps labels inside the axes, clear of the title
                axes.annotate(f"{value:.1f}", (n, value), textcoords="offset points",
                              xytext=(0, -15 if below else 7), ha="center", fontsize=9)
    if all_ns[-1] >= 10 * all_ns[0]:
        axes.set_xscale("log")
    axes.set_xticks(all_ns, [str(n) for n in all_ns])
    axes.minorticks_off()
    axes.set_ylim(0, 100)
    axes.set_xlabel("N (number of predictions)")
    axes.set_ylabel("Recall@N (%)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if len(runs) > 1:
        axes.legend(loc="best")
    return _save(figure, path)


def save_map(path: str | os.PathLike, split: Split, predictions: np.ndarray, *,
             title: str | None = None) -> Path:
    """Saves a PNG map: database positions as small grey points, queries green (top-1 correct)
    or red (wrong), east/north in metres with equal aspect; the title gives R@1.

    Args:
      path: the .png to write (parent folders are created).
      split: the split the predictions were computed on.
      predictions: int [Q, k] database indices, best first.
      title: a prefix for the title (e.g. the method name).
    """
    correct = top1_correct(split, predictions)
    recall_1 = 100.0 * correct.mean() if len(correct) else 0.0
    figure = Figure(figsize=(7, 7), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.scatter(*split.database_utm.T, s=4, c="0.65", label=f"database ({split.num_database})")
    if split.has_labels:
        for mask, colour, name in ((correct, CORRECT_RGB, "top-1 correct"),
                                   (~correct, WRONG_RGB, "top-1 wrong")):
            axes.scatter(*split.query_utm[mask].T, s=24, color=np.array(colour) / 255,
                         edgecolors="black", linewidths=0.4, label=f"query, {name} ({mask.sum()})")
    else:
        top1 = np.asarray(predictions)[:, 0]
        axes.scatter(*split.database_utm[top1[top1 >= 0]].T, s=24, color=PREDICTED_RGB,
                     edgecolors="black", linewidths=0.4, label=f"queries' predicted positions ({len(top1)})")
    axes.set_aspect("equal", adjustable="datalim")
    axes.ticklabel_format(useOffset=False, style="plain")
    axes.tick_params(axis="x", labelrotation=30)
    axes.set_xlabel("east (m)")
    axes.set_ylabel("north (m)")
    prefix = f"{title}: " if title else ""
    axes.set_title(f"{prefix}{split.name}, R@1 = {recall_1:.1f}% ({int(correct.sum())}/{len(correct)} queries)"
                   if split.has_labels else f"{prefix}{split.name}: top-1 predicted positions")
    figure.legend(loc="outside lower center", ncol=3, markerscale=1.5)
    return _save(figure, path)


def spread_indices(total: int, count: int) -> np.ndarray:
    """`count` distinct indices evenly spread over range(total), starting at 0."""
    return np.unique(np.linspace(0, total - 1, count).round().astype(int)) if count > 0 else np.zeros(0, int)


def save_evaluation_pictures(out_dir: str | os.PathLike, split: Split, predictions: np.ndarray,
                             recalls: Mapping[int, float], eval_config, *, title: str = "",
                             recall_plot: bool = True) -> Path:
    """What `eval.num_preds_to_save > 0` asks for: prediction rows of `eval.queries_to_save`
    queries spread evenly over the split (over its wrong ones with `eval.save_only_wrong_preds`),
    `recalls.png` (unless not `recall_plot`) and `map.png` (without labels: no recall plot, and a
    map of the predicted positions when the database's names give them), all in out_dir.

    Spread, not the first ones: datasets list their queries in capture order, so the first
    queries usually show one street (or one room) only.
    """
    out_dir = Path(out_dir)
    candidates = np.arange(split.num_queries)
    if eval_config.save_only_wrong_preds and split.has_labels:
        candidates = np.flatnonzero(~top1_correct(split, predictions))
    chosen = candidates[spread_indices(len(candidates), min(eval_config.queries_to_save, len(candidates)))]
    save_predictions(out_dir, split, predictions,
                     num_preds=min(eval_config.num_preds_to_save, predictions.shape[1]),
                     query_indices=chosen)
    if split.has_labels and recall_plot:
        save_recall_plot(out_dir / "recalls.png", recalls, title=f"{title}: Recall@N" if title else "Recall@N")
    if np.isfinite(split.database_utm).all():  # without labels, where the database's names say
        save_map(out_dir / "map.png", split, predictions, title=title or None)
    print(f"Pictures: {out_dir}", flush=True)
    return out_dir


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def save_sweep_plot(path: str | os.PathLike, curves: Mapping[str, Sequence[tuple[float, float, float]]], *,
                    xlabel: str, ylabel: str = "Recall (%)", title: str = "", log_x: bool = False) -> Path:
    """Curves of a sweep's means with their standard deviations as error bars.

    Args:
      curves: {label: [(x, mean, std), ...]}, e.g. {"R@1": [(40, 61.2, 0.8), (60, ...)]}.
      xlabel, ylabel, title: the plot's texts; log_x: a logarithmic x axis (e.g. PCA dimensions).
    """
    figure = Figure(figsize=(6.4, 4.8), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for label, points in curves.items():
        xs, means, stds = zip(*sorted(points))
        axes.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    xs = sorted({x for points in curves.values() for x, _, _ in points})
    if log_x:
        axes.set_xscale("log")
    axes.set_xticks(xs, [f"{x:g}" for x in xs])
    axes.minorticks_off()
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best")
    return _save(figure, path)


def save_tradeoff_plot(path: str | os.PathLike, points: Mapping[str, tuple[float, float, float, float]], *,
                       recall: str = "R@1", title: str = "") -> Path:
    """The benchmark's Fig. 4b: recall against matching time (left) and index memory (right).

    Args:
      points: {label (e.g. an index kind): (matching ms per query, index MB, mean recall, std)}.
    """
    figure = Figure(figsize=(11, 5 + 0.2 * len(points)), dpi=100, layout="constrained")
    markers = "osD^v<>pPX*h"
    for column, (xlabel, position) in enumerate((("matching time per query (ms)", 0), ("index memory (MB)", 1))):
        axes = figure.add_subplot(1, 2, column + 1)
        for i, (label, values) in enumerate(points.items()):
            axes.errorbar(values[position], values[2], yerr=values[3], marker=markers[i % len(markers)], capsize=3,
                          linestyle="none", color=f"C{i % 10}", label=label if column == 0 else None)
        axes.set_xscale("log")
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set_xlabel(xlabel)
        axes.set_ylabel(f"{recall} (%)")
        axes.grid(True, alpha=0.3)
    figure.legend(loc="outside lower center", ncols=min(3, len(points)), fontsize=9)
    figure.suptitle(title)
    return _save(figure, path)

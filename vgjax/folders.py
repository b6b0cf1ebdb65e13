"""Any network on any two folders of images, from Python (what `vgjax-eval` runs):

  import vgjax
  summary = vgjax.evaluate_folders("cosplace_resnet50_2048", "db/", "queries/", output="out")
  places = vgjax.geolocalize("cosplace_resnet50_2048", "db/", "my_photos/", k=3)

`evaluate_folders` computes recalls when the file names carry positions (the VG format), and
with labels=False geolocalizes the queries instead; either way it writes
<output>/predictions/<test method>/predictions.csv, results.json and what else is asked for
(pictures, descriptors; vgjax.eval_run). `geolocalize` returns predictions.csv's rows.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path

from vgjax import eval_run, models
from vgjax.configs import common
from vgjax.data.vg_folder import load_folders
from vgjax.models import LoadedModel


def default_output(model: str | os.PathLike | LoadedModel) -> Path:
    """vgjax_eval/<model name>/<date_time>."""
    name = "model" if isinstance(model, LoadedModel) else Path(model).name
    return Path("vgjax_eval") / name / datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def evaluate_folders(model: str | os.PathLike | LoadedModel, database_folder: str | os.PathLike,
                     queries_folder: str | os.PathLike, *, labels: bool = True,
                     output: str | os.PathLike | None = None, image_size: tuple[int, int] | None = None,
                     model_config: dict | None = None, test_method: str = "hard_resize",
                     recall_values: Sequence[int] = (1, 5, 10, 20), positive_dist_m: float = 25.0,
                     num_preds_to_save: int = 0, queries_to_save: int = 20, save_only_wrong_preds: bool = False,
                     save_descriptors: bool = False, batch_size: int = 16, num_workers: int = 2,
                     offline: bool | None = None) -> dict:
    """Embeds both folders with `model` and searches the queries' nearest database images.

    Args:
      model: a zoo name, a path (vgjax.models.load), or an already loaded model.
      database_folder, queries_folder: images (.jpg/.jpeg/.png, recursive).
      labels: the names carry positions (recalls are computed); False: geolocalize the queries.
      output: where the files go (default: `default_output(model)`).
      image_size: (H, W) to embed at; default: the model's.
      model_config: for a weights file, the network it holds (see vgjax.models.load).
      The other options are vgjax-eval's (and the config's eval section).

    Returns:
      results.json's content: the model, folders, counts, labels, the output folder and
      {"results": {test method: {"recalls": {"R@N": percent} (empty without labels),
      "descriptor_dim", "index", "timings"}}}.
    """
    if num_preds_to_save > max(recall_values):  # as VPR-methods-evaluation: search deep enough to show them
        recall_values = (*recall_values, num_preds_to_save)
    split = load_folders(database_folder, queries_folder, positive_dist_m, labels=labels)  # checked first
    print(f"{split.num_database} database images, {split.num_queries} queries"
          + ("" if labels else " (no labels: geolocalizing them)"))
    loaded = model if isinstance(model, LoadedModel) else models.load(
        model, model=model_config, image_size=image_size, offline=offline)
    config = common.get_config()
    config.data.update(resize=tuple(loaded.image_size), infer_batch_size=batch_size, num_workers=num_workers)
    config.eval.update(test_method=test_method, recall_values=tuple(recall_values),
                       num_preds_to_save=num_preds_to_save, queries_to_save=queries_to_save,
                       save_only_wrong_preds=save_only_wrong_preds, save_descriptors=save_descriptors,
                       save_predictions=True)
    output = Path(output) if output is not None else default_output(model)
    output.mkdir(parents=True, exist_ok=True)
    results = eval_run.evaluate_split(config, loaded.embed_fn, split, output)
    summary = {"model": "a loaded model" if isinstance(model, LoadedModel) else str(model),
               "image_size": list(loaded.image_size), "database_folder": str(database_folder),
               "queries_folder": str(queries_folder), "num_database": split.num_database,
               "num_queries": split.num_queries, "labels": labels, "output": str(output), "results": results}
    (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"Wrote {output / 'results.json'}")
    return summary


def geolocalize(model: str | os.PathLike | LoadedModel, database_folder: str | os.PathLike,
                photos_folder: str | os.PathLike, *, k: int = 5, **options) -> list[dict]:
    """The k nearest database images of each photo (no coordinates needed), best first.

    Returns predictions.csv's rows (see vgjax.evaluate.write_predictions_csv): dicts with query,
    rank, prediction, distance, and the prediction's east, north, lat, lon ("" where its name
    does not carry them). `options` are evaluate_folders' (output, num_preds_to_save, ...).
    """
    summary = evaluate_folders(model, database_folder, photos_folder, labels=False, recall_values=(k,), **options)
    method = options.get("test_method", "hard_resize")
    with open(Path(summary["output"]) / "predictions" / method / "predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))

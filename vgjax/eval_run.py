"""Evaluation as config.eval asks for it: the ONE mechanism behind `--mode eval`
(vgjax.experiment.run_eval) and the test at the end of training (vgjax.train.loop).

A network, given as an embed function, is tested on a split with every test method of
eval.test_method (one, a comma-separated list, or "all"), with eval.pca_dim (PCA fitted on
eval.pca_dataset_folder) and eval.index / eval.index_params. The split's database is embedded
once and reused by every test method. On request each method's pictures
(eval.num_preds_to_save) and predictions.csv (eval.save_predictions, and always for a split
without labels) are written to <out_dir>/predictions/<method>, its descriptors
(eval.save_descriptors) to <out_dir>/descriptors/<method>.

Also here: the datasets folder and the names eval.datasets gives (the datasets --mode eval
tests), and the file-name suffix of PCA and index options.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections
import numpy as np

from vgjax import evaluate, sharding, visualize
from vgjax import index as index_lib
from vgjax.data.vg_folder import Split


def datasets_root(data_config: ml_collections.ConfigDict) -> Path:
    """config.data.datasets_folder, else $DATASETS_FOLDER (as the benchmark falls back)."""
    root = data_config.datasets_folder or os.environ.get("DATASETS_FOLDER", "")
    if not root:
        raise ValueError("no datasets folder: set --config.data.datasets_folder=DIR or the "
                         "DATASETS_FOLDER environment variable")
    return Path(root)


def test_methods(eval_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """eval.test_method as a tuple of test methods: "all" -> every one of the benchmark's,
    "a, b" -> ("a", "b") (vgjax.configs.validate has checked the names)."""
    text = eval_config.test_method.strip()
    if text == "all":
        return evaluate.TEST_METHODS
    return tuple(dict.fromkeys(filter(None, (method.strip() for method in text.split(",")))))


def dataset_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """eval.datasets (names under data.datasets_folder, in a sequence and/or comma-separated),
    or (data.dataset_name,) when it is empty."""
    names = [name.strip() for item in config.eval.datasets for name in str(item).split(",")]
    return tuple(dict.fromkeys(filter(None, names))) or (config.data.dataset_name,)


def options_suffix(eval_config: ml_collections.ConfigDict) -> str:
    """"[_pca<d>][_<index>]": how results with PCA or another index than flat are told apart."""
    suffix = f"_pca{eval_config.pca_dim}" if eval_config.pca_dim is not None else ""
    return suffix + (f"_{eval_config.index}" if eval_config.index != "flat" else "")


def check_pca(eval_config: ml_collections.ConfigDict) -> None:
    """ValueError when eval.pca_dim is set without eval.pca_dataset_folder to fit it on."""
    if eval_config.pca_dim is not None and not eval_config.pca_dataset_folder:
        raise ValueError(f"eval.pca_dim={eval_config.pca_dim}: pca_dim needs config.eval.pca_dataset_folder "
                         "(relative to the datasets folder, e.g. pitts30k/images/train)")


class DescriptorStore:
    """Descriptors one network has computed, by what was embedded (images, transform, size), so
    that evaluations differing only in how descriptors are searched (PCA dimension, index,
    N, positives radius: vgjax.sweep's evaluation axes) embed nothing twice. In memory, for one
    network: a store must not outlive the network it was filled by."""

    def __init__(self):
        self._descriptors: dict[tuple, np.ndarray] = {}

    def get(self, key: tuple) -> np.ndarray | None:
        return self._descriptors.get(key)

    def put(self, key: tuple, descriptors: np.ndarray | None) -> None:
        if descriptors is not None:
            self._descriptors[key] = descriptors


def fit_pca(config: ml_collections.ConfigDict, embed_fn: evaluate.EmbedFn, *,
            store: DescriptorStore | None = None) -> evaluate.PCA | None:
    """PCA to eval.pca_dim fitted on eval.pca_dataset_folder's images, or None without pca_dim;
    the folder's descriptors come from `store` when it has them (and go there)."""
    check_pca(config.eval)
    if config.eval.pca_dim is None:
        return None
    folder, size = datasets_root(config.data) / config.eval.pca_dataset_folder, tuple(config.data.resize)
    key = ("pca sample", str(folder), size, config.seed)
    descriptors = store.get(key) if store is not None else None
    if descriptors is None:
        descriptors = evaluate.pca_sample_descriptors(embed_fn, folder, resize=size,
                                                      batch_size=config.data.infer_batch_size, seed=config.seed)
    if store is not None:
        store.put(key, descriptors)
    return evaluate.fit_pca(descriptors, config.eval.pca_dim)


def test_positive_dist_m(config: ml_collections.ConfigDict) -> float:
    """The radius (metres) of test positives: eval.positive_dist_threshold, else
    data.val_positive_dist_threshold (the benchmark's 25 m for validation and test)."""
    threshold = config.eval.positive_dist_threshold
    return float(config.data.val_positive_dist_threshold if threshold is None else threshold)


def eval_image_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(H, W) validation and test images are resized to: eval.resize, else data.resize."""
    return tuple(config.eval.resize or config.data.resize)


def evaluate_split(config: ml_collections.ConfigDict, embed_fn: evaluate.EmbedFn, split: Split,
                   out_dir: Path, *, pca: evaluate.PCA | None = None, title: str = "",
                   store: DescriptorStore | None = None) -> dict[str, dict]:
    """Tests `embed_fn` on `split` with every test method of eval.test_method.

    Args:
      embed_fn: uint8 [B, H, W, 3] -> float [B, D].
      split: from vgjax.data.vg_folder.load_split.
      out_dir: pictures go to out_dir/predictions/<method> (with several methods, one recall
        plot of them all in out_dir/predictions/recalls.png), descriptors to
        out_dir/descriptors/<method> (only when config.eval asks for them).
      pca: from `fit_pca`, applied to database and queries; None for none.
      title: a prefix of the pictures' titles (e.g. "trained").
      store: descriptors of this network computed before (by image folder, test method and
        size), used instead of embedding, and where the new ones go.

    Returns:
      {test method: {"recalls": {"R@N": percent}, "descriptor_dim": int, "index": str,
      "timings": {...}}}, in eval.test_method's order.
    """
    store = store if store is not None else DescriptorStore()  # the database, embedded once
    size, methods, results = eval_image_size(config), test_methods(config.eval), {}
    database_key = ("database", str(split.folder), size)
    for method in methods:
        queries_key = ("queries", str(split.folder), tuple(split.query_paths[:1]), method, size)  # the first: which folder
        result = evaluate.evaluate(
            embed_fn, split, test_method=method, resize=size,
            recall_values=tuple(config.eval.recall_values), index_kind=config.eval.index,
            index_params=index_lib.parse_params(config.eval.index_params),
            batch_size=config.data.infer_batch_size, majority_weight=config.eval.majority_weight,
            pca=pca, num_threads=config.data.num_workers, database_descriptors=store.get(database_key),
            query_descriptors=store.get(queries_key), keep_descriptors=True)
        store.put(database_key, result.database_descriptors)
        store.put(queries_key, result.query_descriptors)
        if split.has_labels:
            print(f"Recalls on {split.folder} ({method}): {result}", flush=True)
        if sharding.is_main_process():
            _save_outputs(config, split, result, out_dir, f"{title}, {method}" if title else method,
                          recall_plot=len(methods) == 1)
        results[method] = {"recalls": {f"R@{n}": r for n, r in result.recalls.items()},
                           "descriptor_dim": result.descriptor_dim, "index": result.index,
                           "timings": result.timings}
    if len(methods) > 1 and config.eval.num_preds_to_save > 0 and split.has_labels and sharding.is_main_process():
        path = visualize.save_recall_plot(out_dir / "predictions" / "recalls.png",
                                          {method: entry["recalls"] for method, entry in results.items()},
                                          title=f"{title}: Recall@N" if title else "Recall@N")
        print(f"Wrote {path} (every test method)")
    return results


def _save_outputs(config: ml_collections.ConfigDict, split: Split, result: evaluate.EvaluationResult,
                  out_dir: Path, title: str, *, recall_plot: bool) -> None:
    """The pictures (with its own recall plot when `recall_plot`), predictions.csv and
    descriptors config.eval asks for, of one test method's result."""
    method = result.test_method
    if config.eval.save_predictions or not split.has_labels:
        path = evaluate.write_predictions_csv(out_dir / "predictions" / method / "predictions.csv", split,
                                              result.predictions, result.distances)
        print(f"Wrote {path}")
    if config.eval.num_preds_to_save > 0:
        visualize.save_evaluation_pictures(out_dir / "predictions" / method, split, result.predictions,
                                           result.recalls, config.eval, title=title, recall_plot=recall_plot)
    if config.eval.save_descriptors:
        evaluate.export_descriptors(out_dir / "descriptors" / method, split, result.database_descriptors,
                                    result.query_descriptors, test_method=method, pca_dim=config.eval.pca_dim)

"""Evaluation protocol of the benchmark (reference.md §4): embed, search, recall@N.

Pieces, each usable alone:
- `recall_at_n`: percent of queries with a positive among the first N predictions.
- Query test methods (§4.2): a host-side image transform per method (`query_transform`) and,
  for the multi-crop methods, a ranking step (`mean_of_crops`, `nearest_crop`, `maj_voting`).
- `fit_pca` / `fit_pca_on_folder`: PCA of descriptors (eval only, as in the benchmark).
- `export_descriptors`: .npy descriptors plus CSV/JSON metadata.
- `evaluate`: the notebook entry point; works with any `embed_fn` (uint8 images -> descriptors).

Deliberate differences from the PyTorch benchmark:
- nearest_crop/maj_voting take their depth k from the recall values instead of a hard-coded 20
  (maj_voting searches at least 10 per crop so its top-10 vote sees what the original sees);
  the top-k lists are the same as the original's truncated to k.
- Ties in distance are broken by a stable sort (crop order, then rank), not quicksort's order.
- PCA is fitted with an exact eigendecomposition (no sklearn, no randomized SVD), on images
  hard-resized to the evaluation size (the original does not resize them, which only works when
  all images share a size). Component signs are fixed (largest |entry| positive).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from vgjax import index as index_lib
from vgjax.embed import EmbedFn, EmbedTiming, embed_images
from vgjax.data import images as image_ops
from vgjax.data import pipeline
from vgjax.data.vg_folder import Positives, Split, latitude_longitude, list_images

TEST_METHODS = ("hard_resize", "single_query", "central_crop", "five_crops", "nearest_crop",
                "maj_voting")
MULTI_CROP_METHODS = ("five_crops", "nearest_crop", "maj_voting")
NUM_CROPS = 5
MAJ_VOTING_TOP_NS = (1, 5, 10)


# ---------------------------------------------------------------------------------------------
# Recall.


def _as_positives(positives: Positives | Sequence[np.ndarray]) -> Positives:
    if isinstance(positives, Positives):
        return positives
    arrays = [np.unique(np.asarray(p, dtype=np.int64)) for p in positives]
    indptr = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=indptr[1:])
    indices = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    return Positives(indptr=indptr, indices=indices)


def _check_recall_values(ns: Sequence[int]) -> tuple[int, ...]:
    ns = tuple(int(n) for n in ns)
    if not ns or ns[0] < 1 or any(b <= a for a, b in zip(ns, ns[1:])):
        raise ValueError(f"recall values must be positive and strictly increasing, got {ns}")
    return ns


def first_correct_rank(predictions: np.ndarray, positives: Positives | Sequence[np.ndarray]) -> np.ndarray:
    """Rank (0-based) of the first prediction that is a positive, or K if none is.

    Args:
      predictions: int [Q, K] database indices, best first (negative = no prediction).
      positives: for each query, its positive database indices.

    Returns:
      int64 [Q].
    """
    predictions = np.asarray(predictions, dtype=np.int64)
    positives = _as_positives(positives)
    if predictions.ndim != 2 or len(predictions) != len(positives):
        raise ValueError(f"predictions must be [Q, K] with Q = {len(positives)} queries, "
                         f"got shape {predictions.shape}")
    num_queries, depth = predictions.shape
    # One sorted key space over (query, database index): row q's positives are the keys
    # q * stride + index, so membership of all predictions is one searchsorted.
    stride = int(max(predictions.max(initial=0), positives.indices.max(initial=0))) + 1
    positive_keys = np.repeat(np.arange(num_queries), positives.counts()) * stride + positives.indices
    prediction_keys = np.arange(num_queries)[:, None] * stride + predictions
    if len(positive_keys) == 0:
        return np.full(num_queries, depth, dtype=np.int64)
    slots = np.minimum(np.searchsorted(positive_keys, prediction_keys), len(positive_keys) - 1)
    is_positive = (predictions >= 0) & (positive_keys[slots] == prediction_keys)
    return np.where(is_positive.any(axis=1), is_positive.argmax(axis=1), depth)


def recall_at_n(predictions: np.ndarray, positives: Positives | Sequence[np.ndarray],
                ns: Sequence[int] = (1, 5, 10, 20)) -> dict[int, float]:
    """Recall@N as the benchmark counts it.

    Args:
      predictions: int [Q, K] database indices, best first, K >= max(ns).
      positives: for each query, its positive database indices (e.g. Split.positives).
      ns: strictly increasing N values.

    Returns:
      {N: percent of queries with at least one positive among their first N predictions}.
      Queries without any positive count as misses.
    """
    ns = _check_recall_values(ns)
    predictions = np.asarray(predictions)
    if predictions.ndim == 2 and predictions.shape[1] < ns[-1]:
        raise ValueError(f"need at least {ns[-1]} predictions per query for R@{ns[-1]}, "
                         f"got {predictions.shape[1]}")
    ranks = first_correct_rank(predictions, positives)
    num_queries = max(len(ranks), 1)
    return {n: 100.0 * int(np.count_nonzero(ranks < n)) / num_queries for n in ns}


def format_recalls(recalls: dict[int, float]) -> str:
    """'R@1: 86.4, R@5: 93.0, ...' (one decimal, as the benchmark logs them)."""
    return ", ".join(f"R@{n}: {r:.1f}" for n, r in recalls.items())


# ---------------------------------------------------------------------------------------------
# Query test methods: image transforms (host, uint8 HWC).


def _hard_resize(image: np.ndarray, resize: tuple[int, int]) -> np.ndarray:
    return image_ops.resize_bilinear(image, resize)


def _single_query(image: np.ndarray, resize: tuple[int, int]) -> np.ndarray:
    return image_ops.resize_shorter_side(image, min(resize))


def _central_crop(image: np.ndarray, resize: tuple[int, int]) -> np.ndarray:
    height, width = image.shape[:2]
    scale = max(resize[0] / height, resize[1] / width)
    return image_ops.center_crop(image_ops.resize_nearest_by_scale(image, scale), resize)


def _five_crops(image: np.ndarray, resize: tuple[int, int]) -> np.ndarray:
    side = min(resize)
    return image_ops.five_crops(image_ops.resize_shorter_side(image, side), side)


_QUERY_TRANSFORMS = {
    "hard_resize": _hard_resize,
    "single_query": _single_query,
    "central_crop": _central_crop,
    "five_crops": _five_crops,
    "nearest_crop": _five_crops,
    "maj_voting": _five_crops,
}


def _check_test_method(test_method: str) -> None:
    if test_method not in TEST_METHODS:
        raise ValueError(f"unknown test_method {test_method!r}; choose one of {TEST_METHODS}")


def query_transform(test_method: str, resize: tuple[int, int]) -> pipeline.ImageTransform:
    """The query preprocessing of a test method: uint8 [H, W, 3] -> uint8 image(s).

    hard_resize -> [H_r, W_r, 3]; single_query -> shorter side min(resize), aspect kept;
    central_crop -> nearest rescale to cover `resize`, then a central crop of `resize`;
    five_crops / nearest_crop / maj_voting -> shorter side to s = min(resize), then
    [5, s, s, 3] crops (top-left, top-right, bottom-left, bottom-right, center).
    """
    _check_test_method(test_method)
    return functools.partial(_QUERY_TRANSFORMS[test_method], resize=tuple(resize))


# ---------------------------------------------------------------------------------------------
# Query test methods: ranking of the multi-crop methods.


def mean_of_crops(descriptors: np.ndarray) -> np.ndarray:
    """five_crops: float [Q * 5, D] crop descriptors (crop-minor) -> [Q, D] means (no re-L2)."""
    descriptors = np.asarray(descriptors)
    return descriptors.reshape(-1, NUM_CROPS, descriptors.shape[-1]).mean(axis=1)


def _closest_unique(distances: np.ndarray, predictions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorts a query's crop results by distance and keeps the closest occurrence of each
    database index; returns the first k (distances float32 [k], predictions int64 [k])."""
    distances, predictions = distances.ravel(), predictions.ravel()
    order = np.argsort(distances, kind="stable")
    _, first = np.unique(predictions[order], return_index=True)
    keep = order[np.sort(first)][:k]
    if len(keep) < k:
        raise ValueError(f"only {len(keep)} distinct predictions for a query, need {k}")
    return distances[keep], predictions[keep]


def _merge_per_query(distances: np.ndarray, predictions: np.ndarray, k: int,
                     vote: Callable[[np.ndarray, np.ndarray], None] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    depth = distances.shape[-1]
    distances = np.array(distances, dtype=np.float32).reshape(-1, NUM_CROPS, depth)
    predictions = np.asarray(predictions, dtype=np.int64).reshape(-1, NUM_CROPS, depth)
    out_d = np.empty((len(distances), k), np.float32)
    out_p = np.empty((len(distances), k), np.int64)
    for q in range(len(distances)):
        if vote is not None:
            vote(distances[q], predictions[q])
        out_d[q], out_p[q] = _closest_unique(distances[q], predictions[q], k)
    return out_d, out_p


def nearest_crop(distances: np.ndarray, predictions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """nearest_crop: merges each query's 5 crop searches, keeping each database image once at
    its smallest distance.

    Args:
      distances: float [Q * 5, K] search distances of the crops (crop-minor rows), K >= k.
      predictions: int [Q * 5, K] database indices.
      k: predictions to keep per query.

    Returns:
      (distances float32 [Q, k], predictions int64 [Q, k]), ascending distance.
    """
    return _merge_per_query(distances, predictions, k)


def _vote_top_n(distances: np.ndarray, predictions: np.ndarray, n: int, weight: float) -> None:
    """In place, on one query's [5, K] arrays: every database index seen more than once in the
    first n columns gets `weight * count / n` subtracted at all its occurrences there."""
    columns = slice(0, n)
    values, counts = np.unique(predictions[:, columns], return_counts=True)
    for value, count in zip(values[counts > 1], counts[counts > 1]):
        mask = predictions[:, columns] == value
        distances[:, columns][mask] -= np.float32(weight * count / n)


def maj_voting(distances: np.ndarray, predictions: np.ndarray, k: int,
               majority_weight: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """maj_voting: per query, the top-1, top-5 and top-10 votes (cumulative, in that order)
    lower the distances of database images that several crops retrieve; then as nearest_crop.

    Args:
      distances, predictions: [Q * 5, K] crop search results, K >= max(k, 10) for the
        original's behaviour.
      k: predictions to keep per query.
      majority_weight: the vote's scale.

    Returns:
      (voted distances float32 [Q, k], predictions int64 [Q, k]).
    """
    def vote(query_distances: np.ndarray, query_predictions: np.ndarray) -> None:
        for n in MAJ_VOTING_TOP_NS:
            _vote_top_n(query_distances, query_predictions, n, majority_weight)

    return _merge_per_query(distances, predictions, k, vote)


def search_depth(test_method: str, k: int, num_database: int | None = None) -> int:
    """Neighbours to search per query (or per crop) to return k predictions: k, and for
    maj_voting at least 10 (its widest vote), never more than the database holds."""
    if test_method != "maj_voting":
        return k
    return max(k, min(MAJ_VOTING_TOP_NS[-1], num_database or MAJ_VOTING_TOP_NS[-1]))


# ---------------------------------------------------------------------------------------------
# PCA.


@dataclasses.dataclass(frozen=True)
class PCA:
    """mean: float64 [D]; components: float64 [dim, D]; explained_variance: float64 [dim]."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray

    @property
    def dim(self) -> int:
        return len(self.components)

    def transform(self, descriptors: np.ndarray) -> np.ndarray:
        """float [N, D] -> float32 [N, dim]: centred projection, no re-normalization."""
        return ((np.asarray(descriptors, np.float64) - self.mean) @ self.components.T).astype(np.float32)


def fit_pca(descriptors: np.ndarray, dim: int) -> PCA:
    """Exact PCA of float [N, D] descriptors (eigendecomposition of the smaller Gram matrix)."""
    x = np.asarray(descriptors, dtype=np.float64)
    num, features = x.shape
    if not 1 <= dim <= min(num, features):
        raise ValueError(f"pca_dim must be in [1, min(N={num}, D={features})], got {dim}")
    mean = x.mean(axis=0)
    x = x - mean
    if features <= num:
        eigenvalues, vectors = np.linalg.eigh(x.T @ x)
        top = np.argsort(eigenvalues)[::-1][:dim]
        components = vectors[:, top].T
    else:  # D > N: eigenvectors of X X^T map to principal axes through X^T.
        eigenvalues, vectors = np.linalg.eigh(x @ x.T)
        top = np.argsort(eigenvalues)[::-1][:dim]
        components = (x.T @ vectors[:, top]).T
        components /= np.linalg.norm(components, axis=1, keepdims=True)
    signs = np.sign(components[np.arange(dim), np.abs(components).argmax(axis=1)])
    components *= signs[:, None]
    variance = np.maximum(eigenvalues[top], 0.0) / max(num - 1, 1)
    return PCA(mean=mean, components=components, explained_variance=variance)


def pca_sample_descriptors(embed_fn: EmbedFn, folder: str | os.PathLike, *, resize: tuple[int, int] = (480, 640),
                           batch_size: int = 16, max_images: int = 2 ** 14, seed: int = 0,
                           progress: bool = True) -> np.ndarray:
    """float [min(N, max_images), D]: the descriptors of up to `max_images` random .jpg images
    below `folder` (the benchmark uses the train split and 16384 images), hard-resized."""
    paths = list_images(folder)
    order = np.random.default_rng(seed).permutation(len(paths))[:max_images]
    descriptors, _ = embed_images(embed_fn, [paths[i] for i in order],
                                  query_transform("hard_resize", resize),
                                  batch_size, desc="PCA descriptors", progress=progress)
    return descriptors


def fit_pca_on_folder(embed_fn: EmbedFn, folder: str | os.PathLike, dim: int, *,
                      resize: tuple[int, int] = (480, 640), batch_size: int = 16,
                      max_images: int = 2 ** 14, seed: int = 0, progress: bool = True) -> PCA:
    """Fits PCA on `pca_sample_descriptors`."""
    return fit_pca(pca_sample_descriptors(embed_fn, folder, resize=resize, batch_size=batch_size,
                                          max_images=max_images, seed=seed, progress=progress), dim)


# ---------------------------------------------------------------------------------------------
# Export.


def export_descriptors(out_dir: str | os.PathLike, split: Split, database_descriptors: np.ndarray,
                       query_descriptors: np.ndarray, **metadata) -> dict[str, Path]:
    """Writes database_descriptors.npy / queries_descriptors.npy (float32 [N, D]),
    database.csv / queries.csv (index, path, east, north) and descriptors.json (metadata)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "database_descriptors": out_dir / "database_descriptors.npy",
        "queries_descriptors": out_dir / "queries_descriptors.npy",
        "database": out_dir / "database.csv",
        "queries": out_dir / "queries.csv",
        "metadata": out_dir / "descriptors.json",
    }
    np.save(files["database_descriptors"], np.asarray(database_descriptors, np.float32))
    np.save(files["queries_descriptors"], np.asarray(query_descriptors, np.float32))
    for role, paths, utm in (("database", split.database_paths, split.database_utm),
                             ("queries", split.query_paths, split.query_utm)):
        with open(files[role], "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("index", "path", "east", "north"))
            writer.writerows((i, path, f"{east:.2f}", f"{north:.2f}")
                             for i, (path, (east, north)) in enumerate(zip(paths, utm)))
    info = {"split": str(split.folder), "num_database": split.num_database,
            "num_queries": split.num_queries, "descriptor_dim": int(np.shape(database_descriptors)[1]),
            "rows_per_query": len(query_descriptors) // max(split.num_queries, 1),
            "positive_dist_m": split.positive_dist_m, **metadata}
    files["metadata"].write_text(json.dumps(info, indent=2))
    return files


def _coordinate(value: float, decimals: int) -> str:
    return "" if np.isnan(value) else f"{value:.{decimals}f}"


def write_predictions_csv(path: str | os.PathLike, split: Split, predictions: np.ndarray,
                          distances: np.ndarray) -> Path:
    """Writes one row per (query, rank) of the predictions, best first.

    Columns: query (path), rank (1 = best), prediction (database path), distance (the index's:
    squared L2 for the exact index, votes for maj_voting), the prediction's east, north (UTM,
    metres), lat and lon (its name's, else from east/north and its UTM zone; empty when the
    name has neither); for a split with labels also
    metres (from the query's position) and correct (1 when the prediction is a positive).
    Ranks without a prediction (index -1) are left out.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    utm = split.database_utm
    lat, lon = latitude_longitude(split.database_fields)
    header = ["query", "rank", "prediction", "distance", "east", "north", "lat", "lon"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header + (["metres", "correct"] if split.has_labels else []))
        for q, (row, scores) in enumerate(zip(np.asarray(predictions), np.asarray(distances))):
            positives = set(split.positives[q].tolist()) if split.has_labels else set()
            for rank, (p, score) in enumerate(zip(row.tolist(), scores.tolist()), start=1):
                if p < 0:
                    continue
                line = [split.query_paths[q], rank, split.database_paths[p], f"{score:.6g}",
                        _coordinate(utm[p, 0], 2), _coordinate(utm[p, 1], 2),
                        _coordinate(lat[p], 6), _coordinate(lon[p], 6)]
                if split.has_labels:
                    metres = float(np.hypot(*(utm[p] - split.query_utm[q])))
                    line += [f"{metres:.1f}", int(p in positives)]
                writer.writerow(line)
    return path


# ---------------------------------------------------------------------------------------------
# The entry point.


@dataclasses.dataclass
class EvaluationResult:
    """recalls: {N: percent}; predictions int64 [Q, k] and distances float32 [Q, k] (squared L2
    for the flat index; voted distances for maj_voting), best first; timings: see `evaluate`.
    With keep_descriptors: database_descriptors [DB, D] and query_descriptors ([Q, D], or
    [Q * 5, D] for nearest_crop/maj_voting), both before PCA."""

    recalls: dict[int, float]
    predictions: np.ndarray
    distances: np.ndarray
    timings: dict[str, float]
    test_method: str
    descriptor_dim: int
    index: str
    database_descriptors: np.ndarray | None = None
    query_descriptors: np.ndarray | None = None

    def __str__(self) -> str:
        return format_recalls(self.recalls)


def _given_descriptors(descriptors: np.ndarray, rows: int, what: str, images: str) -> np.ndarray:
    descriptors = np.asarray(descriptors, np.float32)
    if len(descriptors) != rows:
        raise ValueError(f"{what} has {len(descriptors)} rows for {rows} {images}")
    return descriptors


def _embed_split(embed_fn, split, test_method, resize, batch_size, progress, num_threads,
                 database=None, queries=None):
    if database is None:
        database, database_timing = embed_images(
            embed_fn, split.database_paths, query_transform("hard_resize", resize),
            batch_size, desc="database", progress=progress, num_threads=num_threads)
    else:
        database = _given_descriptors(database, split.num_database, "database_descriptors", "database images")
        database_timing = EmbedTiming()
    if queries is not None:  # as an earlier result kept them (five_crops: already averaged)
        crops = NUM_CROPS if test_method in ("nearest_crop", "maj_voting") else 1
        queries = _given_descriptors(queries, split.num_queries * crops, "query_descriptors",
                                     f"queries x {crops} crops" if crops > 1 else "queries")
        return database, queries, (database_timing, EmbedTiming())
    queries, query_timing = embed_images(
        embed_fn, split.query_paths, query_transform(test_method, resize),
        1 if test_method == "single_query" else batch_size,
        desc=f"queries ({test_method})", progress=progress, num_threads=num_threads)
    if test_method == "five_crops":
        queries = mean_of_crops(queries)
    return database, queries, (database_timing, query_timing)


def _rank(test_method, index, queries, k, majority_weight):
    depth = search_depth(test_method, k, index.num_vectors)
    distances, predictions = index_lib.search(index, queries, depth)
    if test_method == "nearest_crop":
        return nearest_crop(distances, predictions, k)
    if test_method == "maj_voting":
        return maj_voting(distances, predictions, k, majority_weight)
    return distances, predictions


def _extraction_timings(timings: Sequence[EmbedTiming]) -> dict[str, float]:
    """Speeds of the embedding done in this call; none ({}) when every descriptor was given."""
    images = sum(t.images for t in timings)
    if images == 0:
        return {}
    steady_images = sum(t.steady_images for t in timings)
    steady_seconds = sum(t.steady_seconds for t in timings)
    if steady_images == 0:  # a single batch each: the compile is part of the only measurement
        steady_images, steady_seconds = images, sum(t.first_batch_seconds for t in timings)
    return {
        "extraction_ms_per_image": 1000.0 * steady_seconds / max(steady_images, 1),
        "extraction_images_per_second": steady_images / max(steady_seconds, 1e-12),
        "extraction_first_batch_seconds": sum(t.first_batch_seconds for t in timings),
        "loading_and_extraction_seconds": sum(t.wall_seconds for t in timings),
    }


def _warn_without_positives(split: Split) -> None:
    """Warns when no query of `split` has a positive: every recall would be 0."""
    if split.num_queries and not split.positives.counts().any():
        warnings.warn(f"{split.folder}: no query has a database image within "
                      f"{split.positive_dist_m:g} m: every recall is 0; check the east/north "
                      "coordinates in the file names", stacklevel=3)


def evaluate(embed_fn: EmbedFn, split: Split, *, test_method: str = "hard_resize",
             resize: tuple[int, int] = (480, 640), recall_values: Sequence[int] = (1, 5, 10, 20),
             index_kind: str = "flat", index_params: dict | None = None, batch_size: int = 16,
             majority_weight: float = 0.01, pca: PCA | None = None, num_threads: int = 2,
             database_descriptors: np.ndarray | None = None, query_descriptors: np.ndarray | None = None,
             keep_descriptors: bool = False, progress: bool = True) -> EvaluationResult:
    """Evaluates a descriptor function on a split, as the benchmark's test() does.

    The database is always hard-resized to `resize`; queries follow `test_method`.

    Args:
      embed_fn: uint8 [B, H, W, 3] RGB -> float [B, D]. It always receives `batch_size` images
        per call (single_query: 1; the multi-crop methods: 5x), zero-padded at the end.
      split: from `vgjax.data.vg_folder.load_split`.
      test_method: one of TEST_METHODS.
      resize: (H, W) for database images and the query transforms.
      recall_values: the N of R@N; the depth k of the returned predictions is max(N).
      index_kind, index_params: see `vgjax.index.build_index` ("flat" is the benchmark's exact
        squared-L2 search).
      batch_size: images per embed call (the benchmark's infer_batch_size).
      majority_weight: maj_voting's vote scale.
      pca: applied to database and query descriptors before the search (not re-normalized).
      num_threads: image-decoding threads.
      database_descriptors: float [DB, D] from an earlier call's result (before PCA), to compare
        test methods without embedding the database again.
      query_descriptors: an earlier call's query_descriptors with the same test method and
        resize, to compare search options (PCA, index, N, positives) without embedding again.
      keep_descriptors: also return the descriptors (e.g. for `export_descriptors`).
      progress: show progress bars.

    Returns:
      EvaluationResult. timings holds extraction_ms_per_image and extraction_images_per_second
      (model calls after the first, i.e. without compilation), extraction_first_batch_seconds,
      loading_and_extraction_seconds (wall) when this call embedded images; index_build_seconds, matching_ms_per_query (search
      and re-ranking), index_bytes. A split where no query has a positive gives a UserWarning
      (every recall is 0); a split without labels (Split.has_labels False) gets no recalls ({}).
    """
    _check_test_method(test_method)
    ns = _check_recall_values(recall_values)
    if split.has_labels:
        _warn_without_positives(split)
    raw_database, raw_queries, embed_timings = _embed_split(
        embed_fn, split, test_method, resize, batch_size, progress, num_threads, database_descriptors,
        query_descriptors)
    database, queries = raw_database, raw_queries
    if pca is not None:
        database, queries = pca.transform(raw_database), pca.transform(raw_queries)
    index = index_lib.build_index(database, index_kind, **(index_params or {}))
    tick = time.perf_counter()
    distances, predictions = _rank(test_method, index, queries, ns[-1], majority_weight)
    matching_seconds = time.perf_counter() - tick
    timings = {
        **_extraction_timings(embed_timings),
        "index_build_seconds": index.train_seconds + index.add_seconds,
        "matching_ms_per_query": 1000.0 * matching_seconds / max(split.num_queries, 1),
        "index_bytes": float(index.nbytes),
    }
    return EvaluationResult(
        recalls=recall_at_n(predictions, split.positives, ns) if split.has_labels else {},
        predictions=predictions,
        distances=distances,
        timings=timings,
        test_method=test_method,
        descriptor_dim=int(database.shape[1]),
        index=index_lib.describe(index),
        database_descriptors=raw_database if keep_descriptors else None,
        query_descriptors=raw_queries if keep_descriptors else None,
    )

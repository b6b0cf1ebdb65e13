"""Triplet mining of the benchmark (reference.md §3.1-3.2): partial, full, random, msls_weighted.

A mining round is split in two pure steps so that the caller embeds images in between with its
own jitted model (no function here runs a model):

1. `plan_round` (host numpy): draws the round's queries and negative candidates with the same
   draws, in the same order, as the benchmark (an explicit `np.random.Generator` stands in for
   `np.random`), and lists the database images whose descriptors the selection needs.
2. `select_triplets` (device jnp): given those descriptors, picks each query's best positive
   (the feature-nearest hard positive) and hardest negatives (the `negs_num_per_query`
   feature-nearest candidates, never a soft positive). Chunks of queries are scored against the
   embedded images with one matmul and reduced with `argmin` / `jax.lax.top_k` under `jax.jit`;
   padded index matrices with -1 entries keep every shape static.

Methods (`METHODS`), for the round's R = cache_refresh_rate sampled queries:
- partial (and msls_weighted, which samples queries with `msls_weights`): one draw of
  neg_samples_num database images shared by the round; a query's candidates are that draw minus
  its soft positives. Embeds the draw and the hard positives of the sampled queries.
- full: embeds the whole database; per query a fresh draw of neg_samples_num images minus its
  soft positives, united (np.unique) with the negatives it got last time (`neg_cache`).
- random: embeds only the hard positives; per query negs + #soft positives random images minus
  the soft positives, the first negs of them in draw order, with no feature-based selection.

Tie rules (the benchmark's faiss search keeps the earlier of equal distances):
- best positive: among equally near hard positives, the lowest database index;
- negatives: among equally near candidates, the earlier in candidate order (partial: the order
  of the shared draw; full: ascending database index, as np.unique sorts).

Deliberate differences from the PyTorch benchmark:
- Distances are float32 on the accelerator (matmul at HIGHEST precision); candidates whose
  squared distances differ by less than float32 rounding may be ordered differently from faiss.
- Hard positives are sorted (the original's radius search returns them unsorted), which fixes
  the tie rule above.
- A query with fewer than negs_num_per_query candidates is an error; the original lets faiss pad
  with -1, which silently repeats the last candidate.
- Triplet rows hold query indices into `split.query_paths` (all queries); the original indexes
  its list with the queries without hard positives removed.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vgjax.data.vg_folder import Positives, Split

METHODS = ("partial", "full", "random", "msls_weighted")

_SCORE_BUDGET = 1 << 25  # float32 entries of one chunk's [queries, pool] score matrix (128 MiB)
_POOL_ROW_MULTIPLE = 1024  # a varying pool is padded to this, so rounds rarely recompile


# ---------------------------------------------------------------------------------------------
# Training queries.


@dataclasses.dataclass(frozen=True, repr=False)
class TrainingQueries:
    """The training queries that have at least one hard positive, with their positives.

    Attributes:
      query_indices: int64 [Qt], indices into split.query_paths, ascending.
      hard_positives: Positives over the Qt queries (within hard_dist_m; never empty).
      soft_positives: Positives over the Qt queries (within split.positive_dist_m); they are
        never used as negatives.
      num_database: DB, the number of database images.
    """

    query_indices: np.ndarray
    hard_positives: Positives
    soft_positives: Positives
    num_database: int

    def __len__(self) -> int:
        return len(self.query_indices)

    def __repr__(self) -> str:
        return (f"TrainingQueries({len(self)} queries with a hard positive, "
                f"{self.num_database} database images)")


def _select_rows(positives: Positives, rows: np.ndarray) -> Positives:
    """The Positives of the queries `rows`, in that order."""
    counts = positives.counts()[rows]
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    offsets = np.repeat(positives.indptr[rows] - indptr[:-1], counts)
    return Positives(indptr=indptr, indices=positives.indices[offsets + np.arange(indptr[-1])])


def training_queries(split: Split, hard_dist_m: float = 10.0) -> tuple[TrainingQueries, int]:
    """The benchmark's training queries: those with a hard positive within `hard_dist_m`.

    Args:
      split: the train split, loaded with positive_dist_m = the soft-positive radius (25 m in
        the benchmark); split.positives become the soft positives.
      hard_dist_m: the hard-positive radius (train_positives_dist_threshold, 10 m).

    Returns:
      (queries, num_dropped): num_dropped is the number of queries without any hard positive,
      which the benchmark removes (and logs).

    Raises:
      ValueError: naming the split folder, when no query has a hard positive.
    """
    if not 0 <= hard_dist_m <= split.positive_dist_m:
        raise ValueError(
            f"hard_dist_m must be in [0, split.positive_dist_m = {split.positive_dist_m:g}] (hard "
            f"positives are a subset of the soft positives), got {hard_dist_m}")
    hard = split.positives_within(hard_dist_m)
    keep = np.flatnonzero(hard.counts() > 0).astype(np.int64)
    if len(keep) == 0:
        raise ValueError(
            f"{split.folder}: none of the {split.num_queries} training queries has a database image "
            f"within {hard_dist_m:g} m (data.train_positives_dist_threshold); check the east/north "
            "coordinates in the file names")
    queries = TrainingQueries(
        query_indices=keep,
        hard_positives=_select_rows(hard, keep),
        soft_positives=_select_rows(split.positives, keep),
        num_database=split.num_database,
    )
    return queries, split.num_queries - len(keep)


def msls_weights(notes: np.ndarray) -> np.ndarray:
    """Query-sampling probabilities of msls_weighted mining (MSLS supplementary material).

    A note (file-name field 14) reads `<time>_<view>_<city>`, e.g. "night_sideways_cph".
    w = 1 + Qt/#night·[night] + Qt/#sideways·[sideways], normalized to sum 1.

    Args:
      notes: str [Qt], the notes of the training queries (TrainingQueries order), e.g.
        `split.query_fields["note"][queries.query_indices]`.

    Returns:
      float64 [Qt].
    """
    notes = np.asarray(notes, dtype=str).reshape(-1)
    fields = [note.split("_") for note in notes]
    malformed = [note for note, parts in zip(notes, fields) if len(parts) < 2]
    if malformed:
        raise ValueError(
            f"msls_weighted needs notes like night_sideways_cph (<time>_<view>_<city>, as in "
            f"Mapillary SLS); {len(malformed)} of {len(notes)} query notes lack these fields, "
            f"e.g. {malformed[0]!r}")
    night = np.array([parts[0] == "night" for parts in fields])
    sideways = np.array([parts[1] == "sideways" for parts in fields])
    if not night.any() or not sideways.any():
        raise ValueError(
            f"msls_weighted needs night and sideways queries (notes like night_sideways_cph); "
            f"found {night.sum()} night and {sideways.sum()} sideways among {len(notes)} queries")
    weights = np.ones(len(notes))
    weights[night] += len(notes) / night.sum()
    weights[sideways] += len(notes) / sideways.sum()
    return weights / weights.sum()


# ---------------------------------------------------------------------------------------------
# Plans.


@dataclasses.dataclass(frozen=True)
class MiningPlan:
    """What one mining round needs embedded, and each query's negative candidates.

    Attributes:
      method: one of METHODS.
      negs_num_per_query: negatives per triplet row.
      queries: int64 [R], positions into TrainingQueries, in draw order (the triplets' order).
      database_to_embed: int64 [E], sorted unique database indices whose descriptors
        `select_triplets` needs (partial: the shared draw and the hard positives; full: all;
        random: the hard positives).
      candidates: int64 [R, M], each query's negative candidates as database indices, in faiss
        order (partial: the shared draw, the same row for every query; full: ascending), -1 where
        padded. None for random.
      candidate_mask: bool [R, M], True for a usable candidate (partial: not a soft positive of
        the query; full: not padding). None for random.
      sampled_database: int64 [S], partial/msls_weighted's shared draw in draw order, else None.
      negatives: int64 [R, negs_num_per_query], random mining's negatives (final), else None.
    """

    method: str
    negs_num_per_query: int
    queries: np.ndarray
    database_to_embed: np.ndarray
    candidates: np.ndarray | None = None
    candidate_mask: np.ndarray | None = None
    sampled_database: np.ndarray | None = None
    negatives: np.ndarray | None = None


def empty_neg_cache(num_queries: int, negs_num_per_query: int) -> np.ndarray:
    """Full mining's memory of last round's negatives: int64 [Qt, negs], -1 = none yet."""
    return np.full((num_queries, negs_num_per_query), -1, dtype=np.int64)


def update_neg_cache(neg_cache: np.ndarray, plan: MiningPlan, triplets: np.ndarray) -> np.ndarray:
    """A copy of `neg_cache` where each of the plan's queries holds its new negatives.

    Args:
      neg_cache: int64 [Qt, negs] (see `empty_neg_cache`).
      plan: a full-mining plan.
      triplets: int64 [R, 2 + negs], `select_triplets(plan, ...)`.
    """
    if plan.method != "full":
        raise ValueError(
            f"the negatives cache belongs to full mining, not to mining={plan.method!r}")
    if triplets.shape != (len(plan.queries), neg_cache.shape[1] + 2):
        raise ValueError(
            f"triplets of shape {triplets.shape} do not match the plan's {len(plan.queries)} "
            f"queries and a cache of {neg_cache.shape[1]} negatives")
    updated = neg_cache.copy()
    updated[plan.queries] = triplets[:, 2:]
    return updated


def _without(values: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """`values` minus `excluded`, order kept (np.setdiff1d with assume_unique=True)."""
    return values[~np.isin(values, excluded)]


def _hard_positives_of(queries: TrainingQueries, rows: np.ndarray) -> np.ndarray:
    return _select_rows(queries.hard_positives, rows).indices


def _check_enough_candidates(queries: TrainingQueries, sampled: np.ndarray, mask: np.ndarray,
                             negs: int) -> None:
    counts = mask.sum(axis=1)
    if counts.min() < negs:
        r = int(np.argmin(counts))
        raise ValueError(
            f"query {queries.query_indices[sampled[r]]} has only {counts[r]} negative candidates "
            f"once its soft positives are removed, fewer than negs_num_per_query={negs}; "
            "raise neg_samples_num")


def _plan_partial(queries, rng, sampled, neg_samples_num, negs) -> dict:
    sampled_database = rng.choice(queries.num_database, neg_samples_num, replace=False)
    mask = np.stack([~np.isin(sampled_database, queries.soft_positives[q]) for q in sampled])
    _check_enough_candidates(queries, sampled, mask, negs)
    to_embed = np.concatenate([sampled_database, _hard_positives_of(queries, sampled)])
    return dict(database_to_embed=np.unique(to_embed), sampled_database=sampled_database,
                candidates=np.broadcast_to(sampled_database, mask.shape), candidate_mask=mask)


def _plan_full(queries, rng, sampled, neg_samples_num, negs, neg_cache) -> dict:
    candidates = np.full((len(sampled), neg_samples_num + negs), -1, dtype=np.int64)
    for row, q in zip(candidates, sampled):
        drawn = rng.choice(queries.num_database, neg_samples_num, replace=False)
        previous = neg_cache[q][neg_cache[q] >= 0]
        merged = np.unique(np.concatenate([previous, _without(drawn, queries.soft_positives[q])]))
        row[:len(merged)] = merged
    mask = candidates >= 0
    _check_enough_candidates(queries, sampled, mask, negs)
    return dict(database_to_embed=np.arange(queries.num_database, dtype=np.int64),
                candidates=candidates, candidate_mask=mask)


def _plan_random(queries, rng, sampled, negs) -> dict:
    negatives = np.empty((len(sampled), negs), dtype=np.int64)
    for row, q in zip(negatives, sampled):
        soft = queries.soft_positives[q]
        drawn = rng.choice(queries.num_database, negs + len(soft), replace=False)
        row[:] = _without(drawn, soft)[:negs]
    return dict(database_to_embed=np.unique(_hard_positives_of(queries, sampled)),
                negatives=negatives)


def _check_plan_options(method, queries, cache_refresh_rate, neg_samples_num, negs, weights,
                        neg_cache):
    if method not in METHODS:
        raise ValueError(f"mining must be one of {METHODS}, got {method!r}")
    if negs < 1:
        raise ValueError(f"negs_num_per_query must be >= 1, got {negs}")
    if not 1 <= cache_refresh_rate <= len(queries):
        raise ValueError(
            f"cache_refresh_rate={cache_refresh_rate} must be in [1, {len(queries)}], the number "
            "of training queries with a hard positive (queries are sampled without replacement)")
    if method in ("partial", "full", "msls_weighted") and not (
            1 <= neg_samples_num <= queries.num_database):
        raise ValueError(
            f"neg_samples_num={neg_samples_num} must be in [1, {queries.num_database}], the "
            "database size (sampled without replacement)")
    if (method == "msls_weighted") != (weights is not None):
        raise ValueError(
            "msls_weighted mining needs weights (msls_weights of the query notes), and only it "
            f"uses them; got mining={method!r} with weights="
            f"{'None' if weights is None else 'an array'}")
    if weights is not None and np.shape(weights) != (len(queries),):
        raise ValueError(f"weights must have shape ({len(queries)},), got {np.shape(weights)}")
    if method == "full" and np.shape(neg_cache) != (len(queries), negs):
        raise ValueError(
            f"full mining needs neg_cache of shape ({len(queries)}, {negs}) (empty_neg_cache, then "
            f"update_neg_cache after each round), got "
            f"{None if neg_cache is None else np.shape(neg_cache)}")
    most_soft = queries.soft_positives.counts().max()
    if method == "random" and negs + most_soft > queries.num_database:
        raise ValueError(
            f"random mining draws negs_num_per_query + #soft positives, up to {negs + most_soft} "
            f"database images per query, more than the {queries.num_database} in the database")


def plan_round(method: str, queries: TrainingQueries, rng: np.random.Generator, *,
               cache_refresh_rate: int = 1000, neg_samples_num: int = 1000,
               negs_num_per_query: int = 10, weights: np.ndarray | None = None,
               neg_cache: np.ndarray | None = None) -> MiningPlan:
    """Draws one mining round: its queries, negative candidates and the images to embed.

    Args:
      method: one of METHODS.
      queries: from `training_queries`.
      rng: the only source of randomness; consumed exactly as the benchmark consumes np.random.
      cache_refresh_rate: R, queries per round.
      neg_samples_num: database images drawn as negative candidates (partial, full).
      negs_num_per_query: negatives per triplet.
      weights: float [Qt] query probabilities (msls_weighted only; see `msls_weights`).
      neg_cache: int64 [Qt, negs] last negatives per query (full only; see `empty_neg_cache`).

    Returns:
      A MiningPlan; embed `plan.database_to_embed` and the queries
      `queries.query_indices[plan.queries]`, then call `select_triplets`.
    """
    _check_plan_options(method, queries, cache_refresh_rate, neg_samples_num, negs_num_per_query,
                        weights, neg_cache)
    sampled = rng.choice(len(queries), cache_refresh_rate, replace=False, p=weights)
    sampled = sampled.astype(np.int64)
    if method == "full":
        fields = _plan_full(queries, rng, sampled, neg_samples_num, negs_num_per_query, neg_cache)
    elif method == "random":
        fields = _plan_random(queries, rng, sampled, negs_num_per_query)
    else:
        fields = _plan_partial(queries, rng, sampled, neg_samples_num, negs_num_per_query)
    return MiningPlan(method=method, negs_num_per_query=negs_num_per_query, queries=sampled,
                      **fields)


# ---------------------------------------------------------------------------------------------
# Selection.


def _padded_rows(positives: Positives, rows: np.ndarray, width: int) -> np.ndarray:
    """int64 [len(rows), width]: each row's positives, then -1."""
    counts = positives.counts()[rows]
    slots = np.arange(width)
    valid = slots < counts[:, None]
    flat = np.where(valid, positives.indptr[rows][:, None] + slots, 0)
    return np.where(valid, positives.indices[flat], -1)


def _columns(database_to_embed: np.ndarray, indices: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """int32 positions of database `indices` in `database_to_embed`, -1 where not `valid`."""
    positions = np.minimum(np.searchsorted(database_to_embed, indices), len(database_to_embed) - 1)
    if np.any(valid & (database_to_embed[positions] != indices)):
        raise ValueError("the plan does not match these queries: a needed database image is not "
                         "in plan.database_to_embed")
    return np.where(valid, positions, -1).astype(np.int32)


def _squared_distances_to_rows(queries: jax.Array, rows: jax.Array) -> jax.Array:
    """||q - r||^2 minus ||q||^2 (the same order per query), for queries [C, D] and rows
    [C, M, D] (each query's own rows) or [M, D] (rows shared by all queries) -> [C, M]."""
    if rows.ndim == 2:
        products = jnp.dot(queries, rows.T, precision=jax.lax.Precision.HIGHEST)
    else:
        products = jnp.einsum("cd,cmd->cm", queries, rows, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(jnp.square(rows), axis=-1) - 2.0 * products


def _best_positive(queries: jax.Array, pool: jax.Array, positive_columns: jax.Array) -> jax.Array:
    """Slot [C] of each query's nearest positive; positive_columns int [C, W] (-1 = padding)."""
    scores = _squared_distances_to_rows(queries, pool[jnp.maximum(positive_columns, 0)])
    return jnp.argmin(jnp.where(positive_columns >= 0, scores, jnp.inf), axis=1)


@functools.partial(jax.jit, static_argnames="k")
def _nearest_shared(queries, pool, positive_columns, candidate_columns, candidate_mask, k):
    """Partial mining: every query has the same candidates (candidate_columns int [M]), minus
    its soft positives (candidate_mask bool [C, M]). Distances to those M rows only.
    Returns (best positive slot [C], the k nearest candidate slots [C, k])."""
    scores = _squared_distances_to_rows(queries, pool[candidate_columns])
    _, nearest = jax.lax.top_k(-jnp.where(candidate_mask, scores, jnp.inf), k)
    return _best_positive(queries, pool, positive_columns), nearest


@functools.partial(jax.jit, static_argnames="k")
def _nearest_per_query(queries, pool, positive_columns, candidate_columns, k):
    """Full mining: each query has its own candidates (candidate_columns int [C, M], -1 =
    padding) from the whole pool: one [C, pool] matmul, then a gather.
    Returns (best positive slot [C], the k nearest candidate slots [C, k])."""
    scores = _squared_distances_to_rows(queries, pool)
    scores = jnp.take_along_axis(scores, jnp.maximum(candidate_columns, 0), axis=1)
    _, nearest = jax.lax.top_k(-jnp.where(candidate_columns >= 0, scores, jnp.inf), k)
    return _best_positive(queries, pool, positive_columns), nearest


@jax.jit
def _positives_only(queries, pool, positive_columns):
    return _best_positive(queries, pool, positive_columns), None


def _chunk_size(num_queries: int, scores_per_query: int) -> int:
    """A power of two: all queries at once when the [chunk, scores] matrix fits _SCORE_BUDGET."""
    fitting = 1 << max(0, (_SCORE_BUDGET // max(scores_per_query, 1)).bit_length() - 1)
    return min(1 << max(0, (num_queries - 1).bit_length()), fitting)


def _pad_rows(array, rows: int, fill):
    padding = [(0, rows - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    return (jnp if isinstance(array, jax.Array) else np).pad(array, padding, constant_values=fill)


def _as_float32(descriptors):
    """float32 descriptors, staying on the host (numpy) or on the device (jax) as given."""
    if isinstance(descriptors, jax.Array):
        return descriptors.astype(jnp.float32)
    return np.asarray(descriptors, dtype=np.float32)


def _nearest(query_descriptors, pool_descriptors, positive_columns, k, *, shared_columns=None,
             shared_mask=None, per_query_columns=None, pad_pool=True):
    """Chunked nearest positive / negatives of all R queries -> (int64 [R], int64 [R, k] or None).

    Negative candidates are either `shared_columns` [M] + `shared_mask` [R, M] (partial mining),
    or `per_query_columns` [R, M] (full mining), or neither (positives only).
    """
    # Padding happens before the transfer: on host arrays it costs no compilation per shape.
    pool = _as_float32(pool_descriptors)
    if pad_pool:
        pool = _pad_rows(pool, -(-pool.shape[0] // _POOL_ROW_MULTIPLE) * _POOL_ROW_MULTIPLE, 0.0)
    pool = jnp.asarray(pool)
    num_queries = query_descriptors.shape[0]
    scores_per_query = pool.shape[0] if per_query_columns is not None else max(
        positive_columns.shape[1], 0 if shared_columns is None else len(shared_columns))
    chunk = _chunk_size(num_queries, scores_per_query)
    rows = -(-num_queries // chunk) * chunk
    queries = jnp.asarray(_pad_rows(_as_float32(query_descriptors), rows, 0.0))
    positive_columns = _pad_rows(positive_columns, rows, -1)
    if shared_columns is not None:
        mask = _pad_rows(shared_mask, rows, False)
        kernel = lambda part: _nearest_shared(queries[part], pool, positive_columns[part],  # noqa: E731
                                              shared_columns, mask[part], k)
    elif per_query_columns is not None:
        columns = _pad_rows(per_query_columns, rows, -1)
        kernel = lambda part: _nearest_per_query(queries[part], pool, positive_columns[part],  # noqa: E731
                                                 columns[part], k)
    else:
        kernel = lambda part: _positives_only(queries[part], pool, positive_columns[part])  # noqa: E731
    # Dispatched asynchronously, read back once at the end.
    results = [kernel(slice(start, start + chunk)) for start in range(0, rows, chunk)]
    best = np.concatenate([np.asarray(b) for b, _ in results])[:num_queries].astype(np.int64)
    if results[0][1] is None:
        return best, None
    nearest = np.concatenate([np.asarray(n) for _, n in results])[:num_queries]
    return best, nearest.astype(np.int64)


def select_triplets(plan: MiningPlan, queries: TrainingQueries, query_descriptors,
                    database_descriptors, negs_num_per_query: int) -> np.ndarray:
    """Best positive and hardest negatives of each planned query, from their descriptors.

    Args:
      plan: from `plan_round` (with the same `queries`).
      queries: the TrainingQueries the plan was drawn from.
      query_descriptors: float [R, D] (numpy or jax, any float dtype), the descriptors of
        `queries.query_indices[plan.queries]`, in that order.
      database_descriptors: float [E, D], the descriptors of `plan.database_to_embed`, in order.
      negs_num_per_query: must equal the plan's.

    Returns:
      int64 [R, 2 + negs] rows: (query index into split.query_paths, best positive database
      index, negative database indices nearest first; random mining: in draw order).
    """
    if negs_num_per_query != plan.negs_num_per_query:
        raise ValueError(f"negs_num_per_query={negs_num_per_query} differs from the plan's "
                         f"{plan.negs_num_per_query}")
    num_queries, num_embedded = len(plan.queries), len(plan.database_to_embed)
    if query_descriptors.shape[0] != num_queries or database_descriptors.shape[0] != num_embedded:
        raise ValueError(
            f"expected descriptors of the plan's {num_queries} queries and {num_embedded} database "
            f"images, got {query_descriptors.shape[0]} and {database_descriptors.shape[0]} rows")
    if query_descriptors.shape[1] != database_descriptors.shape[1]:
        raise ValueError(f"query and database descriptors differ in dimension: "
                         f"{query_descriptors.shape[1]} vs {database_descriptors.shape[1]}")
    width = int(queries.hard_positives.counts().max())
    hard = _padded_rows(queries.hard_positives, plan.queries, width)
    positive_columns = _columns(plan.database_to_embed, hard, hard >= 0)
    candidates = {}
    if plan.sampled_database is not None:  # one candidate row shared by all queries
        candidates = dict(shared_columns=_columns(plan.database_to_embed, plan.sampled_database,
                                                  np.ones(len(plan.sampled_database), bool)),
                          shared_mask=plan.candidate_mask)
    elif plan.candidates is not None:
        candidates = dict(per_query_columns=_columns(plan.database_to_embed, plan.candidates,
                                                     plan.candidate_mask))
    best, nearest = _nearest(query_descriptors, database_descriptors, positive_columns,
                             negs_num_per_query, pad_pool=plan.method != "full", **candidates)
    if nearest is None:
        negatives = plan.negatives
    else:
        negatives = np.take_along_axis(plan.candidates, nearest, axis=1)
    best_positive = np.take_along_axis(hard, best[:, None], axis=1)
    return np.concatenate([queries.query_indices[plan.queries][:, None], best_positive, negatives],
                          axis=1).astype(np.int64)

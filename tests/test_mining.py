"""Mining: identical triplets to a per-query numpy/faiss transcription of the benchmark's rules."""

import dataclasses
from pathlib import Path

import faiss
import jax.numpy as jnp
import numpy as np
import pytest

from vgjax.train import mining
from vgjax.data import vg_folder

DIM = 16
ROUND = dict(cache_refresh_rate=20, neg_samples_num=50, negs_num_per_query=5)
NOTES = np.array(["night_sideways_cph", "day_front_cph", "day_sideways_sf", "night_front_sf"])


# ---------------------------------------------------------------------------------------------
# A synthetic train split: 300 database images on an 8 m grid, 54 queries inside it and 6 at
# 18 m outside it (soft positives but no hard positive), interleaved.


def _make_split(seed=0):
    rng = np.random.default_rng(seed)
    east, north = np.meshgrid(np.arange(20) * 8.0, np.arange(15) * 8.0)
    database_utm = np.stack([east.ravel(), north.ravel()], axis=1)
    inside = rng.uniform([0, 0], [152, 112], size=(54, 2))
    outside = np.stack([rng.uniform(20, 130, 6), np.full(6, -18.0)], axis=1)
    query_utm = np.concatenate([inside, outside])[rng.permutation(60)]
    notes = np.array([NOTES[i % 4] for i in range(60)])
    return vg_folder.Split(
        name="train", folder=Path("synthetic"),
        database_paths=[f"db{i}.jpg" for i in range(300)],
        query_paths=[f"q{i}.jpg" for i in range(60)],
        database_utm=database_utm, query_utm=query_utm,
        database_fields={}, query_fields={"note": notes},
        positive_dist_m=25.0,
        positives=vg_folder.positives_within(query_utm, database_utm, 25.0),
    )


SPLIT = _make_split()
QUERIES, NUM_DROPPED = mining.training_queries(SPLIT)


def _descriptors(seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(300, DIM)).astype(np.float32),
            rng.normal(size=(60, DIM)).astype(np.float32))


def _within(radius):
    """Brute-force positives: for each query, the sorted database indices within radius."""
    distances = np.linalg.norm(SPLIT.query_utm[:, None] - SPLIT.database_utm[None], axis=-1)
    return [np.flatnonzero(row <= radius) for row in distances]


# ---------------------------------------------------------------------------------------------
# The reference: the benchmark's loops, with a faiss IndexFlatL2 per query.


class Reference:
    def __init__(self):
        hard, soft = _within(10.0), _within(25.0)
        self.kept = np.array([q for q in range(60) if len(hard[q])])
        self.hard = [hard[q] for q in self.kept]
        self.soft = [soft[q] for q in self.kept]
        self.neg_cache = [np.empty((0,), dtype=np.int32) for _ in self.kept]

    def round(self, method, rng, db_desc, q_desc, cache_refresh_rate, neg_samples_num,
              negs_num_per_query, weights=None):
        num_db, negs = len(db_desc), negs_num_per_query
        p = weights if method == "msls_weighted" else None
        sampled = rng.choice(len(self.kept), cache_refresh_rate, replace=False, p=p)
        positives = [i for q in sampled for i in self.hard[q]]
        if method in ("partial", "msls_weighted"):
            sampled_db = rng.choice(num_db, neg_samples_num, replace=False)
            cached = np.unique(list(sampled_db) + positives)
        elif method == "full":
            cached = np.arange(num_db)
        else:
            cached = np.unique(positives)
        cache = np.full_like(db_desc, np.nan)  # images not cached must never be looked at
        cache[cached] = db_desc[cached]
        rows = []
        for q in sampled:
            query = q_desc[self.kept[q]][None]
            best = self.hard[q][self._search(cache[self.hard[q]], query, 1)[0]]
            soft = self.soft[q]
            if method == "random":
                neg = rng.choice(num_db, negs + len(soft), replace=False)
                neg = np.setdiff1d(neg, soft, assume_unique=True)[:negs]
            else:
                if method == "full":
                    neg = rng.choice(num_db, neg_samples_num, replace=False)
                    neg = np.setdiff1d(neg, soft, assume_unique=True)
                    neg = np.unique(np.concatenate([self.neg_cache[q], neg]))
                else:
                    neg = np.setdiff1d(sampled_db, soft, assume_unique=True)
                neg = neg[self._search(cache[neg], query, negs)]
                if method == "full":
                    self.neg_cache[q] = neg
            rows.append((self.kept[q], best, *neg))
        return np.array(rows, dtype=np.int64), cached

    @staticmethod
    def _search(features, query, k):
        assert not np.isnan(features).any(), "the reference used an image that was not cached"
        index = faiss.IndexFlatL2(features.shape[1])
        index.add(features)
        return index.search(query, k)[1][0]


def _library_round(method, rng, db_desc, q_desc, *, weights=None, neg_cache=None, as_jax=False):
    plan = mining.plan_round(method, QUERIES, rng, weights=weights, neg_cache=neg_cache, **ROUND)
    q = q_desc[QUERIES.query_indices[plan.queries]]  # what the caller embeds: exactly the plan
    d = db_desc[plan.database_to_embed]
    if as_jax:
        q, d = jnp.asarray(q), jnp.asarray(d)
    triplets = mining.select_triplets(plan, QUERIES, q, d, ROUND["negs_num_per_query"])
    return plan, triplets


# ---------------------------------------------------------------------------------------------
# Training queries and weights.


def test_training_queries_drop_those_without_hard_positive():
    hard = _within(10.0)
    assert NUM_DROPPED == 6
    np.testing.assert_array_equal(QUERIES.query_indices, [q for q in range(60) if len(hard[q])])
    assert len(QUERIES) == 54 and QUERIES.num_database == 300
    for row, q in enumerate(QUERIES.query_indices):
        np.testing.assert_array_equal(QUERIES.hard_positives[row], hard[q])
        np.testing.assert_array_equal(QUERIES.soft_positives[row], SPLIT.positives[q])
        assert np.isin(QUERIES.hard_positives[row], QUERIES.soft_positives[row]).all()
    assert 2 < QUERIES.hard_positives.counts().mean() < QUERIES.soft_positives.counts().mean() / 3


def test_msls_weights_formula_on_hand_made_notes():
    # Qt = 4, 2 night and 2 sideways: w = 1 + 4/2·night + 4/2·sideways = [5, 1, 3, 3] / 12.
    np.testing.assert_allclose(mining.msls_weights(NOTES), np.array([5, 1, 3, 3]) / 12)
    weights = mining.msls_weights(["night_front_x"] + ["day_sideways_x"] * 3 + ["day_front_x"])
    np.testing.assert_allclose(weights, np.array([6, 1 + 5 / 3, 1 + 5 / 3, 1 + 5 / 3, 1]) / 15)


@pytest.mark.parametrize("notes, message", [
    (["night_sideways_cph", "pitch1"], "msls_weighted needs notes like night_sideways_cph"),
    (["day_sideways_cph", "day_front_cph"], "found 0 night and 1 sideways"),
    (["night_front_cph"], "found 1 night and 0 sideways"),
])
def test_msls_weights_errors(notes, message):
    with pytest.raises(ValueError, match=message):
        mining.msls_weights(notes)


# ---------------------------------------------------------------------------------------------
# Identical triplets.


@pytest.mark.parametrize("method", ["partial", "random", "msls_weighted"])
def test_round_matches_the_benchmark(method):
    db_desc, q_desc = _descriptors(1)
    weights = None
    if method == "msls_weighted":
        weights = mining.msls_weights(SPLIT.query_fields["note"][QUERIES.query_indices])
    expected, cached = Reference().round(method, np.random.default_rng(7), db_desc, q_desc,
                                         weights=weights, **ROUND)
    plan, triplets = _library_round(method, np.random.default_rng(7), db_desc, q_desc,
                                    weights=weights)
    np.testing.assert_array_equal(plan.database_to_embed, cached)
    np.testing.assert_array_equal(triplets, expected)
    assert triplets.dtype == np.int64 and triplets.shape == (20, 7)


def test_full_two_rounds_match_the_benchmark():
    reference, rng_ref, rng = Reference(), np.random.default_rng(3), np.random.default_rng(3)
    neg_cache = mining.empty_neg_cache(len(QUERIES), ROUND["negs_num_per_query"])
    db_desc, q_desc = _descriptors(2)
    noise = np.random.default_rng(9).normal(size=db_desc.shape).astype(np.float32) * 0.3
    for round_num, db in enumerate([db_desc, db_desc + noise]):  # the model changed in between
        expected, _ = reference.round("full", rng_ref, db, q_desc, **ROUND)
        plan, triplets = _library_round("full", rng, db, q_desc, neg_cache=neg_cache,
                                        as_jax=round_num == 1)
        np.testing.assert_array_equal(triplets, expected)
        np.testing.assert_array_equal(plan.database_to_embed, np.arange(300))
        if round_num == 1:  # re-sampled queries see their last negatives again, and reuse some
            previous = neg_cache[plan.queries]
            assert (previous >= 0).all(axis=1).sum() >= 3
            for row, last in enumerate(previous):
                candidates = plan.candidates[row][plan.candidate_mask[row]]
                assert np.isin(last[last >= 0], candidates).all()
            assert sum(np.isin(t[2:], last).sum() for t, last in zip(triplets, previous)) > 0
        neg_cache = mining.update_neg_cache(neg_cache, plan, triplets)
        np.testing.assert_array_equal(neg_cache[plan.queries], triplets[:, 2:])


def test_full_round_needs_the_cache_to_match():
    db_desc, q_desc = _descriptors(4)
    neg_cache = mining.empty_neg_cache(len(QUERIES), 5)
    rng = np.random.default_rng(5)
    plan, triplets = _library_round("full", rng, db_desc, q_desc, neg_cache=neg_cache)
    neg_cache = mining.update_neg_cache(neg_cache, plan, triplets)
    state = rng.bit_generator.state
    _, with_cache = _library_round("full", rng, db_desc, q_desc, neg_cache=neg_cache)
    rng.bit_generator.state = state
    _, without = _library_round("full", rng, db_desc, q_desc,
                                neg_cache=mining.empty_neg_cache(len(QUERIES), 5))
    assert not np.array_equal(with_cache, without)


# ---------------------------------------------------------------------------------------------
# Invariants, tie rules and chunking.


def _all_methods_rounds(seed):
    db_desc, q_desc = _descriptors(seed)
    weights = mining.msls_weights(SPLIT.query_fields["note"][QUERIES.query_indices])
    cache = mining.empty_neg_cache(len(QUERIES), 5)
    for method in mining.METHODS:
        yield method, _library_round(method, np.random.default_rng(seed), db_desc, q_desc,
                                     weights=weights if method == "msls_weighted" else None,
                                     neg_cache=cache if method == "full" else None)


def test_triplets_respect_the_positive_radii():
    for method, (plan, triplets) in _all_methods_rounds(11):
        np.testing.assert_array_equal(triplets[:, 0], QUERIES.query_indices[plan.queries])
        for row, (q, best, *negatives) in zip(plan.queries, triplets):
            utm = SPLIT.query_utm[q]
            assert np.linalg.norm(SPLIT.database_utm[best] - utm) <= 10.0, method
            assert best in QUERIES.hard_positives[row]
            assert not np.isin(negatives, QUERIES.soft_positives[row]).any(), method
            assert np.linalg.norm(SPLIT.database_utm[negatives] - utm, axis=1).min() > 25.0
            assert len(set(negatives)) == len(negatives)


def test_negatives_are_nearest_first_and_the_hardest():
    db_desc, q_desc = _descriptors(12)
    plan, triplets = _library_round("partial", np.random.default_rng(0), db_desc, q_desc)
    for row, (q, _, *negatives) in zip(range(20), triplets):
        candidates = plan.candidates[row][plan.candidate_mask[row]]
        distances = ((db_desc[candidates] - q_desc[q]) ** 2).sum(1)
        np.testing.assert_array_equal(negatives, candidates[np.argsort(distances)[:5]])


def test_tie_rules():
    """All database descriptors equal: the lowest hard positive; the first candidates.

    They are zeros, so that every distance is exactly |q|^2 whatever the matmul kernel: with
    equal non-zero rows, CPU matmul kernels may round the columns of a block tail differently
    by an ulp, which breaks the tie before top_k sees it (seen on AVX-512 machines)."""
    db_desc = np.zeros((300, DIM), np.float32)
    q_desc = np.random.default_rng(0).normal(size=(60, DIM)).astype(np.float32)
    for method, (plan, triplets) in _all_methods_rounds(0):
        tied = mining.select_triplets(plan, QUERIES, q_desc[QUERIES.query_indices[plan.queries]],
                                      db_desc[plan.database_to_embed], 5)
        hard_min = [QUERIES.hard_positives[r].min() for r in plan.queries]
        np.testing.assert_array_equal(tied[:, 1], hard_min)
        if method == "random":
            np.testing.assert_array_equal(tied[:, 2:], plan.negatives)
            continue
        first = [plan.candidates[r][plan.candidate_mask[r]][:5] for r in range(20)]
        np.testing.assert_array_equal(tied[:, 2:], first)
        if method == "partial":  # draw order, not database order
            assert any((np.diff(row) < 0).any() for row in first)


def test_chunked_selection_equals_one_chunk(monkeypatch):
    db_desc, q_desc = _descriptors(13)
    cache = mining.empty_neg_cache(len(QUERIES), 5)
    plan = mining.plan_round("full", QUERIES, np.random.default_rng(1), neg_cache=cache, **ROUND)
    args = (plan, QUERIES, q_desc[QUERIES.query_indices[plan.queries]], db_desc, 5)
    whole = mining.select_triplets(*args)
    monkeypatch.setattr(mining, "_SCORE_BUDGET", 300 * 4)  # 4 queries per chunk, 5 chunks
    assert mining._chunk_size(20, 300) == 4
    np.testing.assert_array_equal(mining.select_triplets(*args), whole)


# ---------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="hardest"), "mining must be one of"),
    (dict(cache_refresh_rate=55), "cache_refresh_rate=55 must be in \\[1, 54\\]"),
    (dict(neg_samples_num=301), "neg_samples_num=301 must be in \\[1, 300\\]"),
    (dict(method="msls_weighted"), "msls_weighted mining needs weights"),
    (dict(weights=np.full(54, 1 / 54)), "only it uses them; got mining='partial'"),
    (dict(method="msls_weighted", weights=np.full(5, 0.2)), "weights must have shape \\(54,\\)"),
    (dict(method="full"), "full mining needs neg_cache of shape \\(54, 5\\)"),
    (dict(neg_samples_num=5), "negative candidates once its soft positives are removed"),
    (dict(negs_num_per_query=0), "negs_num_per_query must be >= 1"),
])
def test_plan_errors(kwargs, message):
    options = dict(ROUND, method="partial") | kwargs
    with pytest.raises(ValueError, match=message):
        mining.plan_round(options.pop("method"), QUERIES, np.random.default_rng(0), **options)


def test_random_mining_needs_a_large_enough_database():
    small = mining.TrainingQueries(QUERIES.query_indices, QUERIES.hard_positives,
                                   QUERIES.soft_positives, num_database=30)
    with pytest.raises(ValueError, match="random mining draws negs_num_per_query"):
        mining.plan_round("random", small, np.random.default_rng(0), **ROUND)


def test_selection_and_cache_errors():
    db_desc, q_desc = _descriptors(0)
    plan = mining.plan_round("partial", QUERIES, np.random.default_rng(0), **ROUND)
    q = q_desc[QUERIES.query_indices[plan.queries]]
    d = db_desc[plan.database_to_embed]
    with pytest.raises(ValueError, match="differs from the plan's 5"):
        mining.select_triplets(plan, QUERIES, q, d, 10)
    with pytest.raises(ValueError, match="descriptors of the plan's 20 queries"):
        mining.select_triplets(plan, QUERIES, q, db_desc, 5)
    with pytest.raises(ValueError, match="differ in dimension"):
        mining.select_triplets(plan, QUERIES, q[:, :3], d, 5)
    with pytest.raises(ValueError, match="belongs to full mining"):
        mining.update_neg_cache(mining.empty_neg_cache(54, 5), plan, np.zeros((20, 7), np.int64))
    with pytest.raises(ValueError, match="hard_dist_m must be in \\[0, split.positive_dist_m = 25"):
        mining.training_queries(SPLIT, hard_dist_m=30.0)


def test_training_queries_without_any_hard_positive_is_an_error():
    far = dataclasses.replace(SPLIT, query_utm=SPLIT.query_utm + 10_000.0)
    with pytest.raises(ValueError, match=r"^synthetic: none of the 60 training queries has a "
                                         r"database image within 10 m \(data.train_positives_dist_threshold\)"):
        mining.training_queries(far)

"""The evaluation protocol: recall@N, test methods, PCA, export and evaluate()."""

import csv
import dataclasses
import json

import numpy as np
import pytest

from vgjax import evaluate, index
from vgjax.data import synthetic, vg_folder

# ---------------------------------------------------------------------------------------------
# Independent, literal implementations of the benchmark's loops (reference.md §4).


def reference_recalls(predictions, positives, ns):
    recalls = np.zeros(len(ns))
    for pred, pos in zip(predictions, positives):
        for i, n in enumerate(ns):
            if np.any(np.isin(pred[:n], pos)):
                recalls[i:] += 1
                break
    return recalls / len(predictions) * 100


def reference_merge(distances, predictions, k):
    """Per query: sort the 5 x K pairs by distance, keep each index's first occurrence."""
    out = []
    for d, p in zip(distances.reshape(-1, 5 * distances.shape[1]),
                    predictions.reshape(-1, 5 * predictions.shape[1])):
        seen, kept = set(), []
        for j in np.argsort(d, kind="stable"):
            if p[j] not in seen:
                seen.add(p[j])
                kept.append(p[j])
        out.append(kept[:k])
    return np.array(out)


def reference_votes(distances, predictions, weight):
    distances = distances.reshape(-1, 5, distances.shape[1]).astype(np.float32).copy()
    predictions = predictions.reshape(-1, 5, predictions.shape[1])
    for d, p in zip(distances, predictions):
        for n in (1, 5, 10):
            block = p[:, :n]
            for value in np.unique(block):
                count = int((block == value).sum())
                if count > 1:
                    d[:, :n][block == value] -= np.float32(weight * count / n)
    return distances.reshape(-1, distances.shape[2])


# ---------------------------------------------------------------------------------------------
# Recall.


def test_recall_at_n_by_hand():
    predictions = np.array([[5, 3, 9], [1, 2, 3], [7, 7, 8], [0, 1, 2], [-1, -1, 4]])
    positives = [[9], [4, 1], [], [2, 0], [4]]
    # first correct rank: 2, 0, none, 0, 2 -> R@1 = 2/5, R@2 = 2/5, R@3 = 4/5
    assert evaluate.recall_at_n(predictions, positives, (1, 2, 3)) == {1: 40.0, 2: 40.0, 3: 80.0}
    assert evaluate.first_correct_rank(predictions, positives).tolist() == [2, 0, 3, 0, 2]


def test_recall_at_n_equals_the_reference_loop_on_random_data():
    rng = np.random.default_rng(0)
    predictions = rng.integers(0, 50, size=(300, 20))
    positives = [rng.choice(50, size=rng.integers(0, 4), replace=False) for _ in range(300)]
    ns = (1, 5, 10, 20)
    got = evaluate.recall_at_n(predictions, positives, ns)
    np.testing.assert_allclose(list(got.values()), reference_recalls(predictions, positives, ns))
    csr = evaluate._as_positives(positives)
    assert evaluate.recall_at_n(predictions, csr, ns) == got


def test_recall_needs_enough_predictions_and_increasing_ns():
    with pytest.raises(ValueError, match="need at least 20 predictions per query for R@20, got 10"):
        evaluate.recall_at_n(np.zeros((2, 10), int), [[0], [1]])
    with pytest.raises(ValueError, match="strictly increasing"):
        evaluate.recall_at_n(np.zeros((2, 10), int), [[0], [1]], ns=(5, 1))
    with pytest.raises(ValueError, match="Q = 3 queries"):
        evaluate.recall_at_n(np.zeros((2, 10), int), [[0], [1], [2]], ns=(1,))
    assert evaluate.format_recalls({1: 86.44, 5: 93.0}) == "R@1: 86.4, R@5: 93.0"


# ---------------------------------------------------------------------------------------------
# Multi-crop ranking on hand-made arrays.

CROP_PREDICTIONS = np.array([[4, 7, 1], [7, 2, 4], [9, 4, 3], [1, 8, 2], [5, 6, 0]])
CROP_DISTANCES = np.array([[.10, .50, .90], [.20, .30, .40], [.05, .60, .70], [.35, .80, .85],
                           [.95, .96, .97]], np.float32)


def test_nearest_crop_keeps_each_database_image_at_its_closest_crop():
    distances, predictions = evaluate.nearest_crop(CROP_DISTANCES, CROP_PREDICTIONS, k=5)
    assert predictions.tolist() == [[9, 4, 7, 2, 1]]
    np.testing.assert_allclose(distances, [[.05, .10, .20, .30, .35]])


def test_maj_voting_by_hand():
    # top-1: column 0 = 4,7,9,1,5, no repeat. top-5 and top-10 (all 3 columns): 4 x3, 7 x2,
    # 1 x2, 2 x2 lose 0.1*count/5 then 0.1*count/10. 4: .10 -> .04 -> .01 overtakes 9 (.05).
    distances, predictions = evaluate.maj_voting(CROP_DISTANCES, CROP_PREDICTIONS, k=5,
                                                 majority_weight=0.1)
    assert predictions.tolist() == [[4, 9, 7, 2, 1]]
    np.testing.assert_allclose(distances, [[.01, .05, .14, .24, .29]], atol=1e-6)


def test_maj_voting_top1_vote_and_stable_ties():
    predictions = np.array([[1, 2], [1, 3], [4, 5], [6, 7], [8, 9]])
    distances = np.array([[.5, .6], [.5, .7], [.3, .9], [.8, .9], [.8, .95]], np.float32)
    # 1 is the top-1 of two crops: -0.1*2/1, then -0.1*2/5, then -0.1*2/10 = 0.24 < 0.3.
    voted_d, voted_p = evaluate.maj_voting(distances, predictions, k=8, majority_weight=0.1)
    assert voted_p.tolist() == [[1, 4, 2, 3, 6, 8, 5, 7]]  # ties 6/8 and 5/7 keep crop order
    np.testing.assert_allclose(voted_d[0, :2], [.24, .3], atol=1e-6)
    _, plain = evaluate.nearest_crop(distances, predictions, k=3)
    assert plain.tolist() == [[4, 1, 2]]


def test_multi_crop_ranking_equals_the_reference_loops_on_random_searches():
    rng = np.random.default_rng(1)
    database = rng.normal(size=(300, 16)).astype(np.float32)
    crops = rng.normal(size=(40 * 5, 16)).astype(np.float32)
    flat = index.build_index(database, "flat")
    distances, predictions = index.search(flat, crops, 20)
    _, nearest = evaluate.nearest_crop(distances, predictions, 20)
    np.testing.assert_array_equal(nearest, reference_merge(distances, predictions, 20))
    _, voted = evaluate.maj_voting(distances, predictions, 20, majority_weight=0.5)
    voted_reference = reference_merge(reference_votes(distances, predictions, 0.5), predictions, 20)
    np.testing.assert_array_equal(voted, voted_reference)
    # Searching only search_depth(k) per crop gives the original's top-20 truncated to k.
    for method, merge in (("nearest_crop", evaluate.nearest_crop),
                          ("maj_voting", lambda d, p, k: evaluate.maj_voting(d, p, k, 0.5))):
        depth = evaluate.search_depth(method, 5)
        short_d, short_p = index.search(flat, crops, depth)
        full = nearest if method == "nearest_crop" else voted
        np.testing.assert_array_equal(merge(short_d, short_p, 5)[1], full[:, :5])
    assert evaluate.search_depth("maj_voting", 5) == 10 and evaluate.search_depth("hard_resize", 5) == 5


def test_mean_of_crops_is_not_renormalized():
    descriptors = np.arange(20, dtype=np.float32).reshape(10, 2)
    np.testing.assert_allclose(evaluate.mean_of_crops(descriptors), [[4, 5], [14, 15]])


@pytest.mark.parametrize("method, shape", [
    ("hard_resize", (48, 64, 3)),
    ("single_query", (48, 51, 3)),  # shorter side 48: 48 x int(48 * 80 / 75)
    ("central_crop", (48, 64, 3)),
    ("five_crops", (5, 48, 48, 3)),
    ("nearest_crop", (5, 48, 48, 3)),
    ("maj_voting", (5, 48, 48, 3)),
])
def test_query_transforms_shapes(method, shape):
    image = np.random.default_rng(0).integers(0, 256, size=(75, 80, 3), dtype=np.uint8)
    assert evaluate.query_transform(method, (48, 64))(image).shape == shape


def test_single_query_keeps_aspect_and_central_crop_covers():
    portrait = np.zeros((80, 60, 3), np.uint8)
    assert evaluate.query_transform("single_query", (48, 64))(portrait).shape == (64, 48, 3)
    assert evaluate.query_transform("central_crop", (48, 64))(portrait).shape == (48, 64, 3)
    with pytest.raises(ValueError, match="unknown test_method 'five_crop'"):
        evaluate.query_transform("five_crop", (48, 64))


# ---------------------------------------------------------------------------------------------
# PCA.


@pytest.mark.parametrize("num, dim_in", [(200, 16), (12, 40)])
def test_pca_matches_svd(num, dim_in):
    x = np.random.default_rng(0).normal(size=(num, dim_in)) * np.linspace(3, 0.1, dim_in)
    pca = evaluate.fit_pca(x, 5)
    centred = x - x.mean(0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(pca.components @ vt[:5].T), np.eye(5), atol=1e-8)
    np.testing.assert_allclose(pca.explained_variance, singular[:5] ** 2 / (num - 1), rtol=1e-8)
    projected = pca.transform(x)
    assert projected.dtype == np.float32 and projected.shape == (num, 5)
    np.testing.assert_allclose(np.abs(projected), np.abs(centred @ vt[:5].T), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="pca_dim must be in"):
        evaluate.fit_pca(x, min(num, dim_in) + 1)


# ---------------------------------------------------------------------------------------------
# evaluate() on a dataset written in the real format.

# Each image is one flat colour (far apart, so JPEG noise cannot reorder them). Query q is the
# twin of database image TWINS[q]: same colour, so it retrieves its twin first. Eastings are
# ascending, so the sorted file names keep these orders.
DATABASE_EAST = np.array([0, 30, 60, 90, 120, 150, 180], float)
DATABASE_RED = np.array([40, 60, 90, 130, 180, 240, 10])
QUERY_EAST = np.array([5, 40, 100, 170, 300])
TWINS = np.array([0, 5, 1, 6, 3])


def _colour_image(red):
    return lambda i, east, north: np.full((48, 64, 3), (red[i], 128, 90), np.uint8)


def mean_colour_embed(calls):
    def embed(images):
        calls.append(images.shape)
        return images.astype(np.float32).mean(axis=(1, 2)) / 255.0
    return embed


@pytest.fixture(scope="module")
def colour_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    origin = np.array(synthetic.UTM_ORIGIN)
    folder = root / "images" / "test"
    synthetic.write_images(folder / "database", np.c_[DATABASE_EAST, np.zeros(7)] + origin,
                           _colour_image(DATABASE_RED), jpeg_quality=100)
    synthetic.write_images(folder / "queries", np.c_[QUERY_EAST, np.zeros(5)] + origin,
                           _colour_image(DATABASE_RED[TWINS]), jpeg_quality=100)
    return vg_folder.load_split(root, "test")


@pytest.mark.parametrize("method", evaluate.TEST_METHODS)
def test_evaluate_end_to_end_every_test_method(colour_split, method):
    calls = []
    result = evaluate.evaluate(mean_colour_embed(calls), colour_split, test_method=method,
                               resize=(48, 64), recall_values=(1, 2, 3), batch_size=3,
                               progress=False, keep_descriptors=True)
    # Top-1 = the twin. Twins within 25 m of their query: q0 (5 m), q3 (10 m) -> R@1 = 2/5.
    np.testing.assert_array_equal(result.predictions[:, 0], TWINS)
    assert result.recalls[1] == 40.0
    # Deeper ranks follow colour distance; compare with brute force on the returned descriptors.
    queries = result.query_descriptors  # five_crops: already the mean of the crops
    if method in ("nearest_crop", "maj_voting"):
        queries = queries[::5]  # flat colours: all five crops are alike
    brute = np.argsort(((queries[:, None] - result.database_descriptors[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(result.predictions, brute[:, :3])
    expected = reference_recalls(brute[:, :3], colour_split.positives, (1, 2, 3))
    np.testing.assert_allclose(list(result.recalls.values()), expected)
    # Every call saw one static batch shape; the last (padded) batch included.
    crops = 5 if method in evaluate.MULTI_CROP_METHODS else 1
    query_batch = 1 if method == "single_query" else 3
    assert set(calls) == {(3, 48, 64, 3), (query_batch * crops, *((48, 48) if crops == 5 else (48, 64)), 3)}
    assert result.timings["index_bytes"] > 0 and result.timings["extraction_ms_per_image"] > 0
    assert result.descriptor_dim == 3 and "flat" in result.index


def test_evaluate_with_pca_approximate_index_and_reused_database(colour_split):
    first = evaluate.evaluate(mean_colour_embed([]), colour_split, resize=(48, 64),
                              recall_values=(1, 3), progress=False, keep_descriptors=True)
    pca = evaluate.fit_pca(first.database_descriptors, 2)
    calls = []
    again = evaluate.evaluate(mean_colour_embed(calls), colour_split, resize=(48, 64),
                              recall_values=(1, 3), progress=False, pca=pca, index_kind="hnsw",
                              database_descriptors=first.database_descriptors)
    assert calls == [(16, 48, 64, 3)]  # the queries only, in one padded batch
    assert again.descriptor_dim == 2
    np.testing.assert_array_equal(again.predictions[:, 0], TWINS)


def test_evaluate_rejects_bad_embed_outputs(colour_split):
    with pytest.raises(ValueError, match=r"embed_fn returned shape \(16,\) for 16 images"):
        evaluate.evaluate(lambda x: np.zeros(len(x)), colour_split, resize=(48, 64), progress=False)
    with pytest.raises(FloatingPointError, match="database: embed_fn produced non-finite"):
        evaluate.evaluate(lambda x: np.full((len(x), 2), np.nan), colour_split, resize=(48, 64),
                          progress=False)
    with pytest.raises(ValueError, match="has 3 rows for 7 database images"):
        evaluate.evaluate(mean_colour_embed([]), colour_split, resize=(48, 64), progress=False,
                          database_descriptors=np.zeros((3, 3)))


def test_export_descriptors(colour_split, tmp_path):
    result = evaluate.evaluate(mean_colour_embed([]), colour_split, resize=(48, 64),
                               recall_values=(1,), progress=False, keep_descriptors=True)
    files = evaluate.export_descriptors(tmp_path / "out", colour_split, result.database_descriptors,
                                        result.query_descriptors, test_method="hard_resize")
    np.testing.assert_array_equal(np.load(files["database_descriptors"]), result.database_descriptors)
    assert np.load(files["queries_descriptors"]).shape == (5, 3)
    with open(files["queries"]) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["east"]) for r in rows] == sorted(QUERY_EAST + synthetic.UTM_ORIGIN[0])
    assert rows[0]["path"] == colour_split.query_paths[0]
    meta = json.loads(files["metadata"].read_text())
    assert meta["num_database"] == 7 and meta["descriptor_dim"] == 3 and meta["test_method"] == "hard_resize"


def test_evaluate_copies_an_embed_fn_output_buffer_that_is_reused(colour_split):
    """TensorRT/ONNX-style embed functions write every batch into one preallocated buffer."""
    buffer = np.zeros((3, 3), np.float32)

    def embed_into_buffer(images):
        buffer[:len(images)] = mean_colour_embed([])(images)
        return buffer

    fresh = evaluate.evaluate(mean_colour_embed([]), colour_split, resize=(48, 64),
                              recall_values=(1, 2), batch_size=3, progress=False)
    reused = evaluate.evaluate(embed_into_buffer, colour_split, resize=(48, 64),
                               recall_values=(1, 2), batch_size=3, progress=False)
    np.testing.assert_array_equal(reused.predictions, fresh.predictions)
    assert reused.recalls == fresh.recalls


def test_export_descriptors_quotes_paths_with_commas_and_quotes(colour_split, tmp_path):
    odd = [f'{tmp_path}/a "quoted", folder/{i}.jpg' for i in range(colour_split.num_queries)]
    split = dataclasses.replace(colour_split, query_paths=odd)
    files = evaluate.export_descriptors(tmp_path / "out", split, np.zeros((7, 3)), np.zeros((5, 3)))
    with open(files["queries"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == odd


def test_evaluate_warns_when_no_query_has_a_positive(colour_split):
    none = vg_folder.Positives(indptr=np.zeros(6, np.int64), indices=np.zeros(0, np.int64))
    split = dataclasses.replace(colour_split, positives=none)
    with pytest.warns(UserWarning, match=r"no query has a database image within 25 m: every recall is 0"):
        result = evaluate.evaluate(mean_colour_embed([]), split, resize=(48, 64), recall_values=(1,),
                                   progress=False)
    assert result.recalls == {1: 0.0}

"""Tests for vgjax.index on real faiss indexes (small data, a few seconds)."""

import faiss
import numpy as np
import pytest

from vgjax.index import build_index, describe, index_bytes, search

NUM_DB, DIM, NUM_QUERIES = 5000, 32, 500


def _clustered(num: int, dim: int, seed: int) -> np.ndarray:
    """L2-normalized points [num, dim]: 50 clusters, each spread along an 8-d latent subspace."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((50, dim))
    projection = rng.standard_normal((8, dim)) / np.sqrt(8)
    x = centers[rng.integers(0, 50, num)] + 0.5 * rng.standard_normal((num, 8)) @ projection
    x += 0.05 * rng.standard_normal((num, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """(database [NUM_DB, DIM], queries [NUM_QUERIES, DIM]) from one distribution."""
    x = _clustered(NUM_DB + NUM_QUERIES, DIM, seed=0)
    return x[:NUM_DB], x[NUM_DB:]


@pytest.fixture(scope="module")
def exact_top1(data) -> np.ndarray:
    """Exact nearest database neighbour of each query [NUM_QUERIES, 1]."""
    database, queries = data
    return search(build_index(database, "flat"), queries, 1)[1]


def test_flat_matches_brute_force_squared_l2():
    rng = np.random.default_rng(1)
    database, queries = rng.standard_normal((300, 16)), rng.standard_normal((20, 16))
    distances, indices = search(build_index(np.asfortranarray(database)), queries, 10)
    expected = ((queries[:, None, :] - database[None, :, :]) ** 2).sum(-1)
    order = np.argsort(expected, axis=1)[:, :10]
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_allclose(distances, np.take_along_axis(expected, order, 1), rtol=1e-5)
    assert distances.dtype == np.float32 and indices.dtype == np.int64


def test_flat_ip_matches_brute_force_inner_product():
    rng = np.random.default_rng(2)
    database, queries = rng.standard_normal((300, 16)), rng.standard_normal((20, 16))
    distances, indices = search(build_index(database, "flat_ip"), queries, 10)
    expected = queries @ database.T
    order = np.argsort(-expected, axis=1)[:, :10]
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_allclose(distances, np.take_along_axis(expected, order, 1), rtol=1e-5)


# Recall@1/@5 of the exact top-1, measured on this data: ivf_flat 1.00/1.00, pq 0.54/0.96,
# ivf_pq 0.78/0.99, imi 0.81/1.00, hnsw 1.00/1.00. Random neighbours would give about 0.0002/0.001.
@pytest.mark.parametrize(
    "kind, min_recall_at_1, min_recall_at_5",
    [("ivf_flat", 0.95, 0.98), ("pq", 0.4, 0.85), ("ivf_pq", 0.65, 0.95), ("imi", 0.6, 0.95), ("hnsw", 0.95, 0.98)],
)
def test_approximate_kinds_recall(data, exact_top1, kind, min_recall_at_1, min_recall_at_5):
    database, queries = data
    index = build_index(database, kind)
    indices = search(index, queries, 5)[1]
    recall_at_1 = (indices[:, :1] == exact_top1).any(axis=1).mean()
    recall_at_5 = (indices == exact_top1).any(axis=1).mean()
    assert recall_at_1 >= min_recall_at_1, describe(index)
    assert recall_at_5 >= min_recall_at_5, describe(index)


def test_default_params_are_resolved_and_recorded(data):
    database, _ = data
    assert build_index(database, "ivf_pq").params == {
        "nlist": 128, "m": 8, "nbits": 8, "nprobe": 16, "train_size": NUM_DB, "seed": 0
    }
    assert build_index(database, "hnsw").params == {"M": 32, "ef_construction": 40, "ef_search": 64}
    subsampled = build_index(database, "ivf_flat", nprobe=1000, train_size=1000).params
    assert subsampled == {"nlist": 1000 // 39, "nprobe": 1000 // 39, "train_size": 1000, "seed": 0}


def test_memory_footprints(data):
    database, _ = data
    indexes = {kind: build_index(database, kind) for kind in ("flat", "pq", "ivf_pq", "hnsw")}
    raw_bytes = NUM_DB * DIM * 4
    assert 0 <= indexes["flat"].nbytes - raw_bytes < 1024
    m, nbits = indexes["pq"].params["m"], indexes["pq"].params["nbits"]
    pq_expected = NUM_DB * m * nbits // 8 + 2**nbits * DIM * 4  # codes + codebooks
    assert 0 <= indexes["pq"].nbytes - pq_expected < 1024
    assert indexes["pq"].nbytes < raw_bytes / 3 and indexes["ivf_pq"].nbytes < raw_bytes / 3
    assert indexes["hnsw"].nbytes > raw_bytes
    assert index_bytes(indexes["pq"]) == indexes["pq"].nbytes
    assert indexes["flat"].train_seconds == 0.0 and indexes["pq"].train_seconds > 0.0
    assert describe(indexes["pq"]).startswith(f"pq(m=8, nbits=8, train_size={NUM_DB}, seed=0): 5000 vectors x 32 d, ")


@pytest.mark.parametrize("kind", ["ivf_flat", "pq", "ivf_pq", "imi"])
def test_same_seed_gives_identical_results(data, kind):
    database, queries = data
    first, second = (search(build_index(database, kind, train_size=3000), queries, 5) for _ in range(2))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_seed_changes_pq_codebooks(data):
    database, _ = data
    codebooks = [faiss.vector_to_array(build_index(database, "pq", seed=s).faiss_index.pq.centroids) for s in (0, 1)]
    assert not np.array_equal(*codebooks)


@pytest.mark.parametrize(
    "kind, params, message",
    [
        ("lsh", {}, "unknown index kind 'lsh'; valid kinds: flat, flat_ip"),
        ("ivf_flat", {"nlsit": 8}, "unknown parameter(s) nlsit for index kind 'ivf_flat'; valid parameters: nlist, nprobe"),
        ("flat", {"nprobe": 8}, "valid parameters: (none)"),
        ("pq", {"m": 5}, "D=32 is not divisible by the number of PQ sub-quantizers m=5"),
        ("ivf_pq", {"nprobe": 0}, "nprobe must be a positive integer, got 0"),
        ("pq", {"nbits": 20}, "nbits must be between 1 and 16, got 20"),
        ("ivf_flat", {"nlist": 600, "train_size": 500}, "nlist=600 needs at least 600 training vectors, got 500"),
        ("pq", {"train_size": 100}, "nbits=8 needs at least 256 training vectors, got 100"),
    ],
)
def test_bad_build_options(data, kind, params, message):
    with pytest.raises(ValueError) as error:
        build_index(data[0], kind, **params)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "descriptors, message",
    [
        (np.zeros(8), "must be a 2-D array"),
        (np.zeros((0, 8)), "at least one row"),
        (np.array([[0.0, np.nan]]), "non-finite"),
        (np.array([[0.0, np.inf]]), "non-finite"),
    ],
)
def test_bad_descriptors(descriptors, message):
    with pytest.raises(ValueError, match=message):
        build_index(descriptors)


def test_bad_search_arguments():
    index = build_index(np.eye(4))
    with pytest.raises(ValueError, match="query dimension 3 does not match index dimension 4"):
        search(index, np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match=r"k=5 exceeds the number of indexed vectors \(4\)"):
        search(index, np.zeros((2, 4)), 5)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        search(index, np.zeros((2, 4)), 0)
    with pytest.raises(ValueError, match="query_descriptors contains non-finite"):
        search(index, np.full((1, 4), np.nan), 1)


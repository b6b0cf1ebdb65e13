"""faiss indexes for descriptor search (kNN) in evaluation.

Build one of the index families compared in Fig. 4b of the "Deep Visual
Geo-localization Benchmark" (CVPR 2022) by name, search it, and report its
memory footprint and build times.

Kinds (all but ``flat_ip`` return SQUARED L2 distances, smaller = closer):

- ``flat``: exact search, squared L2 (``IndexFlatL2``), as in the benchmark.
- ``flat_ip``: exact inner product (``IndexFlatIP``). Its "distances" are
  similarities: larger = closer. Descriptors are not normalized here.
- ``ivf_flat``: inverted file with ``nlist`` lists, ``nprobe`` visited.
- ``pq``: product quantizer with ``m`` sub-quantizers of ``nbits`` bits.
- ``ivf_pq``: inverted file with residual product-quantized codes.
- ``imi``: inverted multi-index ``IMI2x{imi_nbits},PQ{m}x{nbits}``.
- ``hnsw``: HNSW graph over raw vectors (``IndexHNSWFlat``).

Default parameter rules (N = database size, D = dimension, T = number of
training vectors = min(N, train_size), with train_size defaulting to
``DEFAULT_TRAIN_CAP``):

- ``nlist = max(1, min(round(4 * sqrt(N)), T // 39))``: about 4 sqrt(N) lists,
  but at least 39 training points per list (faiss' own warning threshold).
- ``nprobe = 16`` (``ivf_flat``, ``ivf_pq``) or ``64`` (``imi``), capped to the
  number of inverted lists; the capped value is recorded in ``params``.
- ``m`` = the largest divisor of D that is <= max(1, min(64, D // 4)), i.e.
  sub-vectors of at least 4 dimensions and codes of at most 64 sub-quantizers.
- ``nbits = 8``.
- ``imi_nbits = clip(floor(log2(T / 39)), 1, 8)``: 2**imi_nbits centroids per
  half, with about 39 training points per centroid.
- ``M = 32``, ``ef_construction = 40``, ``ef_search = 64``.

Too little training data is an error, never silently clamped: every k-means
needs at least as many training vectors as centroids (``nlist``,
``2**nbits``, ``2**imi_nbits``), otherwise ``build_index`` raises ValueError.
Between k and 39*k training points faiss trains but prints a warning.

Determinism: all k-means seeds (IVF coarse quantizer, PQ, IMI sub-quantizers)
and the training subsample are derived from ``seed``, so trained kinds give
bit-identical results on repeated builds. ``hnsw`` needs no seed (faiss
fixes its level generator), but its graph is built by several OpenMP threads
and is only guaranteed reproducible with ``faiss.omp_set_num_threads(1)``.

Approximate kinds may return fewer than k hits (index -1) when the visited
lists hold fewer than k vectors; ``k > num_vectors`` is always an error.
"""

from __future__ import annotations

import dataclasses
import math
import time

import faiss
import numpy as np

INDEX_KINDS = ("flat", "flat_ip", "ivf_flat", "pq", "ivf_pq", "imi", "hnsw")

DEFAULT_TRAIN_CAP = 100_000
MIN_POINTS_PER_CENTROID = 39
MAX_NBITS = 16

_KIND_PARAMS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "flat_ip": (),
    "ivf_flat": ("nlist", "nprobe"),
    "pq": ("m", "nbits"),
    "ivf_pq": ("nlist", "m", "nbits", "nprobe"),
    "imi": ("imi_nbits", "m", "nbits", "nprobe"),
    "hnsw": ("M", "ef_construction", "ef_search"),
}
_TRAINED_KINDS = ("ivf_flat", "pq", "ivf_pq", "imi")
_HNSW_DEFAULTS = {"M": 32, "ef_construction": 40, "ef_search": 64}


@dataclasses.dataclass
class Index:
    """A built faiss index with the parameters and timings of its build.

    ``params`` holds every resolved parameter (defaults filled in); for
    trained kinds it also holds ``train_size`` (vectors actually used) and
    ``seed``, so ``build_index(x, idx.kind, **idx.params)`` rebuilds it.
    """

    faiss_index: faiss.Index
    kind: str
    params: dict
    dim: int
    num_vectors: int
    train_seconds: float
    add_seconds: float

    @property
    def nbytes(self) -> int:
        """Size in bytes of the serialized index (codes + structures), counted as faiss writes
        it, so no copy of the index is made (a 1M x 1024 flat index is 4 GB)."""
        total = 0

        def count(chunk: bytes) -> int:
            nonlocal total
            total += len(chunk)
            return len(chunk)

        faiss.write_index(self.faiss_index, faiss.PyCallbackIOWriter(count))
        return total


def build_index(
    database_descriptors: np.ndarray,
    kind: str = "flat",
    *,
    seed: int = 0,
    train_size: int | None = None,
    **params,
) -> Index:
    """Build an index of kind ``kind`` over database descriptors [N, D].

    ``train_size``: trained kinds train on at most this many vectors (default
    ``DEFAULT_TRAIN_CAP``), sampled with ``np.random.default_rng(seed)`` when
    smaller than N. ``seed`` also seeds every k-means. Both are validated but
    otherwise unused by kinds that need no training. ``params`` are the kind's parameters (see the
    module docstring); None means "use the default".
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; valid kinds: {', '.join(INDEX_KINDS)}")
    x = _as_descriptors(database_descriptors, "database_descriptors")
    num_vectors, dim = x.shape
    trained = kind in _TRAINED_KINDS
    seed = _check_seed(seed)
    train_x = _training_sample(x, seed, train_size) if trained else x[:0]
    resolved = _resolve_params(kind, dim, num_vectors, len(train_x), params)
    faiss_index = _make_faiss_index(kind, dim, resolved)
    train_seconds = 0.0
    if trained:
        _seed_clusterings(faiss_index, seed)
        start = time.perf_counter()
        faiss_index.train(train_x)
        train_seconds = time.perf_counter() - start
        resolved |= {"train_size": len(train_x), "seed": seed}
    start = time.perf_counter()
    faiss_index.add(x)
    add_seconds = time.perf_counter() - start
    return Index(faiss_index, kind, resolved, dim, num_vectors, train_seconds, add_seconds)


def search(index: Index, query_descriptors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Find the k nearest database vectors of each query [Q, D].

    Returns (distances [Q, k] float32, indices [Q, k] int64), best first.
    Distances are squared L2, except for ``flat_ip`` (inner products).
    """
    q = _as_descriptors(query_descriptors, "query_descriptors")
    if q.shape[1] != index.dim:
        raise ValueError(f"query dimension {q.shape[1]} does not match index dimension {index.dim}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > index.num_vectors:
        raise ValueError(f"k={k} exceeds the number of indexed vectors ({index.num_vectors})")
    distances, indices = index.faiss_index.search(q, int(k))
    return distances.astype(np.float32, copy=False), indices.astype(np.int64, copy=False)


def index_bytes(index: Index) -> int:
    """Memory footprint of ``index`` in bytes (same as ``index.nbytes``)."""
    return index.nbytes


def describe(index: Index) -> str:
    """One line such as 'ivf_pq(nlist=256, ...): 10000 vectors x 64 d, 1.2 MB, train 0.8 s, add 0.1 s'."""
    params = ", ".join(f"{name}={value}" for name, value in index.params.items())
    return (
        f"{index.kind}({params}): {index.num_vectors} vectors x {index.dim} d, "
        f"{_format_bytes(index.nbytes)}, train {index.train_seconds:.1f} s, add {index.add_seconds:.1f} s"
    )


def _as_descriptors(descriptors: np.ndarray, name: str) -> np.ndarray:
    """Validate descriptors [N, D] and return them as C-contiguous float32."""
    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return x


def _training_sample(x: np.ndarray, seed: int, train_size: int | None) -> np.ndarray:
    """Rows [T, D] to train on: all of x [N, D], or a seeded random subset of train_size rows."""
    size = DEFAULT_TRAIN_CAP if train_size is None else _positive_int("train_size", train_size)
    if size >= len(x):
        return x
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=size, replace=False))
    return x[rows]


def parse_params(text: str) -> dict[str, int | float]:
    """The text form of an index's params (config.eval.index_params): 'nlist=1024,nprobe=16' ->
    {'nlist': 1024, 'nprobe': 16}; ValueError naming the item that is not name=number."""
    params = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name:
            raise ValueError(f"expected name=value items, got {item!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"{name}={value!r} is not a number") from None
        params[name] = int(number) if number.is_integer() and "." not in value else number
    return params


def check_params(kind: str, params: dict) -> None:
    """ValueError for a parameter ``kind`` does not take, or a value (other than None, the
    default) that is not a positive integer. ``kind`` is one of INDEX_KINDS."""
    valid = _KIND_PARAMS[kind]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for index kind {kind!r}; "
            f"valid parameters: {', '.join(valid) or '(none)'}"
        )
    for name, value in params.items():
        if value is not None:
            _positive_int(name, value)


def _resolve_params(kind: str, dim: int, num_vectors: int, num_train: int, given: dict) -> dict:
    """Validate the user's params for ``kind`` and fill in defaults, in a fixed order."""
    valid = _KIND_PARAMS[kind]
    check_params(kind, given)
    p = {name: int(value) for name, value in given.items() if value is not None}
    if "nlist" in valid:
        p.setdefault("nlist", max(1, min(round(4 * math.sqrt(num_vectors)), num_train // MIN_POINTS_PER_CENTROID)))
        _require_training(f"nlist={p['nlist']}", p["nlist"], num_train)
    if "imi_nbits" in valid:
        _resolve_imi(p, dim, num_train)
    if "m" in valid:
        _resolve_pq(p, dim, num_train)
    if "nprobe" in valid:
        num_lists = p["nlist"] if "nlist" in p else 2 ** (2 * p["imi_nbits"])
        p["nprobe"] = min(p.get("nprobe", 64 if kind == "imi" else 16), num_lists)
    if kind == "hnsw":
        p = _HNSW_DEFAULTS | p
        if p["M"] < 2:
            raise ValueError(f"hnsw parameter M must be >= 2, got {p['M']}")
    return {name: p[name] for name in valid}


def _resolve_imi(p: dict, dim: int, num_train: int) -> None:
    """Fill in and check ``imi_nbits`` (bits per half of the multi-index)."""
    if dim % 2:
        raise ValueError(f"index kind 'imi' needs an even dimension, got D={dim}")
    default = int(np.clip(math.floor(math.log2(max(num_train, 1) / MIN_POINTS_PER_CENTROID)), 1, 8))
    p.setdefault("imi_nbits", default)
    _check_nbits("imi_nbits", p["imi_nbits"])
    _require_training(f"imi_nbits={p['imi_nbits']}", 2 ** p["imi_nbits"], num_train)


def _resolve_pq(p: dict, dim: int, num_train: int) -> None:
    """Fill in and check the product-quantizer parameters ``m`` and ``nbits``."""
    p.setdefault("m", _default_m(dim))
    if dim % p["m"]:
        raise ValueError(f"dimension D={dim} is not divisible by the number of PQ sub-quantizers m={p['m']}")
    p.setdefault("nbits", 8)
    _check_nbits("nbits", p["nbits"])
    _require_training(f"nbits={p['nbits']}", 2 ** p["nbits"], num_train)


def _default_m(dim: int) -> int:
    """Largest divisor of dim that is <= max(1, min(64, dim // 4))."""
    cap = max(1, min(64, dim // 4))
    return max(m for m in range(1, cap + 1) if dim % m == 0)


def _check_nbits(name: str, nbits: int) -> None:
    """Raise if a code or centroid bit count exceeds MAX_NBITS."""
    if nbits > MAX_NBITS:
        raise ValueError(f"parameter {name} must be between 1 and {MAX_NBITS}, got {nbits}")


def _require_training(what: str, num_centroids: int, num_train: int) -> None:
    """Raise if k-means with num_centroids centroids cannot be trained on num_train vectors."""
    if num_train < num_centroids:
        raise ValueError(
            f"{what} needs at least {num_centroids} training vectors, got {num_train}; "
            f"use more database vectors, a larger train_size, or a smaller parameter"
        )


def _check_seed(seed: int) -> int:
    """Return seed if it fits faiss' C int seeds and numpy's generator."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    return int(seed)


def _positive_int(name: str, value) -> int:
    """Return value as int, or raise naming the parameter if it is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"parameter {name} must be a positive integer, got {value!r}")
    return int(value)


def _make_faiss_index(kind: str, dim: int, p: dict) -> faiss.Index:
    """Create the untrained faiss index for ``kind`` with search parameters set."""
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, p["M"])
        index.hnsw.efConstruction = p["ef_construction"]
        index.hnsw.efSearch = p["ef_search"]
        return index
    factory = {
        "flat": "Flat",
        "flat_ip": "Flat",
        "ivf_flat": "IVF{nlist},Flat",
        "pq": "PQ{m}x{nbits}",
        "ivf_pq": "IVF{nlist},PQ{m}x{nbits}",
        "imi": "IMI2x{imi_nbits},PQ{m}x{nbits}",
    }[kind].format(**p)
    metric = faiss.METRIC_INNER_PRODUCT if kind == "flat_ip" else faiss.METRIC_L2
    index = faiss.index_factory(dim, factory, metric)
    if "nprobe" in p:
        index.nprobe = p["nprobe"]
    if hasattr(index, "do_polysemous_training"):
        index.do_polysemous_training = False  # only needed for Hamming-filtered search, which we do not use
    return index


def _seed_clusterings(index: faiss.Index, seed: int) -> None:
    """Seed every k-means that training ``index`` runs."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.MultiIndexQuantizer):
            quantizer.pq.cp.seed = seed
    if hasattr(index, "pq"):
        index.pq.cp.seed = seed


def _format_bytes(num_bytes: int) -> str:
    """Human-readable size in decimal units, e.g. '1.2 MB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"

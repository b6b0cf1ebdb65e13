"""kNN indexes on synthetic 1024-d descriptors: build time, search time, memory, recall vs exact.

  python benchmarks/knn.py                  # 10k, 100k and 1M database vectors, 1000 queries: ~20 min
  python benchmarks/knn.py --quick          # 10k and 50k, 500 queries, train on 10k, 1 thread: ~80 s
  python benchmarks/knn.py --sizes 100000 --kinds ivf_pq,hnsw --threads 1

Data: a Gaussian mixture, deterministic in --seed. 4096 random unit-norm centers; each database
vector is a random center plus isotropic Gaussian noise of norm ~0.3 (NOISE), L2-normalized,
float32. Each query is a distinct random database vector plus noise of norm ~0.6 (QUERY_NOISE),
normalized: its true neighbour exists (usually the vector it was made from), but the other
vectors of that cluster are not much farther, so approximate distances can swap them (with
isotropic noise of the same norm for both, every index finds the exact neighbour and recalls are
all ~1). Vectors are generated in chunks of CHUNK rows, each from its own seeded generator, so a
smaller database is a prefix of a larger one and 1M x 1024 (4 GB) needs no second copy.

Measured for each database size N and each kind of vgjax.index.INDEX_KINDS, with the index's
default parameters (vgjax.index's rules; trained kinds train on min(N, --train-size) vectors,
vgjax.index.DEFAULT_TRAIN_CAP by default; --quick trains on 10k so that it fits in 2 minutes, which
makes nlist 256 at 50k instead of 894):
- build s: train + add seconds (Index.train_seconds + Index.add_seconds);
- ms/query: wall time of one search of all queries for their k=20 nearest, divided by the number
  of queries (faiss' OpenMP threads: --threads, by default faiss' default, all cores; --quick
  uses 1: on a machine whose cores are busy with other work, OpenMP's spin-waiting makes more
  threads than free cores several times slower, e.g. PQ training 6x on a loaded 2-core machine);
- MB and bytes/vec: vgjax.index.index_bytes (the serialized index), in 1e6 bytes and per vector;
- R@1 and R@10 vs exact: the fraction of queries whose exact nearest neighbour (top-1 of the
  exact ``flat`` search) is the index's top-1, or is among the index's top-10 (faiss' "1-recall@R").
``flat`` is always run first: it is the exact reference (its recalls are 1 by definition).
``flat_ip`` ranks by inner product, which for normalized vectors gives the same order as L2.

The full run took 20 minutes on 2 busy cores, 13 of them at 1M (mostly IVF k-means with 2564
lists, PQ encoding, hnsw's graph and the exact searches). Its peak memory is about 22 GB, at 1M:
the 4 GB database, an index holding a copy of it (flat, ivf_flat, hnsw) and index_bytes'
serialization of that index, which faiss builds in a growing buffer and then copies. An index
that cannot be built or searched gets its error string in its row and the run goes on.
Prints a table and writes benchmarks/results/knn.json (rewritten after each size, with the
machine's details).
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for vgjax/

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from vgjax import index as vgindex  # noqa: E402

DIM = 1024
NUM_CENTERS = 4096
NOISE = 0.3
QUERY_NOISE = 0.6
CHUNK = 65_536
K = 20
FULL_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (10_000, 50_000)
QUICK_TRAIN_SIZE = 10_000
QUICK_THREADS = 1


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Divide each row of x [N, D] by its L2 norm, in place, and return x."""
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def cluster_centers(seed: int) -> np.ndarray:
    """NUM_CENTERS random unit vectors [C, DIM], float32."""
    rng = np.random.default_rng([seed, 0])
    return unit_rows(rng.standard_normal((NUM_CENTERS, DIM), dtype=np.float32))


def noisy(x: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Normalized x [N, DIM] plus isotropic Gaussian noise of expected norm ~noise."""
    scale = np.float32(noise / np.sqrt(DIM))
    return unit_rows(x + scale * rng.standard_normal(x.shape, dtype=np.float32))


def database(num_vectors: int, centers: np.ndarray, seed: int) -> np.ndarray:
    """num_vectors database descriptors [N, DIM], chunk c drawn from default_rng([seed, 1, c])."""
    out = np.empty((num_vectors, DIM), np.float32)
    for chunk, start in enumerate(range(0, num_vectors, CHUNK)):
        rng = np.random.default_rng([seed, 1, chunk])
        rows = min(CHUNK, num_vectors - start)
        out[start:start + rows] = noisy(centers[rng.integers(0, len(centers), rows)], NOISE, rng)
    return out


def queries(database_descriptors: np.ndarray, num_queries: int, seed: int) -> np.ndarray:
    """num_queries perturbed copies [Q, DIM] of distinct random database vectors."""
    rng = np.random.default_rng([seed, 2])
    rows = rng.choice(len(database_descriptors), size=num_queries, replace=False)
    return noisy(database_descriptors[np.sort(rows)], QUERY_NOISE, rng)


def one_recall_at(found: np.ndarray, exact_top1: np.ndarray, r: int) -> float:
    """Fraction of queries whose exact nearest neighbour is in found[:, :r] (found [Q, >=r] ids)."""
    return float((found[:, :r] == exact_top1[:, None]).any(axis=1).mean())


def measure(x: np.ndarray, q: np.ndarray, kind: str, seed: int,
            train_size: int | None) -> tuple[dict, np.ndarray]:
    """Build and search one index; returns (its measurements, the ids it found [Q, K])."""
    index = vgindex.build_index(x, kind, seed=seed, train_size=train_size)
    start = time.perf_counter()
    _, found = vgindex.search(index, q, K)
    search_seconds = time.perf_counter() - start
    num_bytes = vgindex.index_bytes(index)
    measured = {"params": index.params, "describe": vgindex.describe(index),
                "train_s": index.train_seconds, "add_s": index.add_seconds,
                "build_s": index.train_seconds + index.add_seconds,
                "ms_per_query": 1000 * search_seconds / len(q),
                "bytes": num_bytes, "bytes_per_vector": num_bytes / len(x)}
    return measured, found


def with_recalls(measured: dict, found: np.ndarray, exact_top1: np.ndarray) -> dict:
    """measured plus R@1 and R@10 of the found ids [Q, K] against the exact top-1 ids [Q]."""
    return measured | {"recall_1": one_recall_at(found, exact_top1, 1),
                       "recall_10": one_recall_at(found, exact_top1, 10)}


def benchmark_size(num_vectors: int, kinds: list[str], num_queries: int, seed: int,
                   train_size: int | None) -> list[dict]:
    """Rows for one database size: flat (the exact reference) first, then the other kinds."""
    x = database(num_vectors, cluster_centers(seed), seed)
    q = queries(x, num_queries, seed)
    reference, exact = measure(x, q, "flat", seed, train_size)
    rows = []
    for kind in ["flat"] + [k for k in kinds if k != "flat"]:
        row = {"N": num_vectors, "kind": kind, "num_queries": num_queries, "k": K}
        try:
            measured, found = (reference, exact) if kind == "flat" else measure(x, q, kind, seed, train_size)
            row |= with_recalls(measured, found, exact[:, 0])
        except Exception as error:  # noqa: BLE001 -- recorded in the row, the run goes on
            row["error"] = f"{type(error).__name__}: {error}"
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def params_text(row: dict) -> str:
    """The index parameters as describe() writes them, without the train sample and seed."""
    params = {k: v for k, v in row.get("params", {}).items() if k not in ("train_size", "seed")}
    text = ", ".join(f"{k}={v}" for k, v in params.items())
    train = row.get("params", {}).get("train_size")
    return (text or "(none)") + (f" (train {train})" if train else "")


HEADER = (f"| {'N':>9} | {'kind':<8} | {'params (describe)':<52} | {'build s':>8} | {'ms/query':>8} "
          f"| {'MB':>8} | {'bytes/vec':>9} | {'R@1 vs exact':>12} | {'R@10 vs exact':>13} |")


def format_row(row: dict) -> str:
    """One markdown table row; an index that failed shows its error instead of measurements."""
    if "error" in row:
        return f"| {row['N']:>9} | {row['kind']:<8} | error: {row['error']} |"
    return (f"| {row['N']:>9} | {row['kind']:<8} | {params_text(row):<52} | {row['build_s']:>8.2f} "
            f"| {row['ms_per_query']:>8.3f} | {row['bytes'] / 1e6:>8.1f} | {row['bytes_per_vector']:>9.0f} "
            f"| {row['recall_1']:>12.3f} | {row['recall_10']:>13.3f} |")


def format_table(rows: list[dict]) -> str:
    """The markdown table of all rows."""
    separator = "|" + "|".join("-" * len(cell) for cell in HEADER.split("|")[1:-1]) + "|"
    return "\n".join([HEADER, separator] + [format_row(row) for row in rows])


def machine_info(threads: int) -> dict:
    """The machine and library versions the numbers were taken on."""
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(), "faiss_threads": threads, "processor": platform.processor(),
            "platform": platform.platform(), "python": platform.python_version(),
            "faiss": faiss.__version__, "numpy": np.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="10k and 50k vectors, 500 queries, train on 10k, 1 thread")
    parser.add_argument("--sizes", default="", help="comma-separated database sizes (default 10k,100k,1M)")
    parser.add_argument("--kinds", default=",".join(vgindex.INDEX_KINDS),
                        help="comma-separated index kinds (flat, the reference, always runs)")
    parser.add_argument("--queries", type=int, default=None, help="default 1000 (500 with --quick)")
    parser.add_argument("--train-size", type=int, default=None,
                        help=f"training sample cap (default vgjax.index's {vgindex.DEFAULT_TRAIN_CAP}, "
                             f"{QUICK_TRAIN_SIZE} with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="faiss OpenMP threads (default faiss', 1 with --quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/knn.json")
    args = parser.parse_args()
    kinds = [kind for kind in args.kinds.split(",") if kind]
    unknown = sorted(set(kinds) - set(vgindex.INDEX_KINDS))
    if unknown:
        parser.error(f"unknown kinds {', '.join(unknown)}; valid: {', '.join(vgindex.INDEX_KINDS)}")
    sizes = [int(s) for s in args.sizes.split(",") if s] or list(QUICK_SIZES if args.quick else FULL_SIZES)
    num_queries = args.queries or (500 if args.quick else 1000)
    train_size = args.train_size or (QUICK_TRAIN_SIZE if args.quick else None)
    threads = args.threads or (QUICK_THREADS if args.quick else None)
    if threads:
        faiss.omp_set_num_threads(threads)
    results = {"machine": machine_info(faiss.omp_get_max_threads()),
               "data": {"dim": DIM, "centers": NUM_CENTERS, "noise": NOISE, "query_noise": QUERY_NOISE,
                        "seed": args.seed, "queries": num_queries, "k": K},
               "train_size": train_size or vgindex.DEFAULT_TRAIN_CAP, "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    for num_vectors in sizes:
        results["rows"] += benchmark_size(num_vectors, kinds, num_queries, args.seed, train_size)
        out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(format_table(results["rows"]))
    print(f"({os.cpu_count()} CPUs, {faiss.omp_get_max_threads()} faiss threads, faiss {faiss.__version__}, "
          f"{DIM}-d, {num_queries} queries, k={K}; recall: exact top-1 in the index's top-1 / top-10)")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()

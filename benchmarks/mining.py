"""One mining round, split into extraction and selection, against the benchmark's selection.

  python benchmarks/mining.py            # partial and full rounds, 256-d and 16384-d descriptors
  python benchmarks/mining.py --quick    # 256-d only, smaller full-mining database: < 2 minutes

- partial: 1000 sampled queries (cache_refresh_rate), 1000 sampled database images
  (neg_samples_num) and the queries' hard positives, on a 30k-image synthetic database.
- full: the same 1000 queries against a 10k database (all of it embedded), each query with its
  1000 drawn candidates plus last round's 10 negatives (the neg_cache).

Selection is timed for vgjax (`mining.select_triplets`: one batched matmul + top-k on the
device) and for the benchmark's way (per query, a faiss IndexFlatL2 over its hard positives for
the best positive and one over its candidates for the 10 nearest negatives), on the same random
descriptors, median over rounds after a first (compiling) round. The two return the same
triplets. Extraction is the number of images the round embeds divided by the measured
extraction rate of ResNet-18 conv4 + GeM at --size (timed on a few batches, not the whole
round). Prints a table and writes benchmarks/results/mining.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for configs/

import vgjax  # noqa: E402,F401  (sets vgjax's XLA CPU flags before jax starts)
import faiss  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from vgjax.configs import common  # noqa: E402
from vgjax import profiling  # noqa: E402
from vgjax.train import mining  # noqa: E402
from vgjax.data.vg_folder import Split, positives_within  # noqa: E402

NEGS = 10


def synthetic_queries(num_database: int, num_queries: int, seed: int = 0) -> mining.TrainingQueries:
    """TrainingQueries over random positions on a 3 km square (no images needed for selection)."""
    rng = np.random.default_rng(seed)
    database = rng.uniform(0, 3000, (num_database, 2))
    queries = database[rng.choice(num_database, num_queries)] + rng.normal(0, 4, (num_queries, 2))
    split = Split(name="train", folder=Path("."), database_paths=[""] * num_database,
                  query_paths=[""] * num_queries, database_utm=database, query_utm=queries,
                  database_fields={}, query_fields={}, positive_dist_m=25.0,
                  positives=positives_within(queries, database, 25.0))
    return mining.training_queries(split)[0]


def reference_selection(plan, queries, query_desc, database_desc) -> np.ndarray:
    """The benchmark's selection: two faiss IndexFlatL2 per query. Returns int64 [R, 2 + NEGS]."""
    row_of = np.full(queries.num_database, -1)
    row_of[plan.database_to_embed] = np.arange(len(plan.database_to_embed))
    rows = []
    for r, q in enumerate(plan.queries):
        positives = queries.hard_positives[q]
        index = faiss.IndexFlatL2(query_desc.shape[1])
        index.add(database_desc[row_of[positives]])
        best = positives[index.search(query_desc[r:r + 1], 1)[1][0, 0]]
        candidates = plan.candidates[r][plan.candidate_mask[r]]
        index = faiss.IndexFlatL2(query_desc.shape[1])
        index.add(database_desc[row_of[candidates]])
        negatives = candidates[index.search(query_desc[r:r + 1], NEGS)[1][0]]
        rows.append([queries.query_indices[q], best, *negatives])
    return np.asarray(rows, np.int64)


def time_selection(method: str, queries, dim: int, rounds: int, neg_samples_num: int) -> dict:
    rng = np.random.default_rng(0)
    neg_cache = mining.empty_neg_cache(len(queries.query_indices), NEGS)
    ours, reference, agree = [], [], []
    for _ in range(rounds + 1):
        plan = mining.plan_round(method, queries, rng, cache_refresh_rate=1000,
                                 neg_samples_num=neg_samples_num, negs_num_per_query=NEGS, neg_cache=neg_cache)
        query_desc = rng.standard_normal((len(plan.queries), dim)).astype(np.float32)
        database_desc = rng.standard_normal((len(plan.database_to_embed), dim)).astype(np.float32)
        tick = time.perf_counter()
        triplets = mining.select_triplets(plan, queries, query_desc, database_desc, NEGS)
        ours.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        expected = reference_selection(plan, queries, query_desc, database_desc)
        reference.append(time.perf_counter() - tick)
        agree.append(float(np.mean(triplets == expected)))
        if method == "full":
            neg_cache[:] = mining.update_neg_cache(neg_cache, plan, triplets)
    return {"method": method, "dim": dim, "images_to_embed": len(plan.database_to_embed) + len(plan.queries),
            "vgjax_ms": 1000 * float(np.median(ours[1:])), "vgjax_first_round_ms": 1000 * ours[0],
            "reference_ms": 1000 * float(np.median(reference[1:])),
            "speedup": float(np.median(reference[1:]) / np.median(ours[1:])),
            "same_triplets": float(np.mean(agree))}


def extraction_rate(size, batch_size: int = 8, batches: int = 2) -> float:
    """Images/s of the jitted ResNet-18 conv4 + GeM inference at `size` (after compiling)."""
    config = common.get_config().model
    config.backbone, config.aggregation = "resnet18conv4", "gem"
    return profiling.profile_model(config, size, batch_size=batch_size, iterations=batches).images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256-d only; 5k full-mining database")
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--size", type=int, nargs=2, default=None, help="H W for the extraction rate")
    parser.add_argument("--out", default="benchmarks/results/mining.json")
    args = parser.parse_args()
    dims = args.dims or ([256] if args.quick else [256, 16384])
    rounds = args.rounds or (2 if args.quick else 3)
    size = tuple(args.size or ((240, 320) if args.quick else (480, 640)))
    rate = extraction_rate(size)
    worlds = {"partial": synthetic_queries(30_000, 3000), "full": synthetic_queries(5_000 if args.quick else 10_000, 3000)}
    header = (f"{'method':<8}{'dim':>6}{'database':>9}{'embed':>7}{'extract s':>10}{'vgjax ms':>10}"
              f"{'faiss/query ms':>15}{'speedup':>8}{'same':>6}")
    print(f"extraction: ResNet-18 conv4 + GeM at {size[0]}x{size[1]}: {rate:.1f} img/s\n{header}\n{'-' * len(header)}")
    rows = []
    for dim in dims:
        for method, queries in worlds.items():
            row = time_selection(method, queries, dim, rounds, neg_samples_num=1000)
            row["database_size"] = queries.num_database
            row["extraction_seconds"] = row["images_to_embed"] / rate
            rows.append(row)
            print(f"{method:<8}{dim:>6}{queries.num_database:>9}{row['images_to_embed']:>7}"
                  f"{row['extraction_seconds']:>10.0f}{row['vgjax_ms']:>10.1f}{row['reference_ms']:>15.1f}"
                  f"{row['speedup']:>7.1f}x{row['same_triplets']:>6.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(jax.devices()[0]), "date": time.strftime("%Y-%m-%d"),
                               "extraction_size": size, "extraction_images_per_second": rate,
                               "rows": rows}, indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()

"""Training throughput: the train step, and one mining round split into extraction and selection.

  python benchmarks/training.py            # 480x640, resnet18conv4 + gem, the benchmark's batch
  python benchmarks/training.py --quick    # 120x160, ~1 minute
  python benchmarks/training.py --cosplace # CosPlace's step: ResNet-18 + GeM + FC 512, 32 x 512x512

Measures, on the current device:
- train step (forward, backward, Adam; 4 tuples x (1 query + 1 positive + 10 negatives) = 48
  images; frozen stages as in the benchmark): images/s and seconds/step after compilation;
- extraction for mining: images/s of the jitted inference at the infer batch size;
- selection for one partial-mining round (1000 queries, 1000 sampled database images, the
  queries' hard positives; synthetic descriptors): vgjax's batched on-device selection against
  the reference's way, one faiss flat index per query for the positive and one for the negatives.
Prints a table and writes benchmarks/results/training.json.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for configs/

import faiss  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

import functools  # noqa: E402

import optax  # noqa: E402

from configs import common, cosplace_resnet18_512  # noqa: E402
from vgjax import losses, mining, train_cosplace, train_step  # noqa: E402
from vgjax.data import augment  # noqa: E402
from vgjax.data.vg_folder import Split, positives_within  # noqa: E402
from vgjax.models import geoloc_net  # noqa: E402


def time_train_step(config, size, steps):
    model = geoloc_net.build(config.model, size)
    state, tx = train_step.create_state(config, geoloc_net.init_variables(model, size), seed=0)
    tuple_size = 2 + config.mining.negs_num_per_query
    step = train_step.make_train_step(model, tx, train_step.StepConfig(
        tuple_size, config.train.criterion, config.train.margin, augment.AugmentConfig.from_config(config.train)))
    images = np.random.default_rng(0).integers(0, 256, (config.train.train_batch_size * tuple_size, *size, 3), np.uint8)
    tick = time.perf_counter()
    state, metrics = step(state, images)
    jax.block_until_ready(metrics["loss"])
    compile_seconds = time.perf_counter() - tick
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        state, metrics = step(state, images)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - tick)
    seconds = float(np.median(times))
    return {"seconds_per_step": seconds, "images_per_second": len(images) / seconds,
            "first_step_seconds": compile_seconds, "images_per_step": len(images)}


def time_extraction(config, size, batches):
    model = geoloc_net.build(config.model, size)
    embed = geoloc_net.make_embed_fn(model, geoloc_net.init_variables(model, size))
    images = np.random.default_rng(0).integers(0, 256, (config.data.infer_batch_size, *size, 3), np.uint8)
    embed(images)
    tick = time.perf_counter()
    for _ in range(batches):
        embed(images)
    return {"images_per_second": batches * len(images) / (time.perf_counter() - tick)}


def synthetic_queries(num_database, num_queries, seed=0):
    """TrainingQueries on random positions (no images needed for selection)."""
    rng = np.random.default_rng(seed)
    database = rng.uniform(0, 3000, (num_database, 2))
    queries = database[rng.choice(num_database, num_queries)] + rng.normal(0, 4, (num_queries, 2))
    split = Split(name="train", folder=Path("."), database_paths=[""] * num_database,
                  query_paths=[""] * num_queries, database_utm=database, query_utm=queries,
                  database_fields={}, query_fields={}, positive_dist_m=25.0,
                  positives=positives_within(queries, database, 25.0))
    return mining.training_queries(split)[0]


def reference_selection(plan, queries, query_desc, database_desc, negs):
    """The benchmark's way: a faiss IndexFlatL2 per query for the positive and the negatives."""
    row_of = {int(db): i for i, db in enumerate(plan.database_to_embed)}
    for r, q in enumerate(plan.queries):
        positives = queries.hard_positives[q]
        index = faiss.IndexFlatL2(query_desc.shape[1])
        index.add(database_desc[[row_of[int(p)] for p in positives]])
        index.search(query_desc[r:r + 1], 1)
        soft = queries.soft_positives[q]
        candidates = np.setdiff1d(plan.sampled_database, soft, assume_unique=True)
        index = faiss.IndexFlatL2(query_desc.shape[1])
        index.add(database_desc[[row_of[int(c)] for c in candidates]])
        index.search(query_desc[r:r + 1], negs)


def time_selection(dim, num_database=10_000, rounds=3):
    queries = synthetic_queries(num_database, 3000)
    rng = np.random.default_rng(0)
    ours, reference = [], []
    for _ in range(rounds):
        plan = mining.plan_round("partial", queries, rng)
        query_desc = rng.standard_normal((len(plan.queries), dim)).astype(np.float32)
        database_desc = rng.standard_normal((len(plan.database_to_embed), dim)).astype(np.float32)
        tick = time.perf_counter()
        mining.select_triplets(plan, queries, query_desc, database_desc, 10)
        ours.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        reference_selection(plan, queries, query_desc, database_desc, 10)
        reference.append(time.perf_counter() - tick)
    return {"images_embedded_per_round": len(plan.database_to_embed) + len(plan.queries),
            "vgjax_seconds": float(np.median(ours[1:] or ours)),
            "vgjax_first_round_seconds": ours[0],
            "reference_seconds": float(np.median(reference))}


def time_cosplace_step(size, steps, batch_size=32):
    """CosPlace's step: model + a 1000-class CosFace classifier, on-device augmentation."""
    config = cosplace_resnet18_512.get_config()
    model = geoloc_net.build(config.model, size)
    state, tx = train_step.create_state(config, geoloc_net.init_variables(model, size), seed=0)
    classifier_tx = optax.adam(0.01)
    weight = losses.cosface_init(jax.random.key(0), 1000, config.model.fc_output_dim)
    classifier = train_cosplace.Classifier(weight, classifier_tx.init(weight))
    step = jax.jit(functools.partial(train_cosplace.cosplace_step, model=model, tx=tx, classifier_tx=classifier_tx,
                                     augmentation=(0.7, 0.7, 0.7, 0.5, 0.5)), donate_argnums=(0, 1))
    images = np.random.default_rng(0).integers(0, 256, (batch_size, *size, 3), np.uint8)
    labels = np.arange(batch_size, dtype=np.int32)
    times = []
    for _ in range(steps + 1):
        tick = time.perf_counter()
        state, classifier, metrics = step(state, classifier, images, labels)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - tick)
    seconds = float(np.median(times[1:]))
    return {"seconds_per_step": seconds, "images_per_second": batch_size / seconds,
            "first_step_seconds": times[0], "images_per_step": batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cosplace", action="store_true", help="only CosPlace's train step")
    parser.add_argument("--out", default="benchmarks/results/training.json")
    args = parser.parse_args()
    if args.cosplace:
        size = (128, 128) if args.quick else (512, 512)
        step = time_cosplace_step(size, steps=2 if args.quick else 3)
        print(f"CosPlace step (32 images, {size[0]}x{size[1]}, ResNet-18 + GeM + FC 512): "
              f"{step['seconds_per_step']:.2f} s/step, {step['images_per_second']:.2f} img/s "
              f"(first step incl. compile {step['first_step_seconds']:.1f} s)")
        return
    config = common.get_config()
    config.model.backbone, config.model.aggregation = "resnet18conv4", "gem"
    size = (120, 160) if args.quick else (480, 640)
    step = time_train_step(config, size, steps=2 if args.quick else 3)
    extraction = time_extraction(config, size, batches=2 if args.quick else 4)
    selection = time_selection(geoloc_net.descriptor_dim(config.model))
    embed_seconds = selection["images_embedded_per_round"] / extraction["images_per_second"]
    results = {"device": str(jax.devices()[0]), "image_size": size, "train_step": step,
               "extraction": extraction, "selection": selection,
               "mining_round_extraction_seconds": embed_seconds}
    print(f"train step ({step['images_per_step']} images, {size[0]}x{size[1]}): "
          f"{step['seconds_per_step']:.2f} s/step, {step['images_per_second']:.2f} img/s "
          f"(first step incl. compile {step['first_step_seconds']:.1f} s)")
    print(f"mining round, partial: {selection['images_embedded_per_round']} images to embed at "
          f"{extraction['images_per_second']:.2f} img/s = {embed_seconds:.1f} s extraction; selection "
          f"{selection['vgjax_seconds'] * 1000:.1f} ms (first, compiling: {selection['vgjax_first_round_seconds']:.2f} s) "
          f"vs reference faiss-per-query {selection['reference_seconds'] * 1000:.1f} ms "
          f"({selection['reference_seconds'] / selection['vgjax_seconds']:.1f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Triplet training, the benchmark's train.py: mine, train, validate, early-stop, test the best.

An epoch is ceil(queries_per_epoch / cache_refresh_rate) mining rounds ("loops"). Each round
embeds the images its mining method needs with the current network (jit, large batches), picks
the best positive and hardest negatives on device (vgjax.mining), then trains on the resulting
query tuples. After each epoch the network is validated (R@5 decides the best checkpoint and
early stopping), and at the end the best one is tested.

Resume is exact: checkpoints hold the params, batch stats, optimizer state, step, PRNG key,
the current round's tuples and the full-mining negative cache, plus (as JSON) the position
(epoch, loop, batch), best recall, patience counter and the numpy RNG state. Relaunching the same
command continues where the last checkpoint was taken (every round, and every
train.checkpoint_every_steps steps); on CPU the result is bit-identical to an uninterrupted run.
Deliberate difference: the benchmark re-runs the whole saved epoch on resume.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from vgjax import checkpoint, evaluate, mining, profiling, sharding, train_step, visualize
from vgjax.data import augment, packed, pipeline
from vgjax.data.vg_folder import Split, load_split
from vgjax.metrics import MetricWriter
from vgjax.models import geoloc_net, pretrained


@dataclasses.dataclass
class Progress:
    """Where the run is; stored as JSON in every checkpoint."""

    epoch: int = 0
    loop: int = 0  # mining round within the epoch
    batch: int = 0  # next batch of the round's tuples; 0 = the round is not mined yet
    best_recall: float = -1.0
    not_improved: int = 0
    rng_state: dict | None = None  # numpy RNG (mining draws), as bit_generator.state
    history: list = dataclasses.field(default_factory=list)
    train_images_per_second: list = dataclasses.field(default_factory=list)  # one per round


@dataclasses.dataclass
class RoundData:
    """The current round's query tuples and the full-mining negative cache (arrays)."""

    tuples: np.ndarray  # int64 [R, T]: query index, positive db index, negative db indices
    neg_cache: np.ndarray  # int64 [Qt, negs], -1 = empty


def loops_per_epoch(mining_config) -> int:
    return math.ceil(mining_config.queries_per_epoch / mining_config.cache_refresh_rate)


class _Run:
    """The pieces of one training run, set up from the config."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path, dataset_dir: Path):
        self.config, self.workdir, self.dataset_dir = config, workdir, dataset_dir
        self.image_size = tuple(config.data.resize)
        self.mesh = sharding.make_mesh()
        data = config.data
        self.train_split = load_split(dataset_dir, "train", data.val_positive_dist_threshold)
        self.val_split = load_split(dataset_dir, "val", data.val_positive_dist_threshold)
        self.queries, dropped = mining.training_queries(self.train_split, data.train_positives_dist_threshold)
        if dropped:
            print(f"{dropped} training queries have no positive within "
                  f"{data.train_positives_dist_threshold:g} m and are not used")
        self.train_loader = packed_train_loader(config, dataset_dir, self.train_split)
        self.checkpoints = checkpoint.Checkpoints(workdir / "checkpoints")
        self.model, variables = pretrained.build_and_load(config.model, self.image_size, config.seed)
        if (config.model.aggregation in ("netvlad", "crn") and not config.model.resume
                and not self.checkpoints.exists()):  # a restored checkpoint replaces it anyway
            variables = self._initialize_netvlad(variables)
        state, self.tx = train_step.create_state(config, variables, config.seed)
        self.state = sharding.replicate(state, self.mesh)
        negs = config.mining.negs_num_per_query
        self.step_fn = train_step.make_train_step(self.model, self.tx, train_step.StepConfig(
            tuple_size=2 + negs, criterion=config.train.criterion, margin=config.train.margin,
            augment=augment.AugmentConfig.from_config(config.train)))
        self.embed_state = train_step.make_state_embed_fn(self.model, self.mesh)
        self.metrics = MetricWriter(workdir)
        self.tracer = profiling.StepTracer(workdir / "profile", config.train.profile_steps)

    def _initialize_netvlad(self, variables):
        paths = self.train_split.database_paths + self.train_split.query_paths
        return geoloc_net.initialize_netvlad(self.model, variables, paths, self.image_size,
                                             self.config.model.netvlad_clusters,
                                             batch_size=self.config.data.infer_batch_size,
                                             seed=self.config.seed)

    def embed_fn(self, images: np.ndarray) -> np.ndarray:
        """uint8 images -> descriptors with the current params."""
        return self.embed_state(self.state, images)

    def evaluate(self, split: Split, test_method: str = "hard_resize") -> evaluate.EvaluationResult:
        config = self.config
        return evaluate.evaluate(self.embed_fn, split, test_method=test_method, resize=self.image_size,
                                 recall_values=tuple(config.eval.recall_values),
                                 batch_size=config.data.infer_batch_size,
                                 majority_weight=config.eval.majority_weight,
                                 num_threads=config.data.num_workers)


def packed_train_folder(config: ml_collections.ConfigDict) -> Path | None:
    """Where data.packed_folder keeps the train split packed at data.resize, or None."""
    if not config.data.packed_folder:
        return None
    height, width = config.data.resize
    return Path(config.data.packed_folder) / f"{config.data.dataset_name}-train-{height}x{width}"


def packed_train_loader(config: ml_collections.ConfigDict, dataset_dir: Path, split: Split):
    """With data.packed_folder: the train split's images read from its packed form (vgjax.data.packed),
    packed first if missing (single-process runs); else None (decode the JPEGs)."""
    folder = packed_train_folder(config)
    if folder is None:
        return None
    if not folder.exists():
        if jax.process_count() > 1:
            raise FileNotFoundError(f"{folder} does not exist; pack it once before a multi-host run: "
                                    "python launch.py --config ... --mode pack")
        packed.pack_split(dataset_dir, "train", folder, tuple(config.data.resize),
                          num_threads=config.data.num_workers)
    return packed.open_packed(folder, tuple(config.data.resize)).loader(split)


def _mine_round(run: _Run, rng: np.random.Generator, neg_cache: np.ndarray, weights) -> np.ndarray:
    """One mining round: plan, embed what the plan needs, select tuples (global indices)."""
    config, split = run.config, run.train_split
    plan = mining.plan_round(config.mining.mining, run.queries, rng,
                             cache_refresh_rate=config.mining.cache_refresh_rate,
                             neg_samples_num=config.mining.neg_samples_num,
                             negs_num_per_query=config.mining.negs_num_per_query,
                             weights=weights, neg_cache=neg_cache)
    transform = evaluate.query_transform("hard_resize", run.image_size)
    batch = config.data.infer_batch_size
    database, _ = evaluate.embed_images(run.embed_fn, [split.database_paths[i] for i in plan.database_to_embed],
                                        transform, batch, desc="caching database", loader=run.train_loader)
    query_paths = [split.query_paths[run.queries.query_indices[i]] for i in plan.queries]
    queries, _ = evaluate.embed_images(run.embed_fn, query_paths, transform, batch, desc="caching queries",
                                       loader=run.train_loader)
    tuples = mining.select_triplets(plan, run.queries, queries, database, config.mining.negs_num_per_query)
    if config.mining.mining == "full":
        neg_cache[:] = mining.update_neg_cache(neg_cache, plan, tuples)
    return tuples


def _tuple_paths(split: Split, tuples: np.ndarray) -> list[list[str]]:
    return [[split.query_paths[row[0]], *(split.database_paths[i] for i in row[1:])] for row in tuples]


def _save(run: _Run, progress: Progress, data: RoundData, *, best: bool = False) -> None:
    state = {"train": run.state, "tuples": data.tuples, "neg_cache": data.neg_cache}
    run.checkpoints.save(state, dataclasses.asdict(progress), best=best)


def _restore(run: _Run, data: RoundData, which: str = "last") -> Progress | None:
    target = {"train": run.state, "tuples": data.tuples, "neg_cache": data.neg_cache}
    restored = run.checkpoints.restore(target, which)
    if restored is None:
        return None
    state, meta = restored
    run.state = state["train"]
    data.tuples, data.neg_cache = np.asarray(state["tuples"]), np.asarray(state["neg_cache"])
    return Progress(**meta)


def _train_round(run: _Run, progress: Progress, data: RoundData, rng: np.random.Generator) -> None:
    """Trains on the round's tuples from progress.batch on, checkpointing as configured."""
    config = run.config
    per_batch = config.train.train_batch_size
    num_batches = len(data.tuples) // per_batch
    every = config.train.checkpoint_every_steps
    batches = pipeline.triplet_batches(
        _tuple_paths(run.train_split, data.tuples), per_batch, run.image_size,
        start_batch=progress.batch, process_index=jax.process_index(),
        process_count=jax.process_count(), num_threads=config.data.num_workers, loader=run.train_loader)
    losses, first_done = [], None
    bar = tqdm(total=num_batches, initial=progress.batch, unit="batch",
               desc=f"epoch {progress.epoch} loop {progress.loop}")
    for images in batches:
        run.tracer.before_step()
        run.state, metrics = run.step_fn(run.state, sharding.shard_batch(images, run.mesh))
        run.tracer.after_step(metrics)
        loss = train_step.checked_loss(metrics, run.state, f"epoch {progress.epoch}, loop {progress.loop}",
                                       run.workdir / "checkpoints")
        losses.append(loss)
        first_done = first_done or time.perf_counter()
        progress.batch += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if every and progress.batch % every == 0 and progress.batch < num_batches:
            progress.rng_state = rng.bit_generator.state
            _save(run, progress, data)
    bar.close()
    if len(losses) < 2:
        return
    # The first step of a process compiles; the rate counts the later ones.
    seconds = time.perf_counter() - first_done
    rate = (len(losses) - 1) * per_batch * data.tuples.shape[1] / seconds
    progress.train_images_per_second.append(rate)
    run.metrics.write(int(run.state.step), {"epoch": progress.epoch, "loop": progress.loop,
                                            "loss": float(np.mean(losses)),
                                            "images_per_second": rate}, prefix="train/")


def _validate(run: _Run, progress: Progress, data: RoundData, rng: np.random.Generator) -> bool:
    """Validates, saves last (and best), updates patience; returns True to stop early."""
    config = run.config
    result = run.evaluate(run.val_split)
    ns = tuple(config.eval.recall_values)
    recall = result.recalls[ns[1] if len(ns) > 1 else ns[0]]  # the benchmark's recalls[1] (R@5)
    print(f"Epoch {progress.epoch}: recalls on val set {run.val_split.folder}: {result}")
    improved = recall > progress.best_recall
    progress.history.append({"epoch": progress.epoch, "val": {f"R@{n}": r for n, r in result.recalls.items()}})
    run.metrics.write(int(run.state.step), progress.history[-1])
    if improved:
        progress.best_recall, progress.not_improved = recall, 0
    else:
        progress.not_improved += 1
    progress.epoch, progress.loop, progress.batch = progress.epoch + 1, 0, 0
    progress.rng_state = rng.bit_generator.state
    _save(run, progress, data, best=improved)
    print(f"{'Improved' if improved else 'Not improved'}: best R@{ns[1] if len(ns) > 1 else ns[0]} "
          f"{progress.best_recall:.1f}, {progress.not_improved} epoch(s) without improvement")
    return progress.not_improved >= config.train.patience


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path, dataset_dir: Path) -> dict:
    """Trains on <dataset_dir>/.../train (validating on val), resuming from
    workdir/checkpoints if present, then tests the best network on test."""
    run = _Run(config, workdir, dataset_dir)
    negs = config.mining.negs_num_per_query
    data = RoundData(tuples=np.zeros((config.mining.cache_refresh_rate, 2 + negs), np.int64),
                     neg_cache=mining.empty_neg_cache(len(run.queries.query_indices), negs))
    progress = _restore(run, data) or Progress()
    rng = np.random.default_rng(config.seed)
    if progress.rng_state is not None:
        rng.bit_generator.state = progress.rng_state
    weights = (mining.msls_weights(run.train_split.query_fields["note"][run.queries.query_indices])
               if config.mining.mining == "msls_weighted" else None)
    stop = progress.not_improved >= config.train.patience
    while progress.epoch < config.train.epochs_num and not stop:
        while progress.loop < loops_per_epoch(config.mining):
            if progress.batch == 0:
                data.tuples = _mine_round(run, rng, data.neg_cache, weights)
            _train_round(run, progress, data, rng)
            progress.loop, progress.batch = progress.loop + 1, 0
            progress.rng_state = rng.bit_generator.state
            _save(run, progress, data)
        stop = _validate(run, progress, data, rng)
    return _test_best(run, data, progress)


def _test_best(run: _Run, data: RoundData, progress: Progress) -> dict:
    """Loads the best checkpoint and tests it on the test split; writes results.json."""
    config = run.config
    _restore(run, data, "best")
    test_split = load_split(run.dataset_dir, "test", config.data.val_positive_dist_threshold)
    result = run.evaluate(test_split, config.eval.test_method)
    print(f"Recalls on test set {test_split.folder} ({config.eval.test_method}): {result}")
    if config.eval.num_preds_to_save > 0:
        visualize.save_evaluation_pictures(run.workdir / "predictions", test_split, result.predictions,
                                           result.recalls, config.eval, title="trained")
    run.tracer.stop()
    run.checkpoints.close()
    run.metrics.close()
    params = run.state.params
    images = np.zeros((1, *run.image_size, 3), np.uint8)
    rates = progress.train_images_per_second
    return {"val_history": progress.history, "best_val_recall": progress.best_recall,
            "test": {f"R@{n}": r for n, r in result.recalls.items()},
            "test_method": config.eval.test_method, "descriptor_dim": result.descriptor_dim,
            "steps": int(run.state.step),
            "params_total": profiling.count_params(params),
            "params_trainable": profiling.count_params(run.state.trainable),
            "gflops_per_image": profiling.xla_flops(run.embed_state.jitted, run.state.variables(), images) / 1e9,
            "train_images_per_second": float(np.median(rates)) if rates else None,
            "extraction_images_per_second": result.timings["extraction_images_per_second"],
            "test_timings": result.timings}

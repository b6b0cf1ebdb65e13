"""Triplet training, the benchmark's train.py: what differs from the shared engine (loop.py).

An epoch is ceil(queries_per_epoch / cache_refresh_rate) mining rounds. Each round embeds the
images its mining method needs with the current network (jit, large batches), picks the best
positive and hardest negatives on device (vgjax.train.mining), then trains on the resulting
query tuples with the triplet or SARE loss; the benchmark's query augmentations run on device.

Checkpointed beside the network: the round's tuples and the full-mining negative cache (arrays)
and the numpy RNG of the mining draws (JSON), so a resumed round trains on the same tuples.
Deliberate difference: the benchmark re-runs the whole saved epoch on resume.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vgjax import embed, eval_run, evaluate
from vgjax.data import augment, packed, pipeline, tfds_builders
from vgjax.data.vg_folder import Split, load_split
from vgjax.train import losses, mining
from vgjax.train.loop import Method, Progress, Run
from vgjax.train.state import TrainState, step_keys, update


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the compiled step (hashable)."""

    tuple_size: int  # images per query tuple: 1 query + 1 positive + negatives
    criterion: str
    margin: float
    augment: augment.AugmentConfig


def augment_tuples(images: jax.Array, key: jax.Array, step_config: StepConfig) -> jax.Array:
    """uint8 [N, H, W, 3] tuple-major batch -> ImageNet-normalized float32, with the query
    augmentations on rows 0, T, 2T, ... and the optional whole-batch flip."""
    x = images.astype(jnp.float32) / 255.0
    query_key, flip_key = jax.random.split(key)
    if not augment.is_identity(step_config.augment, images.shape[1:3]):
        queries = augment.augment_queries(x[::step_config.tuple_size], query_key, step_config.augment)
        x = x.at[::step_config.tuple_size].set(queries)
    x = augment.flip_batch(x, flip_key, step_config.augment.horizontal_flip)
    return augment.normalize(x)


def triplet_step(state: TrainState, head: None, batch: dict, *, model, tx,
                 step_config: StepConfig) -> tuple[TrainState, None, dict]:
    """One update on a batch of query tuples.

    Args:
      batch: {"images": uint8 [B * T, H, W, 3]}, tuple-major: [query, positive, negatives...].

    Returns:
      (new state, None, {"loss": float32 [], "finite": bool []}).
    """
    augment_key, dropout_key = step_keys(state)
    x = augment_tuples(batch["images"], augment_key, step_config)
    criterion = losses.LOSSES[step_config.criterion]

    def loss_fn(descriptors, _):
        return criterion(descriptors, negs_per_query=step_config.tuple_size - 2, margin=step_config.margin)

    return update(state, head, x, loss_fn, model=model, tx=tx, dropout_key=dropout_key)


def make_step(model, tx, step_config: StepConfig):
    """triplet_step jit-compiled with the state donated."""
    return jax.jit(functools.partial(triplet_step, model=model, tx=tx, step_config=step_config),
                   donate_argnums=(0,))


def loops_per_epoch(mining_config) -> int:
    return math.ceil(mining_config.queries_per_epoch / mining_config.cache_refresh_rate)


def train_pack(config: ml_collections.ConfigDict, dataset_dir: Path) -> tfds_builders.VgFolderPack | None:
    """With data.packed_folder: the train split packed at data.resize as data.packed_encoding
    (vgjax.data.tfds_builders); else None."""
    if not config.data.packed_folder:
        return None
    return tfds_builders.vg_folder_pack(config.data.packed_folder, dataset_dir, config.data.resize, splits=("train",),
                                        encoding=config.data.packed_encoding, num_threads=config.data.num_workers)


class Triplet(Method):
    """Mining rounds of query tuples, the triplet/SARE loss (reference.md §3)."""

    name = "triplet"

    def __init__(self, config: ml_collections.ConfigDict, dataset_dir: Path):
        super().__init__(config)
        self.dataset_dir = dataset_dir
        data, negs = config.data, config.mining.negs_num_per_query
        self.train_split = load_split(dataset_dir, "train", data.val_positive_dist_threshold)
        self.val_split = load_split(dataset_dir, "val", data.val_positive_dist_threshold)
        self.queries, self.dropped = mining.training_queries(self.train_split, data.train_positives_dist_threshold)
        builder = train_pack(config, dataset_dir)
        self.loader = None if builder is None else packed.training_loader(
            builder, dataset_dir, self.train_split.database_paths + self.train_split.query_paths,
            may_build=jax.process_count() == 1)
        self.tuples = np.zeros((config.mining.cache_refresh_rate, 2 + negs), np.int64)
        self.neg_cache = mining.empty_neg_cache(len(self.queries.query_indices), negs)
        self.weights = (mining.msls_weights(self.train_split.query_fields["note"][self.queries.query_indices])
                        if config.mining.mining == "msls_weighted" else None)

    def describe(self) -> list[str]:
        mine, train, val = self.config.mining, self.train_split, self.val_split
        lines = [f"train: {train.folder}: {train.num_database} database images, {train.num_queries} queries "
                 f"({len(self.queries.query_indices)} with a positive within "
                 f"{self.config.data.train_positives_dist_threshold:g} m)",
                 *([f"{self.dropped} training queries have no positive within "
                    f"{self.config.data.train_positives_dist_threshold:g} m and are not used"] if self.dropped else []),
                 f"val: {val.folder}: {val.num_database} database images, {val.num_queries} queries",
                 f"mining: {mine.mining}, {loops_per_epoch(mine)} rounds of {mine.cache_refresh_rate} queries "
                 f"per epoch, {mine.negs_num_per_query} negatives each; {self.config.train.criterion} loss"]
        if self.loader is not None:
            lines.append(f"train images read from {self.loader.folder}")
        return lines

    def netvlad_init_paths(self) -> list[str]:
        return self.train_split.database_paths + self.train_split.query_paths

    def test_split(self) -> Split:
        return load_split(self.dataset_dir, "test", eval_run.test_positive_dist_m(self.config))

    def setup(self, run: Run) -> None:
        config = self.config
        self.run = run
        self.step_fn = make_step(run.model, run.tx, StepConfig(
            tuple_size=2 + config.mining.negs_num_per_query, criterion=config.train.criterion,
            margin=config.train.margin, augment=augment.AugmentConfig.from_config(config.train)))

    def rounds_per_epoch(self) -> int:
        return loops_per_epoch(self.config.mining)

    def _rng(self, progress: Progress) -> np.random.Generator:
        rng = np.random.default_rng(self.config.seed)
        if "rng_state" in progress.method:
            rng.bit_generator.state = progress.method["rng_state"]
        return rng

    def prepare_round(self, run: Run, progress: Progress) -> None:
        """One mining round: plan, embed what the plan needs, select tuples (global indices)."""
        config, split = self.config, self.train_split
        rng = self._rng(progress)
        plan = mining.plan_round(config.mining.mining, self.queries, rng,
                                 cache_refresh_rate=config.mining.cache_refresh_rate,
                                 neg_samples_num=config.mining.neg_samples_num,
                                 negs_num_per_query=config.mining.negs_num_per_query,
                                 weights=self.weights, neg_cache=self.neg_cache)
        transform = evaluate.query_transform("hard_resize", run.image_size)
        batch = config.data.infer_batch_size
        database, _ = embed.embed_images(run.embed_fn, [split.database_paths[i] for i in plan.database_to_embed],
                                            transform, batch, desc="caching database", loader=self.loader)
        query_paths = [split.query_paths[self.queries.query_indices[i]] for i in plan.queries]
        queries, _ = embed.embed_images(run.embed_fn, query_paths, transform, batch,
                                           desc="caching queries", loader=self.loader)
        self.tuples = mining.select_triplets(plan, self.queries, queries, database, config.mining.negs_num_per_query)
        if jax.process_count() > 1:  # every process must train on the same tuples
            multihost_utils.assert_equal(self.tuples, "the processes mined different tuples (their datasets "
                                                      "or configs differ?)")
        if config.mining.mining == "full":
            self.neg_cache = mining.update_neg_cache(self.neg_cache, plan, self.tuples)
        progress.method["rng_state"] = rng.bit_generator.state

    def batches_per_round(self) -> int:
        return len(self.tuples) // self.config.train.train_batch_size

    def images_per_batch(self) -> int:
        return self.config.train.train_batch_size * self.tuples.shape[1]

    def batches(self, progress: Progress) -> Iterator[dict]:
        split = self.train_split
        paths = [[split.query_paths[row[0]], *(split.database_paths[i] for i in row[1:])] for row in self.tuples]
        for images in pipeline.triplet_batches(
                paths, self.config.train.train_batch_size, self.run.image_size, start_batch=progress.batch,
                process_index=jax.process_index(), process_count=jax.process_count(),
                num_threads=self.config.data.num_workers, loader=self.loader):
            yield {"images": images}

    def checkpoint_items(self) -> dict:
        return {"tuples": self.tuples, "neg_cache": self.neg_cache}

    def restore_items(self, items: dict) -> None:
        self.tuples, self.neg_cache = np.asarray(items["tuples"]), np.asarray(items["neg_cache"])

    def results(self) -> dict:
        return {"training_queries_without_positive": self.dropped}


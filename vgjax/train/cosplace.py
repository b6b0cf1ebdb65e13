"""CosPlace training (reference.md §5): what differs from the shared engine (loop.py).

The training folder's images are partitioned into classes (UTM cell x heading bin) and groups
(vgjax.data.cosplace_groups). Epoch e is one round on group e % groups_num for
cosplace.iterations_per_epoch steps: each batch holds train.train_batch_size distinct classes
of the group (shuffled passes over its classes, the last incomplete batch of a pass dropped, as
CosPlace's infinite loader does), one random image each, augmented on device (colour jitter in
a random order per image, random resized crop); the loss is CosFace with that group's
classifier, the method's head. The network learns with train.optim(train.lr), each group's
classifier with its own Adam(cosplace.classifiers_lr); only the active group's classifier is on
the device.

Checkpointed beside the network: every group's classifier and its optimizer state; batches are
a pure function of (seed, epoch, step), so resume is exact.
Deliberate difference: the classifier memory of one group is [classes, D] float32 on every
device (replicated): about 50k classes x 512 = 100 MB; groups far larger need row sharding,
which is not implemented.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

import jax
import ml_collections
import numpy as np
import optax

from vgjax import eval_run, sharding
from vgjax.data import augment, cosplace_groups, pipeline
from vgjax.data.vg_folder import Split, load_split
from vgjax.models import geoloc_net
from vgjax.train import losses
from vgjax.train.loop import Method, Progress, Run
from vgjax.train.state import Head, TrainState, step_keys, update

AUGMENTATIONS = ("brightness", "contrast", "saturation", "hue", "random_resized_crop")
# The triplet recipe's augmentations, which the methods augmenting with `augmented` do not use.
UNSUPPORTED = ("rand_perspective", "random_rotation", "horizontal_flip")


def augmented(images: jax.Array, key: jax.Array, augmentation: tuple) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 in [0, 1], augmented as CosPlace does on the device;
    `augmentation` is (brightness, contrast, saturation, hue, random_resized_crop) (AUGMENTATIONS)."""
    b, c, s, h, crop = augmentation
    return augment.cosplace_augment(images.astype("float32") / 255.0, key, brightness=b, contrast=c,
                                    saturation=s, hue=h, random_resized_crop=crop)


def cosplace_step(state: TrainState, head: Head, batch: dict, *, model, tx, head_tx,
                  augmentation: tuple) -> tuple[TrainState, Head, dict]:
    """One update of the network and the active group's classifier.

    Args:
      head: the classifier, params float32 [classes, D], and its Adam state.
      batch: {"images": uint8 [B, H, W, 3], "labels": int32 [B] class positions in the group}.
      augmentation: static (brightness, contrast, saturation, hue, random_resized_crop).
    """
    augment_key, dropout_key = step_keys(state)
    x = augmented(batch["images"], augment_key, augmentation)
    loss_fn = functools.partial(_cosface, labels=batch["labels"])
    return update(state, head, augment.normalize(x), loss_fn, model=model, tx=tx, head_tx=head_tx,
                  dropout_key=dropout_key)


def _cosface(descriptors, weight, *, labels):
    return losses.cosface_loss(descriptors, weight, labels)


def epoch_samples(partition: cosplace_groups.Partition, group: int, *, seed: int, epoch: int,
                  steps: int, batch_size: int) -> tuple[list[str], np.ndarray]:
    """(image paths [steps * B], labels int32 [steps * B]) of one epoch: shuffled passes over the
    group's classes, floor(classes / B) batches per pass, one random image per class."""
    classes = partition.groups[group]
    per_pass = len(classes) // batch_size
    if per_pass == 0:
        raise ValueError(f"group {group} has {len(classes)} classes, fewer than train.train_batch_size "
                         f"{batch_size}: lower it or cosplace.min_images_per_class")
    paths, labels = [], []
    for step in range(steps):
        pass_index, within = divmod(step, per_pass)
        order = np.random.default_rng([seed, epoch, pass_index]).permutation(len(classes))
        chosen = order[within * batch_size:(within + 1) * batch_size]
        picks = np.random.default_rng([seed, epoch, pass_index, within, 1]).random(batch_size)
        for label, pick in zip(chosen, picks):
            members = classes[label]
            paths.append(partition.paths[members[int(pick * len(members))]])
            labels.append(label)
    return paths, np.asarray(labels, np.int32)


def load_folder(folder: str, positive_dist_m: float, queries_folder: str = "queries") -> Split:
    """A split given as a folder holding database/ and the queries folder (CosPlace's way)."""
    folder = Path(folder)
    return load_split(folder.parent, folder.name, positive_dist_m, queries_folder=queries_folder)


class CosPlace(Method):
    """CosFace classification over groups of geographic classes, one group per epoch."""

    name = "cosplace"

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        cfg = config.cosplace
        self.train_all_layers = cfg.train_all_layers
        self.train_folder = Path(cfg.train_folder)
        self.partition = cosplace_groups.build_partition(self.train_folder, cosplace_groups.PartitionConfig(
            M=cfg.M, alpha=cfg.alpha, N=cfg.N, L=cfg.L, groups_num=cfg.groups_num,
            min_images_per_class=cfg.min_images_per_class))
        self.val_split = load_folder(cfg.val_folder, config.data.val_positive_dist_threshold)
        self.head_tx = optax.adam(cfg.classifiers_lr)
        dim = geoloc_net.descriptor_dim(config.model)
        keys = jax.random.split(jax.random.PRNGKey(config.seed + 1), len(self.partition.groups))
        self.classifiers = []
        for key, group in zip(keys, self.partition.groups):
            weight = losses.cosface_init(key, len(group), dim)
            self.classifiers.append(jax.device_get(Head(weight, self.head_tx.init(weight))))

    def describe(self) -> list[str]:
        cfg, val = self.config.cosplace, self.val_split
        groups = ", ".join(str(len(group)) for group in self.partition.groups)
        return [f"train: {self.train_folder}: {len(self.partition.paths)} images in {len(self.partition.groups)} "
                f"groups of classes ({groups} classes), {cfg.iterations_per_epoch} steps per epoch",
                f"val: {val.folder}: {val.num_database} database images, {val.num_queries} queries"]

    def netvlad_init_paths(self) -> list[str]:
        return [str(self.train_folder / path) for path in self.partition.paths]

    def test_split(self) -> Split:
        cfg = self.config.cosplace
        return load_folder(cfg.test_folder, eval_run.test_positive_dist_m(self.config), cfg.test_queries_folder)

    def setup(self, run: Run) -> None:
        self.run = run
        augmentation = tuple(float(self.config.train[key]) for key in AUGMENTATIONS)
        self.step_fn = jax.jit(functools.partial(cosplace_step, model=run.model, tx=run.tx, head_tx=self.head_tx,
                                                 augmentation=augmentation), donate_argnums=(0, 1))

    def _group(self, progress: Progress) -> int:
        return progress.epoch % self.config.cosplace.groups_num

    def batches_per_round(self) -> int:
        return self.config.cosplace.iterations_per_epoch

    def images_per_batch(self) -> int:
        return self.config.train.train_batch_size

    def batches(self, progress: Progress) -> Iterator[dict]:
        batch_size = self.config.train.train_batch_size
        paths, labels = epoch_samples(self.partition, self._group(progress), seed=self.config.seed,
                                      epoch=progress.epoch, steps=self.batches_per_round(), batch_size=batch_size)
        index, count = jax.process_index(), jax.process_count()  # each loads its share of a batch
        images = pipeline.triplet_batches(  # single-image "tuples"
            [[str(self.train_folder / p)] for p in paths], batch_size, self.run.image_size,
            start_batch=progress.batch, process_index=index, process_count=count,
            num_threads=self.config.data.num_workers)
        for step, batch in enumerate(images, start=progress.batch):
            yield {"images": batch, "labels": pipeline.process_share(labels, batch_size, step, index, count)}

    def head(self, progress: Progress) -> Head:
        return sharding.replicate(self.classifiers[self._group(progress)], self.run.mesh)

    def keep_head(self, head: Head, progress: Progress) -> None:
        self.classifiers[self._group(progress)] = jax.device_get(head)

    def checkpoint_items(self) -> dict:
        return {"classifiers": self.classifiers}

    def restore_items(self, items: dict) -> None:
        self.classifiers = list(items["classifiers"])

    def results(self) -> dict:
        return {"groups": [len(group) for group in self.partition.groups]}

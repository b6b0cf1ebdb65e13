"""GSV-Cities training (MixVPR, Conv-AP): what differs from the shared engine (loop.py).

An epoch is one pass over the places of data.gsv_cities (vgjax.data.gsv_cities): batches of
train.train_batch_size places x gsv.images_per_place images, drawn anew every epoch; the loss
is pytorch-metric-learning's multi-similarity loss on the pairs its multi-similarity miner
keeps (vgjax.train.losses), labels being the places. Each step also reports GSV-Cities' b_acc:
1 - the fraction of the batch's images that anchor a mined positive pair. Validation and the
final test use data.dataset_name's val and test splits (the VG folder format); the learning
rate follows train.warmup_steps / train.lr_milestones (vgjax.train.state.learning_rate).

Deliberate difference: the training images are augmented on the device with the train.*
colour jitter and random resized crop (cosplace.augmented; none when all are 0), not
torchvision's RandAugment(3), which vgjax does not implement.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgjax import eval_run
from vgjax.data import augment, gsv_cities, packed, pipeline, tfds_builders
from vgjax.data.vg_folder import Split, load_split
from vgjax.train import losses
from vgjax.train import cosplace
from vgjax.train.loop import Method, Progress, Run
from vgjax.train.state import TrainState, step_keys, update


def gsv_step(state: TrainState, head: None, batch: dict, *, model, tx, augmentation: tuple,
             epsilon: float, alpha: float, beta: float, base: float) -> tuple[TrainState, None, dict]:
    """One update on a places x K batch.

    Args:
      batch: {"images": uint8 [P * K, H, W, 3] place-major, "labels": int32 [P * K] places}.
      augmentation: static (brightness, contrast, saturation, hue, random_resized_crop).
    """
    augment_key, dropout_key = step_keys(state)
    x = (cosplace.augmented(batch["images"], augment_key, augmentation) if any(augmentation)
         else batch["images"].astype(jnp.float32) / 255.0)
    labels = batch["labels"]

    def loss_fn(descriptors, _):
        positive, negative = losses.multi_similarity_miner(jax.lax.stop_gradient(descriptors), labels, epsilon=epsilon)
        loss = losses.multi_similarity_loss(descriptors, positive, negative, alpha=alpha, beta=beta, base=base)
        anchors = jnp.sum(jnp.any(positive, axis=1))
        return loss, {"b_acc": 1.0 - anchors / len(labels)}

    return update(state, head, augment.normalize(x), loss_fn, model=model, tx=tx, dropout_key=dropout_key)


def train_pack(config: ml_collections.ConfigDict) -> tfds_builders.GsvCitiesPack | None:
    """With data.packed_folder: the training cities packed at data.resize as data.packed_encoding
    (vgjax.data.tfds_builders); else None."""
    if not config.data.packed_folder:
        return None
    cities = tuple(config.data.gsv_cities) or gsv_cities.TRAIN_CITIES
    return tfds_builders.gsv_cities_pack(config.data.packed_folder, cities, config.data.resize,
                                         encoding=config.data.packed_encoding, num_threads=config.data.num_workers)


class GSVCities(Method):
    """The multi-similarity loss over places x K batches of GSV-Cities."""

    name = "gsv_cities"

    def __init__(self, config: ml_collections.ConfigDict, gsv_folder: Path, dataset_dir: Path):
        super().__init__(config)
        cfg = config.gsv
        self.gsv_folder, self.dataset_dir = Path(gsv_folder), Path(dataset_dir)
        cities = tuple(config.data.gsv_cities) or gsv_cities.TRAIN_CITIES
        self.places = gsv_cities.read_places(self.gsv_folder, cities, cfg.min_images_per_place)
        if gsv_cities.batches_per_epoch(self.places, config.train.train_batch_size) == 0:
            raise ValueError(f"{self.gsv_folder}: {len(self.places.paths)} places, fewer than one batch of "
                             f"train.train_batch_size={config.train.train_batch_size} places")
        self.val_split = load_split(self.dataset_dir, "val", config.data.val_positive_dist_threshold)
        builder = train_pack(config)
        self.loader = None if builder is None else packed.training_loader(
            builder, self.gsv_folder, [str(self.gsv_folder / path) for paths in self.places.paths for path in paths],
            may_build=jax.process_count() == 1)

    def describe(self) -> list[str]:
        places, cfg, val = self.places, self.config.gsv, self.val_split
        return [f"train: {self.gsv_folder}: {len(places.paths)} places ({places.num_images} images) in "
                f"{len(places.cities)} cities, {places.dropped} places with fewer than {cfg.min_images_per_place} "
                f"images dropped; {self.config.train.train_batch_size} places x {cfg.images_per_place} images "
                f"per step, {self.batches_per_round()} steps per epoch",
                f"val: {val.folder}: {val.num_database} database images, {val.num_queries} queries",
                *([f"train images read from {self.loader.folder}"] if self.loader is not None else [])]

    def netvlad_init_paths(self) -> list[str]:
        return [str(self.gsv_folder / path) for paths in self.places.paths for path in paths]

    def test_split(self) -> Split:
        return load_split(self.dataset_dir, "test", eval_run.test_positive_dist_m(self.config))

    def setup(self, run: Run) -> None:
        self.run = run
        cfg = self.config.gsv
        augmentation = tuple(float(self.config.train[key]) for key in cosplace.AUGMENTATIONS)
        self.step_fn = jax.jit(functools.partial(
            gsv_step, model=run.model, tx=run.tx, augmentation=augmentation, epsilon=cfg.miner_epsilon,
            alpha=cfg.ms_alpha, beta=cfg.ms_beta, base=cfg.ms_base), donate_argnums=(0,))

    def batches_per_round(self) -> int:
        return gsv_cities.batches_per_epoch(self.places, self.config.train.train_batch_size)

    def images_per_batch(self) -> int:
        return self.config.train.train_batch_size * self.config.gsv.images_per_place

    def batches(self, progress: Progress) -> Iterator[dict]:
        cfg, per_batch = self.config.gsv, self.config.train.train_batch_size
        tuples, places = gsv_cities.epoch_tuples(
            self.places, seed=self.config.seed, epoch=progress.epoch, places_per_batch=per_batch,
            images_per_place=cfg.images_per_place, shuffle_all=cfg.shuffle_all)
        index, count = jax.process_index(), jax.process_count()  # each loads its share of a batch
        images = pipeline.triplet_batches(
            [[str(self.gsv_folder / path) for path in paths] for paths in tuples], per_batch, self.run.image_size,
            start_batch=progress.batch, process_index=index, process_count=count,
            num_threads=self.config.data.num_workers, loader=self.loader)
        for step, batch in enumerate(images, start=progress.batch):
            share = pipeline.process_share(places, per_batch, step, index, count)
            yield {"images": batch, "labels": np.repeat(share, cfg.images_per_place)}

    def results(self) -> dict:
        return {"places": len(self.places.paths), "dropped_places": self.places.dropped,
                "cities": list(self.places.cities)}

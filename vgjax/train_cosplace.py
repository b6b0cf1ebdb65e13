"""CosPlace training (reference.md §5): CosFace classification over groups of geographic classes.

The training folder's images are partitioned into classes (UTM cell x heading bin) and groups
(vgjax.cosplace). Epoch e trains on group e % groups_num for iterations_per_epoch steps: each
batch holds `batch_size` distinct classes of the group (shuffled passes over its classes, the
last incomplete batch of a pass dropped, as CosPlace's infinite loader does), one random image
each, augmented on device; the loss is CosFace with that group's classifier. The model learns
with Adam(lr), each group's classifier with its own Adam(classifiers_lr); only the active
group's classifier is on the device. After each epoch the model is validated (R@1 picks the
best, as in CosPlace; no early stopping); at the end the best is tested.

Resume is exact: checkpoints hold the model state and optimizer, every group's classifier and
its optimizer state, the step, PRNG key, epoch, position, best recall and history; batches are a
pure function of (seed, epoch, step).
Deliberate difference: the classifier memory of one group is [classes, D] float32 on every
device (replicated): about 50k classes x 512 = 100 MB; groups far larger need row sharding,
which is not implemented.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from vgjax import checkpoint, cosplace, evaluate, losses, profiling, sharding, train_step
from vgjax.data import augment, pipeline
from vgjax.data.vg_folder import Split, load_split
from vgjax.metrics import MetricWriter
from vgjax.models import geoloc_net, pretrained


@flax.struct.dataclass
class Classifier:
    """A group's CosFace weight [classes, D] and its Adam state."""

    weight: jax.Array
    opt_state: optax.OptState


@dataclasses.dataclass
class Progress:
    epoch: int = 0
    step: int = 0  # next step within the epoch
    best_recall: float = -1.0
    history: list = dataclasses.field(default_factory=list)
    train_images_per_second: list = dataclasses.field(default_factory=list)


def cosplace_step(state: train_step.TrainState, classifier: Classifier, images: jax.Array,
                  labels: jax.Array, *, model, tx, classifier_tx, augmentation: tuple):
    """One update of the model and the active classifier.

    Args:
      images: uint8 [B, H, W, 3]; labels: int32 [B], class positions in the group.
      augmentation: static (brightness, contrast, saturation, hue, random_resized_crop).
    """
    step_key = jax.random.fold_in(state.key, state.step)
    augment_key, dropout_key = jax.random.split(step_key)
    b, c, s, h, crop = augmentation
    x = augment.cosplace_augment(images.astype(jnp.float32) / 255.0, augment_key, brightness=b,
                                 contrast=c, saturation=s, hue=h, random_resized_crop=crop)
    x = (x - jnp.asarray(geoloc_net.IMAGENET_MEAN)) / jnp.asarray(geoloc_net.IMAGENET_STD)

    def compute_loss(trainable, weight):
        params = train_step.merge_params(trainable, state.frozen)
        descriptors, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                           train=True, mutable=["batch_stats"], rngs={"dropout": dropout_key})
        return losses.cosface_loss(descriptors, weight, labels), updates.get("batch_stats", state.batch_stats)

    (loss, batch_stats), (grads, weight_grad) = jax.value_and_grad(compute_loss, argnums=(0, 1), has_aux=True)(
        state.trainable, classifier.weight)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    weight_updates, classifier_opt = classifier_tx.update(weight_grad, classifier.opt_state, classifier.weight)
    state = state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                          batch_stats=batch_stats, opt_state=opt_state)
    classifier = Classifier(optax.apply_updates(classifier.weight, weight_updates), classifier_opt)
    return state, classifier, {"loss": loss}


def epoch_samples(partition: cosplace.Partition, group: int, *, seed: int, epoch: int,
                  steps: int, batch_size: int) -> tuple[list[str], np.ndarray]:
    """(image paths [steps * B], labels int32 [steps * B]) of one epoch: shuffled passes over the
    group's classes, floor(classes / B) batches per pass, one random image per class."""
    classes = partition.groups[group]
    per_pass = len(classes) // batch_size
    if per_pass == 0:
        raise ValueError(f"group {group} has {len(classes)} classes, fewer than batch_size "
                         f"{batch_size}: lower cosplace.batch_size or min_images_per_class")
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


class _Run:
    def __init__(self, config: ml_collections.ConfigDict, workdir: Path):
        self.config, self.workdir = config, workdir
        cfg = config.cosplace
        self.image_size = tuple(config.data.resize)
        self.mesh = sharding.make_mesh()
        self.train_folder = Path(cfg.train_folder)
        self.partition = cosplace.build_partition(self.train_folder, cosplace.PartitionConfig(
            M=cfg.M, alpha=cfg.alpha, N=cfg.N, L=cfg.L, groups_num=cfg.groups_num,
            min_images_per_class=cfg.min_images_per_class))
        self.model, variables = pretrained.build_and_load(config.model, self.image_size, config.seed)
        state, self.tx = train_step.create_state(config, variables, config.seed,
                                                 train_all_layers=cfg.train_all_layers)
        self.state = sharding.replicate(state, self.mesh)
        self.classifier_tx = optax.adam(cfg.classifiers_lr)
        dim = geoloc_net.descriptor_dim(config.model)
        keys = jax.random.split(jax.random.PRNGKey(config.seed + 1), len(self.partition.groups))
        self.classifiers = []
        for key, group in zip(keys, self.partition.groups):
            weight = losses.cosface_init(key, len(group), dim)
            self.classifiers.append(jax.device_get(Classifier(weight, self.classifier_tx.init(weight))))
        augmentation = (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, cfg.random_resized_crop)
        self.step_fn = jax.jit(functools.partial(
            cosplace_step, model=self.model, tx=self.tx, classifier_tx=self.classifier_tx,
            augmentation=augmentation), donate_argnums=(0, 1))
        self.embed_state = train_step.make_state_embed_fn(self.model, self.mesh)
        self.val_split = _load_folder(cfg.val_folder, config.data.val_positive_dist_threshold)
        self.checkpoints = checkpoint.Checkpoints(workdir / "checkpoints")
        self.metrics = MetricWriter(workdir)
        self.tracer = profiling.StepTracer(workdir / "profile", config.train.profile_steps)

    def evaluate(self, split: Split) -> evaluate.EvaluationResult:
        return evaluate.evaluate(lambda images: self.embed_state(self.state, images), split,
                                 resize=self.image_size, recall_values=tuple(self.config.eval.recall_values),
                                 batch_size=self.config.data.infer_batch_size,
                                 num_threads=self.config.data.num_workers)


def _load_folder(folder: str, positive_dist_m: float, queries_folder: str = "queries") -> Split:
    """A split given as a folder holding database/ and the queries folder (CosPlace's way)."""
    folder = Path(folder)
    return load_split(folder.parent, folder.name, positive_dist_m, queries_folder=queries_folder)


def _save(run: _Run, progress: Progress, *, best: bool = False) -> None:
    run.checkpoints.save({"train": run.state, "classifiers": run.classifiers},
                         dataclasses.asdict(progress), best=best)


def _restore(run: _Run, which: str = "last") -> Progress | None:
    restored = run.checkpoints.restore({"train": run.state, "classifiers": run.classifiers}, which)
    if restored is None:
        return None
    state, meta = restored
    run.state, run.classifiers = state["train"], list(state["classifiers"])
    return Progress(**meta)


def _train_epoch(run: _Run, progress: Progress) -> None:
    cfg = run.config.cosplace
    group = progress.epoch % cfg.groups_num
    paths, labels = epoch_samples(run.partition, group, seed=run.config.seed, epoch=progress.epoch,
                                  steps=cfg.iterations_per_epoch, batch_size=cfg.batch_size)
    start = progress.step
    batches = pipeline.triplet_batches(  # single-image "tuples"
        [[str(run.train_folder / p)] for p in paths], cfg.batch_size, run.image_size,
        start_batch=start, num_threads=run.config.data.num_workers)
    classifier = sharding.replicate(run.classifiers[group], run.mesh)
    every = run.config.train.checkpoint_every_steps
    bar = tqdm(total=cfg.iterations_per_epoch, initial=start, unit="step", desc=f"epoch {progress.epoch} (group {group})")
    losses_seen, first_done = [], None
    for images in batches:
        step_labels = labels[progress.step * cfg.batch_size:(progress.step + 1) * cfg.batch_size]
        run.tracer.before_step()
        run.state, classifier, metrics = run.step_fn(run.state, classifier, sharding.shard_batch(images, run.mesh),
                                                     sharding.shard_batch(step_labels, run.mesh))
        run.tracer.after_step(metrics)
        loss = train_step.checked_loss(metrics, run.state, f"epoch {progress.epoch}",
                                       run.workdir / "checkpoints")
        losses_seen.append(loss)
        first_done = first_done or time.perf_counter()
        progress.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if every and progress.step % every == 0 and progress.step < cfg.iterations_per_epoch:
            run.classifiers[group] = jax.device_get(classifier)
            _save(run, progress)
    bar.close()
    run.classifiers[group] = jax.device_get(classifier)
    if len(losses_seen) > 1:
        rate = (len(losses_seen) - 1) * cfg.batch_size / (time.perf_counter() - first_done)
        progress.train_images_per_second.append(rate)
        run.metrics.write(int(run.state.step), {"epoch": progress.epoch, "loss": float(np.mean(losses_seen)),
                                                "images_per_second": rate}, prefix="train/")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Trains (resuming from workdir/checkpoints), validating R@1 each epoch; tests the best."""
    run = _Run(config, workdir)
    cfg = config.cosplace
    progress = _restore(run) or Progress()
    while progress.epoch < cfg.epochs_num:
        _train_epoch(run, progress)
        result = run.evaluate(run.val_split)
        recall = result.recalls[config.eval.recall_values[0]]
        print(f"Epoch {progress.epoch}: recalls on val set {cfg.val_folder}: {result}")
        improved = recall > progress.best_recall
        progress.best_recall = max(recall, progress.best_recall)
        progress.history.append({"epoch": progress.epoch, "val": {f"R@{n}": r for n, r in result.recalls.items()}})
        run.metrics.write(int(run.state.step), progress.history[-1])
        progress.epoch, progress.step = progress.epoch + 1, 0
        _save(run, progress, best=improved)
    _restore(run, "best")
    test_split = _load_folder(cfg.test_folder, config.data.val_positive_dist_threshold,
                              cfg.test_queries_folder)
    result = run.evaluate(test_split)
    print(f"Recalls on test set {cfg.test_folder} ({cfg.test_queries_folder}): {result}")
    run.tracer.stop()
    run.checkpoints.close()
    run.metrics.close()
    rates = progress.train_images_per_second
    return {"val_history": progress.history, "best_val_recall": progress.best_recall,
            "test": {f"R@{n}": r for n, r in result.recalls.items()},
            "descriptor_dim": result.descriptor_dim, "steps": int(run.state.step),
            "groups": [len(group) for group in run.partition.groups],
            "train_images_per_second": float(np.median(rates)) if rates else None}

"""The training step: train state, optimizer, and one jit-compiled update.

Frozen parameters (the benchmark's frozen stages) are not differentiated at all: the loss is a
function of the trainable parameters only, so XLA drops the backward pass through the frozen
early layers instead of computing gradients that an optimizer mask would then discard.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from vgjax import losses, sharding
from vgjax.data import augment
from vgjax.models import geoloc_net

OPTIMIZERS = ("adam", "sgd")
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 1e-3


@flax.struct.dataclass
class TrainState:
    """step: int32 []; trainable / frozen: the params split in two nested dicts (each holding
    only its own leaves); batch_stats; opt_state (over `trainable`); key: uint32 [2] PRNG key."""

    step: jax.Array
    trainable: dict
    frozen: dict
    batch_stats: dict
    opt_state: Any
    key: jax.Array

    @property
    def params(self) -> dict:
        """The full nested params tree."""
        return merge_params(self.trainable, self.frozen)

    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def split_params(params: dict, mask: dict) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts from a params tree and a bool mask tree."""
    flat, flat_mask = traverse_util.flatten_dict(params), traverse_util.flatten_dict(mask)
    trainable = {path: value for path, value in flat.items() if flat_mask[path]}
    frozen = {path: value for path, value in flat.items() if not flat_mask[path]}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: dict, frozen: dict) -> dict:
    """The inverse of split_params."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(trainable),
                                         **traverse_util.flatten_dict(frozen)})


def _base_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    """torch's Adam (default betas, no weight decay) or SGD(momentum 0.9, weight decay 1e-3)."""
    if name == "adam":
        return optax.adam(lr)
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(SGD_WEIGHT_DECAY),
                           optax.sgd(lr, momentum=SGD_MOMENTUM))
    raise ValueError(f"unknown train.optim {name!r}; choose one of {OPTIMIZERS}")


def make_optimizer(train_config: ml_collections.ConfigDict, aggregation: str,
                   trainable: dict) -> optax.GradientTransformation:
    """The optimizer over the trainable params. With CRN, its context module learns at
    lr_crn_layer and everything else at lr_crn_net (reference §2.5); otherwise all at lr."""
    if aggregation != "crn":
        return _base_optimizer(train_config.optim, train_config.lr)
    labels = traverse_util.unflatten_dict({
        path: "crn" if path[:2] == ("aggregation", "crn") else "net"
        for path in traverse_util.flatten_dict(trainable)})
    return optax.multi_transform(
        {"crn": _base_optimizer(train_config.optim, train_config.lr_crn_layer),
         "net": _base_optimizer(train_config.optim, train_config.lr_crn_net)}, labels)


def create_state(config: ml_collections.ConfigDict, variables: dict, seed: int, *,
                 train_all_layers: bool = False) -> tuple[TrainState, optax.GradientTransformation]:
    """The initial TrainState for `variables` and the optimizer that goes with it. The
    benchmark's frozen layers stay fixed unless `train_all_layers`."""
    mask = geoloc_net.trainable_mask(config.model, variables["params"])
    if train_all_layers:
        mask = jax.tree.map(lambda _: True, mask)
    trainable, frozen = split_params(variables["params"], mask)
    tx = make_optimizer(config.train, config.model.aggregation, trainable)
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                       batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(trainable),
                       key=jax.random.PRNGKey(seed))
    return state, tx


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the compiled step (hashable)."""

    tuple_size: int  # images per query tuple: 1 query + 1 positive + negatives
    criterion: str
    margin: float
    augment: augment.AugmentConfig


def _augment(images: jax.Array, key: jax.Array, step_config: StepConfig) -> jax.Array:
    """uint8 [N, H, W, 3] tuple-major batch -> ImageNet-normalized float32, with the query
    augmentations on rows 0, T, 2T, ... and the optional whole-batch flip."""
    x = images.astype(jnp.float32) / 255.0
    query_key, flip_key = jax.random.split(key)
    if not augment.is_identity(step_config.augment, images.shape[1:3]):
        queries = augment.augment_queries(x[::step_config.tuple_size], query_key, step_config.augment)
        x = x.at[::step_config.tuple_size].set(queries)
    x = augment.flip_batch(x, flip_key, step_config.augment.horizontal_flip)
    mean = jnp.asarray(geoloc_net.IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(geoloc_net.IMAGENET_STD, jnp.float32)
    return (x - mean) / std


def train_step(state: TrainState, images: jax.Array, *, model: geoloc_net.GeoLocalizationNet,
               tx: optax.GradientTransformation, step_config: StepConfig) -> tuple[TrainState, dict]:
    """One update on a batch of query tuples.

    Args:
      state: the TrainState (donated by `make_train_step`).
      images: uint8 [B * T, H, W, 3], tuple-major: [query, positive, negatives...] per tuple.

    Returns:
      (new state, {"loss": float32 []}).
    """
    step_key = jax.random.fold_in(state.key, state.step)
    augment_key, dropout_key = jax.random.split(step_key)
    x = _augment(images, augment_key, step_config)
    loss_fn = losses.LOSSES[step_config.criterion]

    def compute_loss(trainable):
        params = merge_params(trainable, state.frozen)
        descriptors, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_key})
        loss = loss_fn(descriptors, negs_per_query=step_config.tuple_size - 2, margin=step_config.margin)
        return loss, updates.get("batch_stats", state.batch_stats)

    (loss, batch_stats), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    new_state = state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    return new_state, {"loss": loss}


def make_state_embed_fn(model: geoloc_net.GeoLocalizationNet, mesh):
    """(state, uint8 images) -> float32 numpy descriptors with the state's current params;
    one compiled function for the run, batches sharded over the mesh when they divide."""
    embed = jax.jit(lambda variables, x: model.apply(variables, geoloc_net.normalize_images(x)))

    def embed_state(state: TrainState, images):
        if len(images) % len(mesh.local_devices) == 0:
            images = sharding.shard_batch(images, mesh)
        return np.asarray(embed(state.variables(), images))

    embed_state.jitted = embed
    return embed_state


def checked_loss(metrics: dict, state: TrainState, where: str, checkpoint_dir) -> float:
    """The step's loss as a float; raises FloatingPointError (naming the step and that the last
    good checkpoint in `checkpoint_dir` is kept) when it is not finite."""
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss} at step {int(state.step)} ({where}); "
                                 f"the last good checkpoint in {checkpoint_dir} is kept")
    return loss


def make_train_step(model, tx, step_config: StepConfig):
    """train_step jit-compiled with its state buffers donated."""
    return jax.jit(functools.partial(train_step, model=model, tx=tx, step_config=step_config),
                   donate_argnums=(0,))

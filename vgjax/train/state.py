"""Training state, the trainable/frozen split, optimizers, and the ONE update every method uses.

Frozen parameters (the benchmark's frozen stages) are not differentiated at all: the loss is a
function of the trainable parameters only, so XLA drops the backward pass through the frozen
early layers instead of computing gradients that an optimizer mask would then discard.

A method (triplet, CosPlace, ...) supplies only its input preparation and its loss; `update`
runs the network in training mode, differentiates, and applies the gradients to the network
and, where the method has one, to its head (e.g. CosPlace's classifier). Every step returns
`{"loss": float32 [], "finite": bool []}` and any metrics the loss reports: "finite" is False
when the loss or any updated parameter is not finite, so the loop can refuse to save a broken
network without reading anything back from the device after each step.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from vgjax.models import geoloc_net

OPTIMIZERS = ("adam", "sgd", "adamw")
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


@flax.struct.dataclass
class Head:
    """A method's own trained parameters beside the network (e.g. a CosFace classifier) and
    their optimizer state."""

    params: Any
    opt_state: Any


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


def schedule_in_epochs(train_config: ml_collections.ConfigDict) -> bool:
    """Whether `learning_rate` counts epochs (train.lr_milestones, train.warmup_epochs), so it
    needs the method's fixed number of steps per epoch."""
    return bool(train_config.lr_milestones or train_config.warmup_epochs)


def learning_rate(train_config: ml_collections.ConfigDict, base: float, steps_per_epoch: int) -> optax.ScalarOrSchedule:
    """`base`, or with train.warmup_steps / train.lr_milestones the schedule of GSV-Cities and
    MixVPR: lr(step) = base * min(1, (step + 1) / warmup) * lr_gamma^(milestones <= epoch),
    warmup = train.warmup_steps, or train.warmup_epochs * steps_per_epoch (BoQ),
    epoch = step // steps_per_epoch (torch's MultiStepLR stepped every epoch, and the linear
    warm-up they apply on top of it); with train.lr_decay_steps = N also times torch's LinearLR
    factor 1 + (lr_end_factor - 1) * min(step, N) / N (SALAD's schedule)."""
    warmup = train_config.warmup_steps or train_config.warmup_epochs * steps_per_epoch
    milestones, gamma = tuple(train_config.lr_milestones), train_config.lr_gamma
    decay, end = train_config.lr_decay_steps, train_config.lr_end_factor
    if not warmup and not milestones and not decay:
        return base

    def schedule(step):
        step = jnp.asarray(step)
        scale = jnp.minimum(1.0, (step + 1) / warmup) if warmup else 1.0
        passed = jnp.sum(jnp.asarray(milestones or (np.inf,)) <= step // max(steps_per_epoch, 1))
        linear = 1.0 + (end - 1.0) * jnp.minimum(step, decay) / decay if decay else 1.0
        return base * scale * gamma ** passed * linear
    return schedule


def base_optimizer(name: str, lr: optax.ScalarOrSchedule, weight_decay: float = 0.01) -> optax.GradientTransformation:
    """torch's Adam (default betas, no weight decay), SGD(momentum 0.9, weight decay 1e-3) or
    AdamW(default betas, decoupled `weight_decay`)."""
    if name == "adam":
        return optax.adam(lr)
    if name == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay)
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(SGD_WEIGHT_DECAY),
                           optax.sgd(lr, momentum=SGD_MOMENTUM))
    raise ValueError(f"unknown train.optim {name!r}; choose one of {OPTIMIZERS}")


def make_optimizer(train_config: ml_collections.ConfigDict, aggregation: str,
                   trainable: dict, steps_per_epoch: int = 1) -> optax.GradientTransformation:
    """The optimizer over the trainable params. With CRN, its context module learns at
    lr_crn_layer and everything else at lr_crn_net (reference §2.5); otherwise all at lr; each
    on the schedule of `learning_rate`."""
    def optimizer(base: float) -> optax.GradientTransformation:
        return base_optimizer(train_config.optim, learning_rate(train_config, base, steps_per_epoch),
                              train_config.weight_decay)

    if aggregation != "crn":
        return optimizer(train_config.lr)
    labels = traverse_util.unflatten_dict({
        path: "crn" if path[:2] == ("aggregation", "crn") else "net"
        for path in traverse_util.flatten_dict(trainable)})
    return optax.multi_transform({"crn": optimizer(train_config.lr_crn_layer),
                                  "net": optimizer(train_config.lr_crn_net)}, labels)


def create_state(config: ml_collections.ConfigDict, variables: dict, seed: int, *,
                 train_all_layers: bool = False, steps_per_epoch: int = 1
                 ) -> tuple[TrainState, optax.GradientTransformation]:
    """The initial TrainState for `variables` and the optimizer that goes with it. The
    benchmark's frozen layers stay fixed unless `train_all_layers`; `steps_per_epoch` places the
    learning-rate milestones and an epochs-long warm-up (schedule_in_epochs)."""
    mask = geoloc_net.trainable_mask(config.model, variables["params"])
    if train_all_layers:
        mask = jax.tree.map(lambda _: True, mask)
    trainable, frozen = split_params(variables["params"], mask)
    tx = make_optimizer(config.train, config.model.aggregation, trainable, steps_per_epoch)
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                       batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(trainable),
                       key=jax.random.PRNGKey(seed))
    return state, tx


def step_keys(state: TrainState) -> tuple[jax.Array, jax.Array]:
    """(augmentation key, dropout key) of this step: a pure function of (run key, step), so a
    resumed run draws exactly what an uninterrupted one would."""
    augment_key, dropout_key = jax.random.split(jax.random.fold_in(state.key, state.step))
    return augment_key, dropout_key


def all_finite(tree) -> jax.Array:
    """bool []: every element of every leaf is finite."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.bool_(True)


# (descriptors [B, D], head params or None) -> loss [], or (loss [], {name: float32 []}) with
# metrics the step reports beside the loss (e.g. GSV-Cities' b_acc).
LossFn = Callable[[jax.Array, Any], jax.Array | tuple[jax.Array, dict]]


def update(state: TrainState, head: Head | None, images: jax.Array, loss_fn: LossFn, *,
           model: geoloc_net.GeoLocalizationNet, tx: optax.GradientTransformation,
           head_tx: optax.GradientTransformation | None = None,
           dropout_key: jax.Array) -> tuple[TrainState, Head | None, dict]:
    """One update: the network in training mode on `images`, the loss, gradients of the
    trainable params (and of the head's), and their optimizers' steps.

    Args:
      state: the TrainState; head: the method's Head or None.
      images: float32 [B, H, W, 3], ImageNet-normalized (augmented by the method).
      loss_fn: (descriptors float32 [B, D], head params or None) -> float32 [].

    Returns:
      (new state, new head, {"loss": float32 [], "finite": bool [], and the loss's metrics}).
    """
    def compute_loss(trainable, head_params):
        params = merge_params(trainable, state.frozen)
        descriptors, updates = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats"], rngs={"dropout": dropout_key})
        out = loss_fn(descriptors, head_params)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        return loss, (updates.get("batch_stats", state.batch_stats), metrics)

    head_params = None if head is None else head.params
    (loss, (batch_stats, loss_metrics)), (grads, head_grads) = jax.value_and_grad(
        compute_loss, argnums=(0, 1), has_aux=True)(state.trainable, head_params)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    state = state.replace(step=state.step + 1, trainable=trainable, batch_stats=batch_stats,
                          opt_state=opt_state)
    if head is not None:
        head_updates, head_opt = head_tx.update(head_grads, head.opt_state, head.params)
        head = Head(optax.apply_updates(head.params, head_updates), head_opt)
    finite = jnp.isfinite(loss) & all_finite((trainable, batch_stats, head_params if head is None else head.params))
    return state, head, {"loss": loss, "finite": finite, **loss_metrics}

"""The one jitted inference path: uint8 images -> ImageNet normalization on device -> network.

`make_sharded_embed_fn(model, mesh)` gives `embed(variables, images) -> numpy [B, D]`: one
compiled function for a run, fed the current variables ({"params", "batch_stats"}) at every
call, as mining, validation and profiling do. A batch whose size divides by the number of local
devices is sharded over the mesh's data axis (each process passes its own rows); other batches
run unsharded. `make_embed_fn(model, variables)` binds fixed variables on top of it, over the
devices of this process (evaluation, the demo); `make_features_fn` returns backbone features
instead of descriptors (NetVLAD init).

vgjax.models never imports this module; it imports the models.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from vgjax import sharding
from vgjax.data import augment
from vgjax.models.geoloc_net import GeoLocalizationNet


def make_sharded_embed_fn(model: GeoLocalizationNet, mesh: Mesh) -> Callable[[dict, np.ndarray], np.ndarray]:
    """`embed(variables, images)`: uint8 [B, H, W, 3] -> float32 numpy [B, D] in inference mode.

    `variables` should be replicated over `mesh` (sharding.replicate), or not yet placed. The
    jitted function (variables, images) -> descriptors, e.g. for cost analysis, is
    `embed.jitted`.
    """
    jitted = jax.jit(lambda variables, images: model.apply(
        variables, augment.normalize_uint8(images), train=False))

    def embed(variables: dict, images) -> np.ndarray:
        if len(images) % len(mesh.local_devices) == 0:
            images = sharding.shard_batch(images, mesh)
        return np.asarray(jitted(variables, images))

    embed.jitted = jitted
    return embed


def make_embed_fn(model: GeoLocalizationNet, variables: dict) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 [B, H, W, 3] -> float32 numpy [B, D] with fixed `variables`, over this process's
    devices (so each process may embed its own images independently)."""
    mesh = Mesh(np.asarray(jax.local_devices()), (sharding.DATA_AXIS,))
    embed, variables = make_sharded_embed_fn(model, mesh), sharding.replicate(variables, mesh)
    return lambda images: embed(variables, images)


def make_features_fn(model: GeoLocalizationNet, variables: dict) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 [B, H, W, 3] -> float32 numpy backbone outputs, maps [B, h, w, C] or tokens
    [B, T, C] (inference mode), e.g. for netvlad_init.initialize_netvlad."""
    jitted = jax.jit(lambda variables, images: model.apply(
        variables, augment.normalize_uint8(images), method=GeoLocalizationNet.backbone_features))
    return lambda images: np.asarray(jitted(variables, images))

"""Learning-free baseline descriptors.

`tiny_image_embed`: the "tiny images" descriptor (Torralba et al., 2008), a classic place
recognition baseline: each image is area-downsampled to a few pixels per side, normalized per
channel to zero mean and unit variance (robust to global lighting changes), flattened and
L2-normalized. It runs jit-compiled on the device, takes uint8 images like every vgjax embed
function, and serves as the reference point that learned models must beat.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

NAMES = ("tiny_image",)  # the `model.backbone` values that are baselines, not networks


@functools.partial(jax.jit, static_argnames=("size",))
def tiny_image_descriptors(images: jax.Array, size: tuple[int, int] = (12, 16)) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 [B, size[0] * size[1] * 3], unit L2 norm."""
    x = images.astype(jnp.float32) / 255.0
    x = jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method="linear", antialias=True)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    x = x / (x.std(axis=(1, 2), keepdims=True) + 1e-6)
    x = x.reshape(x.shape[0], -1)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def tiny_image_embed(size: tuple[int, int] = (12, 16)):
    """An embed function for `vgjax.evaluate.evaluate`: uint8 [B, H, W, 3] -> float32 [B, D]."""
    def embed(images: np.ndarray) -> np.ndarray:
        return np.asarray(tiny_image_descriptors(images, size=tuple(size)))
    return embed

"""On-device training augmentations (the benchmark's query transform and batch flip, CosPlace's
batch augmentation) and the ONE ImageNet normalization of vgjax.

Normalization: `normalize(x)` maps float32 images in [0, 1] to (x - IMAGENET_MEAN) / IMAGENET_STD
(after the augmentations, in the training steps); `normalize_uint8(images)` maps uint8 images
straight to (x - 255 mean) / (255 std), equal to normalize(x / 255) up to float rounding
(inference, `vgjax.embed`).

The benchmark (reference.md §1.1, §3.1, §9.3) augments each training query, in this order, with
ColorJitter(brightness) -> ColorJitter(contrast) -> ColorJitter(saturation) -> ColorJitter(hue)
-> RandomPerspective(rand_perspective, p=0.5) -> RandomResizedCrop(scale=(1 - x, 1),
ratio=(3/4, 4/3)) -> RandomRotation(random_rotation); positives and negatives are not augmented.
`--horizontal_flip` flips the whole collated batch (one coin per batch).

Here every op is vectorized over the batch with per-image parameters drawn from a JAX key, on
float32 images in [0, 1] (the caller converts from uint8 and normalizes afterwards), so it
compiles into the training step. Parameters follow torchvision's draws; the ops follow
torchvision's float-tensor formulas, and for the warps the border rule of PIL, which is what the
benchmark runs. Deliberate differences from the benchmark (which works on uint8 PIL images):
- no rounding to uint8 between ops, and the colour ops use torchvision's tensor formulas (grey
  = 0.2989 R + 0.587 G + 0.114 B, exact float mean for contrast, hue shifted in float HSV)
  where PIL rounds the grey mean and quantizes hue to 1/255 of a turn;
- `random_resized_crop=0` on an image whose aspect ratio is within [3/4, 4/3] is skipped.
  torchvision then keeps the whole image except when one of its 10 tries lands on a
  near-full crop such as 480x639, which it stretches back by up to one pixel (under 1% of
  queries at 480x640).

dm-pix supplies the grey image, the hue shift and the flip. Its brightness (additive), contrast
(per-channel means), saturation (scales HSV saturation) and rotate (see `rotate`) differ from
torchvision or are slower, so those are written here.

An option of 0 turns its op off: nothing is drawn and nothing is computed, so a disabled op
costs nothing under jit. Each op has its own sub-key, so enabling one op does not change the
parameters another one draws.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import dm_pix
import jax
import jax.numpy as jnp

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range (w / h)
_CROP_TRIES = 10  # torchvision's RandomResizedCrop tries this many draws before its fallback
_PERSPECTIVE_P = 0.5  # RandomPerspective's default probability
_FLIP_P = 0.5
_OPS = ("brightness", "contrast", "saturation", "hue", "perspective", "crop", "rotation")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The benchmark's augmentation options (names as in its parser; 0 / False = off)."""

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    rand_perspective: float = 0.0
    random_resized_crop: float = 0.0
    random_rotation: float = 0.0
    horizontal_flip: bool = False

    def __post_init__(self):
        ranges = {"brightness": (0, math.inf), "contrast": (0, math.inf),
                  "saturation": (0, math.inf), "hue": (0, 0.5), "rand_perspective": (0, 1),
                  "random_resized_crop": (0, 1), "random_rotation": (0, math.inf)}
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {value}")

    @classmethod
    def from_config(cls, train_config) -> AugmentConfig:
        """Reads the options from a config section (e.g. `config.train`) holding these keys."""
        values = {f.name: float(train_config[f.name]) for f in dataclasses.fields(cls)
                  if f.name != "horizontal_flip"}
        return cls(horizontal_flip=bool(train_config["horizontal_flip"]), **values)


def is_identity(config: AugmentConfig, image_size: tuple[int, int]) -> bool:
    """Whether `augment_queries` returns [*, H, W, 3] images of this (H, W) unchanged.

    The crop is part of the benchmark's query transform even at `random_resized_crop=0`: it
    crops images whose aspect ratio is outside [3/4, 4/3], hence the size argument.
    """
    return (config.brightness == config.contrast == config.saturation == config.hue == 0
            and config.rand_perspective == 0 and config.random_rotation == 0
            and not _crop_enabled(config, *image_size))


def _crop_enabled(config: AugmentConfig, height: int, width: int) -> bool:
    return config.random_resized_crop > 0 or _crop_fallback(height, width) != (0, 0, height, width)


# Colour: torchvision's float-tensor formulas.


def _blend(images: jax.Array, other: jax.Array, factors: jax.Array) -> jax.Array:
    factors = jnp.asarray(factors, jnp.float32)[:, None, None, None]
    return jnp.clip(factors * images + (1.0 - factors) * other, 0.0, 1.0)


def _grey(images: jax.Array) -> jax.Array:
    """[B, H, W, 1] luma with torchvision's tensor weights (0.2989, 0.587, 0.114)."""
    return dm_pix.rgb_to_grayscale(images, luma_standard="rec601")


def adjust_brightness(images: jax.Array, factors: jax.Array) -> jax.Array:
    """images [B, H, W, 3] in [0, 1], factors [B] -> clip(image * factor, 0, 1)."""
    return _blend(images, 0.0, factors)


def adjust_contrast(images: jax.Array, factors: jax.Array) -> jax.Array:
    """Blend of each image with the mean of its grey image, clipped to [0, 1]."""
    return _blend(images, jnp.mean(_grey(images), axis=(1, 2, 3), keepdims=True), factors)


def adjust_saturation(images: jax.Array, factors: jax.Array) -> jax.Array:
    """Blend of each image with its grey image, clipped to [0, 1]."""
    return _blend(images, _grey(images), factors)


def adjust_hue(images: jax.Array, factors: jax.Array) -> jax.Array:
    """Adds factors [B] (in turns, [-0.5, 0.5]) to the HSV hue, as torchvision's adjust_hue.

    dm-pix computes the same HSV round trip (red > green > blue when channels tie).
    """
    return dm_pix.adjust_hue(images, jnp.asarray(factors, jnp.float32)[:, None, None])


# Warps.


def _gather_pixels(images: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """images [B, H, W, C]; rows, cols int [B, h, w] in range -> [B, h, w, C]."""
    batch, height, width, channels = images.shape
    flat = images.reshape(batch, height * width, channels)
    index = (rows * width + cols).reshape(batch, -1, 1)
    return jnp.take_along_axis(flat, index, axis=1).reshape(*rows.shape, channels)


def _sample_bilinear(images: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """Bilinear samples at pixel-edge coordinates x, y [B, h, w] (pixel i spans [i, i + 1)).

    PIL's rule: 0 where the point lies outside [0, W) x [0, H), otherwise interpolation
    between the nearest pixel centres with the border pixels repeated.
    """
    height, width = images.shape[1:3]
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    x, y = x - 0.5, y - 0.5  # to pixel-centre coordinates
    x0, y0 = jnp.floor(x), jnp.floor(y)
    wx, wy = (x - x0)[..., None], (y - y0)[..., None]
    x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
    c0, c1 = jnp.clip(x0, 0, width - 1), jnp.clip(x0 + 1, 0, width - 1)
    r0, r1 = jnp.clip(y0, 0, height - 1), jnp.clip(y0 + 1, 0, height - 1)
    top = (1 - wx) * _gather_pixels(images, r0, c0) + wx * _gather_pixels(images, r0, c1)
    bottom = (1 - wx) * _gather_pixels(images, r1, c0) + wx * _gather_pixels(images, r1, c1)
    return jnp.where(inside[..., None], (1 - wy) * top + wy * bottom, 0.0)


def _homographies(startpoints: jax.Array, endpoints: jax.Array, scale: float) -> jax.Array:
    """[B, 8] coefficients (a..h) mapping endpoints to startpoints ([B, 4, 2] (x, y) each):
    (x, y) -> ((a x + b y + c) / (g x + h y + 1), (d x + e y + f) / (g x + h y + 1)), in units
    of `scale` pixels (the 8x8 system is solved in float32, so coordinates are kept near 1)."""
    end = jnp.asarray(endpoints, jnp.float32) / scale
    start = jnp.asarray(startpoints, jnp.float32) / scale
    ex, ey, sx, sy = end[..., 0], end[..., 1], start[..., 0], start[..., 1]
    zero, one = jnp.zeros_like(ex), jnp.ones_like(ex)
    rows_x = jnp.stack([ex, ey, one, zero, zero, zero, -sx * ex, -sx * ey], axis=-1)
    rows_y = jnp.stack([zero, zero, zero, ex, ey, one, -sy * ex, -sy * ey], axis=-1)
    system = jnp.stack([rows_x, rows_y], axis=-2).reshape(-1, 8, 8)
    target = jnp.stack([sx, sy], axis=-1).reshape(-1, 8, 1)
    return jnp.linalg.solve(system, target)[..., 0]


def perspective(images: jax.Array, startpoints: jax.Array, endpoints: jax.Array) -> jax.Array:
    """torchvision's `perspective(img, startpoints, endpoints)` with bilinear sampling, fill 0.

    Args:
      images: float [B, H, W, 3].
      startpoints, endpoints: [B, 4, 2] (x, y) pixel indices of the corners (top-left,
        top-right, bottom-right, bottom-left) before and after the warp.

    Like torchvision, each output pixel centre (x + 0.5, y + 0.5) is mapped through the
    homography taking endpoints to startpoints; the border follows PIL (`_sample_bilinear`).
    """
    height, width = images.shape[1:3]
    scale = float(max(height, width))
    coeffs = _homographies(startpoints, endpoints, scale)[:, :, None, None]
    y, x = jnp.meshgrid((jnp.arange(height) + 0.5) / scale, (jnp.arange(width) + 0.5) / scale,
                        indexing="ij")
    a, b, c, d, e, f, g, h = (coeffs[:, i] for i in range(8))
    denominator = g * x + h * y + 1.0
    source_x = scale * (a * x + b * y + c) / denominator
    source_y = scale * (d * x + e * y + f) / denominator
    return _sample_bilinear(images, source_x, source_y)


def _resize_taps(start: jax.Array, length: jax.Array, out_size: int):
    """torch's bilinear taps (align_corners=False, no antialias) from `length` source pixels
    at `start` ([B] each) to `out_size`: (i0, i1) int [B, out], weight of i1 float [B, out]."""
    ratio = length.astype(jnp.float32)[:, None] / out_size
    source = jnp.maximum(ratio * (jnp.arange(out_size, dtype=jnp.float32) + 0.5) - 0.5, 0.0)
    i0 = source.astype(jnp.int32)
    i1 = jnp.minimum(i0 + 1, length[:, None] - 1)
    return start[:, None] + i0, start[:, None] + i1, source - i0


def resized_crop(images: jax.Array, top: jax.Array, left: jax.Array, height: jax.Array,
                 width: jax.Array) -> jax.Array:
    """Crops [top, top + height) x [left, left + width) (int [B] each, inside the image) and
    resizes it back to the input size with torch's bilinear rule (align_corners=False, no
    antialias): torchvision's `resized_crop(..., antialias=False)` on tensors. Crops are never
    larger than the image, so this only upsamples, where PIL's bilinear filter agrees."""
    out_h, out_w = images.shape[1:3]
    asint = functools.partial(jnp.asarray, dtype=jnp.int32)
    r0, r1, wr = _resize_taps(asint(top), asint(height), out_h)
    c0, c1, wc = _resize_taps(asint(left), asint(width), out_w)
    wr, wc = wr[:, :, None, None], wc[:, None, :, None]
    x = (1 - wr) * _take(images, r0, axis=1) + wr * _take(images, r1, axis=1)
    return (1 - wc) * _take(x, c0, axis=2) + wc * _take(x, c1, axis=2)


def _take(images: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """Per-image rows (axis 1) or columns (axis 2) of [B, H, W, C]; index int [B, n]."""
    shape = [index.shape[0], 1, 1, 1]
    shape[axis] = index.shape[1]
    return jnp.take_along_axis(images, index.reshape(shape), axis=axis)


def rotate(images: jax.Array, angles: jax.Array) -> jax.Array:
    """Counter-clockwise rotation by angles [B] (degrees) about the image centre, nearest
    interpolation, fill 0: torchvision's `rotate(img, angle, NEAREST)` on tensors, including
    its round-half-to-even choice of the nearest pixel. Exact half-pixel ties (90 degrees when
    H and W have different parities) are broken by float noise, differently on each side.

    Not dm-pix's `rotate`: it interpolates the image as a 3-D volume (one gather per channel
    value, with 3-D coordinates) and rounds halves away from zero; this is 4x faster on CPU.
    """
    height, width = images.shape[1:3]
    radians = jnp.deg2rad(jnp.asarray(angles, jnp.float32))[:, None, None]
    cos, sin = jnp.cos(radians), jnp.sin(radians)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    y, x = jnp.meshgrid(jnp.arange(height) - cy, jnp.arange(width) - cx, indexing="ij")
    cols = jnp.round(cos * x - sin * y + cx).astype(jnp.int32)
    rows = jnp.round(sin * x + cos * y + cy).astype(jnp.int32)
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    pixels = _gather_pixels(images, jnp.clip(rows, 0, height - 1), jnp.clip(cols, 0, width - 1))
    return jnp.where(inside[..., None], pixels, 0.0)


# Parameter draws: torchvision's algorithms, one independent draw per image.


def jitter_range(option: str, strength: float) -> tuple[float, float]:
    """ColorJitter's factor range for one option: [max(0, 1 - s), 1 + s], hue [-s, s]."""
    if option == "hue":
        return -strength, strength
    return max(0.0, 1.0 - strength), 1.0 + strength


def sample_factors(key: jax.Array, batch: int, low: float, high: float) -> jax.Array:
    """ColorJitter's factor draw: U[low, high), float32 [B]."""
    return jax.random.uniform(key, (batch,), minval=low, maxval=high)


def sample_perspective(key: jax.Array, batch: int, height: int, width: int,
                       distortion_scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """RandomPerspective's draw: each corner moves inwards by an integer offset uniform in
    [0, int(distortion_scale * (W // 2))] along x and [0, int(distortion_scale * (H // 2))]
    along y; the warp is applied with probability 0.5.

    Returns:
      startpoints, endpoints: int32 [B, 4, 2] (x, y), corners in the order top-left,
        top-right, bottom-right, bottom-left; apply: bool [B].
    """
    offset_key, apply_key = jax.random.split(key)
    max_dx, max_dy = int(distortion_scale * (width // 2)), int(distortion_scale * (height // 2))
    offsets = jax.random.randint(offset_key, (batch, 4, 2), 0, jnp.array([max_dx + 1, max_dy + 1]))
    corners = jnp.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]])
    inwards = jnp.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    startpoints = jnp.broadcast_to(corners, (batch, 4, 2)).astype(jnp.int32)
    endpoints = (corners + inwards * offsets).astype(jnp.int32)
    return startpoints, endpoints, jax.random.uniform(apply_key, (batch,)) < _PERSPECTIVE_P


def _crop_fallback(height: int, width: int) -> tuple[int, int, int, int]:
    """RandomResizedCrop's central fallback (top, left, height, width): the ratio is clamped."""
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        h, w = round(width / RATIO[0]), width
    elif in_ratio > RATIO[1]:
        h, w = height, round(height * RATIO[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def sample_resized_crop(key: jax.Array, batch: int, height: int, width: int,
                        scale: tuple[float, float]) -> tuple[jax.Array, ...]:
    """RandomResizedCrop's draw: 10 tries of (area fraction ~ U[scale], log aspect ratio ~
    U[log 3/4, log 4/3]) rounded to integer sizes; the first that fits is placed uniformly,
    else the central fallback.

    Returns:
      top, left, crop height, crop width: int32 [B] each.
    """
    area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
    shape = (batch, _CROP_TRIES)
    area = height * width * jax.random.uniform(area_key, shape, minval=scale[0], maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(ratio_key, shape, minval=math.log(RATIO[0]),
                                        maxval=math.log(RATIO[1])))
    w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = jnp.argmax(fits, axis=1)[:, None]
    found = fits.any(axis=1)
    top0, left0, h0, w0 = _crop_fallback(height, width)
    h = jnp.where(found, jnp.take_along_axis(h, first, axis=1)[:, 0], h0)
    w = jnp.where(found, jnp.take_along_axis(w, first, axis=1)[:, 0], w0)
    top = jnp.where(found, jax.random.randint(top_key, (batch,), 0, height - h + 1), top0)
    left = jnp.where(found, jax.random.randint(left_key, (batch,), 0, width - w + 1), left0)
    return top, left, h, w


def sample_rotation(key: jax.Array, batch: int, degrees: float) -> jax.Array:
    """RandomRotation's angle: U[-degrees, degrees], float32 [B]."""
    return jax.random.uniform(key, (batch,), minval=-degrees, maxval=degrees)


# The query transform.


def sample_query_params(key: jax.Array, batch: int, height: int, width: int,
                        config: AugmentConfig) -> dict[str, tuple[jax.Array, ...]]:
    """Per-image parameters of every enabled op: {op in `_OPS`: the arguments its function takes
    after the images}, e.g. {"hue": (factors [B],), "crop": (top, left, height, width)}."""
    keys = dict(zip(_OPS, jax.random.split(key, len(_OPS))))
    params = {}
    for op in ("brightness", "contrast", "saturation", "hue"):
        strength = getattr(config, op)
        if strength > 0:
            params[op] = (sample_factors(keys[op], batch, *jitter_range(op, strength)),)
    if config.rand_perspective > 0:
        params["perspective"] = sample_perspective(keys["perspective"], batch, height, width,
                                                   config.rand_perspective)
    if _crop_enabled(config, height, width):
        params["crop"] = sample_resized_crop(keys["crop"], batch, height, width,
                                             (1.0 - config.random_resized_crop, 1.0))
    if config.random_rotation > 0:
        params["rotation"] = (sample_rotation(keys["rotation"], batch, config.random_rotation),)
    return params


def _apply_perspective(images, startpoints, endpoints, apply):
    """Warps the images where apply [B] is True (RandomPerspective's p)."""
    warped = perspective(images, startpoints, endpoints)
    return jnp.where(apply[:, None, None, None], warped, images)


_APPLY = {"brightness": adjust_brightness, "contrast": adjust_contrast,
          "saturation": adjust_saturation, "hue": adjust_hue, "perspective": _apply_perspective,
          "crop": resized_crop, "rotation": rotate}


def apply_query_params(images: jax.Array, params: dict[str, tuple[jax.Array, ...]]) -> jax.Array:
    """Applies the ops present in `params` in the benchmark's order (`_OPS`)."""
    for op in _OPS:
        if op in params:
            images = _APPLY[op](images, *params[op])
    return images


@functools.partial(jax.jit, static_argnames="config")
def augment_queries(images: jax.Array, key: jax.Array, config: AugmentConfig) -> jax.Array:
    """The benchmark's query transform (everything but the batch flip).

    Args:
      images: float32 [B, H, W, 3] in [0, 1] (not normalized yet).
      key: a JAX PRNG key; each image gets its own parameters.
      config: static.

    Returns:
      float32 [B, H, W, 3] in [0, 1].
    """
    batch, height, width = images.shape[:3]
    params = sample_query_params(key, batch, height, width, config)
    return apply_query_params(images, params)


@functools.partial(jax.jit, static_argnames="enabled")
def flip_batch(images: jax.Array, key: jax.Array, enabled: bool) -> jax.Array:
    """`--horizontal_flip`: flips all images [N, H, W, C] left-right or none, with p = 0.5."""
    if not enabled:
        return images
    return dm_pix.random_flip_left_right(key, images, probability=_FLIP_P)


# CosPlace's batch augmentation (reference §5.5): ColorJitter with all four options, where each
# image gets its own factors AND its own random order of the four ops (torchvision draws a
# permutation per call), then RandomResizedCrop back to the input size.

_COLOR_OPS = ("brightness", "contrast", "saturation", "hue")


def color_jitter_in_order(images: jax.Array, factors: dict[str, jax.Array], orders: jax.Array) -> jax.Array:
    """Applies the four colour ops to each image in its own order.

    Args:
      images: float32 [B, H, W, 3] in [0, 1].
      factors: {op: float32 [B]} for every op of _COLOR_OPS.
      orders: int [B, 4]; orders[b] is a permutation of range(4) indexing _COLOR_OPS.
    """
    rows = jnp.arange(images.shape[0])
    for position in range(len(_COLOR_OPS)):
        candidates = jnp.stack([_APPLY[op](images, factors[op]) for op in _COLOR_OPS])
        images = candidates[orders[:, position], rows]
    return images


@functools.partial(jax.jit, static_argnames=("brightness", "contrast", "saturation", "hue",
                                             "random_resized_crop"))
def cosplace_augment(images: jax.Array, key: jax.Array, *, brightness: float = 0.7,
                     contrast: float = 0.7, saturation: float = 0.7, hue: float = 0.5,
                     random_resized_crop: float = 0.5) -> jax.Array:
    """CosPlace's training augmentation of a batch: float32 [B, H, W, 3] in [0, 1] -> same shape.

    Deliberate difference: the crop is resized without antialiasing, as CosPlace's code at the
    paper's time did (later versions pass antialias=True).
    """
    batch, height, width = images.shape[:3]
    factor_keys = jax.random.split(key, len(_COLOR_OPS) + 2)
    strengths = dict(zip(_COLOR_OPS, (brightness, contrast, saturation, hue)))
    factors = {op: sample_factors(k, batch, *jitter_range(op, strengths[op]))
               for op, k in zip(_COLOR_OPS, factor_keys)}
    orders = jax.vmap(lambda k: jax.random.permutation(k, len(_COLOR_OPS)))(
        jax.random.split(factor_keys[-2], batch))
    images = color_jitter_in_order(images, factors, orders)
    crop = sample_resized_crop(factor_keys[-1], batch, height, width, (1.0 - random_resized_crop, 1.0))
    return resized_crop(images, *crop)


# ImageNet normalization, every network's input (reference §1.1).

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: jax.Array) -> jax.Array:
    """float32 RGB in [0, 1] [..., 3] -> ImageNet-normalized float32."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (images - mean) / std


def normalize_uint8(images: jax.Array) -> jax.Array:
    """uint8 RGB [..., 3] -> ImageNet-normalized float32, as (x - 255 mean) / (255 std)."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
    return (images.astype(jnp.float32) - mean) / std

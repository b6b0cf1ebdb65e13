"""Aggregation layers of the benchmark: local features -> one global descriptor (reference §2.2,
§2.3, §2.5).

Inputs are channels-last feature maps [B, H, W, C] from CNN backbones or, for the layers the
benchmark allows after CCT/ViT (gem, netvlad), tokens [B, T, C]. Every layer returns [B, D].
The `--l2` placement wrapper, the optional FC and the cls/seqpool token selection belong to the
full network, not here: a layer normalizes only where the benchmark's layer itself does (RRM
ends with L2; NetVLAD and CRN normalize the local descriptors, each cluster and the output).

Mixed precision (dtype=bfloat16): only the matmuls and convolutions with learned weights (RRM's
two Dense layers, CRN's three context filters) compute in `dtype`. Everything numerically
sensitive stays in float32: GeM's clamp/pow/mean, averages, every L2 norm, LayerNorm
statistics, the CRN mask's channel sum and upsampling, and the whole NetVLAD core (soft
assignment, softmax, residual aggregation). The two NetVLAD matmuls are cheap next to any
backbone, so they run in float32 at HIGHEST precision on every device (no TF32/bf16 passes):
the assignment logits are alpha * cosine with alpha in the tens, where bf16 rounding would
visibly change the softmax, and V[k] cancels a large sum against c_k * sum(a). Outputs are cast
to `dtype`.

Weight import: `import_torch(reader, prefix, aggregation, channels, clusters)` reads one
aggregation's tensors under the benchmark's names relative to the aggregation module (prefix
"aggregation." for netvlad/crn/rrm, "aggregation.1." for gem under l2=before_pool, see §2.8);
`export_torch` writes them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vgjax.models.convert import (StateDictReader, WeightImportError, conv, dense, layer_norm, torch_conv,
                                  torch_dense, torch_layer_norm)

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """torch `F.normalize(x, p=2, dim=axis)`: x / max(||x||, eps), computed in float32."""
    x = x.astype(_F32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def _local_descriptors(x: jax.Array, layer: str) -> jax.Array:
    """Maps [B, H, W, C] or tokens [B, T, C] -> local descriptors [B, N, C]."""
    if x.ndim == 4:
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if x.ndim == 3:
        return x
    raise ValueError(f"{layer}: expected feature maps [B, H, W, C] or tokens [B, T, C], "
                     f"got shape {x.shape}")


def _require_maps(x: jax.Array, layer: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{layer}: expected CNN feature maps [B, H, W, C], got shape {x.shape} "
                         "(after token backbones the benchmark allows only gem and netvlad)")


def _torch_default_uniform(fan_in: int):
    """torch's default Linear/Conv init of weights and biases: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=_F32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


# ------------------------------------------------------------------------------ global poolings

class GeM(nn.Module):
    """Generalized mean pooling with a learnable exponent p (init 3.0, param shape (1,)).

    [B, H, W, C] or [B, T, C] -> [B, C]: (mean over positions of max(x, eps)^p)^(1/p).
    """
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _local_descriptors(x, "GeM").astype(_F32)
        p = self.param("p", nn.initializers.constant(3.0), (1,), self.param_dtype).astype(_F32)
        pooled = jnp.mean(jnp.maximum(x, self.eps) ** p, axis=1)
        return (pooled ** (1.0 / p)).astype(self.dtype)


class SPoC(nn.Module):
    """Sum (average) pooling: [B, H, W, C] -> [B, C] spatial mean."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _require_maps(x, "SPoC")
        return jnp.mean(x.astype(_F32), axis=(1, 2)).astype(self.dtype)


class MAC(nn.Module):
    """Maximum activation of convolutions: [B, H, W, C] -> [B, C] spatial max."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _require_maps(x, "MAC")
        return jnp.max(x, axis=(1, 2)).astype(self.dtype)


_RMAC_OVERLAP = np.float32(0.4)
_RMAC_STEPS = np.arange(2, 8, dtype=np.float32)


def rmac_regions(height: int, width: int, levels: int = 3) -> list[tuple[int, int, int]]:
    """R-MAC's square regions (top, left, size) on a height x width map, global one excluded.

    Radenovic's cirtorch geometry: the number of extra regions along the long side comes from
    the steps 2..7 whose overlap is closest to 0.4, computed in float32 like torch; the
    region starts are float32 values floored. 30x40 -> 2 + 6 + 12 = 20 regions of sizes
    30/20/15.
    """
    w = min(height, width)
    b = np.float32(max(height, width) - w) / (_RMAC_STEPS - 1)
    overlap = (np.float32(w * w) - np.float32(w) * b) / np.float32(w * w)
    idx = int(np.argmin(np.abs(overlap - _RMAC_OVERLAP)))
    extra_w = idx + 1 if height < width else 0
    extra_h = idx + 1 if height > width else 0
    regions = []
    for level in range(1, levels + 1):
        size = math.floor(2 * w / (level + 1))
        if size == 0:
            continue
        tops = _region_starts(height, size, level + extra_h)
        lefts = _region_starts(width, size, level + extra_w)
        regions += [(top, left, size) for top in tops for left in lefts]
    return regions


def _region_starts(length: int, size: int, count: int) -> list[int]:
    """`count` region starts spread over `length`, as cirtorch floors float32 centres."""
    half = math.floor(size / 2 - 1)
    step = 0.0 if count == 1 else (length - size) / (count - 1)
    centres = np.floor(np.float32(half) + np.arange(count, dtype=np.float32) * np.float32(step))
    return [int(c) - half for c in centres]


class RMAC(nn.Module):
    """Regional MAC (cirtorch): global max-pool plus the max-pool of every `rmac_regions`
    region, each divided by (||v|| + eps), summed. [B, H, W, C] -> [B, C], not normalized.
    Regions are static given (H, W) and computed in Python at trace time."""
    L: int = 3
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _require_maps(x, "RMAC")
        v = self._unit_max(x)
        for top, left, size in rmac_regions(x.shape[1], x.shape[2], self.L):
            v = v + self._unit_max(x[:, top:top + size, left:left + size])
        return v.astype(self.dtype)

    def _unit_max(self, x: jax.Array) -> jax.Array:
        v = jnp.max(x, axis=(1, 2)).astype(_F32)
        return v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + self.eps)


class RRM(nn.Module):
    """Residual retrieval module: average pool -> LayerNorm (ln1) -> x + fc2(relu(fc1(x))) ->
    LayerNorm (ln2) -> L2. [B, H, W, C] -> [B, C] with unit norm. LN eps 1e-5; fc C -> C with
    bias, initialised like torch's Linear."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _require_maps(x, "RRM")
        channels = x.shape[-1]
        x = self._layer_norm("ln1")(jnp.mean(x.astype(_F32), axis=(1, 2)))
        y = nn.relu(self._dense(channels, "fc1")(x))
        x = self._layer_norm("ln2")(x + self._dense(channels, "fc2")(y))
        return l2_normalize(x).astype(self.dtype)

    def _layer_norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)

    def _dense(self, channels: int, name: str) -> nn.Dense:
        init = _torch_default_uniform(channels)
        return nn.Dense(channels, kernel_init=init, bias_init=init, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)


# ------------------------------------------------------------------------------ NetVLAD and CRN

def _vlad_params(module: nn.Module, channels: int) -> tuple[jax.Array, jax.Array]:
    """Declares NetVLAD's params on `module`: `centroids` [K, C], initialised U[0, 1) like
    torch.rand, and `assignment_kernel` [C, K] (the bias-free 1x1 conv, usable on maps and
    tokens), initialised U(+-1/sqrt(C)) like a fresh torch conv; both are meant to be replaced
    by `netvlad_init.init_params` or a checkpoint."""
    centroids = module.param("centroids", nn.initializers.uniform(1.0),
                             (module.clusters, channels), module.param_dtype)
    kernel = module.param("assignment_kernel", _torch_default_uniform(channels),
                          (channels, module.clusters), module.param_dtype)
    return centroids.astype(_F32), kernel.astype(_F32)


def _soft_assignment(descriptors: jax.Array, kernel: jax.Array) -> jax.Array:
    """Unit descriptors [B, N, C] -> softmax over clusters of the 1x1 conv, [B, N, K]."""
    logits = jnp.einsum("bnc,ck->bnk", descriptors, kernel, precision=_HIGHEST)
    return jax.nn.softmax(logits, axis=-1)


def _vlad(descriptors: jax.Array, assignment: jax.Array, centroids: jax.Array) -> jax.Array:
    """V[k] = sum_i a_k(x_i) (x_i - c_k) -> intra L2 -> cluster-major flatten -> L2, [B, K*C]."""
    weighted = jnp.einsum("bnk,bnc->bkc", assignment, descriptors, precision=_HIGHEST)
    vlad = weighted - assignment.sum(axis=1)[:, :, None] * centroids[None]
    vlad = l2_normalize(vlad, axis=-1)
    return l2_normalize(vlad.reshape(vlad.shape[0], -1))


class NetVLAD(nn.Module):
    """NetVLAD (reference §2.3): [B, H, W, C] or [B, T, C] -> [B, clusters * C], unit norm.

    Local descriptors are L2-normalized over channels, softly assigned with softmax over clusters
    of a bias-free 1x1 conv (`assignment_kernel` [C, K]), and their residuals to the raw
    `centroids` [K, C] summed per cluster; then intra-normalization, flatten at index k * C + c,
    global L2. Computed in float32 whatever `dtype` is (see the module docstring).
    """
    clusters: int = 64
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        descriptors = l2_normalize(_local_descriptors(x, "NetVLAD"))
        centroids, kernel = _vlad_params(self, descriptors.shape[-1])
        assignment = _soft_assignment(descriptors, kernel)
        return _vlad(descriptors, assignment, centroids).astype(self.dtype)


def _ceil_pool_size(length: int, window: int = 3, stride: int = 2) -> int:
    """Output length of torch's pooling with padding 0 and ceil_mode=True: the last window may
    overhang the end but must start inside the input."""
    size = -(-(length - window) // stride) + 1
    return size - 1 if (size - 1) * stride >= length else size


def _avg_pool_3x3_s2_ceil(x: jax.Array) -> jax.Array:
    """torch AvgPool2d(3, stride=2, padding=0, ceil_mode=True) on [B, H, W, C]. With padding 0
    torch divides an overhanging window by its in-bounds element count."""
    height, width = x.shape[1:3]
    out_h, out_w = _ceil_pool_size(height), _ceil_pool_size(width)
    pad = ((0, 0), (0, 2 * out_h + 1 - height), (0, 2 * out_w + 1 - width), (0, 0))
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 2, 2, 1), pad)
    rows = np.minimum(3, height - 2 * np.arange(out_h))
    cols = np.minimum(3, width - 2 * np.arange(out_w))
    counts = np.outer(rows, cols).astype(np.float32)
    return sums / counts[None, :, :, None]


def _bilinear_x2_taps(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weight of torch's bilinear x2 upsampling (align_corners=False):
    src = max((dst + 0.5) / 2 - 0.5, 0), between floor(src) and min(floor(src) + 1, n - 1)."""
    src = np.maximum((np.arange(2 * length) + 0.5) * 0.5 - 0.5, 0.0)
    lower = src.astype(np.int64)
    upper = np.minimum(lower + 1, length - 1)
    return lower, upper, (src - lower).astype(np.float32)


def _upsample_bilinear_x2(mask: jax.Array) -> jax.Array:
    """torch `F.interpolate(scale_factor=2, mode='bilinear', align_corners=False)` on [B, h, w]."""
    lower, upper, frac = _bilinear_x2_taps(mask.shape[1])
    mask = mask[:, lower] * (1 - frac)[None, :, None] + mask[:, upper] * frac[None, :, None]
    lower, upper, frac = _bilinear_x2_taps(mask.shape[2])
    return mask[:, :, lower] * (1 - frac) + mask[:, :, upper] * frac


_CRN_FILTERS = ((3, 32), (5, 32), (7, 20))


class CRNModule(nn.Module):
    """CRN's context mask (reference §2.5): [B, H, W, C] -> [B, H, W], non-negative.

    AvgPool(3, stride 2, ceil_mode) -> 3x3/5x5/7x7 convs (32/32/20 channels, "same" padding,
    bias; xavier-normal weights, zero bias) -> concat 84 -> ReLU -> `acc_w` -> ReLU -> bilinear
    x2 upsampling. The benchmark's acc_w is a 1x1 conv 84 -> 1 with weight 1 and bias 0 that it
    never trains; here it is that constant (a channel sum), not a parameter, so no optimizer or
    mask can ever change it (`import_torch` checks a checkpoint holds exactly 1 and 0).
    """
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        height, width = x.shape[1:3]
        out_h, out_w = _ceil_pool_size(height), _ceil_pool_size(width)
        if out_h < 1 or out_w < 1 or (2 * out_h, 2 * out_w) != (height, width):
            raise ValueError(
                f"CRN: a {height}x{width} feature map gives a {2 * out_h}x{2 * out_w} context "
                "mask (AvgPool 3/2 with ceil_mode, then x2 upsampling); CRN needs even H and W, "
                "e.g. a conv4 or VGG16 map at 480x640 (30x40), not a conv5 one (15x20)")
        pooled = _avg_pool_3x3_s2_ceil(x.astype(_F32))
        context = jnp.concatenate([self._filter(k, n)(pooled) for k, n in _CRN_FILTERS], axis=-1)
        # acc_w then ReLU: a channel sum of ReLU outputs, already non-negative
        mask = jnp.sum(nn.relu(context.astype(_F32)), axis=-1)
        return _upsample_bilinear_x2(mask)

    def _filter(self, size: int, features: int) -> nn.Conv:
        return nn.Conv(features, (size, size), padding=[(size // 2, size // 2)] * 2,
                       kernel_init=nn.initializers.variance_scaling(1.0, "fan_avg", "normal"),
                       bias_init=nn.initializers.zeros, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=f"filter_{size}_{size}")


class CRN(nn.Module):
    """Contextual Reweighting Network (reference §2.5): NetVLAD on [B, H, W, C] (H and W even)
    whose soft assignment is multiplied by the `crn` context mask computed from the normalized
    map. -> [B, clusters * C], unit norm. Params: NetVLAD's plus `crn` (the sub-tree the
    benchmark trains with its own learning rate)."""
    clusters: int = 64
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _require_maps(x, "CRN")
        batch, height, width, channels = x.shape
        x = l2_normalize(x)
        mask = CRNModule(dtype=self.dtype, param_dtype=self.param_dtype, name="crn")(x)
        descriptors = x.reshape(batch, height * width, channels)
        centroids, kernel = _vlad_params(self, channels)
        assignment = _soft_assignment(descriptors, kernel) * mask.reshape(batch, -1, 1)
        return _vlad(descriptors, assignment, centroids).astype(self.dtype)


# ------------------------------------------------------------------------------ GSV-Cities family

def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch AdaptiveAvgPool2d on [B, H, W, C] -> [B, s1, s2, C]: output cell (i, j) averages
    rows floor(i H / s1) .. ceil((i + 1) H / s1) - 1 and the same for columns."""
    def bins(length: int, count: int) -> list[tuple[int, int]]:
        return [(i * length // count, -(-(i + 1) * length // count)) for i in range(count)]

    rows = [jnp.stack([jnp.mean(x[:, r0:r1, c0:c1], axis=(1, 2)) for c0, c1 in bins(x.shape[2], size[1])], axis=1)
            for r0, r1 in bins(x.shape[1], size[0])]
    return jnp.stack(rows, axis=1)


class ConvAP(nn.Module):
    """Conv-AP (GSV-Cities): 1x1 convolution C -> out_channels (with bias, torch's default init),
    adaptive average pooling to `pool` (s1, s2), flattened in torch's (channel, row, column)
    order, L2. [B, H, W, C] -> [B, out_channels * s1 * s2] with unit norm."""
    out_channels: int = 512
    pool: tuple[int, int] = (2, 2)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _require_maps(x, "Conv-AP")
        init = _torch_default_uniform(x.shape[-1])
        y = nn.Conv(self.out_channels, (1, 1), kernel_init=init, bias_init=init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="channel_pool")(x)
        pooled = adaptive_avg_pool(y.astype(_F32), tuple(self.pool))  # [B, s1, s2, out]
        return l2_normalize(pooled.transpose(0, 3, 1, 2).reshape(len(x), -1)).astype(self.dtype)


class FeatureMixer(nn.Module):
    """One MixVPR Feature-Mixer block over the flattened positions: x + MLP(LayerNorm(x)), the
    MLP HW -> HW * mlp_ratio -> HW with ReLU; Linear weights ~ N(0, 0.02), biases 0 (as
    MixVPR initialises them). [B, C, HW] -> [B, C, HW]."""
    mlp_ratio: float = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        positions = x.shape[-1]
        dense = functools.partial(nn.Dense, kernel_init=nn.initializers.normal(0.02), bias_init=nn.initializers.zeros,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        y = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=_F32, param_dtype=self.param_dtype,
                         name="norm")(x.astype(_F32))
        y = dense(int(positions * self.mlp_ratio), name="fc1")(y)
        y = dense(positions, name="fc2")(nn.relu(y))
        return x.astype(_F32) + y.astype(_F32)


class MixVPR(nn.Module):
    """MixVPR (Ali-bey et al., WACV 2023): the map flattened to [B, C, HW], `mix_depth`
    Feature-Mixer blocks, a channel projection C -> out_channels and a row projection
    HW -> out_rows (torch's default Linear init), flattened (channel-major) and L2.
    [B, H, W, C] -> [B, out_channels * out_rows] with unit norm. The parameters depend on H*W,
    so a network is built for one input size."""
    out_channels: int = 1024
    out_rows: int = 4
    mix_depth: int = 4
    mlp_ratio: float = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _require_maps(x, "MixVPR")
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height * width, channels).transpose(0, 2, 1)  # [B, C, HW], HW row-major
        for k in range(self.mix_depth):
            x = FeatureMixer(self.mlp_ratio, dtype=self.dtype, param_dtype=self.param_dtype, name=f"mix_{k}")(x)
        x = self._dense(self.out_channels, channels, "channel_proj")(x.transpose(0, 2, 1))  # [B, HW, out]
        x = self._dense(self.out_rows, height * width, "row_proj")(x.transpose(0, 2, 1))  # [B, out, rows]
        return l2_normalize(x.reshape(batch, -1)).astype(self.dtype)

    def _dense(self, features: int, fan_in: int, name: str) -> nn.Dense:
        init = _torch_default_uniform(fan_in)
        return nn.Dense(features, kernel_init=init, bias_init=init, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name)


# ------------------------------------------------------------------------------ SALAD (DINOv2)

def log_optimal_transport(scores: jax.Array, dustbin: jax.Array, iterations: int = 3) -> jax.Array:
    """SALAD's Sinkhorn in log space (after OpenGlue): scores [B, m, n] (m clusters, n local
    features) and a dustbin row of value `dustbin` -> log transport plan [B, m + 1, n] plus
    log(n + m). Source marginals 1/(n + m) per cluster and (n - m)/(n + m) for the dustbin,
    target 1/(n + m) per feature; regularisation 1."""
    batch, clusters, features = scores.shape
    if features <= clusters:
        raise ValueError(f"SALAD needs more local features than clusters (its dustbin weighs n - m), got "
                         f"{features} features for {clusters} clusters: use a larger input")
    scores = jnp.concatenate([scores, jnp.broadcast_to(dustbin.astype(scores.dtype), (batch, 1, features))], axis=1)
    norm = -math.log(features + clusters)
    log_a = jnp.full((clusters + 1,), norm, scores.dtype).at[-1].add(math.log(features - clusters))
    log_b = jnp.full((features,), norm, scores.dtype)
    u, v = jnp.zeros((batch, clusters + 1), scores.dtype), jnp.zeros((batch, features), scores.dtype)
    for _ in range(iterations):
        u = log_a - jax.nn.logsumexp(scores + v[:, None, :], axis=2)
        v = log_b - jax.nn.logsumexp(scores + u[:, :, None], axis=1)
    return scores + u[:, :, None] + v[:, None, :] - norm


class SALAD(nn.Module):
    """SALAD (Izquierdo & Civera, CVPR 2024): from DINOv2's patch map [B, h, w, C] and CLS token
    [B, C]: a score MLP (C -> 512 -> ReLU -> clusters) and a feature MLP (C -> 512 -> ReLU ->
    cluster_dim) per patch (1x1 convolutions, dropout after the first layer), the scores turned
    into an assignment by `log_optimal_transport` with a learned dustbin (the dustbin row is
    dropped), features summed per cluster and L2-normalised over cluster_dim, flattened
    (feature-major) after the CLS token's MLP (C -> 512 -> ReLU -> token_dim) L2-normalised;
    the whole L2-normalised. -> [B, token_dim + clusters * cluster_dim]. The Sinkhorn and the
    norms run in float32."""
    clusters: int = 64
    cluster_dim: int = 128
    token_dim: int = 256
    dropout: float = 0.3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: tuple[jax.Array, jax.Array], train: bool = False) -> jax.Array:
        if not isinstance(x, tuple):
            raise ValueError("SALAD takes (patch map, CLS token): use it after a DINOv2 backbone")
        maps, token = x
        batch, height, width, channels = maps.shape
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        local = maps.reshape(batch, height * width, channels)

        def mlp(name: str, features: int) -> jax.Array:  # [B, n, features]
            hidden = dense(512, name=f"{name}_1")(local)
            hidden = nn.Dropout(self.dropout, deterministic=not train)(hidden)
            return dense(features, name=f"{name}_2")(nn.relu(hidden))

        features = mlp("cluster_features", self.cluster_dim).astype(_F32)  # [B, n, l]
        scores = mlp("score", self.clusters).astype(_F32).transpose(0, 2, 1)  # [B, m, n]
        dustbin = self.param("dust_bin", nn.initializers.constant(1.0), (), self.param_dtype)
        assignment = jnp.exp(log_optimal_transport(scores, dustbin.astype(_F32)))[:, :-1]  # [B, m, n]
        clustered = jnp.einsum("bnl,bmn->blm", features, assignment, precision=_HIGHEST)
        token = dense(self.token_dim, name="token_features_2")(nn.relu(dense(512, name="token_features_1")(token)))
        descriptor = jnp.concatenate([l2_normalize(token), l2_normalize(clustered, axis=1).reshape(batch, -1)], axis=-1)
        return l2_normalize(descriptor).astype(self.dtype)


def _import_salad(reader: StateDictReader, prefix: str, channels: int, module: SALAD) -> dict:
    def conv1x1(name: str, n_in: int, n_out: int) -> dict:
        return {"kernel": reader.take(f"{name}.weight", (n_out, n_in, 1, 1)).reshape(n_out, n_in).T,
                "bias": reader.take(f"{name}.bias", (n_out,))}

    return {"cluster_features_1": conv1x1(prefix + "cluster_features.0", channels, 512),
            "cluster_features_2": conv1x1(prefix + "cluster_features.3", 512, module.cluster_dim),
            "score_1": conv1x1(prefix + "score.0", channels, 512),
            "score_2": conv1x1(prefix + "score.3", 512, module.clusters),
            "token_features_1": dense(reader, prefix + "token_features.0", channels, 512),
            "token_features_2": dense(reader, prefix + "token_features.2", 512, module.token_dim),
            "dust_bin": reader.take(prefix + "dust_bin", ())}


def _export_salad(params: dict, prefix: str) -> dict:
    def conv1x1(values: dict, name: str) -> dict:
        kernel = np.asarray(values["kernel"], np.float32)
        return {f"{name}.weight": kernel.T[:, :, None, None], f"{name}.bias": np.asarray(values["bias"], np.float32)}

    return {**conv1x1(params["cluster_features_1"], prefix + "cluster_features.0"),
            **conv1x1(params["cluster_features_2"], prefix + "cluster_features.3"),
            **conv1x1(params["score_1"], prefix + "score.0"), **conv1x1(params["score_2"], prefix + "score.3"),
            **torch_dense(params["token_features_1"], prefix + "token_features.0"),
            **torch_dense(params["token_features_2"], prefix + "token_features.2"),
            prefix + "dust_bin": np.asarray(params["dust_bin"], np.float32)}


# ------------------------------------------------------------------------------ BoQ

class TorchMultiheadAttention(nn.Module):
    """torch's nn.MultiheadAttention (batch_first, biases, no dropout): q, k, v from one input
    projection `in_proj` [d, 3d] (thirds: q, k, v), `heads` heads of d / heads, softmax in
    float32, output projection. (query [B, Tq, d], key/value [B, Tk, d]) -> [B, Tq, d]."""
    width: int
    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
        width, head_dim = self.width, self.width // self.heads
        kernel = self.param("in_proj_kernel", nn.initializers.xavier_uniform(), (width, 3 * width), self.param_dtype)
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * width,), self.param_dtype)

        def project(x: jax.Array, third: int) -> jax.Array:
            part = slice(third * width, (third + 1) * width)
            y = jnp.dot(x.astype(self.dtype), kernel[:, part].astype(self.dtype)) + bias[part].astype(self.dtype)
            return y.reshape(*x.shape[:2], self.heads, head_dim)

        attended = nn.dot_product_attention(project(query, 0), project(key, 1), project(value, 2),
                                            deterministic=True, dtype=self.dtype, force_fp32_for_softmax=True)
        return nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="out_proj")(attended.reshape(*query.shape[:2], width))


def _layer_norm(name: str, param_dtype: Any) -> nn.LayerNorm:
    """torch's LayerNorm (eps 1e-5, exact variance), computed in float32."""
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=_F32, param_dtype=param_dtype, name=name)


class BoQBlock(nn.Module):
    """One Bag-of-Queries block: a post-norm torch TransformerEncoderLayer (ReLU FFN of 4d) over
    the features, then `queries` learned queries: q + self-attention, LayerNorm, cross-attention
    to the features, LayerNorm. [B, T, d] -> (features [B, T, d], queries out [B, Q, d])."""
    queries: int
    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        width, kw = x.shape[-1], {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = _TorchEncoderLayer(self.heads, name="encoder", **kw)(x)
        q = self.param("queries", nn.initializers.normal(1.0), (1, self.queries, width), self.param_dtype)
        q = jnp.broadcast_to(q.astype(_F32), (x.shape[0], self.queries, width))
        q = q + TorchMultiheadAttention(width, self.heads, name="self_attn", **kw)(q, q, q).astype(_F32)
        q = _layer_norm("norm_q", self.param_dtype)(q)
        out = TorchMultiheadAttention(width, self.heads, name="cross_attn", **kw)(q, x, x)
        return x, _layer_norm("norm_out", self.param_dtype)(out.astype(_F32))


class _TorchEncoderLayer(nn.Module):
    """torch's nn.TransformerEncoderLayer(d, heads, 4d, dropout 0, batch_first), post-norm."""
    heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width, kw = x.shape[-1], {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = x.astype(_F32)
        x = _layer_norm("norm1", self.param_dtype)(
            x + TorchMultiheadAttention(width, self.heads, name="self_attn", **kw)(x, x, x).astype(_F32))
        hidden = nn.relu(nn.Dense(4 * width, name="linear1", **kw)(x))
        return _layer_norm("norm2", self.param_dtype)(x + nn.Dense(width, name="linear2", **kw)(hidden).astype(_F32))


class BoQ(nn.Module):
    """Bag-of-Queries (Ali-bey et al., CVPR 2024): a 3x3 convolution C -> proj_channels
    (padding 1), the map flattened to [B, hw, d] and LayerNorm-ed, `layers` BoQ blocks (heads of
    64) each giving `queries` outputs, all concatenated [B, layers * queries, d], a Linear
    layers * queries -> row_dim across them, flattened (channel-major) and L2.
    [B, h, w, C] -> [B, proj_channels * row_dim] with unit norm."""
    proj_channels: int = 512
    queries: int = 64
    layers: int = 2
    row_dim: int = 32
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        _require_maps(x, "BoQ")
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = nn.Conv(self.proj_channels, (3, 3), padding=((1, 1), (1, 1)), name="proj_c", **kw)(x)
        x = _layer_norm("norm_input", self.param_dtype)(x.reshape(x.shape[0], -1, self.proj_channels).astype(_F32))
        outs = []
        for index in range(self.layers):
            x, out = BoQBlock(self.queries, self.proj_channels // 64, name=f"boqs_{index}", **kw)(x)
            outs.append(out)
        out = jnp.concatenate(outs, axis=1).transpose(0, 2, 1)  # [B, d, layers * queries]
        out = nn.Dense(self.row_dim, name="fc", **kw)(out)
        return l2_normalize(out.reshape(out.shape[0], -1)).astype(self.dtype)


def _import_torch_mha(reader: StateDictReader, prefix: str, width: int) -> dict:
    return {"in_proj_kernel": reader.take(prefix + "in_proj_weight", (3 * width, width)).T,
            "in_proj_bias": reader.take(prefix + "in_proj_bias", (3 * width,)),
            "out_proj": dense(reader, prefix + "out_proj", width, width)}


def _export_torch_mha(params: dict, prefix: str) -> dict:
    return {prefix + "in_proj_weight": np.asarray(params["in_proj_kernel"], np.float32).T,
            prefix + "in_proj_bias": np.asarray(params["in_proj_bias"], np.float32),
            **torch_dense(params["out_proj"], prefix + "out_proj")}


def _import_boq(reader: StateDictReader, prefix: str, channels: int, module: BoQ) -> dict:
    width = module.proj_channels
    params = {"proj_c": conv(reader, prefix + "proj_c", width, channels, 3),
              "norm_input": layer_norm(reader, prefix + "norm_input", width),
              "fc": dense(reader, prefix + "fc", module.layers * module.queries, module.row_dim)}
    for index in range(module.layers):
        block = f"{prefix}boqs.{index}."
        params[f"boqs_{index}"] = {
            "encoder": {"self_attn": _import_torch_mha(reader, block + "encoder.self_attn.", width),
                        "linear1": dense(reader, block + "encoder.linear1", width, 4 * width),
                        "linear2": dense(reader, block + "encoder.linear2", 4 * width, width),
                        "norm1": layer_norm(reader, block + "encoder.norm1", width),
                        "norm2": layer_norm(reader, block + "encoder.norm2", width)},
            "queries": reader.take(block + "queries", (1, module.queries, width)),
            "self_attn": _import_torch_mha(reader, block + "self_attn.", width),
            "norm_q": layer_norm(reader, block + "norm_q", width),
            "cross_attn": _import_torch_mha(reader, block + "cross_attn.", width),
            "norm_out": layer_norm(reader, block + "norm_out", width)}
    return params


def _export_boq(params: dict, prefix: str) -> dict:
    state = {**torch_conv(params["proj_c"], prefix + "proj_c"), **torch_layer_norm(params["norm_input"], prefix + "norm_input"),
             **torch_dense(params["fc"], prefix + "fc")}
    for index in range(sum(name.startswith("boqs_") for name in params)):
        block, name = params[f"boqs_{index}"], f"{prefix}boqs.{index}."
        encoder = block["encoder"]
        state.update({**_export_torch_mha(encoder["self_attn"], name + "encoder.self_attn."),
                      **torch_dense(encoder["linear1"], name + "encoder.linear1"),
                      **torch_dense(encoder["linear2"], name + "encoder.linear2"),
                      **torch_layer_norm(encoder["norm1"], name + "encoder.norm1"),
                      **torch_layer_norm(encoder["norm2"], name + "encoder.norm2"),
                      name + "queries": np.asarray(block["queries"], np.float32),
                      **_export_torch_mha(block["self_attn"], name + "self_attn."),
                      **torch_layer_norm(block["norm_q"], name + "norm_q"),
                      **_export_torch_mha(block["cross_attn"], name + "cross_attn."),
                      **torch_layer_norm(block["norm_out"], name + "norm_out")})
    return state


# ------------------------------------------------------------------------------ registry, import

AGGREGATIONS = {"gem": GeM, "spoc": SPoC, "mac": MAC, "rmac": RMAC, "rrm": RRM,
                "netvlad": NetVLAD, "crn": CRN, "convap": ConvAP, "mixvpr": MixVPR, "salad": SALAD, "boq": BoQ}
# The model config keys of each GSV-Cities-style aggregation, by module field.
OPTION_KEYS = {"convap": {"out_channels": "convap_out_channels", "pool": "convap_pool"},
               "mixvpr": {"out_channels": "mixvpr_out_channels", "out_rows": "mixvpr_out_rows",
                          "mix_depth": "mixvpr_mix_depth", "mlp_ratio": "mixvpr_mlp_ratio"},
               "salad": {"clusters": "salad_clusters", "cluster_dim": "salad_cluster_dim",
                         "token_dim": "salad_token_dim", "dropout": "salad_dropout"},
               "boq": {"proj_channels": "boq_proj_channels", "queries": "boq_queries", "layers": "boq_layers",
                       "row_dim": "boq_row_dim"}}


def _check_name(aggregation: str) -> str:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation '{aggregation}'; choices: {sorted(AGGREGATIONS)} "
                         "(cls and seqpool come from the CCT/ViT backbones)")
    return aggregation


def options(aggregation: str, model_config: Mapping | None) -> dict:
    """The module fields a GSV-Cities aggregation takes from the model config ({} for others;
    the module's defaults without a config)."""
    keys = OPTION_KEYS.get(aggregation, {})
    if model_config is None:
        return {}
    fields = {field: model_config[key] for field, key in keys.items()}
    if "pool" in fields:
        fields["pool"] = tuple(int(n) for n in fields["pool"])
    return fields


def create(aggregation: str, clusters: int = 64, dtype: Any = jnp.float32,
           param_dtype: Any = jnp.float32, model_config: Mapping | None = None) -> nn.Module:
    """The aggregation module named as in the benchmark's `--aggregation` (or convap, mixvpr,
    with their options from `model_config`)."""
    module = AGGREGATIONS[_check_name(aggregation)]
    if aggregation in ("netvlad", "crn"):
        return module(clusters=clusters, dtype=dtype, param_dtype=param_dtype)
    return module(dtype=dtype, param_dtype=param_dtype, **options(aggregation, model_config))


def output_dim(aggregation: str, channels: int, clusters: int = 64, model_config: Mapping | None = None) -> int:
    """Descriptor size: clusters * channels for netvlad/crn, out_channels * s1 * s2 for convap,
    out_channels * out_rows for mixvpr, channels otherwise."""
    if _check_name(aggregation) in ("netvlad", "crn"):
        return clusters * channels
    if aggregation == "salad":
        module = create(aggregation, model_config=model_config)
        return module.token_dim + module.clusters * module.cluster_dim
    if aggregation == "boq":
        module = create(aggregation, model_config=model_config)
        return module.proj_channels * module.row_dim
    if aggregation in OPTION_KEYS:
        module = create(aggregation, model_config=model_config)
        return module.out_channels * (module.out_rows if aggregation == "mixvpr" else math.prod(module.pool))
    return channels


def import_torch(reader: StateDictReader, prefix: str, aggregation: str, channels: int,
                 clusters: int = 64, model_config: Mapping | None = None) -> dict:
    """Flax variables {"params": ...} of one aggregation from the benchmark's tensors
    `prefix + <key>`: gem `p` [1]; netvlad `centroids` [K, C] and `conv.weight` [K, C, 1, 1]
    (Conv2d, CNN) or [K, C, 1] (Conv1d, tokens); crn adds `crn.filter_{3_3,5_5,7_7}.{weight,
    bias}` and `crn.acc_w.{weight,bias}` (read and checked to be 1 and 0); rrm
    `{ln1,fc1,fc2,ln2}.{weight,bias}`; convap `channel_pool.{weight,bias}` and mixvpr
    `mix.<k>.mix.{0,1,3}`, `channel_proj`, `row_proj` in the GSV-Cities/MixVPR layouts, salad
    `{cluster_features,score}.{0,3}` (1x1 Conv2d), `token_features.{0,2}` and `dust_bin` in
    serizba/salad's, boq `proj_c`, `norm_input`, `boqs.<i>.*` and `fc` in amaralibey/Bag-of-Queries'
    (options from `model_config`). spoc, mac and rmac have no tensors."""
    _check_name(aggregation)
    if aggregation in OPTION_KEYS:
        module = create(aggregation, model_config=model_config)
        importer = {"convap": _import_convap, "mixvpr": _import_mixvpr, "salad": _import_salad,
                    "boq": _import_boq}[aggregation]
        return {"params": importer(reader, prefix, channels, module)}
    if aggregation == "gem":
        return {"params": {"p": reader.take(prefix + "p", (1,))}}
    if aggregation == "rrm":
        return {"params": _import_rrm(reader, prefix, channels)}
    if aggregation in ("netvlad", "crn"):
        params = _import_vlad(reader, prefix, channels, clusters)
        if aggregation == "crn":
            params["crn"] = _import_crn_module(reader, prefix + "crn.", channels)
        return {"params": params}
    return {"params": {}}


def _import_vlad(reader: StateDictReader, prefix: str, channels: int, clusters: int) -> dict:
    weight = reader.take(prefix + "conv.weight")
    if weight.shape not in ((clusters, channels, 1, 1), (clusters, channels, 1)):
        raise WeightImportError(
            f"{reader.source}: tensor '{prefix}conv.weight' has shape {weight.shape}, expected "
            f"{(clusters, channels, 1, 1)} (Conv2d) or {(clusters, channels, 1)} (Conv1d)")
    return {"centroids": reader.take(prefix + "centroids", (clusters, channels)),
            "assignment_kernel": weight.reshape(clusters, channels).T}


def _import_crn_module(reader: StateDictReader, prefix: str, channels: int) -> dict:
    params = {}
    for size, features in _CRN_FILTERS:
        name = f"filter_{size}_{size}"
        params[name] = conv(reader, f"{prefix}{name}", features, channels, size)
    acc_weight = reader.take(prefix + "acc_w.weight", (1, 84, 1, 1))
    acc_bias = reader.take(prefix + "acc_w.bias", (1,))
    if not (np.all(acc_weight == 1) and np.all(acc_bias == 0)):
        raise WeightImportError(f"{reader.source}: '{prefix}acc_w' must be the benchmark's fixed "
                                "weight 1 / bias 0 (vgjax's CRN hard-codes it)")
    return params


def export_torch(variables: dict, prefix: str, aggregation: str, tokens: bool = False) -> dict:
    """The inverse of `import_torch`: one aggregation's {"params"} -> float32 tensors
    `prefix + <key>` in the benchmark's layouts. NetVLAD's `conv.weight` is [K, C, 1, 1]
    (Conv2d), or [K, C, 1] (Conv1d) after a token backbone; CRN's fixed `acc_w` is written as
    the benchmark holds it (weight 1 [1, 84, 1, 1], bias 0)."""
    params = variables.get("params", {})
    if _check_name(aggregation) == "salad":
        return _export_salad(params, prefix)
    if aggregation == "boq":
        return _export_boq(params, prefix)
    if aggregation in OPTION_KEYS:
        return _export_gsv(params, prefix, aggregation)
    if aggregation == "gem":
        return {prefix + "p": np.asarray(params["p"], np.float32)}
    if aggregation == "rrm":
        return {**torch_layer_norm(params["ln1"], prefix + "ln1"),
                **torch_dense(params["fc1"], prefix + "fc1"), **torch_dense(params["fc2"], prefix + "fc2"),
                **torch_layer_norm(params["ln2"], prefix + "ln2")}
    if aggregation not in ("netvlad", "crn"):
        return {}
    kernel = np.asarray(params["assignment_kernel"], np.float32).T  # [K, C]
    state = {prefix + "centroids": np.asarray(params["centroids"], np.float32),
             prefix + "conv.weight": kernel[..., None] if tokens else kernel[..., None, None]}
    if aggregation == "crn":
        for size, _ in _CRN_FILTERS:
            name = f"filter_{size}_{size}"
            state.update(torch_conv(params["crn"][name], f"{prefix}crn.{name}"))
        state[prefix + "crn.acc_w.weight"] = np.ones((1, 84, 1, 1), np.float32)
        state[prefix + "crn.acc_w.bias"] = np.zeros(1, np.float32)
    return state


def _import_convap(reader: StateDictReader, prefix: str, channels: int, module: ConvAP) -> dict:
    return {"channel_pool": conv(reader, prefix + "channel_pool", module.out_channels, channels, 1)}


def _import_mixvpr(reader: StateDictReader, prefix: str, channels: int, module: MixVPR) -> dict:
    """The positions H*W are the file's (its first LayerNorm's size): a network built for
    another input size is refused when the variables are merged."""
    positions = reader.take(prefix + "mix.0.mix.0.weight").shape[0]
    hidden = int(positions * module.mlp_ratio)
    params = {f"mix_{k}": {"norm": layer_norm(reader, f"{prefix}mix.{k}.mix.0", positions),
                           "fc1": dense(reader, f"{prefix}mix.{k}.mix.1", positions, hidden),
                           "fc2": dense(reader, f"{prefix}mix.{k}.mix.3", hidden, positions)}
              for k in range(module.mix_depth)}
    params["channel_proj"] = dense(reader, prefix + "channel_proj", channels, module.out_channels)
    params["row_proj"] = dense(reader, prefix + "row_proj", positions, module.out_rows)
    return params


def _export_gsv(params: dict, prefix: str, aggregation: str) -> dict:
    """The inverse of _import_convap / _import_mixvpr."""
    if aggregation == "convap":
        return torch_conv(params["channel_pool"], prefix + "channel_pool")
    state = {}
    for k in range(sum(name.startswith("mix_") for name in params)):
        block = params[f"mix_{k}"]
        state.update({**torch_layer_norm(block["norm"], f"{prefix}mix.{k}.mix.0"),
                      **torch_dense(block["fc1"], f"{prefix}mix.{k}.mix.1"),
                      **torch_dense(block["fc2"], f"{prefix}mix.{k}.mix.3")})
    return {**state, **torch_dense(params["channel_proj"], prefix + "channel_proj"),
            **torch_dense(params["row_proj"], prefix + "row_proj")}


def _import_rrm(reader: StateDictReader, prefix: str, channels: int) -> dict:
    params = {name: layer_norm(reader, prefix + name, channels) for name in ("ln1", "ln2")}
    params.update({name: dense(reader, prefix + name, channels, channels) for name in ("fc1", "fc2")})
    return params

"""The geo-localization network: backbone -> aggregation [-> FC -> L2], built from a config.

Mirrors the benchmark's GeoLocalizationNet (reference.md §2): the config uses its option names
(backbone, aggregation, l2, netvlad_clusters, fc_output_dim, trunc_te, freeze_te) plus
`dtype` (compute dtype; parameters stay float32) and `frozen_bn`. What a backbone name means
(module, channels, allowed aggregations, freezing) comes from `registry`.

`build` makes the module, `init_variables` its random variables, `descriptor_dim` and
`trainable_mask` answer for a config. Inputs are ImageNet-normalized float images [B, H, W, 3]
(`vgjax.data.augment.normalize_uint8`); `vgjax.embed` holds the jitted uint8 -> descriptor path.

Deliberate differences from the PyTorch benchmark:
- `fc_output_dim` with netvlad/crn works (the Linear is sized K*C); the original builds it with
  C inputs and fails at the first forward.
- `frozen_bn` (default False) chooses whether BatchNorm layers of frozen stages keep updating
  their running statistics during training. False reproduces the benchmark (freezing there only
  stops gradients, and training runs in train mode), so its recipes give its numbers; True is
  the common practice of fully frozen stages.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgjax.models import aggregators, registry
from vgjax.models.aggregators import l2_normalize

L2_MODES = ("before_pool", "after_pool", "none")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The model config keys that change the network's parameters (not how it is trained or run): what
# a vgjax model file records (models.export) and a training run's architecture check compares.
# The GSV-Cities aggregations' own keys came later: a saved run or model file without them holds
# another aggregation (they take their defaults).
AGGREGATION_OPTION_KEYS = tuple(key for keys in aggregators.OPTION_KEYS.values() for key in keys.values())
ARCHITECTURE_KEYS = ("backbone", "aggregation", "l2", "netvlad_clusters", "fc_output_dim", "trunc_te",
                     *AGGREGATION_OPTION_KEYS)


class GeoLocalizationNet(nn.Module):
    """backbone -> [L2] aggregation [L2] -> [FC -> L2]. Returns float32 descriptors [B, D].

    Attributes:
      backbone: a module mapping normalized images [B, H, W, 3] to feature maps [B, h, w, C] or
        tokens [B, T, C] (or, for cls/seqpool, vectors [B, C]).
      aggregation: a pooling module, or None when the backbone already outputs a vector.
      l2: before_pool | after_pool | none; used only around gem/spoc/mac/rmac. before_pool on
        tokens [B, T, C] normalizes over the token axis, as the benchmark does (quirk §9.5).
      fc_output_dim: if set, a Dense layer then L2.
    """

    backbone: nn.Module
    aggregation: nn.Module | None
    l2: str = "none"
    fc_output_dim: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x = self.backbone(images.astype(self.dtype), train=train)
        if self.l2 == "before_pool":
            x = l2_normalize(x, axis=1 if x.ndim == 3 else -1).astype(self.dtype)
        if self.aggregation is not None:
            x = self.aggregation(x, train=train)
        if self.l2 == "after_pool":
            x = l2_normalize(x)
        if self.fc_output_dim is not None:
            x = nn.Dense(self.fc_output_dim, dtype=self.dtype, name="fc")(x)
            x = l2_normalize(x)
        return x.astype(jnp.float32)

    def backbone_features(self, images: jax.Array) -> jax.Array:
        """Backbone output in inference mode: maps [B, h, w, C] or tokens [B, T, C]."""
        return self.backbone(images.astype(self.dtype), train=False).astype(jnp.float32)


def check_model_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError for a combination the benchmark does not allow (reference §1.1)."""
    if config.backbone not in registry.BACKBONES:
        raise ValueError(f"unknown model.backbone {config.backbone!r}; choose one of "
                         f"{registry.BACKBONES}")
    if config.aggregation not in registry.AGGREGATIONS:
        raise ValueError(f"unknown model.aggregation {config.aggregation!r}; choose one of "
                         f"{registry.AGGREGATIONS}")
    allowed = registry.backbone(config.backbone).aggregations
    if config.aggregation not in allowed:
        raise ValueError(f"model.backbone {config.backbone} does not support aggregation "
                         f"{config.aggregation!r}; it allows {allowed}")
    if config.l2 not in L2_MODES:
        raise ValueError(f"unknown model.l2 {config.l2!r}; choose one of {L2_MODES}")
    if config.dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {config.dtype!r}; choose one of {tuple(DTYPES)}")
    for key in aggregators.OPTION_KEYS.get(config.aggregation, {}).values():
        values = config[key] if isinstance(config[key], (tuple, list)) else (config[key],)
        if key.endswith("dropout"):
            if not (isinstance(config[key], (int, float)) and 0 <= config[key] < 1):
                raise ValueError(f"model.{key} must be in [0, 1), got {config[key]!r}")
        elif not all(isinstance(v, (int, float)) and v > 0 for v in values) or not values:
            raise ValueError(f"model.{key} must be positive, got {config[key]!r}")


def check_image_size(backbone: str, image_size: tuple[int, int]) -> None:
    """ViT needs 224x224 or 384x384, CCT 384x384 (their position embeddings are fixed), DINOv2
    multiples of 14; a CNN needs at least its `min_size` per side (a smaller input gives an
    empty feature map, hence all-zero descriptors)."""
    entry = registry.backbone(backbone)
    if entry.image_sizes and tuple(image_size) not in entry.image_sizes:
        raise ValueError(f"backbone {backbone} needs resize {' or '.join(map(str, entry.image_sizes))}, "
                         f"got {tuple(image_size)}")
    if any(side % entry.size_multiple for side in image_size):
        raise ValueError(f"backbone {backbone} needs data.resize sides that are multiples of {entry.size_multiple} "
                         f"(its patch size), got {tuple(image_size)}")
    if min(image_size) < entry.min_size:
        raise ValueError(f"backbone {backbone} needs data.resize of at least {entry.min_size}x"
                         f"{entry.min_size} (a smaller input gives an empty feature map and all-zero "
                         f"descriptors), got {tuple(image_size)}")


def _aggregation(config, dtype) -> nn.Module | None:
    if config.aggregation in registry.TOKEN_OUTPUTS:
        return None
    return aggregators.create(config.aggregation, clusters=config.netvlad_clusters, dtype=dtype, model_config=config)


def build(config: ml_collections.ConfigDict, image_size: tuple[int, int] = (480, 640)) -> GeoLocalizationNet:
    """Builds the network of a `config.model` section.

    Args:
      config: backbone, aggregation, l2, netvlad_clusters, fc_output_dim, trunc_te, freeze_te,
        dtype and (optional) frozen_bn.
      image_size: (H, W) the network will see; checked for ViT/CCT, and sets ViT's token count.
    """
    check_model_config(config)
    check_image_size(config.backbone, image_size)
    dtype = DTYPES[config.dtype]
    entry = registry.backbone(config.backbone)
    backbone = entry.module(dtype=dtype, **entry.module_fields(config, image_size))
    return GeoLocalizationNet(
        backbone=backbone,
        aggregation=_aggregation(config, dtype),
        l2=config.l2 if config.aggregation in registry.POOLINGS else "none",
        fc_output_dim=config.fc_output_dim,
        dtype=dtype,
    )


def descriptor_dim(config: ml_collections.ConfigDict) -> int:
    """Output dimension: fc_output_dim, else the aggregation's (aggregators.output_dim) or C."""
    if config.fc_output_dim is not None:
        return int(config.fc_output_dim)
    channels = registry.backbone(config.backbone).channels
    if config.aggregation in registry.TOKEN_OUTPUTS:
        return channels
    return aggregators.output_dim(config.aggregation, channels, config.netvlad_clusters, model_config=config)


# XLA options for compiling `init` on the CPU (level 0 changes values by an ulp; 1 does not).
INIT_CPU_OPTIONS = {"xla_backend_optimization_level": 1}


def init_variables(model: GeoLocalizationNet, image_size: tuple[int, int], seed: int = 0) -> dict:
    """Randomly initialised variables ({"params", maybe "batch_stats"}) for one image size.

    The network itself is never compiled: XLA drops the forward pass, whose output `init` does
    not return, so the image size costs nothing. What compiles is the random draw of every
    initialised parameter, which JAX's persistent compilation cache keeps for later launches.
    On the CPU it compiles at LLVM optimization level 1 (INIT_CPU_OPTIONS): 1.2-3.5x faster
    (ResNet-18 conv4: 1.6 against 3.9 s) and bit-identical values for every registry family
    (tests/test_models.py checks it); the program runs once, so its speed does not matter.
    The values depend on `seed` only.
    """
    key, images = jax.random.key(seed), jnp.zeros((1, *image_size, 3), jnp.float32)
    lowered = jax.jit(functools.partial(model.init, train=False)).lower(key, images)
    options = INIT_CPU_OPTIONS if jax.default_backend() == "cpu" else {}
    return lowered.compile(compiler_options=options)(key, images)


def variable_shapes(model: GeoLocalizationNet, image_size: tuple[int, int]) -> dict:
    """Zero-filled numpy variables of the right shapes and dtypes, without compiling anything:
    the target of a restore that overwrites every value."""
    images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)


def trainable_mask(config: ml_collections.ConfigDict, params: dict) -> dict:
    """Bool pytree over `params`: False where the benchmark freezes (backbone rules), True else."""
    entry = registry.backbone(config.backbone)
    kwargs = {key: config.get(key) for key in entry.mask_options}
    mask = jax.tree_util.tree_map(lambda _: True, params)
    mask["backbone"] = entry.family.trainable_mask(params["backbone"], **kwargs)
    return mask

"""The geo-localization network: backbone -> aggregation [-> FC -> L2], built from a config.

Mirrors the benchmark's GeoLocalizationNet (reference.md §2): the config uses its option names
(backbone, aggregation, l2, netvlad_clusters, fc_output_dim, trunc_te, freeze_te) plus
`dtype` (compute dtype; parameters stay float32) and `frozen_bn`.

Inputs are ImageNet-normalized float images [B, H, W, 3]; `make_embed_fn` wraps a model and
its variables into a jit-compiled function that takes uint8 images and normalizes on device.

Deliberate differences from the PyTorch benchmark:
- `fc_output_dim` with netvlad/crn works (the Linear is sized K*C); the original builds it with
  C inputs and fails at the first forward.
- `frozen_bn` (default False) chooses whether BatchNorm layers of frozen stages keep updating
  their running statistics during training. False reproduces the benchmark (freezing there only
  stops gradients, and training runs in train mode), so its recipes give its numbers; True is
  the common practice of fully frozen stages.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgjax.data import images as image_ops
from vgjax.models import aggregators, netvlad_init
from vgjax.models.aggregators import l2_normalize
from vgjax.models.backbones import alexnet, cct, resnet, vgg, vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CNN_BACKBONES = ("alexnet", "vgg16", "resnet18conv4", "resnet18conv5", "resnet50conv4",
                 "resnet50conv5", "resnet101conv4", "resnet101conv5")
TOKEN_BACKBONES = ("cct384", "vit")
BACKBONES = CNN_BACKBONES + TOKEN_BACKBONES
POOLINGS = ("gem", "spoc", "mac", "rmac")  # the aggregations that take the --l2 wrapper
AGGREGATIONS = POOLINGS + ("netvlad", "crn", "rrm", "cls", "seqpool")
ALLOWED_AGGREGATIONS = {
    **{name: ("gem", "spoc", "mac", "rmac", "netvlad", "crn", "rrm") for name in CNN_BACKBONES},
    "cct384": ("netvlad", "gem", "cls", "seqpool"),
    "vit": ("cls", "gem", "netvlad"),
}
L2_MODES = ("before_pool", "after_pool", "none")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one named backbone: its module class, fixed fields and output channels."""

    module: type
    fields: dict
    channels: int


def backbone_spec(name: str) -> BackboneSpec:
    if name.startswith("resnet"):
        depth, last_stage = int(name[6:name.index("conv")]), int(name[-1])
        return BackboneSpec(resnet.ResNet, {"depth": depth, "last_stage": last_stage},
                            resnet.resnet_channels(depth, last_stage))
    specs = {
        "vgg16": BackboneSpec(vgg.VGG16, {}, 512),
        "alexnet": BackboneSpec(alexnet.AlexNet, {}, 256),
        "cct384": BackboneSpec(cct.CCT, {}, 384),
        "vit": BackboneSpec(vit.ViT, {}, 768),
    }
    if name not in specs:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    return specs[name]


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
    if config.backbone not in BACKBONES:
        raise ValueError(f"unknown model.backbone {config.backbone!r}; choose one of {BACKBONES}")
    if config.aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown model.aggregation {config.aggregation!r}; choose one of {AGGREGATIONS}")
    allowed = ALLOWED_AGGREGATIONS[config.backbone]
    if config.aggregation not in allowed:
        raise ValueError(f"model.backbone {config.backbone} does not support aggregation "
                         f"{config.aggregation!r}; it allows {allowed}")
    if config.l2 not in L2_MODES:
        raise ValueError(f"unknown model.l2 {config.l2!r}; choose one of {L2_MODES}")
    if config.dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {config.dtype!r}; choose one of {tuple(DTYPES)}")


def check_image_size(backbone: str, image_size: tuple[int, int]) -> None:
    """ViT needs 224x224 or 384x384, CCT 384x384 (their position embeddings are fixed)."""
    if backbone == "vit" and tuple(image_size) not in ((224, 224), (384, 384)):
        raise ValueError(f"backbone vit needs resize (224, 224) or (384, 384), got {tuple(image_size)}")
    if backbone == "cct384" and tuple(image_size) != (384, 384):
        raise ValueError(f"backbone cct384 needs resize (384, 384), got {tuple(image_size)}")


def _backbone_fields(config, image_size) -> dict:
    name = config.backbone
    fields = dict(backbone_spec(name).fields)
    if name.startswith("resnet"):
        fields["frozen_bn"] = bool(config.get("frozen_bn", False))
    if name in TOKEN_BACKBONES:
        fields["trunc_te"] = config.trunc_te
        fields["output"] = config.aggregation if config.aggregation in ("cls", "seqpool") else "tokens"
    if name == "vit":
        fields["image_size"] = int(image_size[0])
    return fields


def _aggregation(config, dtype) -> nn.Module | None:
    if config.aggregation in ("cls", "seqpool"):
        return None
    return aggregators.create(config.aggregation, clusters=config.netvlad_clusters, dtype=dtype)


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
    spec = backbone_spec(config.backbone)
    backbone = spec.module(dtype=dtype, **_backbone_fields(config, image_size))
    return GeoLocalizationNet(
        backbone=backbone,
        aggregation=_aggregation(config, dtype),
        l2=config.l2 if config.aggregation in POOLINGS else "none",
        fc_output_dim=config.fc_output_dim,
        dtype=dtype,
    )


def descriptor_dim(config: ml_collections.ConfigDict) -> int:
    """Output dimension: fc_output_dim, else K*C (netvlad/crn) or C."""
    if config.fc_output_dim is not None:
        return int(config.fc_output_dim)
    channels = backbone_spec(config.backbone).channels
    if config.aggregation in ("cls", "seqpool"):
        return channels
    return aggregators.output_dim(config.aggregation, channels, config.netvlad_clusters)


def init_variables(model: GeoLocalizationNet, image_size: tuple[int, int], seed: int = 0) -> dict:
    """Randomly initialised variables ({"params", maybe "batch_stats"}) for one image size."""
    images = jnp.zeros((1, *image_size, 3), jnp.float32)
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), images)


def trainable_mask(config: ml_collections.ConfigDict, params: dict) -> dict:
    """Bool pytree over `params`: False where the benchmark freezes (backbone rules), True else."""
    module = {"resnet": resnet, "vgg16": vgg, "alexnet": alexnet, "cct384": cct, "vit": vit}[
        "resnet" if config.backbone.startswith("resnet") else config.backbone]
    kwargs = {"freeze_te": config.freeze_te} if config.backbone in TOKEN_BACKBONES else {}
    mask = jax.tree_util.tree_map(lambda _: True, params)
    mask["backbone"] = module.trainable_mask(params["backbone"], **kwargs)
    return mask


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 RGB [..., 3] -> ImageNet-normalized float32."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
    return (images.astype(jnp.float32) - mean) / std


def make_embed_fn(model: GeoLocalizationNet, variables: dict):
    """A jit-compiled embed function uint8 [B, H, W, 3] -> float32 numpy [B, D] (inference)."""
    @jax.jit
    def embed(variables, images):
        return model.apply(variables, normalize_images(images), train=False)

    def embed_numpy(images: np.ndarray) -> np.ndarray:
        return np.asarray(embed(variables, images))

    return embed_numpy


def make_features_fn(model: GeoLocalizationNet, variables: dict):
    """A jit-compiled uint8 [B, H, W, 3] -> backbone features function (e.g. for NetVLAD init)."""
    @jax.jit
    def features(variables, images):
        return model.apply(variables, normalize_images(images), method=GeoLocalizationNet.backbone_features)

    return lambda images: np.asarray(features(variables, images))


def initialize_netvlad(model: GeoLocalizationNet, variables: dict, paths, image_size: tuple[int, int],
                       clusters: int, *, batch_size: int = 16, seed: int = 0, **kwargs) -> dict:
    """`variables` with the NetVLAD/CRN centroids and assignment initialised by k-means over
    local features of random images in `paths` (see netvlad_init.init_from_images)."""
    transform = functools.partial(image_ops.resize_bilinear, size=tuple(image_size))
    params = netvlad_init.init_from_images(make_features_fn(model, variables), paths, transform,
                                           clusters, batch_size=batch_size, seed=seed, **kwargs)
    new_params = dict(variables["params"])
    new_params["aggregation"] = {**variables["params"]["aggregation"], **params}
    return {**variables, "params": new_params}


"""The ONE backbone registry: everything vgjax knows about a `model.backbone` name.

Each entry holds the Flax module class and its fixed fields (e.g. ResNet depth and last stage),
the fields it takes from the model config, its output channels, whether it outputs tokens
[B, T, C] (CCT/ViT) rather than maps [B, h, w, C], the input sizes it needs, the aggregations the
benchmark allows after it (reference §1.1), and its family module, which holds
`import_torch(reader, prefix, **fields)`, its inverse `export_torch(variables, prefix, **fields)`
and `trainable_mask(params, ...)`.
`geoloc_net` (build, descriptor_dim, trainable_mask) and `pretrained` (weight import) read this
table; no other module lists backbones.

Aggregation names: POOLINGS take the `l2` wrapper; TOKEN_OUTPUTS (cls, seqpool) are computed by
the token backbones themselves, without an aggregation module; the others are modules of
`aggregators.AGGREGATIONS`.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import ml_collections

from vgjax.models.backbones import alexnet, cct, dinov2, resnet, vgg, vit

POOLINGS = ("gem", "spoc", "mac", "rmac")
TOKEN_OUTPUTS = ("cls", "seqpool")
GSV_AGGREGATIONS = ("convap", "mixvpr")  # the GSV-Cities family's, after CNNs only
DINOV2_AGGREGATIONS = ("salad",)  # take DINOv2's patch map and CLS token
AGGREGATIONS = POOLINGS + ("netvlad", "crn", "rrm") + GSV_AGGREGATIONS + DINOV2_AGGREGATIONS + ("boq",) + TOKEN_OUTPUTS
_CNN_AGGREGATIONS = POOLINGS + ("netvlad", "crn", "rrm") + GSV_AGGREGATIONS + ("boq",)

# Module fields that come from the model config (and the input size), by field name.
_CONFIG_FIELDS: dict[str, Callable[[ml_collections.ConfigDict, tuple[int, int]], Any]] = {
    "frozen_bn": lambda config, size: bool(config.get("frozen_bn", False)),
    "trunc_te": lambda config, size: config.trunc_te,
    "output": lambda config, size: (config.aggregation if config.aggregation in TOKEN_OUTPUTS
                                    else "tokens"),
    "image_size": lambda config, size: int(size[0]),
    "returns": lambda config, size: ("map_and_cls" if config.aggregation == "salad" else
                                     "cls" if config.aggregation == "cls" else "map"),
    "final_norm": lambda config, size: config.aggregation != "boq",  # BoQ reads DINOv2's last block
}


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One named backbone.

    Attributes:
      name: the `model.backbone` value.
      module: the Flax module class.
      fields: its fixed fields (depth, last_stage for ResNets).
      config_fields: its fields read from the model config / input size (see `module_fields`).
      channels: C of its output maps or tokens.
      tokens: True when it outputs tokens [B, T, C] (and takes trunc_te, freeze_te).
      family: the module holding `import_torch`, `export_torch` and `trainable_mask`.
      aggregations: the aggregations the benchmark allows after it.
      image_sizes: the (H, W) it accepts; empty = any.
      min_size: the smallest input side whose output map is not empty (its unpadded poolings
        floor the size); 1 when padding keeps every map at least 1x1.
      size_multiple: each input side must be a multiple of it (DINOv2's 14-pixel patches).
      mask_options: the model config keys its family's `trainable_mask` takes.
    """

    name: str
    module: type[nn.Module]
    fields: Mapping[str, Any]
    config_fields: tuple[str, ...]
    channels: int
    tokens: bool
    family: types.ModuleType
    aggregations: tuple[str, ...]
    image_sizes: tuple[tuple[int, int], ...] = ()
    min_size: int = 1
    size_multiple: int = 1
    mask_options: tuple[str, ...] = ()

    def module_fields(self, config: ml_collections.ConfigDict, image_size: tuple[int, int]) -> dict:
        """Every field of `module` except dtype, for a model config and input size (H, W); the
        family's `import_torch` and `export_torch` take the same keywords."""
        return {**self.fields, **{name: _CONFIG_FIELDS[name](config, image_size)
                                  for name in self.config_fields}}


def _resnet(depth: int, last_stage: int) -> Backbone:
    return Backbone(f"resnet{depth}conv{last_stage}", resnet.ResNet,
                    {"depth": depth, "last_stage": last_stage}, ("frozen_bn",),
                    resnet.resnet_channels(depth, last_stage), False, resnet, _CNN_AGGREGATIONS)


def _dinov2(size: str, registers: bool) -> Backbone:
    """dinov2_<size> and dinov2_<size>_reg: patch maps [B, h, w, C] (and the CLS token for salad;
    without the final norm for boq)."""
    return Backbone(f"dinov2_{size}{'_reg' if registers else ''}", dinov2.DINOv2,
                    {"size": size, "registers": registers}, ("returns", "final_norm"), dinov2.ARCHS[size].width,
                    False, dinov2, ("salad", "boq", "gem", "netvlad", "cls"), min_size=dinov2.PATCH,
                    size_multiple=dinov2.PATCH,
                    mask_options=("unfreeze_n_blocks",))


_REGISTRY = {entry.name: entry for entry in (
    Backbone("alexnet", alexnet.AlexNet, {}, (), 256, False, alexnet, _CNN_AGGREGATIONS, min_size=31),
    Backbone("vgg16", vgg.VGG16, {}, (), 512, False, vgg, _CNN_AGGREGATIONS, min_size=16),
    *(_resnet(depth, last_stage) for depth in (18, 50, 101) for last_stage in (4, 5)),
    Backbone("cct384", cct.CCT, {}, ("trunc_te", "output"), 384, True, cct,
             ("netvlad", "gem", "cls", "seqpool"), ((384, 384),), mask_options=("freeze_te",)),
    Backbone("vit", vit.ViT, {}, ("trunc_te", "output", "image_size"), 768, True, vit,
             ("cls", "gem", "netvlad"), ((224, 224), (384, 384)), mask_options=("freeze_te",)),
    *(_dinov2(size, registers) for size in dinov2.ARCHS for registers in (False, True)),
)}

BACKBONES = tuple(_REGISTRY)


def backbone(name: str) -> Backbone:
    """The registry entry of `name`; ValueError naming the available backbones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
    return _REGISTRY[name]

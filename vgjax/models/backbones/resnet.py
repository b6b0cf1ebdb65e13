"""torchvision ResNet-18/50/101 cut after layer3 ("conv4") or layer4 ("conv5").

The architecture is torchvision's exactly (Bottleneck v1.5: the stride sits on the 3x3 conv), so
torchvision and benchmark weights load 1:1. Input: ImageNet-normalized images [B, H, W, 3].
Output: the feature map after the last kept stage, [B, H/16, W/16, C] for last_stage=4 and
[B, H/32, W/32, C] for last_stage=5 (ceil-rounded per stride-2 layer; 30x40 / 15x20 at 480x640),
C = `resnet_channels(depth, last_stage)`.

Param tree (and batch_stats tree, for the "bn*" entries), mirroring torchvision's key names:
  conv1, bn1                               stem (`conv1.*`, `bn1.*`)
  layer{s}_{i}/conv{1,2[,3]}, bn{1,2[,3]}  block i of stage s (`layer{s}.{i}.conv1.*` ...)
  layer{s}_{i}/downsample_conv             projection shortcut conv (`layer{s}.{i}.downsample.0.*`)
  layer{s}_{i}/downsample_bn               its BatchNorm (`layer{s}.{i}.downsample.1.*`)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgjax.models.convert import StateDictReader, batch_norm, conv_kernel, torch_batch_norm, torch_conv

_STAGE_BLOCKS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_WIDTHS = (64, 128, 256, 512)
_STEM_CHANNELS = 64
# The benchmark sets requires_grad=False on every child before layer3 (reference §2.1).
_FROZEN_TOP = ("conv1", "bn1")
_FROZEN_STAGES = (1, 2)
# torchvision initialises convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _check_config(depth: int, last_stage: int) -> None:
    if depth not in _STAGE_BLOCKS:
        raise ValueError(f"ResNet depth must be one of {sorted(_STAGE_BLOCKS)}, got {depth!r}")
    if last_stage not in (4, 5):
        raise ValueError(f"ResNet last_stage must be 4 (cut after layer3, 'conv4') or 5 "
                         f"(after layer4, 'conv5'), got {last_stage!r}")


def _expansion(depth: int) -> int:
    """Output channels of a block / its bottleneck width: 1 for BasicBlock, 4 for Bottleneck."""
    return 1 if depth == 18 else 4


def resnet_channels(depth: int, last_stage: int) -> int:
    """Channels C of the output map (18: 256/512; 50 and 101: 1024/2048 for last_stage 4/5)."""
    _check_config(depth, last_stage)
    return _WIDTHS[last_stage - 2] * _expansion(depth)


def _blocks(depth: int, last_stage: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(stage, index, in_channels, width, stride) of every kept residual block, in order."""
    in_channels = _STEM_CHANNELS
    for stage, (count, width) in enumerate(zip(_STAGE_BLOCKS[depth][:last_stage - 1], _WIDTHS), 1):
        for index in range(count):
            stride = 2 if index == 0 and stage > 1 else 1
            yield stage, index, in_channels, width, stride
            in_channels = width * _expansion(depth)


def _conv_specs(depth: int, width: int, stride: int) -> list[tuple[int, int, int]]:
    """(out_channels, kernel, stride) of the main-path convs of one block, torchvision order."""
    if depth == 18:
        return [(width, 3, stride), (width, 3, 1)]
    return [(width, 1, 1), (width, 3, stride), (width * 4, 1, 1)]


def _has_downsample(in_channels: int, out_channels: int, stride: int) -> bool:
    return stride != 1 or in_channels != out_channels


class _Block(nn.Module):
    """BasicBlock (depth 18) or Bottleneck v1.5: [B, h, w, in] -> [B, h/stride, w/stride, out]."""
    depth: int
    in_channels: int
    width: int
    stride: int
    frozen_bn: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        conv = partial(nn.Conv, use_bias=False, kernel_init=_CONV_INIT, dtype=self.dtype,
                       param_dtype=self.param_dtype)
        norm = partial(nn.BatchNorm, use_running_average=not train or self.frozen_bn,
                       momentum=0.9, epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype)
        specs = _conv_specs(self.depth, self.width, self.stride)
        y = x
        for j, (features, kernel, stride) in enumerate(specs, 1):
            pad = kernel // 2
            y = conv(features, (kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)),
                     name=f"conv{j}")(y)
            y = norm(name=f"bn{j}")(y)
            if j < len(specs):
                y = nn.relu(y)
        out_channels = specs[-1][0]
        shortcut = x
        if _has_downsample(self.in_channels, out_channels, self.stride):
            shortcut = conv(out_channels, (1, 1), (self.stride, self.stride), "VALID",
                            name="downsample_conv")(x)
            shortcut = norm(name="downsample_bn")(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """torchvision ResNet trunk: [B, H, W, 3] -> [B, h, w, resnet_channels(depth, last_stage)].

    Fields:
      depth: 18, 50 or 101.
      last_stage: 4 = up to layer3 ("conv4", stride 16), 5 = up to layer4 ("conv5", stride 32).
      frozen_bn: if True, the BatchNorms of the frozen part (bn1, layer1, layer2) always use and
        keep their running averages, even with train=True. False (default) is the benchmark: the
        "frozen" stages only stop gradients, their BN still normalizes with batch statistics and
        updates its running averages in train mode (reference §9.1).
    """
    depth: int
    last_stage: int
    frozen_bn: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        _check_config(self.depth, self.last_stage)
        x = nn.Conv(_STEM_CHANNELS, (7, 7), (2, 2), ((3, 3), (3, 3)), use_bias=False,
                    kernel_init=_CONV_INIT, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train or self.frozen_bn, momentum=0.9,
                         epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="bn1")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))  # pads with -inf, like torch
        for stage, index, in_channels, width, stride in _blocks(self.depth, self.last_stage):
            x = _Block(self.depth, in_channels, width, stride,
                       frozen_bn=self.frozen_bn and stage in _FROZEN_STAGES, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=f"layer{stage}_{index}")(x, train)
        return x


def import_torch(reader: StateDictReader, prefix: str, depth: int, last_stage: int,
                 frozen_bn: bool = False, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32) -> dict:
    """Flax variables {"params", "batch_stats"} of `ResNet(depth, last_stage)`, torchvision keys.

    Reads `prefix + "conv1.weight"`, `"bn1.*"`, `"layer{s}.{i}.conv{j}.weight"`, `"...bn{j}.*"`,
    `"...downsample.{0,1}.*"`; ignores `fc.{weight,bias}` and, for last_stage=4, every `layer4.*`
    tensor (present in torchvision files, absent from benchmark conv4 checkpoints). Does not call
    reader.finish(). `frozen_bn` and `dtype` are accepted so that the module's fields can be passed
    as they are; parameters are cast to `param_dtype`, running statistics stay float32.
    """
    _check_config(depth, last_stage)
    params, stats = {}, {}

    def conv(key, out_channels, in_channels, kernel):
        weight = reader.take(f"{prefix}{key}.weight", (out_channels, in_channels, kernel, kernel))
        return {"kernel": jnp.asarray(conv_kernel(weight), param_dtype)}

    def norm(key, channels):
        p, s = batch_norm(reader, f"{prefix}{key}", channels)
        return {k: jnp.asarray(v, param_dtype) for k, v in p.items()}, jax.tree.map(jnp.asarray, s)

    params["conv1"] = conv("conv1", _STEM_CHANNELS, 3, 7)
    params["bn1"], stats["bn1"] = norm("bn1", _STEM_CHANNELS)
    for stage, index, in_channels, width, stride in _blocks(depth, last_stage):
        torch_name, name = f"layer{stage}.{index}", f"layer{stage}_{index}"
        block_params, block_stats = {}, {}
        channels = in_channels
        for j, (features, kernel, _) in enumerate(_conv_specs(depth, width, stride), 1):
            block_params[f"conv{j}"] = conv(f"{torch_name}.conv{j}", features, channels, kernel)
            block_params[f"bn{j}"], block_stats[f"bn{j}"] = norm(f"{torch_name}.bn{j}", features)
            channels = features
        if _has_downsample(in_channels, channels, stride):
            block_params["downsample_conv"] = conv(f"{torch_name}.downsample.0", channels,
                                                   in_channels, 1)
            block_params["downsample_bn"], block_stats["downsample_bn"] = norm(
                f"{torch_name}.downsample.1", channels)
        params[name], stats[name] = block_params, block_stats
    reader.ignore(re.escape(prefix) + r"fc\.(weight|bias)")
    if last_stage == 4:
        reader.ignore(re.escape(prefix) + r"layer4\..+")
    return {"params": params, "batch_stats": stats}


def export_torch(variables: dict, prefix: str, depth: int, last_stage: int, **fields) -> dict:
    """The inverse of `import_torch`: {"params", "batch_stats"} of `ResNet(depth, last_stage)` ->
    float32 tensors under torchvision keys (`prefix + "conv1.weight"` [O, I, kh, kw], `"bn1.*"`
    with num_batches_tracked, `"layer{s}.{i}.*"`), the kept stages only, no fc. The module's
    other fields are accepted so that they can be passed as they are."""
    del fields
    params, stats = variables["params"], variables["batch_stats"]
    state = {**torch_conv(params["conv1"], f"{prefix}conv1"),
             **torch_batch_norm(params["bn1"], stats["bn1"], f"{prefix}bn1")}
    for stage, index, _, width, stride in _blocks(depth, last_stage):
        torch_name, block = f"{prefix}layer{stage}.{index}", f"layer{stage}_{index}"
        block_params, block_stats = params[block], stats[block]
        for j in range(1, len(_conv_specs(depth, width, stride)) + 1):
            state.update(torch_conv(block_params[f"conv{j}"], f"{torch_name}.conv{j}"))
            state.update(torch_batch_norm(block_params[f"bn{j}"], block_stats[f"bn{j}"],
                                          f"{torch_name}.bn{j}"))
        if "downsample_conv" in block_params:
            state.update(torch_conv(block_params["downsample_conv"], f"{torch_name}.downsample.0"))
            state.update(torch_batch_norm(block_params["downsample_bn"], block_stats["downsample_bn"],
                                          f"{torch_name}.downsample.1"))
    return state


def trainable_mask(params: dict, **config) -> dict:
    """Pytree like `params` of Python bools: False for conv1, bn1, layer1_*, layer2_* (frozen by
    the benchmark), True for layer3_* and layer4_*. The module's config fields may be passed for
    a uniform call; the mask does not depend on them."""
    del config

    def trainable(path, _):
        name = path[0].key
        stage = re.fullmatch(r"layer(\d)_\d+", name)
        if name in _FROZEN_TOP:
            return False
        if stage is None:
            raise ValueError(f"trainable_mask: unexpected top-level ResNet param '{name}' "
                             f"(pass variables['params'], not the whole variables dict)")
        return int(stage.group(1)) not in _FROZEN_STAGES

    return jax.tree_util.tree_map_with_path(trainable, params)

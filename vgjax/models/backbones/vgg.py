"""torchvision VGG-16 (no BN) `features` up to conv5_3, as the benchmark cuts it.

The benchmark keeps `features.children()[:-2]`: the last ReLU and pool5 are dropped, so the output
is conv5_3 **before** its ReLU. Input: ImageNet-normalized images [B, H, W, 3]; output
[B, H/16, W/16, 512] (floor per max-pool; 30x40 at 480x640).

Param tree: conv{block}_{i} with "kernel" and "bias" (conv1_1 ... conv5_3), torch keys
`features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}` in that order.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgjax.models.convert import StateDictReader, conv, torch_conv

_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# The benchmark freezes `layers[:-5]` (conv1_1 ... pool4); the conv5 block is trained.
_TRAINABLE_BLOCK = 5
# torchvision initialises VGG convs with kaiming_normal_(mode="fan_out") and zero bias.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _convs() -> Iterator[tuple[str, int, int, int, bool]]:
    """(name, torch features index, in_channels, out_channels, max-pool before it) per conv."""
    index, in_channels = 0, 3
    for block, widths in enumerate(_BLOCKS, 1):
        for i, out_channels in enumerate(widths, 1):
            yield f"conv{block}_{i}", index, in_channels, out_channels, block > 1 and i == 1
            index += 2  # conv, ReLU
            in_channels = out_channels
        index += 1  # max-pool


class VGG16(nn.Module):
    """VGG-16 features to conv5_3 pre-ReLU: [B, H, W, 3] -> [B, H/16, W/16, 512].
    `train` is accepted for a uniform interface; the network has no BN or dropout."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        convs = list(_convs())
        for k, (name, _, _, out_channels, pool_before) in enumerate(convs):
            if pool_before:
                x = nn.max_pool(x, (2, 2), (2, 2))
            x = nn.Conv(out_channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_CONV_INIT,
                        dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
            if k < len(convs) - 1:
                x = nn.relu(x)
        return x


def import_torch(reader: StateDictReader, prefix: str, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32) -> dict:
    """Flax variables {"params"} of `VGG16` from torchvision keys `features.<i>.{weight,bias}`;
    ignores `classifier.*`. Does not call reader.finish(). `dtype` is accepted so the module's
    fields can be passed as they are; parameters are cast to `param_dtype`."""
    params = {}
    for name, index, in_channels, out_channels, _ in _convs():
        weights = conv(reader, f"{prefix}features.{index}", out_channels, in_channels, 3)
        params[name] = {k: jnp.asarray(v, param_dtype) for k, v in weights.items()}
    reader.ignore(re.escape(prefix) + r"classifier\.\d+\.(weight|bias)")
    return {"params": params}


def export_torch(variables: dict, prefix: str, **fields) -> dict:
    """The inverse of `import_torch`: {"params"} of `VGG16` -> float32 tensors
    `prefix + "features.<i>.{weight,bias}"` (weight [O, I, 3, 3]). The module's fields are
    accepted so that they can be passed as they are."""
    del fields
    return {key: value for name, index, *_ in _convs()
            for key, value in torch_conv(variables["params"][name], f"{prefix}features.{index}").items()}


def trainable_mask(params: dict, **config) -> dict:
    """Pytree like `params` of Python bools: True only for conv5_1, conv5_2, conv5_3. The module's
    config fields may be passed for a uniform call; the mask does not depend on them."""
    del config

    def trainable(path, _):
        name = path[0].key
        match = re.fullmatch(r"conv(\d)_\d", name)
        if match is None:
            raise ValueError(f"trainable_mask: unexpected top-level VGG16 param '{name}' "
                             f"(pass variables['params'], not the whole variables dict)")
        return int(match.group(1)) == _TRAINABLE_BLOCK

    return jax.tree_util.tree_map_with_path(trainable, params)

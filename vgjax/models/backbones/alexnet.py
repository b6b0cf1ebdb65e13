"""torchvision AlexNet `features` without the last ReLU and max-pool, as the benchmark cuts it.

The benchmark keeps `features.children()[:-2]`, so the output is conv5 **before** its ReLU.
Input: ImageNet-normalized images [B, H, W, 3]; output [B, h, w, 256] with
h = pool(pool(conv1(H))), conv1: floor((H + 4 - 11) / 4) + 1, pool (3x3/2, no padding, floor):
floor((n - 3) / 2) + 1 (29x39 at 480x640). Needs H, W >= 63.

Param tree: conv1 ... conv5, each with "kernel" and "bias"; torch keys
`features.{0,3,6,8,10}.{weight,bias}`.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vgjax.models.convert import StateDictReader, conv, torch_conv

# (name, torch features index, in, out, kernel, stride, padding, max-pool 3x3/2 before it)
_CONVS = (
    ("conv1", 0, 3, 64, 11, 4, 2, False),
    ("conv2", 3, 64, 192, 5, 1, 2, True),
    ("conv3", 6, 192, 384, 3, 1, 1, True),
    ("conv4", 8, 384, 256, 3, 1, 1, False),
    ("conv5", 10, 256, 256, 3, 1, 1, False),
)
# The benchmark freezes `layers[:5]` = conv1, ReLU, pool1, conv2, ReLU.
_FROZEN = ("conv1", "conv2")


class AlexNet(nn.Module):
    """AlexNet features to conv5 pre-ReLU: [B, H, W, 3] -> [B, h, w, 256] (see the module doc).
    `train` is accepted for a uniform interface; the features have no BN or dropout."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for name, _, _, out_channels, kernel, stride, pad, pool_before in _CONVS:
            if pool_before:
                x = nn.max_pool(x, (3, 3), (2, 2))
            x = nn.Conv(out_channels, (kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)),
                        dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
            if name != _CONVS[-1][0]:
                x = nn.relu(x)
        return x


def import_torch(reader: StateDictReader, prefix: str, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32) -> dict:
    """Flax variables {"params"} of `AlexNet` from torchvision keys `features.<i>.{weight,bias}`;
    ignores `classifier.*`. Does not call reader.finish(). `dtype` is accepted so the module's
    fields can be passed as they are; parameters are cast to `param_dtype`."""
    params = {}
    for name, index, in_channels, out_channels, kernel, _, _, _ in _CONVS:
        weights = conv(reader, f"{prefix}features.{index}", out_channels, in_channels, kernel)
        params[name] = {k: jnp.asarray(v, param_dtype) for k, v in weights.items()}
    reader.ignore(re.escape(prefix) + r"classifier\.\d+\.(weight|bias)")
    return {"params": params}


def export_torch(variables: dict, prefix: str, **fields) -> dict:
    """The inverse of `import_torch`: {"params"} of `AlexNet` -> float32 tensors
    `prefix + "features.<i>.{weight,bias}"` (weight [O, I, kh, kw]). The module's fields are
    accepted so that they can be passed as they are."""
    del fields
    return {key: value for name, index, *_ in _CONVS
            for key, value in torch_conv(variables["params"][name], f"{prefix}features.{index}").items()}


def trainable_mask(params: dict, **config) -> dict:
    """Pytree like `params` of Python bools: False for conv1 and conv2, True for conv3..conv5.
    The module's config fields may be passed for a uniform call; the mask ignores them."""
    del config
    names = {conv[0] for conv in _CONVS}

    def trainable(path, _):
        name = path[0].key
        if name not in names:
            raise ValueError(f"trainable_mask: unexpected top-level AlexNet param '{name}' "
                             f"(pass variables['params'], not the whole variables dict)")
        return name not in _FROZEN

    return jax.tree_util.tree_map_with_path(trainable, params)

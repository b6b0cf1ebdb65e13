"""DINOv2 ViT-S/14, B/14, L/14 and g/14, with and without register tokens, computed as
facebookresearch/dinov2's `DinoVisionTransformer` (its torch.hub models), with torch import.

Pipeline for an [B, H, W, 3] ImageNet-normalized NHWC image, H and W multiples of 14:
  14x14/14 patch Conv (bias) -> [B, h*w, C] (h, w = H/14, W/14), the CLS token in front;
  position embeddings: one for the CLS and a 37x37 grid (the 518x518 pre-training size), the
  grid resized to h x w as dinov2 does (`position_grid_weights`) unless it is 37x37 already;
  register models: 4 register tokens after the CLS;
  blocks: x + ls1 * attn(norm1(x)), then x + ls2 * ffn(norm2(x)) (LayerNorm eps 1e-6; one qkv
  Dense with bias; heads of 64; FFN: Dense 4C -> exact GELU -> Dense for S/B/L, SwiGLU with a
  hidden width of 4096 for g; ls1/ls2 per-channel LayerScale);
  final LayerNorm (`final_norm`: SALAD and most uses apply it; BoQ reads the last block's
  output without it).
Outputs (`returns`): "map" the patch tokens as a map [B, h, w, C]; "map_and_cls" that map and the
CLS token [B, C] (SALAD's input); "cls" the CLS token [B, C]. Register tokens are dropped.
Drop path and the mask token (pre-training only) are not built.

Flax parameter tree (torch key in brackets, relative to the import prefix):
  patch_embed/{kernel,bias}           [patch_embed.proj.{weight,bias}]
  cls_token [1,1,C], pos_embed [1,1370,C], register_tokens [1,4,C]   [the same names]
  block_{i}/norm1, block_{i}/norm2    [blocks.{i}.norm1.*, blocks.{i}.norm2.*]
  block_{i}/attn/qkv, block_{i}/attn/proj   [blocks.{i}.attn.qkv.*, blocks.{i}.attn.proj.*]
  block_{i}/ls1/gamma, block_{i}/ls2/gamma  [blocks.{i}.ls1.gamma, blocks.{i}.ls2.gamma]
  block_{i}/mlp/{fc1,fc2} or /{w12,w3}      [blocks.{i}.mlp.{fc1,fc2,w12,w3}.*]
  norm/{scale,bias}                   [norm.*]
`mask_token` is read and ignored on import, written as zeros on export.

Freezing (`trainable_mask(params, unfreeze_n_blocks)`), as SALAD and BoQ train it: the last
`unfreeze_n_blocks` blocks and the final norm train (BoQ never reads that norm); the
embeddings and the other blocks are frozen. None trains everything.

Deliberate difference: an input whose sides are not multiples of 14 is an error (dinov2 asserts
too); MegaLoc's forward would resize it first, vgjax asks for a data.resize / eval.resize that is.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vgjax.models.backbones.vit import cast_params
from vgjax.models.convert import (StateDictReader, conv, dense, layer_norm, torch_conv, torch_dense,
                                  torch_layer_norm)

PATCH = 14
GRID = 37  # position embeddings of the 518x518 pre-training size
LN_EPS = 1e-6
REGISTERS = 4
OUTPUTS = ("map", "map_and_cls", "cls")


@dataclasses.dataclass(frozen=True)
class Arch:
    """One DINOv2 size: width C, depth, heads, FFN ("mlp" or "swiglu") and its hidden width."""

    width: int
    depth: int
    heads: int
    ffn: str
    hidden: int


ARCHS = {
    "vits14": Arch(384, 12, 6, "mlp", 1536),
    "vitb14": Arch(768, 12, 12, "mlp", 3072),
    "vitl14": Arch(1024, 24, 16, "mlp", 4096),
    # SwiGLUFFNFused: (int(4C * 2 / 3) + 7) // 8 * 8
    "vitg14": Arch(1536, 40, 24, "swiglu", (int(4 * 1536 * 2 / 3) + 7) // 8 * 8),
}


# ----------------------------------------------------------------------------------------------
# Position-embedding resize, as torch's F.interpolate(mode="bicubic") computes it.


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a (torch: -0.75 plain, -0.5 antialiased)."""
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _bicubic_weights(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """[n_out, n_in] of torch's bicubic (align_corners=False, no antialiasing): source position
    scale * (i + 0.5) - 0.5, taps -1..2 around its floor clamped to the border, a = -0.75."""
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        source = scale * (i + 0.5) - 0.5
        floor = math.floor(source)
        t = source - floor
        for tap, w in zip(range(-1, 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
            weights[i, min(max(floor + tap, 0), n_in - 1)] += w
    return weights


def _antialiased_bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] of torch's antialiased bicubic (`antialias=True`, the PIL-style filter
    with a = -0.5, widened by the scale when shrinking, each row normalised to 1)."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = scale * (i + 0.5)
        start = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), n_in)
        taps = _cubic((np.arange(start, stop) - center + 0.5) * inverse, -0.5)
        weights[i, start:stop] = taps / taps.sum()
    return weights


def position_grid_weights(grid: int, size: int, registers: bool) -> np.ndarray:
    """float32 [size, grid]: the resize of one side of the position grid to `size` patches.

    dinov2 without registers: interpolate(scale_factor=(size + 0.1) / grid, bicubic, no
    antialiasing), so torch maps output i to source (i + 0.5) * grid / (size + 0.1) - 0.5;
    with registers (interpolate_offset 0, antialias): interpolate(size=size, antialiased bicubic).
    """
    if registers:
        return _antialiased_bicubic_weights(grid, size).astype(np.float32)
    return _bicubic_weights(grid, size, grid / (size + 0.1)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Modules.


class LayerScale(nn.Module):
    width: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gamma = self.param("gamma", nn.initializers.constant(1.0), (self.width,), self.param_dtype)
        return x * gamma.astype(x.dtype)


class Block(nn.Module):
    """One dinov2 block: [B, T, C] -> [B, T, C]."""

    arch: Arch
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        arch, kw = self.arch, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        head_dim = arch.width // arch.heads
        h = nn.LayerNorm(epsilon=LN_EPS, name="norm1", **kw)(x)
        attn = _Attention(arch.width, arch.heads, head_dim, name="attn", **kw)(h)
        x = x + LayerScale(arch.width, self.param_dtype, name="ls1")(attn)
        h = nn.LayerNorm(epsilon=LN_EPS, name="norm2", **kw)(x)
        return x + LayerScale(arch.width, self.param_dtype, name="ls2")(_FFN(arch, name="mlp", **kw)(h))


class _Attention(nn.Module):
    width: int
    heads: int
    head_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        qkv = nn.Dense(3 * self.width, name="qkv", **kw)(x).reshape(*x.shape[:2], 3, self.heads, self.head_dim)
        attended = nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], deterministic=True,
                                            dtype=self.dtype, force_fp32_for_softmax=True)
        return nn.Dense(self.width, name="proj", **kw)(attended.reshape(x.shape))


class _FFN(nn.Module):
    arch: Arch
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        arch, kw = self.arch, {"dtype": self.dtype, "param_dtype": self.param_dtype}
        if arch.ffn == "swiglu":
            x1, x2 = jnp.split(nn.Dense(2 * arch.hidden, name="w12", **kw)(x), 2, axis=-1)
            return nn.Dense(arch.width, name="w3", **kw)(nn.silu(x1) * x2)
        h = nn.gelu(nn.Dense(arch.hidden, name="fc1", **kw)(x), approximate=False)
        return nn.Dense(arch.width, name="fc2", **kw)(h)


class DINOv2(nn.Module):
    """A DINOv2 ViT as a backbone (see the module docstring).

    Attributes:
      size: "vits14", "vitb14", "vitl14" or "vitg14".
      registers: the "_reg" models (4 register tokens; antialiased position resize).
      returns: "map", "map_and_cls" or "cls".
      final_norm: apply the final LayerNorm to what is returned.
    """

    size: str = "vitb14"
    registers: bool = False
    returns: str = "map"
    final_norm: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False):
        """x: [B, H, W, 3], H and W multiples of 14. `train` changes nothing (no dropout)."""
        arch = ARCHS[self.size]
        if self.returns not in OUTPUTS:
            raise ValueError(f"DINOv2 returns={self.returns!r}: expected one of {OUTPUTS}")
        batch, height, width = x.shape[0], x.shape[1] // PATCH, x.shape[2] // PATCH
        if x.shape[1] % PATCH or x.shape[2] % PATCH:
            raise ValueError(f"DINOv2 needs input sides that are multiples of {PATCH}, got {tuple(x.shape[1:3])}")
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        init = nn.initializers.truncated_normal(0.02)
        patches = nn.Conv(arch.width, (PATCH, PATCH), strides=PATCH, padding="VALID", name="patch_embed", **kw)(x)
        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, arch.width), self.param_dtype)
        pos_embed = self.param("pos_embed", init, (1, GRID * GRID + 1, arch.width), self.param_dtype)
        grid = pos_embed[0, 1:].reshape(GRID, GRID, arch.width)
        if (height, width) != (GRID, GRID):
            rows = position_grid_weights(GRID, height, self.registers)
            cols = position_grid_weights(GRID, width, self.registers)
            grid = jnp.einsum("ih,jw,hwc->ijc", rows, cols, grid.astype(jnp.float32),
                              precision=jax.lax.Precision.HIGHEST)
        tokens = patches.reshape(batch, height * width, arch.width) + grid.reshape(1, -1, arch.width).astype(self.dtype)
        cls = cls_token.astype(self.dtype) + pos_embed[:, :1].astype(self.dtype)
        parts = [jnp.broadcast_to(cls, (batch, 1, arch.width))]
        if self.registers:
            register_tokens = self.param("register_tokens", nn.initializers.normal(1e-6),
                                         (1, REGISTERS, arch.width), self.param_dtype)
            parts.append(jnp.broadcast_to(register_tokens.astype(self.dtype), (batch, REGISTERS, arch.width)))
        x = jnp.concatenate([*parts, tokens], axis=1)
        for index in range(arch.depth):
            x = Block(arch, name=f"block_{index}", **kw)(x)
        if self.final_norm:
            x = nn.LayerNorm(epsilon=LN_EPS, name="norm", **kw)(x)
        cls, patch_map = x[:, 0], x[:, 1 + REGISTERS * self.registers:].reshape(batch, height, width, arch.width)
        return {"map": patch_map, "cls": cls, "map_and_cls": (patch_map, cls)}[self.returns]


# ----------------------------------------------------------------------------------------------
# Torch import and export.


def import_torch(reader: StateDictReader, prefix: str, size: str = "vitb14", registers: bool = False,
                 final_norm: bool = True, returns: str = "map", dtype: Any = None,
                 param_dtype: Any = jnp.float32) -> dict:
    """dinov2 state dict (keys `prefix + <dinov2 name>`, e.g. "backbone.model." in SALAD's
    checkpoint, "backbone.dino." in BoQ's) -> {"params": ...} for `DINOv2`. The final norm is
    read when the checkpoint holds it (its hub files and SALAD's do) and ignored when the
    network does not apply it; the mask token is ignored. Does not call reader.finish()."""
    del returns, dtype
    arch, width = ARCHS[size], ARCHS[size].width
    params = {
        "patch_embed": conv(reader, f"{prefix}patch_embed.proj", width, 3, PATCH),
        "cls_token": reader.take(f"{prefix}cls_token", (1, 1, width)),
        "pos_embed": reader.take(f"{prefix}pos_embed", (1, GRID * GRID + 1, width)),
    }
    if registers:
        params["register_tokens"] = reader.take(f"{prefix}register_tokens", (1, REGISTERS, width))
    for index in range(arch.depth):
        params[f"block_{index}"] = _import_block(reader, f"{prefix}blocks.{index}.", arch)
    if final_norm:
        params["norm"] = layer_norm(reader, f"{prefix}norm", width)
    reader.ignore(re.escape(f"{prefix}mask_token") + "|" + re.escape(f"{prefix}norm.") + "(weight|bias)")
    return {"params": cast_params(params, param_dtype)}


def _import_block(reader: StateDictReader, block: str, arch: Arch) -> dict:
    width = arch.width
    if arch.ffn == "swiglu":
        mlp = {"w12": dense(reader, f"{block}mlp.w12", width, 2 * arch.hidden),
               "w3": dense(reader, f"{block}mlp.w3", arch.hidden, width)}
    else:
        mlp = {"fc1": dense(reader, f"{block}mlp.fc1", width, arch.hidden),
               "fc2": dense(reader, f"{block}mlp.fc2", arch.hidden, width)}
    return {
        "norm1": layer_norm(reader, f"{block}norm1", width),
        "attn": {"qkv": dense(reader, f"{block}attn.qkv", width, 3 * width),
                 "proj": dense(reader, f"{block}attn.proj", width, width)},
        "ls1": {"gamma": reader.take(f"{block}ls1.gamma", (width,))},
        "norm2": layer_norm(reader, f"{block}norm2", width),
        "mlp": mlp,
        "ls2": {"gamma": reader.take(f"{block}ls2.gamma", (width,))},
    }


def export_torch(variables: dict, prefix: str, size: str = "vitb14", registers: bool = False,
                 final_norm: bool = True, **fields) -> dict:
    """The inverse of `import_torch`: float32 tensors under dinov2's keys, with `mask_token` as
    zeros (pre-training only) and, when the network has no final norm, an identity one (weight
    1, bias 0) so that the file loads into dinov2's module."""
    del fields
    params, arch = variables["params"], ARCHS[size]
    state = {f"{prefix}cls_token": np.asarray(params["cls_token"], np.float32),
             f"{prefix}pos_embed": np.asarray(params["pos_embed"], np.float32),
             f"{prefix}mask_token": np.zeros((1, arch.width), np.float32),
             **torch_conv(params["patch_embed"], f"{prefix}patch_embed.proj")}
    if registers:
        state[f"{prefix}register_tokens"] = np.asarray(params["register_tokens"], np.float32)
    for index in range(arch.depth):
        block, name = params[f"block_{index}"], f"{prefix}blocks.{index}."
        state.update({**torch_layer_norm(block["norm1"], f"{name}norm1"),
                      **torch_dense(block["attn"]["qkv"], f"{name}attn.qkv"),
                      **torch_dense(block["attn"]["proj"], f"{name}attn.proj"),
                      f"{name}ls1.gamma": np.asarray(block["ls1"]["gamma"], np.float32),
                      **torch_layer_norm(block["norm2"], f"{name}norm2"),
                      f"{name}ls2.gamma": np.asarray(block["ls2"]["gamma"], np.float32)})
        for layer, values in block["mlp"].items():
            state.update(torch_dense(values, f"{name}mlp.{layer}"))
    norm = params["norm"] if final_norm else {"scale": np.ones(arch.width), "bias": np.zeros(arch.width)}
    state.update(torch_layer_norm(norm, f"{prefix}norm"))
    return state


def trainable_mask(params: dict, unfreeze_n_blocks: int | None = None) -> dict:
    """SALAD/BoQ freezing: with unfreeze_n_blocks = n, only the last n blocks and the final
    norm train; None trains everything. Returns bools of the shape of `params`."""
    depth = sum(1 for name in params if name.startswith("block_"))
    if unfreeze_n_blocks is not None and not 0 <= unfreeze_n_blocks <= depth:
        raise ValueError(f"unfreeze_n_blocks={unfreeze_n_blocks}: must be between 0 and {depth}")

    def trained(name: str) -> bool:
        if unfreeze_n_blocks is None or name == "norm":
            return True
        match = re.fullmatch(r"block_(\d+)", name)
        return match is not None and int(match.group(1)) >= depth - unfreeze_n_blocks

    return {name: jax.tree.map(lambda _, flag=trained(name): flag, subtree) for name, subtree in params.items()}

"""ViT-B/16 backbone computed as HuggingFace's `ViTModel` (reference §2.4), with torch import.

Pipeline for an [B, S, S, 3] ImageNet-normalized NHWC image (S = 224 or 384):
  16x16/16 patch Conv (bias) -> [B, T, 768] with T = (S/16)^2 (196 or 576), a CLS token in front,
  learnable position embeddings for the T + 1 tokens (no interpolation: S must match them),
  12 pre-norm encoder layers (LayerNorm eps 1e-12; 12 heads of 64 with separate query/key/value
  Dense layers; MLP 768 -> 3072 -> 768 with exact GELU), final LayerNorm.
There is no dropout: HF's defaults are 0 for the hidden and the attention dropout.

Flax parameter tree (torch key in brackets, relative to the import prefix):
  patch_embeddings/{kernel,bias}        [embeddings.patch_embeddings.projection.{weight,bias}]
  cls_token [1,1,768]                   [embeddings.cls_token]
  position_embeddings [1,T+1,768]       [embeddings.position_embeddings]
  layer_{i}/layernorm_before            [encoder.layer.{i}.layernorm_before.*]
  layer_{i}/{query,key,value}           [encoder.layer.{i}.attention.attention.{query,key,value}.*]
  layer_{i}/attention_output            [encoder.layer.{i}.attention.output.dense.*]
  layer_{i}/layernorm_after             [encoder.layer.{i}.layernorm_after.*]
  layer_{i}/intermediate                [encoder.layer.{i}.intermediate.dense.*]
  layer_{i}/output                      [encoder.layer.{i}.output.dense.*]
  layernorm/{scale,bias}                [layernorm.*]
HF's `pooler.*` is never used by the benchmark and is not created.

The transformer helpers at the top (truncation depth, Dense/LayerNorm import, freezing mask) are
shared with `cct.py`.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vgjax.models.convert import (StateDictReader, conv, dense, layer_norm, torch_conv, torch_dense,
                                  torch_layer_norm)

PATCH = 16
WIDTH = 768
DEPTH = 12
HEADS = 12
HEAD_DIM = WIDTH // HEADS
MLP_DIM = 3072
LN_EPS = 1e-12
IMAGE_SIZES = (224, 384)
OUTPUTS = ("tokens", "cls")


# ----------------------------------------------------------------------------------------------
# Helpers shared by the transformer backbones (ViT, CCT).


def kept_depth(trunc_te: int | None, depth: int) -> int:
    """Number of encoder blocks kept by the benchmark's `blocks[:trunc_te]`.

    None or 0 keep all `depth` blocks (0 is falsy in the benchmark); a value above `depth` keeps
    all of them too (Python slicing). Negative values are rejected.
    """
    if trunc_te is not None and trunc_te < 0:
        raise ValueError(f"trunc_te={trunc_te}: must be None or >= 0")
    return min(trunc_te, depth) if trunc_te else depth


def ignore_blocks(reader: StateDictReader, block_prefix: str, first: int, depth: int) -> None:
    """Marks the torch blocks `<block_prefix>{first..depth-1}.*` (cut by trunc_te) as unused."""
    for index in range(first, depth):
        reader.ignore(re.escape(f"{block_prefix}{index}.") + ".*")


def cast_params(params: dict, param_dtype: Any) -> dict:
    """numpy leaves -> arrays of the module's param_dtype."""
    return jax.tree.map(lambda a: np.asarray(a, dtype=param_dtype), params)


def stack_trainable_mask(params: dict, freeze_te: int | None, block_prefix: str) -> dict:
    """The benchmark's freeze_te rule (reference §2.4, §9.9) on a Flax param tree.

    freeze_te None or 0: everything trainable (0 is falsy). Otherwise everything is frozen
    (embeddings, tokenizer, final norm, pooling head ...) except the top-level blocks named
    `<block_prefix><i>` with i > freeze_te; freeze_te = -1 trains all blocks and nothing else.
    Returns a pytree of Python bools with the structure of `params` (True = trained).
    """
    pattern = re.compile(re.escape(block_prefix) + r"(\d+)")

    def subtree_mask(name: str, subtree: Any) -> Any:
        match = pattern.fullmatch(name)
        flag = not freeze_te or (match is not None and int(match.group(1)) > freeze_te)
        return jax.tree.map(lambda _: flag, subtree)

    return {name: subtree_mask(name, subtree) for name, subtree in params.items()}


# ----------------------------------------------------------------------------------------------
# ViT-B/16.


def num_tokens(image_size: int) -> int:
    """Patch tokens of an image_size x image_size input (224 -> 196, 384 -> 576)."""
    return (image_size // PATCH) ** 2


def _check_config(image_size: int, output: str) -> None:
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"ViT image_size={image_size}: the benchmark's checkpoints exist for "
                         f"{IMAGE_SIZES} only")
    if output not in OUTPUTS:
        raise ValueError(f"ViT output={output!r}: expected one of {OUTPUTS}")


class ViTLayer(nn.Module):
    """One pre-norm HF ViT encoder layer: [B, T, 768] -> [B, T, 768]."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.LayerNorm(epsilon=LN_EPS, name="layernorm_before", **kw)(x)
        q, k, v = (nn.Dense(WIDTH, name=name, **kw)(h).reshape(*h.shape[:2], HEADS, HEAD_DIM)
                   for name in ("query", "key", "value"))
        attended = nn.dot_product_attention(q, k, v, deterministic=True, dtype=self.dtype,
                                            force_fp32_for_softmax=True)
        x = x + nn.Dense(WIDTH, name="attention_output", **kw)(attended.reshape(x.shape))
        h = nn.LayerNorm(epsilon=LN_EPS, name="layernorm_after", **kw)(x)
        h = nn.gelu(nn.Dense(MLP_DIM, name="intermediate", **kw)(h), approximate=False)
        return x + nn.Dense(WIDTH, name="output", **kw)(h)


class ViT(nn.Module):
    """ViT-B/16 (HF `ViTModel`) as a token backbone.

    Attributes:
      image_size: 224 (google/vit-base-patch16-224-in21k) or 384 (google/vit-base-patch16-384);
        inputs must be exactly image_size x image_size (the position embeddings are not
        interpolated).
      trunc_te: keep only the first trunc_te encoder layers; None or 0 keep all 12.
      output: "tokens" -> the patch tokens [B, T, 768] after the final LayerNorm (CLS dropped);
        "cls" -> the CLS token after the final LayerNorm [B, 768] (not L2-normalized).
    """

    image_size: int = 224
    trunc_te: int | None = None
    output: str = "tokens"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [B, S, S, 3] with S = image_size. `train` changes nothing (no dropout in HF ViT)."""
        _check_config(self.image_size, self.output)
        depth = kept_depth(self.trunc_te, DEPTH)
        expected = (self.image_size, self.image_size, 3)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ViT(image_size={self.image_size}) needs [B, {expected[0]}, "
                             f"{expected[1]}, 3] inputs (no position-embedding interpolation), "
                             f"got {tuple(x.shape)}")
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        init = nn.initializers.truncated_normal(0.02)
        patches = nn.Conv(WIDTH, (PATCH, PATCH), strides=PATCH, padding="VALID",
                          name="patch_embeddings", **kw)(x)
        batch = x.shape[0]
        cls_token = self.param("cls_token", init, (1, 1, WIDTH), self.param_dtype)
        position = self.param("position_embeddings", init,
                              (1, num_tokens(self.image_size) + 1, WIDTH), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, WIDTH)),
                             patches.reshape(batch, -1, WIDTH)], axis=1)
        x = x + position.astype(self.dtype)
        for index in range(depth):
            x = ViTLayer(name=f"layer_{index}", **kw)(x)
        x = nn.LayerNorm(epsilon=LN_EPS, name="layernorm", **kw)(x)
        return x[:, 1:] if self.output == "tokens" else x[:, 0]


def import_torch(reader: StateDictReader, prefix: str, image_size: int = 224,
                 trunc_te: int | None = None, output: str = "tokens", dtype: Any = None,
                 param_dtype: Any = jnp.float32) -> dict:
    """HF ViTModel state dict (keys `prefix + <HF name>`) -> {"params": ...} for `ViT`.

    `prefix` is e.g. "backbone.vit_model." for the benchmark's checkpoints. Reads the embeddings,
    the first kept_depth(trunc_te) encoder layers and the final layernorm; ignores `pooler.*` and
    the layers removed by trunc_te. `output` and `dtype` are accepted so that a module's fields can
    be passed as they are; they do not change the weights. Does not call reader.finish().
    """
    _check_config(image_size, output)
    depth = kept_depth(trunc_te, DEPTH)
    projection = f"{prefix}embeddings.patch_embeddings.projection"
    params = {
        "patch_embeddings": conv(reader, projection, WIDTH, 3, PATCH),
        "cls_token": reader.take(f"{prefix}embeddings.cls_token", (1, 1, WIDTH)),
        "position_embeddings": reader.take(f"{prefix}embeddings.position_embeddings",
                                           (1, num_tokens(image_size) + 1, WIDTH)),
        "layernorm": layer_norm(reader, f"{prefix}layernorm", WIDTH),
    }
    for index in range(depth):
        params[f"layer_{index}"] = _import_layer(reader, f"{prefix}encoder.layer.{index}.")
    reader.ignore(re.escape(f"{prefix}pooler.") + ".*")
    ignore_blocks(reader, f"{prefix}encoder.layer.", depth, DEPTH)
    return {"params": cast_params(params, param_dtype)}


def _import_layer(reader: StateDictReader, layer: str) -> dict:
    attention = f"{layer}attention.attention."
    params = {name: dense(reader, f"{attention}{name}", WIDTH, WIDTH)
              for name in ("query", "key", "value")}
    params.update(
        layernorm_before=layer_norm(reader, f"{layer}layernorm_before", WIDTH),
        attention_output=dense(reader, f"{layer}attention.output.dense", WIDTH, WIDTH),
        layernorm_after=layer_norm(reader, f"{layer}layernorm_after", WIDTH),
        intermediate=dense(reader, f"{layer}intermediate.dense", WIDTH, MLP_DIM),
        output=dense(reader, f"{layer}output.dense", MLP_DIM, WIDTH),
    )
    return params


def export_torch(variables: dict, prefix: str, trunc_te: int | None = None, **fields) -> dict:
    """The inverse of `import_torch`: {"params"} of `ViT` -> float32 tensors under HF ViTModel
    keys (`prefix + "embeddings.*"`, `"encoder.layer.{i}.*"` for the kept layers, `"layernorm.*"`)
    plus `"pooler.dense.{weight,bias}"` as zeros: HF's ViTModel holds a pooler that the benchmark
    never uses and vgjax does not create. The module's other fields are accepted so that they can
    be passed as they are."""
    del fields
    params = variables["params"]
    state = {f"{prefix}embeddings.cls_token": np.asarray(params["cls_token"], np.float32),
             f"{prefix}embeddings.position_embeddings": np.asarray(params["position_embeddings"], np.float32),
             **torch_conv(params["patch_embeddings"], f"{prefix}embeddings.patch_embeddings.projection")}
    for index in range(kept_depth(trunc_te, DEPTH)):
        state.update(_export_layer(params[f"layer_{index}"], f"{prefix}encoder.layer.{index}."))
    state.update(torch_layer_norm(params["layernorm"], f"{prefix}layernorm"))
    state.update(torch_dense({"kernel": np.zeros((WIDTH, WIDTH)), "bias": np.zeros(WIDTH)},
                             f"{prefix}pooler.dense"))
    return state


def _export_layer(params: dict, layer: str) -> dict:
    attention = f"{layer}attention.attention."
    return {
        **torch_layer_norm(params["layernorm_before"], f"{layer}layernorm_before"),
        **{key: value for name in ("query", "key", "value")
           for key, value in torch_dense(params[name], f"{attention}{name}").items()},
        **torch_dense(params["attention_output"], f"{layer}attention.output.dense"),
        **torch_layer_norm(params["layernorm_after"], f"{layer}layernorm_after"),
        **torch_dense(params["intermediate"], f"{layer}intermediate.dense"),
        **torch_dense(params["output"], f"{layer}output.dense"),
    }


def trainable_mask(params: dict, freeze_te: int | None = None) -> dict:
    """Benchmark freezing for ViT (network.py L171-178): freeze_te None/0 trains everything;
    otherwise only encoder layers with index > freeze_te are trained (embeddings and the final
    layernorm stay frozen). `params` is the module's "params" tree; returns bools of its shape."""
    return stack_trainable_mask(params, freeze_te, "layer_")

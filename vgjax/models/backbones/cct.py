"""CCT-14/7x2 at 384x384 (the benchmark's `cct384` backbone, reference §2.4), with torch import.

Pipeline for an [B, 384, 384, 3] ImageNet-normalized NHWC image:
  tokenizer: [Conv 3->64 7x7/2 pad 3 (no bias), ReLU, MaxPool 3/2 pad 1]
             [Conv 64->384 7x7/2 pad 3 (no bias), ReLU, MaxPool 3/2 pad 1]  -> 24x24 = 576 tokens
  + learnable positional embedding [1, 576, 384] (there is no class token: CCT uses seq-pooling)
  14 hybrid pre/post-norm blocks (below), final LayerNorm `norm` (eps 1e-5 everywhere).
Block i (drop-path rate linspace(0, 0.1, 14)[i], kept when the stack is truncated):
  x = x + DropPath(proj(AttnDropout(softmax(q k^T / 8)) v))   q, k, v from qkv(pre_norm(x)),
  x = norm1(x)                                                  6 heads of 64, qkv without bias
  x = x + DropPath(linear2(GELU(linear1(x))))                   384 -> 1152 -> 384, exact GELU
Attention dropout (0.1) and DropPath are active only with train=True (rng collection "dropout");
the other CCT dropouts have rate 0 and are omitted.

Flax parameter tree (torch key in brackets, relative to the import prefix):
  tokenizer_{0,1}/kernel        [tokenizer.conv_layers.{0,1}.0.weight]
  positional_emb [1,576,384]    [classifier.positional_emb]
  blocks_{i}/pre_norm           [classifier.blocks.{i}.pre_norm.*]
  blocks_{i}/qkv/kernel         [classifier.blocks.{i}.self_attn.qkv.weight]
  blocks_{i}/proj               [classifier.blocks.{i}.self_attn.proj.*]
  blocks_{i}/{linear1,norm1,linear2}  [classifier.blocks.{i}.{linear1,norm1,linear2}.*]
  norm                          [classifier.norm.*]
  attention_pool/{kernel,bias}  [classifier.attention_pool.*]
`attention_pool` (Dense 384 -> 1) is created, imported and required for every `output`, not only
"seqpool": it is part of every CCT checkpoint (ImageNet and benchmark), so weights round-trip and
freeze_te can freeze it as the benchmark does. Under jit its unused computation is dropped.
The ImageNet checkpoint's `classifier.fc.*` is ignored (the benchmark drops the classifier).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vgjax.models.backbones.vit import cast_params, ignore_blocks, kept_depth, stack_trainable_mask
from vgjax.models.convert import (StateDictReader, conv, dense, layer_norm, torch_conv, torch_dense,
                                  torch_layer_norm)

IMAGE_SIZE = 384
TOKENIZER_CHANNELS = (64, 384)
KERNEL = 7
WIDTH = 384
TOKENS = 576
DEPTH = 14
HEADS = 6
HEAD_DIM = WIDTH // HEADS
MLP_DIM = 1152
LN_EPS = 1e-5
ATTENTION_DROPOUT = 0.1
STOCHASTIC_DEPTH = 0.1
OUTPUTS = ("tokens", "cls", "seqpool")


def _check_output(output: str) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"CCT output={output!r}: expected one of {OUTPUTS}")


def drop_path_rates() -> np.ndarray:
    """Per-block stochastic-depth rates of the full 14-block stack."""
    return np.linspace(0.0, STOCHASTIC_DEPTH, DEPTH)


class CCTBlock(nn.Module):
    """CCT encoder layer with the hybrid norm order: [B, T, 384] -> [B, T, 384]."""

    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _drop_path(self, x: jax.Array, train: bool) -> jax.Array:
        """Per-sample stochastic depth: drops whole residual branches, rescales kept ones."""
        if not train or self.drop_path_rate == 0.0:
            return x
        keep_prob = 1.0 - self.drop_path_rate
        keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob,
                                    (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(keep, x / keep_prob, 0).astype(x.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        batch, tokens, _ = x.shape
        h = nn.LayerNorm(epsilon=LN_EPS, name="pre_norm", **kw)(x)
        qkv = nn.Dense(3 * WIDTH, use_bias=False, name="qkv", **kw)(h)
        q, k, v = jnp.moveaxis(qkv.reshape(batch, tokens, 3, HEADS, HEAD_DIM), 2, 0)
        attended = nn.dot_product_attention(
            q, k, v, broadcast_dropout=False, dropout_rate=ATTENTION_DROPOUT,
            dropout_rng=self.make_rng("dropout") if train else None, deterministic=not train,
            dtype=self.dtype, force_fp32_for_softmax=True)
        attended = nn.Dense(WIDTH, name="proj", **kw)(attended.reshape(batch, tokens, WIDTH))
        x = nn.LayerNorm(epsilon=LN_EPS, name="norm1", **kw)(x + self._drop_path(attended, train))
        h = nn.gelu(nn.Dense(MLP_DIM, name="linear1", **kw)(x), approximate=False)
        return x + self._drop_path(nn.Dense(WIDTH, name="linear2", **kw)(h), train)


class CCT(nn.Module):
    """CCT-14/7x2-384 token backbone.

    Attributes:
      trunc_te: keep only the first trunc_te blocks; None or 0 keep all 14.
      output: "tokens" -> [B, 576, 384] after the final norm; "cls" -> x[:, 0], [B, 384]: the FIRST
        PATCH TOKEN, since CCT has no class token (a benchmark quirk, reproduced on purpose);
        "seqpool" -> softmax over tokens of attention_pool(x), weighted sum of x -> [B, 384].
        None of them is L2-normalized.
    """

    trunc_te: int | None = None
    output: str = "tokens"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: [B, 384, 384, 3]. train=True: attention dropout and DropPath on (rng "dropout")."""
        _check_output(self.output)
        depth = kept_depth(self.trunc_te, DEPTH)
        expected = (IMAGE_SIZE, IMAGE_SIZE, 3)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"CCT-14/7x2-384 needs [B, 384, 384, 3] inputs (its {TOKENS} "
                             f"positional embeddings fix the size), got {tuple(x.shape)}")
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        for index, channels in enumerate(TOKENIZER_CHANNELS):
            x = nn.Conv(channels, (KERNEL, KERNEL), strides=2, padding=((3, 3), (3, 3)),
                        use_bias=False, name=f"tokenizer_{index}", **kw)(x)
            x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        position = self.param("positional_emb", nn.initializers.truncated_normal(0.2),
                              (1, TOKENS, WIDTH), self.param_dtype)
        x = x.reshape(x.shape[0], TOKENS, WIDTH) + position.astype(self.dtype)
        rates = drop_path_rates()
        for index in range(depth):
            x = CCTBlock(float(rates[index]), name=f"blocks_{index}", **kw)(x, train)
        x = nn.LayerNorm(epsilon=LN_EPS, name="norm", **kw)(x)
        pool_weights = jax.nn.softmax(nn.Dense(1, name="attention_pool", **kw)(x), axis=1)
        if self.output == "tokens":
            return x
        if self.output == "cls":
            return x[:, 0]  # the first patch token: CCT has no class token (quirk)
        return jnp.einsum("btk,btd->bd", pool_weights, x)


def import_torch(reader: StateDictReader, prefix: str, trunc_te: int | None = None,
                 output: str = "tokens", dtype: Any = None,
                 param_dtype: Any = jnp.float32) -> dict:
    """CCT state dict (keys `prefix + <CCT name>`, e.g. prefix "backbone.") -> {"params": ...}.

    Reads the tokenizer, positional_emb, attention_pool (for every output), the first
    kept_depth(trunc_te) blocks and the final norm; ignores `classifier.fc.*` and the blocks
    removed by trunc_te. `output` and `dtype` are accepted so that a module's fields can be passed
    as they are; they do not change the weights. Does not call reader.finish().
    """
    _check_output(output)
    depth = kept_depth(trunc_te, DEPTH)
    classifier = f"{prefix}classifier."
    params = {
        "positional_emb": reader.take(f"{classifier}positional_emb", (1, TOKENS, WIDTH)),
        "attention_pool": dense(reader, f"{classifier}attention_pool", WIDTH, 1),
        "norm": layer_norm(reader, f"{classifier}norm", WIDTH),
    }
    in_channels = 3
    for index, channels in enumerate(TOKENIZER_CHANNELS):
        params[f"tokenizer_{index}"] = conv(reader, f"{prefix}tokenizer.conv_layers.{index}.0",
                                            channels, in_channels, KERNEL, bias=False)
        in_channels = channels
    for index in range(depth):
        params[f"blocks_{index}"] = _import_block(reader, f"{classifier}blocks.{index}.")
    reader.ignore(re.escape(f"{classifier}fc.") + ".*")
    ignore_blocks(reader, f"{classifier}blocks.", depth, DEPTH)
    return {"params": cast_params(params, param_dtype)}


def _import_block(reader: StateDictReader, block: str) -> dict:
    return {
        "pre_norm": layer_norm(reader, f"{block}pre_norm", WIDTH),
        "qkv": dense(reader, f"{block}self_attn.qkv", WIDTH, 3 * WIDTH, bias=False),
        "proj": dense(reader, f"{block}self_attn.proj", WIDTH, WIDTH),
        "linear1": dense(reader, f"{block}linear1", WIDTH, MLP_DIM),
        "norm1": layer_norm(reader, f"{block}norm1", WIDTH),
        "linear2": dense(reader, f"{block}linear2", MLP_DIM, WIDTH),
    }


def export_torch(variables: dict, prefix: str, trunc_te: int | None = None, **fields) -> dict:
    """The inverse of `import_torch`: {"params"} of `CCT` -> float32 tensors under the
    benchmark's keys (`prefix + "tokenizer.conv_layers.{0,1}.0.weight"`, `"classifier.*"` with the
    kept blocks only; no `classifier.fc`, which the benchmark's CCT does not have). The module's
    other fields are accepted so that they can be passed as they are."""
    del fields
    params, classifier = variables["params"], f"{prefix}classifier."
    state = {key: value for index in range(len(TOKENIZER_CHANNELS)) for key, value in
             torch_conv(params[f"tokenizer_{index}"], f"{prefix}tokenizer.conv_layers.{index}.0").items()}
    state[f"{classifier}positional_emb"] = np.asarray(params["positional_emb"], np.float32)
    state.update(torch_dense(params["attention_pool"], f"{classifier}attention_pool"))
    for index in range(kept_depth(trunc_te, DEPTH)):
        state.update(_export_block(params[f"blocks_{index}"], f"{classifier}blocks.{index}."))
    state.update(torch_layer_norm(params["norm"], f"{classifier}norm"))
    return state


def _export_block(params: dict, block: str) -> dict:
    return {
        **torch_layer_norm(params["pre_norm"], f"{block}pre_norm"),
        **torch_dense(params["qkv"], f"{block}self_attn.qkv"),
        **torch_dense(params["proj"], f"{block}self_attn.proj"),
        **torch_dense(params["linear1"], f"{block}linear1"),
        **torch_layer_norm(params["norm1"], f"{block}norm1"),
        **torch_dense(params["linear2"], f"{block}linear2"),
    }


def trainable_mask(params: dict, freeze_te: int | None = None) -> dict:
    """Benchmark freezing for CCT (network.py L151-158): freeze_te None/0 trains everything;
    otherwise only blocks with index > freeze_te are trained (tokenizer, positional_emb,
    attention_pool and the final norm stay frozen). `params` is the module's "params" tree;
    returns bools of its shape."""
    return stack_trainable_mask(params, freeze_te, "blocks_")

"""Helpers to turn PyTorch state dicts (name -> numpy array) into Flax variables, loudly.

Every importer reads its tensors through a `StateDictReader`: each read checks the shape, and
`finish()` fails if any tensor was neither read nor explicitly ignored, so a wrong or partial
checkpoint can never load silently.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np


class WeightImportError(ValueError):
    """A state dict does not match the network it is loaded into."""


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """torch Conv2d weight [O, I, kh, kw] -> Flax Conv kernel [kh, kw, I, O]."""
    return np.transpose(weight, (2, 3, 1, 0))


def dense_kernel(weight: np.ndarray) -> np.ndarray:
    """torch Linear weight [out, in] -> Flax Dense kernel [in, out]."""
    return np.transpose(weight)


class StateDictReader:
    """Reads tensors from a torch-style state dict with shape checks and key accounting.

    Args:
      state_dict: name -> array (numpy or anything np.asarray accepts).
      source: a description used in error messages (e.g. the file name).
    """

    def __init__(self, state_dict: Mapping[str, np.ndarray], source: str = "state dict"):
        self._state = {k: np.asarray(v) for k, v in state_dict.items()}
        self._unused = set(self._state)
        self.source = source
        self.ignored: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self._state

    def keys(self) -> list[str]:
        return list(self._state)

    def take(self, key: str, shape: Iterable[int] | None = None) -> np.ndarray:
        """The float32 tensor `key`; raises WeightImportError if missing or of another shape."""
        if key not in self._state:
            raise WeightImportError(f"{self.source}: missing tensor '{key}'")
        value = self._state[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise WeightImportError(f"{self.source}: tensor '{key}' has shape {tuple(value.shape)}, "
                                    f"expected {tuple(shape)}")
        self._unused.discard(key)
        return value.astype(np.float32)

    def ignore(self, pattern: str) -> None:
        """Marks every unused key matching the regular expression as deliberately not loaded."""
        matched = sorted(k for k in self._unused if re.fullmatch(pattern, k))
        self._unused.difference_update(matched)
        self.ignored.extend(matched)

    def finish(self) -> None:
        """Raises WeightImportError listing every tensor that was neither read nor ignored."""
        if self._unused:
            unused = sorted(self._unused)
            shown = ", ".join(unused[:10]) + (f", ... ({len(unused)} in all)" if len(unused) > 10 else "")
            raise WeightImportError(f"{self.source}: unexpected tensors not used by this network: {shown}")


def conv(reader: StateDictReader, name: str, out_channels: int, in_channels: int, kernel: int,
         bias: bool = True) -> dict:
    """torch Conv2d '<name>.{weight,bias}' -> flax Conv params (kernel [k, k, I, O], bias)."""
    weight = reader.take(f"{name}.weight", (out_channels, in_channels, kernel, kernel))
    params = {"kernel": conv_kernel(weight)}
    if bias:
        params["bias"] = reader.take(f"{name}.bias", (out_channels,))
    return params


def dense(reader: StateDictReader, name: str, n_in: int, n_out: int, bias: bool = True) -> dict:
    """torch Linear '<name>.{weight,bias}' -> flax Dense params (kernel [n_in, n_out], bias)."""
    params = {"kernel": dense_kernel(reader.take(f"{name}.weight", (n_out, n_in)))}
    if bias:
        params["bias"] = reader.take(f"{name}.bias", (n_out,))
    return params


def layer_norm(reader: StateDictReader, name: str, n: int) -> dict:
    """torch LayerNorm '<name>.{weight,bias}' -> flax LayerNorm params {scale, bias}."""
    return {"scale": reader.take(f"{name}.weight", (n,)), "bias": reader.take(f"{name}.bias", (n,))}


def batch_norm(reader: StateDictReader, prefix: str, channels: int) -> tuple[dict, dict]:
    """torch BatchNorm2d '<prefix>.{weight,bias,running_mean,running_var}' -> (params, batch_stats)
    for flax.linen.BatchNorm; 'num_batches_tracked' is ignored."""
    params = {"scale": reader.take(f"{prefix}.weight", (channels,)),
              "bias": reader.take(f"{prefix}.bias", (channels,))}
    stats = {"mean": reader.take(f"{prefix}.running_mean", (channels,)),
             "var": reader.take(f"{prefix}.running_var", (channels,))}
    reader.ignore(re.escape(f"{prefix}.num_batches_tracked"))
    return params, stats

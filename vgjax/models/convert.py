"""PyTorch state dicts (name -> numpy array): reading them from files, and turning them into
Flax variables, loudly.

`read_state_dict` reads .pth/.pt/.bin (torch pickles, only with `torch.load(weights_only=True)`
plus an allowlist of the numpy types that benchmark checkpoints contain), `.npz` without pickle
and `.safetensors` with the `safetensors` package (`read_safetensors`, `write_safetensors`): files
are untrusted input.

Every importer reads its tensors through a `StateDictReader`: each read checks the shape, and
`finish()` fails if any tensor was neither read nor explicitly ignored, so a wrong or partial
checkpoint can never load silently. `torch_conv`, `torch_dense`, `torch_layer_norm` and
`torch_batch_norm` are the inverses of `conv`, `dense`, `layer_norm` and `batch_norm` (export).
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy


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


def _float32(value) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def torch_conv(params: Mapping, name: str) -> dict[str, np.ndarray]:
    """flax Conv params (kernel [kh, kw, I, O], bias if any) -> torch Conv2d '<name>.weight'
    [O, I, kh, kw] (and '<name>.bias')."""
    state = {f"{name}.weight": np.transpose(_float32(params["kernel"]), (3, 2, 0, 1))}
    if "bias" in params:
        state[f"{name}.bias"] = _float32(params["bias"])
    return state


def torch_dense(params: Mapping, name: str) -> dict[str, np.ndarray]:
    """flax Dense params (kernel [n_in, n_out], bias if any) -> torch Linear '<name>.weight'
    [n_out, n_in] (and '<name>.bias')."""
    state = {f"{name}.weight": _float32(params["kernel"]).T}
    if "bias" in params:
        state[f"{name}.bias"] = _float32(params["bias"])
    return state


def torch_layer_norm(params: Mapping, name: str) -> dict[str, np.ndarray]:
    """flax LayerNorm params {scale, bias} -> torch LayerNorm '<name>.{weight,bias}'."""
    return {f"{name}.weight": _float32(params["scale"]), f"{name}.bias": _float32(params["bias"])}


def torch_batch_norm(params: Mapping, stats: Mapping, prefix: str) -> dict[str, np.ndarray]:
    """flax BatchNorm (params {scale, bias}, batch_stats {mean, var}) -> torch BatchNorm2d
    '<prefix>.{weight,bias,running_mean,running_var,num_batches_tracked}'. vgjax does not count
    batches: num_batches_tracked is 0, which changes nothing while torch's momentum is set."""
    return {f"{prefix}.weight": _float32(params["scale"]), f"{prefix}.bias": _float32(params["bias"]),
            f"{prefix}.running_mean": _float32(stats["mean"]),
            f"{prefix}.running_var": _float32(stats["var"]),
            f"{prefix}.num_batches_tracked": np.array(0, dtype=np.int64)}


# ---------------------------------------------------------------------------------------------
# Reading files.


def _numpy_safe_globals() -> list:
    """The numpy objects benchmark checkpoints pickle (recalls arrays, best_r5 scalars), under
    their numpy 1.x and 2.x module names."""
    reconstruct, scalar = np._core.multiarray._reconstruct, np._core.multiarray.scalar
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [np.ndarray, np.dtype, reconstruct, scalar, *dtypes,
            (reconstruct, "numpy.core.multiarray._reconstruct"),
            (scalar, "numpy.core.multiarray.scalar")]


def _torch_load(path: Path) -> object:
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs torch: pip install 'vgjax[torch]', or convert "
                          "the file to .npz or .safetensors") from None
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises UnpicklingError/RuntimeError/... for bad files
            raise WeightImportError(f"{path}: not a loadable weights-only torch file: {error}") from error


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, header metadata) of a .safetensors file, bfloat16 widened to float32. A file the
    safetensors package rejects (bad header, offsets, dtype) raises WeightImportError naming it."""
    try:
        with safetensors.safe_open(path, framework="np", backend="pread") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (safetensors.SafetensorError, TypeError) as error:
        raise WeightImportError(f"{path}: not a valid .safetensors file: {error}") from error
    return ({name: array.astype(np.float32) if array.dtype == ml_dtypes.bfloat16 else array
             for name, array in tensors.items()}, metadata)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` (name -> array) and string `metadata` as a .safetensors file, atomically
    (a crash never leaves a truncated file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    arrays = {name: np.asarray(array, order="C") for name, array in tensors.items()}
    tmp.write_bytes(safetensors.numpy.save(arrays, metadata=dict(metadata) if metadata else None))
    tmp.replace(path)


def _unwrap_state_dict(obj: object, source: str) -> Mapping:
    """The state dict inside a checkpoint: model_state_dict (benchmark train.py), state_dict
    (legacy torch training scripts), or the object itself (zoo / torchvision / hub files)."""
    if isinstance(obj, Mapping):
        for key in ("model_state_dict", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                return obj[key]
        if all(hasattr(v, "shape") for v in obj.values()):
            return obj
    raise WeightImportError(f"{source}: no state dict found (expected a mapping of tensors, or "
                            "one under 'model_state_dict' or 'state_dict')")


def _npz_members(path: Path) -> dict | np.ndarray:
    """np.load without pickle: {name: member} for an archive, the array for a .npy file."""
    loaded = np.load(path, allow_pickle=False)
    if not isinstance(loaded, Mapping):
        return loaded
    with loaded:
        return {name: loaded[name] for name in loaded.files}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The numeric arrays of a .npz archive; anything else raises WeightImportError naming it."""
    try:
        state = _npz_members(path)
    except (OSError, ValueError, EOFError, NotImplementedError, zipfile.BadZipFile) as error:
        raise WeightImportError(f"{path}: not a .npz archive of numeric arrays: {error}") from error
    if not isinstance(state, dict):
        raise WeightImportError(f"{path}: one array in .npy format, not a .npz archive of named tensors")
    for name, value in state.items():  # a member that is not .npy data comes back as bytes
        if np.asarray(value).dtype.kind not in "biuf":
            raise WeightImportError(f"{path}: tensor {name!r} has non-numeric dtype {np.asarray(value).dtype}")
    return state


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a state dict (name -> numpy array) from .pth/.pth.tar/.pt/.bin, .npz or .safetensors,
    unwrapping training checkpoints and removing a DataParallel 'module.' prefix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".npz":
        state = _read_npz(path)
    elif path.suffix == ".safetensors":
        state, _ = read_safetensors(path)
    else:
        state = _unwrap_state_dict(_torch_load(path), str(path))
    state = {k: _to_numpy(v) for k, v in state.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state

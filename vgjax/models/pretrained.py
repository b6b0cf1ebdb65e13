"""Weight import: torchvision, the benchmark's zoo/train checkpoints, CosPlace, HF ViT and CCT.

Files are untrusted input: torch pickles are read only with `torch.load(weights_only=True)`
(plus an allowlist of the numpy types that benchmark checkpoints contain), `.npz` without
pickle, `.safetensors` with a small validating reader. Every tensor is shape-checked and every
tensor of the file must be used or deliberately ignored (see `convert.StateDictReader`).

All loaders return variables in the layout of `geoloc_net.GeoLocalizationNet`:
{"params": {"backbone": ..., "aggregation": ..., "fc": ...}, "batch_stats": {"backbone": ...}}
(only the parts the file holds); `merge_variables` puts them into freshly initialised ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from vgjax.models import aggregators, geoloc_net
from vgjax.models.backbones import alexnet, cct, resnet, vgg, vit
from vgjax.models.convert import StateDictReader, WeightImportError, dense

# torchvision ImageNet (V1) weights, the benchmark's `pretrain=imagenet`. The 8 hex digits in
# each name are the start of the file's sha256.
TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alexnet": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}
# The benchmark's ResNet children indices -> torchvision names (reference §2.8).
_RESNET_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


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


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A validating .safetensors reader (bfloat16 is widened to float32)."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise WeightImportError(f"{path}: too short for a safetensors file")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > len(data) - 8:
        raise WeightImportError(f"{path}: header size {header_size} exceeds the file")
    header = json.loads(data[8:8 + header_size])
    buffer = memoryview(data)[8 + header_size:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if dtype is None or not 0 <= begin <= end <= len(buffer) or \
                end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise WeightImportError(f"{path}: tensor '{name}' has an invalid header entry {info}")
        array = np.frombuffer(buffer[begin:end], dtype=dtype).reshape(shape)
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array
    return tensors


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
        with np.load(path, allow_pickle=False) as archive:
            state = {k: archive[k] for k in archive.files}
    elif path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        state = _unwrap_state_dict(_torch_load(path), str(path))
    state = {k: _to_numpy(v) for k, v in state.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------
# Assembling variables.


def _variables(**parts: dict) -> dict:
    """{"params": {part: ...}, "batch_stats": {part: ...}} from per-part variable dicts."""
    out: dict = {}
    for part, variables in parts.items():
        for collection, tree in variables.items():
            out.setdefault(collection, {})[part] = tree
    return out


def merge_variables(variables: Mapping, loaded: Mapping) -> dict:
    """Returns `variables` with every leaf present in `loaded` replaced; a loaded leaf that the
    model lacks, or whose shape differs, raises WeightImportError."""
    flat = dict(jax.tree_util.tree_flatten_with_path(variables)[0])
    merged = {path: leaf for path, leaf in flat.items()}
    for path, leaf in jax.tree_util.tree_flatten_with_path(loaded)[0]:
        name = jax.tree_util.keystr(path)
        if path not in flat:
            raise WeightImportError(f"loaded variable {name} does not exist in the model")
        if tuple(np.shape(leaf)) != tuple(np.shape(flat[path])):
            raise WeightImportError(f"loaded variable {name} has shape {np.shape(leaf)}, the model "
                                    f"expects {np.shape(flat[path])}")
        merged[path] = np.asarray(leaf, dtype=np.asarray(flat[path]).dtype)
    treedef = jax.tree_util.tree_structure(variables)
    return jax.tree_util.tree_unflatten(treedef, [merged[p] for p in flat])


def _backbone_module(name: str):
    return resnet if name.startswith("resnet") else {
        "vgg16": vgg, "alexnet": alexnet, "cct384": cct, "vit": vit}[name]


def _import_backbone(reader: StateDictReader, prefix: str, config, image_size) -> dict:
    spec = geoloc_net.backbone_spec(config.backbone)
    fields = {k: v for k, v in geoloc_net._backbone_fields(config, image_size).items()
              if k not in ("output", "frozen_bn")}
    return _backbone_module(config.backbone).import_torch(reader, prefix, **{**spec.fields, **fields})


def _rename_benchmark_backbone(state: Mapping[str, np.ndarray], backbone: str) -> dict:
    """Benchmark key names (backbone.<child index>...) -> torchvision names, for CNNs."""
    renamed = {}
    for key, value in state.items():
        if backbone.startswith("resnet") and key.startswith("backbone."):
            child, _, rest = key[len("backbone."):].partition(".")
            if child not in _RESNET_CHILDREN:
                raise WeightImportError(f"unexpected ResNet tensor '{key}'")
            key = f"{_RESNET_CHILDREN[child]}.{rest}"
        elif backbone in ("vgg16", "alexnet") and key.startswith("backbone."):
            key = "features." + key[len("backbone."):]
        renamed[key] = value
    return renamed


# ---------------------------------------------------------------------------------------------
# Public loaders.


def load_torchvision_backbone(path: str | os.PathLike, model_config: ml_collections.ConfigDict,
                              image_size: tuple[int, int] = (480, 640)) -> dict:
    """Backbone variables from a torchvision-format state dict (resnet/vgg16/alexnet), e.g.
    ImageNet weights or the Places365 ResNet-18; its classifier is ignored."""
    if model_config.backbone not in geoloc_net.CNN_BACKBONES:
        raise ValueError(f"load_torchvision_backbone: {model_config.backbone} is not a torchvision CNN")
    reader = StateDictReader(read_state_dict(path), str(path))
    variables = _import_backbone(reader, "", model_config, image_size)
    reader.finish()
    return _variables(backbone=variables)


def load_vit_hf(path: str | os.PathLike, model_config, image_size=(224, 224)) -> dict:
    """Backbone variables from a HuggingFace ViT-B/16 state dict (ViTModel, or the 'vit.' part of
    ViTForImageClassification, whose classifier is ignored)."""
    state = read_state_dict(path)
    reader = StateDictReader(state, str(path))
    prefix = "vit." if any(k.startswith("vit.") for k in state) else ""
    variables = _import_backbone(reader, prefix, model_config, image_size)
    reader.ignore(r"classifier\..*")
    reader.finish()
    return _variables(backbone=variables)


def load_cct(path: str | os.PathLike, model_config, image_size=(384, 384)) -> dict:
    """Backbone variables from the CCT-14/7x2-384 ImageNet checkpoint layout (its fc ignored)."""
    reader = StateDictReader(read_state_dict(path), str(path))
    variables = _import_backbone(reader, "", model_config, image_size)
    reader.finish()
    return _variables(backbone=variables)


def _aggregation_prefixes(config) -> tuple[str, str | None]:
    """(prefix of the aggregation's own tensors, prefix of the FC) in a benchmark state dict."""
    inner = "aggregation."
    if config.aggregation in geoloc_net.POOLINGS:
        inner += "1." if config.l2 == "before_pool" else "0."
    if config.fc_output_dim is None:
        return inner, None
    return "aggregation.0." + inner[len("aggregation."):], "aggregation.1."


def _import_fc(reader: StateDictReader, prefix: str, in_dim: int, out_dim: int) -> dict:
    return {"params": dense(reader, prefix.rstrip("."), in_dim, out_dim)}


def _fc_in_dim(config) -> int:
    no_fc = config.copy_and_resolve_references()
    no_fc.fc_output_dim = None
    return geoloc_net.descriptor_dim(no_fc)


def load_benchmark_checkpoint(path: str | os.PathLike, model_config: ml_collections.ConfigDict,
                              image_size: tuple[int, int] = (480, 640)) -> dict:
    """All variables from a benchmark zoo file or train.py checkpoint (`model_state_dict`,
    'module.' prefix; key names of reference §2.8) for the network `model_config` describes."""
    return _benchmark_variables(read_state_dict(path), model_config, image_size, str(path))


def _benchmark_variables(state: dict, model_config, image_size, source: str) -> dict:
    backbone = model_config.backbone
    if backbone in geoloc_net.CNN_BACKBONES:
        state, backbone_prefix = _rename_benchmark_backbone(state, backbone), ""
    else:
        backbone_prefix = "backbone.vit_model." if backbone == "vit" else "backbone."
    reader = StateDictReader(state, source)
    parts = {"backbone": _import_backbone(reader, backbone_prefix, model_config, image_size)}
    inner, fc_prefix = _aggregation_prefixes(model_config)
    if model_config.aggregation not in ("cls", "seqpool"):
        aggregation = aggregators.import_torch(
            reader, inner, model_config.aggregation, geoloc_net.backbone_spec(backbone).channels,
            model_config.netvlad_clusters)
        if aggregation["params"]:
            parts["aggregation"] = aggregation
    if fc_prefix is not None:
        parts["fc"] = _import_fc(reader, fc_prefix, _fc_in_dim(model_config), model_config.fc_output_dim)
    reader.finish()
    return _variables(**parts)


COSPLACE_BACKBONES = {"resnet18conv5", "resnet50conv5", "resnet101conv5", "vgg16"}


def load_cosplace_checkpoint(path: str | os.PathLike, model_config: ml_collections.ConfigDict,
                             image_size: tuple[int, int] = (512, 512)) -> dict:
    """All variables from a CosPlace torch.hub file: backbone (conv5 ResNet or VGG16), GeM at
    `aggregation.1.p`, FC at `aggregation.3` (reference §5.1). model_config must describe the
    same network: aggregation gem, l2 before_pool, fc_output_dim = the file's dimension."""
    if (model_config.backbone not in COSPLACE_BACKBONES or model_config.aggregation != "gem"
            or model_config.l2 != "before_pool" or model_config.fc_output_dim is None):
        raise ValueError("a CosPlace network is backbone in "
                         f"{sorted(COSPLACE_BACKBONES)}, aggregation=gem, l2=before_pool and "
                         f"fc_output_dim set; got {model_config.backbone}, "
                         f"{model_config.aggregation}, {model_config.l2}, {model_config.fc_output_dim}")
    state = _rename_benchmark_backbone(read_state_dict(path), model_config.backbone)
    reader = StateDictReader(state, str(path))
    channels = geoloc_net.backbone_spec(model_config.backbone).channels
    parts = {
        "backbone": _import_backbone(reader, "", model_config, image_size),
        "aggregation": aggregators.import_torch(reader, "aggregation.1.", "gem", channels),
        "fc": _import_fc(reader, "aggregation.3.", channels, model_config.fc_output_dim),
    }
    reader.finish()
    return _variables(**parts)


# ---------------------------------------------------------------------------------------------
# Downloads (for users with internet) and their offline cache.


def cache_dir() -> Path:
    """$VGJAX_CACHE, else ~/.cache/vgjax."""
    return Path(os.environ.get("VGJAX_CACHE", Path.home() / ".cache" / "vgjax"))


def downloads_off(offline: bool | None = None) -> bool:
    """`offline` when given, else whether $VGJAX_OFFLINE is set."""
    return offline if offline is not None else bool(os.environ.get("VGJAX_OFFLINE"))


def fetch(url: str, *, offline: bool | None = None) -> Path:
    """The cached copy of `url` under cache_dir()/weights, downloading it first if missing.

    A torchvision-style hash prefix in the file name (name-<sha256[:8+]>.ext) is verified. With
    `offline` (default: $VGJAX_OFFLINE set), a missing file is an error, never a download.
    """
    target = cache_dir() / "weights" / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    if downloads_off(offline):
        raise FileNotFoundError(f"{target} is not cached and downloads are off (VGJAX_OFFLINE); "
                                f"download {url} there, or pass a local file")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with urllib.request.urlopen(url) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {target.name}") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    expected = re.search(r"-([0-9a-f]{8,})\.[a-z.]+$", target.name)
    if expected and not digest.hexdigest().startswith(expected.group(1)):
        partial.unlink()
        raise WeightImportError(f"{url}: sha256 {digest.hexdigest()[:16]}... does not match the "
                                f"name's {expected.group(1)}")
    partial.rename(target)
    return target


def pretrained_backbone_file(model_config: ml_collections.ConfigDict) -> Path | None:
    """The file behind `model_config.pretrain`: a local path, "imagenet" (torchvision V1 weights,
    cached or downloaded), "places365" (ResNet-18 only, vgjax.models.places365) or "none"."""
    pretrain = model_config.pretrain
    if pretrain in ("none", ""):
        return None
    if pretrain == "places365":
        if not model_config.backbone.startswith("resnet18"):
            raise ValueError(f"pretrain=places365 is a ResNet-18; got backbone {model_config.backbone}")
        from vgjax.models import places365  # noqa: PLC0415 (it imports this module)
        return places365.resnet18_file()
    if pretrain == "imagenet":
        arch = re.sub(r"conv[45]$", "", model_config.backbone)
        if arch not in TORCHVISION_URLS:
            raise ValueError(f"pretrain=imagenet is available for {sorted(TORCHVISION_URLS)}; for "
                             f"{model_config.backbone} pass a local weights file as model.pretrain")
        return fetch(TORCHVISION_URLS[arch])
    path = Path(pretrain)
    if not path.is_file():
        raise FileNotFoundError(f"model.pretrain={pretrain!r} is neither 'imagenet', 'places365', 'none' nor an "
                                "existing weights file (places/gldv2 weights: download them and "
                                "pass the file)")
    return path


def load_pretrained_backbone(model_config, image_size) -> dict | None:
    """Backbone variables for model_config.pretrain (None for random init)."""
    path = pretrained_backbone_file(model_config)
    if path is None:
        return None
    loader = {"vit": load_vit_hf, "cct384": load_cct}.get(model_config.backbone, load_torchvision_backbone)
    return loader(path, model_config, image_size)


RESUME_FORMATS = ("benchmark", "cosplace")


def build_and_load(model_config: ml_collections.ConfigDict, image_size: tuple[int, int], seed: int = 0):
    """(network, variables): random init, overwritten by model.resume (a whole network) or else
    by model.pretrain (the backbone only)."""
    model = geoloc_net.build(model_config, image_size)
    variables = geoloc_net.init_variables(model, image_size, seed)
    if model_config.resume:
        if model_config.resume_format not in RESUME_FORMATS:
            raise ValueError(f"unknown model.resume_format {model_config.resume_format!r}; "
                             f"choose one of {RESUME_FORMATS}")
        if model_config.resume_format == "cosplace":
            return model, merge_variables(variables, load_cosplace_checkpoint(model_config.resume, model_config, image_size))
        return model, merge_variables(variables, _load_whole_network(model_config, image_size))
    backbone = load_pretrained_backbone(model_config, image_size)
    if backbone is None:
        logging.warning("model.pretrain=none and no model.resume: the network has RANDOM weights")
        return model, variables
    return model, merge_variables(variables, backbone)


def _load_whole_network(model_config, image_size) -> dict:
    """model.resume in the benchmark's layout. For CRN, a file without CRN tensors is the
    NetVLAD network of the benchmark's two-stage recipe (reference §2.5): it is loaded as such
    and the context module keeps its initialisation."""
    path = model_config.resume
    state = read_state_dict(path)
    if model_config.aggregation == "crn" and not any(k.startswith("aggregation.crn.") for k in state):
        print(f"Starting CRN from the NetVLAD network in {path}; the CRN module starts from scratch")
        netvlad = model_config.copy_and_resolve_references()
        netvlad.aggregation = "netvlad"
        return _benchmark_variables(state, netvlad, image_size, str(path))
    return _benchmark_variables(state, model_config, image_size, str(path))


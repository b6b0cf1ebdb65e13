"""Exporting a network: the PyTorch benchmark's state dict, and a self-describing vgjax model file.

(a) `benchmark_state_dict` is the inverse of `pretrained.load_benchmark_checkpoint`: every tensor
of the benchmark's GeoLocalizationNet under its key (reference §2.8), float32, in torch layouts
(conv weights [O, I, kh, kw], linear weights [out, in], BatchNorm weight/bias/running_mean/
running_var/num_batches_tracked), so that the benchmark's network loads it with
`load_state_dict(strict=True)`. Three kinds of tensors have no vgjax counterpart and are written
as the benchmark's network can hold them: BatchNorm's num_batches_tracked (0; with torch's
default momentum it changes nothing), CRN's fixed acc_w (weight 1, bias 0) and HF ViT's pooler
(zeros; the benchmark never uses it). `save_benchmark` writes it as .safetensors.

(b) `save` writes a vgjax model file (name ending in MODEL_SUFFIX): a .safetensors file with the
flax variables under their tree paths ("params/backbone/conv1/kernel") and, in its header
metadata, the format name and version, the architecture (the model config's
geoloc_net.ARCHITECTURE_KEYS, as JSON) and the image size (H, W). `load` rebuilds the network from
that file alone, checks every variable name and shape against the built network, and returns it
with its variables, image size and an embed function. Neither file involves pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from vgjax.configs import common
from vgjax.models import aggregators, geoloc_net, pretrained, registry
from vgjax.models.convert import WeightImportError, read_safetensors, torch_dense, write_safetensors

FORMAT = "vgjax.model"
FORMAT_VERSION = "1"
MODEL_SUFFIX = ".vgjax.safetensors"
_RESNET_INDICES = {name: index for index, name in pretrained.RESNET_CHILDREN.items()}


# ---------------------------------------------------------------------------------------------
# (a) The PyTorch benchmark's state dict.


def benchmark_state_dict(model_config: ml_collections.ConfigDict, variables: Mapping,
                         image_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """The benchmark's state dict (key -> numpy array, float32 except num_batches_tracked int64)
    of `variables` ({"params", "batch_stats"}) of `geoloc_net.build(model_config, image_size)`.
    Networks the benchmark lacks are written as their authors' code holds them: BoQ networks in
    BoQ's layout, other DINOv2 networks in SALAD's (`_gsv_family_state_dict`), which their
    torch models and resume_format=boq / gsv load."""
    entry = registry.backbone(model_config.backbone)
    params = variables["params"]
    backbone = {"params": params["backbone"],
                "batch_stats": variables.get("batch_stats", {}).get("backbone", {})}
    fields = entry.module_fields(model_config, image_size)
    if model_config.aggregation == "boq" or model_config.backbone.startswith("dinov2_"):
        return _gsv_family_state_dict(model_config, entry, backbone, params, fields)
    if entry.tokens:
        state = entry.family.export_torch(backbone, pretrained.TOKEN_BACKBONE_PREFIXES[entry.name], **fields)
    else:
        state = {_benchmark_cnn_key(key, entry.name): value
                 for key, value in entry.family.export_torch(backbone, "", **fields).items()}
    inner, fc_prefix = pretrained.aggregation_prefixes(model_config)
    if model_config.aggregation not in registry.TOKEN_OUTPUTS:
        state.update(aggregators.export_torch({"params": params.get("aggregation", {})}, inner,
                                              model_config.aggregation, tokens=entry.tokens))
    if fc_prefix is not None:
        state.update(torch_dense(params["fc"], fc_prefix.rstrip(".")))
    return state


def _gsv_family_state_dict(model_config, entry, backbone: dict, params: Mapping, fields: dict) -> dict:
    """Networks the benchmark lacks, in their authors' layouts: DINOv2 with an FC in MegaLoc's
    (`backbone.`, `aggregator.agg.`, `aggregator.linear`), BoQ's (DINOv2 at `backbone.dino.`, a
    ResNet at `backbone.net.<child index>.`) or SALAD's (DINOv2 at `backbone.model.`), the
    aggregation at `aggregator.`."""
    if model_config.fc_output_dim and model_config.backbone.startswith("dinov2_"):  # MegaLoc's layout
        state = {key: value for key, value in entry.family.export_torch(backbone, "backbone.", **fields).items()
                 if key != "backbone.mask_token"}
        state.update(aggregators.export_torch({"params": params.get("aggregation", {})}, "aggregator.agg.",
                                              model_config.aggregation))
        return {**state, **torch_dense(params["fc"], "aggregator.linear")}
    if model_config.aggregation == "boq" and not model_config.backbone.startswith("dinov2_"):
        state = {_benchmark_cnn_key(key, entry.name).replace("backbone.", "backbone.net.", 1): value
                 for key, value in entry.family.export_torch(backbone, "", **fields).items()}
    else:
        prefix = "backbone.dino." if model_config.aggregation == "boq" else "backbone.model."
        state = entry.family.export_torch(backbone, prefix, **fields)
    if model_config.aggregation not in registry.TOKEN_OUTPUTS:
        state.update(aggregators.export_torch({"params": params.get("aggregation", {})}, "aggregator.",
                                              model_config.aggregation))
    return state


def _benchmark_cnn_key(key: str, backbone: str) -> str:
    """A torchvision key -> the benchmark's: ResNet `layer3.0.conv1.weight` ->
    `backbone.6.0.conv1.weight`, VGG16/AlexNet `features.28.weight` -> `backbone.28.weight`."""
    if backbone.startswith("resnet"):
        child, _, rest = key.partition(".")
        return f"backbone.{_RESNET_INDICES[child]}.{rest}"
    return "backbone." + key.removeprefix("features.")


def save_benchmark(path: str | os.PathLike, model_config: ml_collections.ConfigDict, variables: Mapping,
                   image_size: tuple[int, int]) -> None:
    """Writes `benchmark_state_dict(...)` as a .safetensors file (torch: safetensors.torch.load_file)."""
    write_safetensors(path, benchmark_state_dict(model_config, variables, image_size), {"format": "pt"})


# ---------------------------------------------------------------------------------------------
# (b) The vgjax model file.


class LoadedModel(NamedTuple):
    """What `load` returns; `embed_fn` maps uint8 images [B, H, W, 3] to float32 [B, D]."""

    network: geoloc_net.GeoLocalizationNet
    variables: dict
    image_size: tuple[int, int]
    embed_fn: Callable[[np.ndarray], np.ndarray]


def save(path: str | os.PathLike, model_config: ml_collections.ConfigDict, variables: Mapping,
         image_size: tuple[int, int]) -> None:
    """Writes a vgjax model file: `variables` (of `geoloc_net.build(model_config, image_size)`)
    under their tree paths, with the format, the architecture and the image size as metadata."""
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "model": json.dumps({key: model_config[key] for key in geoloc_net.ARCHITECTURE_KEYS}),
                "image_size": json.dumps([int(n) for n in image_size])}
    write_safetensors(path, _flatten(variables), metadata)


def load(path: str | os.PathLike, *, image_size: tuple[int, int] | None = None) -> LoadedModel:
    """(network, variables, image size (H, W), embed function) from a vgjax model file, with no
    config file; at `image_size` when given, else the file's. A file that is not one, of another
    format version, with bad metadata, or whose tensors are not exactly the network's (names and
    shapes) raises WeightImportError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vgjax model file {path} does not exist")
    tensors, metadata = read_safetensors(path)
    model_config, saved_size = _read_metadata(path, metadata)
    image_size = tuple(int(n) for n in image_size) if image_size else saved_size
    try:
        network = geoloc_net.build(model_config, image_size)
        target = geoloc_net.variable_shapes(network, image_size)
    except ValueError as error:
        raise WeightImportError(f"{path}: {error}") from error
    variables = _unflatten(path, tensors, target)
    from vgjax import embed  # above vgjax.models (it imports the data pipeline): imported on use
    return LoadedModel(network, variables, image_size, embed.make_embed_fn(network, variables))


def _read_metadata(path: Path, metadata: Mapping[str, str]
                   ) -> tuple[ml_collections.ConfigDict, tuple[int, int]]:
    """(the model config: defaults with the file's architecture, image size) from the header."""
    if metadata.get("format") != FORMAT:
        raise WeightImportError(f"{path}: not a vgjax model file (no format={FORMAT!r} in its metadata); "
                                "a benchmark state dict loads with model.resume, or vgjax.models.load(path, "
                                "model={...}) naming its network")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise WeightImportError(f"{path}: vgjax model format version {metadata.get('format_version')!r}; "
                                f"this vgjax reads version {FORMAT_VERSION}")
    absent = [key for key in ("model", "image_size") if key not in metadata]
    if absent:
        raise WeightImportError(f"{path}: bad vgjax model metadata: no {' and no '.join(absent)} entry")
    model_config = common.get_config().model
    try:
        architecture, image_size = json.loads(metadata["model"]), json.loads(metadata["image_size"])
        expected, optional = set(geoloc_net.ARCHITECTURE_KEYS), set(geoloc_net.AGGREGATION_OPTION_KEYS)
        if not expected - optional <= set(architecture) <= expected:  # older files lack the optional keys
            raise ValueError(f"model keys {sorted(architecture)}, expected {sorted(expected)}")
        for key, value in architecture.items():
            model_config[key] = value
        if not (isinstance(image_size, list) and len(image_size) == 2
                and all(isinstance(n, int) and n > 0 for n in image_size)):
            raise ValueError(f"image_size {image_size!r} is not [H, W]")
    except (TypeError, ValueError, AttributeError) as error:
        raise WeightImportError(f"{path}: bad vgjax model metadata: {error}") from error
    return model_config, tuple(image_size)


def _flatten(variables: Mapping) -> dict[str, np.ndarray]:
    """{"params": {"fc": {"kernel": x}}} -> {"params/fc/kernel": x as numpy}."""
    return {"/".join(str(key.key) for key in keys): np.asarray(leaf)
            for keys, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}


def _unflatten(path: Path, tensors: Mapping[str, np.ndarray], target: dict) -> dict:
    """`target`'s tree with every leaf taken from `tensors` (by "a/b/c" name, cast to the leaf's
    dtype); a missing, unexpected or misshapen tensor raises WeightImportError naming `path`."""
    expected = _flatten(target)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightImportError(f"{path}: not this network's tensors: missing {_listing(missing)}; "
                                f"unexpected {_listing(unexpected)}")
    for name, leaf in expected.items():
        if tensors[name].shape != leaf.shape:
            raise WeightImportError(f"{path}: tensor '{name}' has shape {tensors[name].shape}, the "
                                    f"network expects {leaf.shape}")
    leaves = [tensors[name].astype(leaf.dtype) for name, leaf in expected.items()]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)


def _listing(names: list[str]) -> str:
    if not names:
        return "none"
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def export(folder: str | os.PathLike, name: str, model_config: ml_collections.ConfigDict, variables: Mapping,
           image_size: tuple[int, int]) -> dict[str, Path]:
    """Writes folder/<name>.safetensors (benchmark layout) and folder/<name>.vgjax.safetensors;
    returns {"benchmark_state_dict": path, "vgjax_model": path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"benchmark_state_dict": folder / f"{name}.safetensors",
             "vgjax_model": folder / f"{name}{MODEL_SUFFIX}"}
    save_benchmark(files["benchmark_state_dict"], model_config, variables, image_size)
    save(files["vgjax_model"], model_config, variables, image_size)
    return files

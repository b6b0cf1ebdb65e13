"""Weight import: torchvision, the benchmark's zoo/train checkpoints, CosPlace, HF ViT and CCT,
and `build_and_load`, which makes a network and its variables from a model config.

Files are read by `convert.read_state_dict` (untrusted input: weights-only torch pickles, .npz,
.safetensors); downloads and their cache are `weights_cache`, the Places365 ResNet-18
`places365`. Every tensor is shape-checked and every tensor of the file must be used or
deliberately ignored (see `convert.StateDictReader`); each backbone family's `import_torch` is
found through `registry`.

All loaders return variables in the layout of `geoloc_net.GeoLocalizationNet`:
{"params": {"backbone": ..., "aggregation": ..., "fc": ...}, "batch_stats": {"backbone": ...}}
(only the parts the file holds); `merge_variables` puts them into freshly initialised ones.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging

from vgjax.models import aggregators, geoloc_net, places365, registry
from vgjax.models.convert import StateDictReader, WeightImportError, dense, read_state_dict
from vgjax.models.weights_cache import fetch

# torchvision ImageNet (V1) weights, the benchmark's `pretrain=imagenet`. The 8 hex digits in
# each name are the start of the file's sha256.
TORCHVISION_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "alexnet": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}
# DINOv2's LVD-142M weights (its torch.hub files), for backbone dinov2_<size>[_reg].
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{size}/dinov2_{size}{registers}_pretrain.pth"


def dinov2_url(backbone: str) -> str:
    """The hub file of a dinov2_<size>[_reg] backbone."""
    size = backbone.removeprefix("dinov2_").removesuffix("_reg")
    return DINOV2_URL.format(size=size, registers="_reg4" if backbone.endswith("_reg") else "")


# The benchmark's ResNet children indices -> torchvision names (reference §2.8).
RESNET_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
# Where the benchmark's state dicts hold a token backbone's own keys (CNN keys are renamed).
TOKEN_BACKBONE_PREFIXES = {"vit": "backbone.vit_model.", "cct384": "backbone."}


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


def _import_backbone(reader: StateDictReader, prefix: str, config, image_size) -> dict:
    entry = registry.backbone(config.backbone)
    return entry.family.import_torch(reader, prefix, **entry.module_fields(config, image_size))


def _rename_benchmark_backbone(state: Mapping[str, np.ndarray], backbone: str) -> dict:
    """Benchmark key names (backbone.<child index>...) -> torchvision names, for CNNs."""
    renamed = {}
    for key, value in state.items():
        if backbone.startswith("resnet") and key.startswith("backbone."):
            child, _, rest = key[len("backbone."):].partition(".")
            if child not in RESNET_CHILDREN:
                raise WeightImportError(f"unexpected ResNet tensor '{key}'")
            key = f"{RESNET_CHILDREN[child]}.{rest}"
        elif backbone in ("vgg16", "alexnet") and key.startswith("backbone."):
            key = "features." + key[len("backbone."):]
        renamed[key] = value
    return renamed


# ---------------------------------------------------------------------------------------------
# Public loaders.


def load_torchvision_backbone(path: str | os.PathLike, model_config: ml_collections.ConfigDict,
                              image_size: tuple[int, int] = (480, 640)) -> dict:
    """Backbone variables from a torchvision-format state dict (resnet/vgg16/alexnet), e.g.
    ImageNet weights or the Places365 ResNet-18 (its classifier is ignored), or from a DINOv2
    hub file (dinov2's names)."""
    if registry.backbone(model_config.backbone).tokens:
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


def aggregation_prefixes(config) -> tuple[str, str | None]:
    """(prefix of the aggregation's own tensors, prefix of the FC) in a benchmark state dict."""
    inner = "aggregation."
    if config.aggregation in registry.POOLINGS:
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
    backbone = registry.backbone(model_config.backbone)
    if not backbone.tokens:
        state, backbone_prefix = _rename_benchmark_backbone(state, backbone.name), ""
    else:
        backbone_prefix = TOKEN_BACKBONE_PREFIXES[backbone.name]
    reader = StateDictReader(state, source)
    parts = {"backbone": _import_backbone(reader, backbone_prefix, model_config, image_size)}
    inner, fc_prefix = aggregation_prefixes(model_config)
    if model_config.aggregation not in registry.TOKEN_OUTPUTS:
        aggregation = aggregators.import_torch(
            reader, inner, model_config.aggregation, backbone.channels, model_config.netvlad_clusters,
            model_config=model_config)
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
    channels = registry.backbone(model_config.backbone).channels
    parts = {
        "backbone": _import_backbone(reader, "", model_config, image_size),
        "aggregation": aggregators.import_torch(reader, "aggregation.1.", "gem", channels),
        "fc": _import_fc(reader, "aggregation.3.", channels, model_config.fc_output_dim),
    }
    reader.finish()
    return _variables(**parts)


def load_gsv_checkpoint(path: str | os.PathLike, model_config: ml_collections.ConfigDict,
                        image_size: tuple[int, int] = (320, 320)) -> dict:
    """All variables from a released MixVPR, Conv-AP or SALAD file (GSV-Cities' layout): the
    backbone at `backbone.model.` (a ResNet under torchvision names, MixVPR's without layer4:
    conv4, Conv-AP's with it: conv5; SALAD's DINOv2 under dinov2's names) and the aggregation at
    `aggregator.` (MixVPR: mix.<k>.mix.{0,1,3}, channel_proj, row_proj; Conv-AP: channel_pool;
    SALAD: see aggregators.import_torch). A Lightning checkpoint's `state_dict` is unwrapped."""
    resnet_gsv = model_config.aggregation in registry.GSV_AGGREGATIONS and model_config.backbone.startswith("resnet")
    dinov2_salad = model_config.aggregation == "salad" and model_config.backbone.startswith("dinov2_")
    if not (resnet_gsv or dinov2_salad):
        raise ValueError("a MixVPR or Conv-AP file holds a ResNet with aggregation mixvpr or convap, a SALAD file "
                         f"a DINOv2 with aggregation salad; got {model_config.backbone} + {model_config.aggregation}")
    reader = StateDictReader(read_state_dict(path), str(path))
    channels = registry.backbone(model_config.backbone).channels
    parts = {"backbone": _import_backbone(reader, "backbone.model.", model_config, image_size),
             "aggregation": aggregators.import_torch(reader, "aggregator.", model_config.aggregation, channels,
                                                     model_config=model_config)}
    reader.finish()
    return _variables(**parts)


def load_boq_checkpoint(path: str | os.PathLike, model_config: ml_collections.ConfigDict,
                        image_size: tuple[int, int] = (322, 322)) -> dict:
    """All variables from a released Bag-of-Queries file: DINOv2 at `backbone.dino.` (dinov2's
    names; its final norm is in the file, BoQ does not use it) or the ResNet cut at layer3 at
    `backbone.net.<index>` (the children of torchvision's ResNet, as the benchmark numbers
    them), and BoQ at `aggregator.`."""
    backbone = model_config.backbone
    if model_config.aggregation != "boq" or not (backbone.startswith("dinov2_") or backbone.endswith("conv4")):
        raise ValueError("a BoQ file holds a DINOv2 or a ResNet cut at conv4 with aggregation boq; got "
                         f"{backbone} + {model_config.aggregation}")
    state = read_state_dict(path)
    if backbone.startswith("dinov2_"):
        prefix = "backbone.dino."
    else:  # backbone.net.<child>. -> backbone.<child>. -> torchvision names
        prefix, state = "", _rename_benchmark_backbone(
            {key.replace("backbone.net.", "backbone.", 1): value for key, value in state.items()}, backbone)
    reader = StateDictReader(state, str(path))
    channels = registry.backbone(backbone).channels
    parts = {"backbone": _import_backbone(reader, prefix, model_config, image_size),
             "aggregation": aggregators.import_torch(reader, "aggregator.", "boq", channels, model_config=model_config)}
    reader.finish()
    return _variables(**parts)


def load_megaloc_checkpoint(path: str | os.PathLike, model_config: ml_collections.ConfigDict,
                            image_size: tuple[int, int] = (322, 322)) -> dict:
    """All variables from MegaLoc's file (gmberton/MegaLoc, model.safetensors): DINOv2 at
    `backbone.` (dinov2's names, no mask token), SALAD at `aggregator.agg.` and its final Linear
    at `aggregator.linear`, which is vgjax's FC (fc_output_dim) before the last L2."""
    if not (model_config.backbone.startswith("dinov2_") and model_config.aggregation == "salad"
            and model_config.fc_output_dim):
        raise ValueError("a MegaLoc file holds a DINOv2 with aggregation salad and an fc_output_dim; got "
                         f"{model_config.backbone} + {model_config.aggregation}, fc_output_dim={model_config.fc_output_dim}")
    reader = StateDictReader(read_state_dict(path), str(path))
    channels = registry.backbone(model_config.backbone).channels
    parts = {"backbone": _import_backbone(reader, "backbone.", model_config, image_size),
             "aggregation": aggregators.import_torch(reader, "aggregator.agg.", "salad", channels,
                                                     model_config=model_config),
             "fc": _import_fc(reader, "aggregator.linear.", _fc_in_dim(model_config), model_config.fc_output_dim)}
    reader.finish()
    return _variables(**parts)


PRETRAIN_NAMES = ("imagenet", "places365", "dinov2", "none", "random")  # or a local weights file
RANDOM_INIT = ("none", "random", "")  # random: asked for on purpose (vgjax.configs.validate)


def check_pretrain(model_config: ml_collections.ConfigDict) -> None:
    """ValueError or FileNotFoundError when `model_config.pretrain` cannot give this backbone
    weights (reads and downloads nothing)."""
    pretrain, backbone = model_config.pretrain, model_config.backbone
    if pretrain == "places365" and not backbone.startswith("resnet18"):
        raise ValueError(f"model.pretrain=places365 is a ResNet-18; got backbone {backbone}")
    if (pretrain == "dinov2") != backbone.startswith("dinov2_") and pretrain in ("dinov2", "imagenet"):
        raise ValueError(f"model.pretrain={pretrain} does not fit backbone {backbone}: DINOv2 backbones take "
                         "pretrain=dinov2 (its LVD-142M weights), the others are not DINOv2")
    if pretrain == "imagenet" and torchvision_arch(backbone) not in TORCHVISION_URLS:
        raise ValueError(f"model.pretrain=imagenet is available for {sorted(TORCHVISION_URLS)}; for "
                         f"{backbone} pass a local weights file as model.pretrain")
    if pretrain not in PRETRAIN_NAMES + RANDOM_INIT and not Path(pretrain).is_file():
        raise FileNotFoundError(f"model.pretrain={pretrain!r} is neither {', '.join(map(repr, PRETRAIN_NAMES))} "
                                "nor an existing weights file (places/gldv2 weights: download them "
                                "and pass the file)")


def torchvision_arch(backbone: str) -> str:
    return re.sub(r"conv[45]$", "", backbone)


def pretrained_backbone_file(model_config: ml_collections.ConfigDict) -> Path | None:
    """The file behind `model_config.pretrain`: a local path, "imagenet" (torchvision V1 weights,
    cached or downloaded), "places365" (ResNet-18 only, vgjax.models.places365), "dinov2"
    (DINOv2's hub file of the backbone, cached or downloaded), or None for "none" and "random"."""
    check_pretrain(model_config)
    pretrain = model_config.pretrain
    if pretrain in RANDOM_INIT:
        return None
    if pretrain == "places365":
        return places365.resnet18_file()
    if pretrain == "imagenet":
        return fetch(TORCHVISION_URLS[torchvision_arch(model_config.backbone)])
    if pretrain == "dinov2":
        return fetch(dinov2_url(model_config.backbone))
    return Path(pretrain)


def load_pretrained_backbone(model_config, image_size) -> dict | None:
    """Backbone variables for model_config.pretrain (None for random init)."""
    path = pretrained_backbone_file(model_config)
    if path is None:
        return None
    loader = {"vit": load_vit_hf, "cct384": load_cct}.get(model_config.backbone, load_torchvision_backbone)
    return loader(path, model_config, image_size)


RESUME_FORMATS = ("benchmark", "cosplace", "gsv", "boq", "megaloc")  # gsv: the released MixVPR / Conv-AP / SALAD files


# The release layouts of the GSV-Cities family (and MegaLoc): resume_format -> loader.
_WHOLE_NETWORK_LOADERS = {"gsv": load_gsv_checkpoint, "boq": load_boq_checkpoint, "megaloc": load_megaloc_checkpoint}


def build_and_load(model_config: ml_collections.ConfigDict, image_size: tuple[int, int],
                   seed: int = 0, *, weights_from_checkpoint: bool = False):
    """(network, variables): random init, overwritten by model.resume (a whole network) or else
    by model.pretrain (the backbone only).

    With `weights_from_checkpoint` the caller overwrites every weight from its own training
    checkpoint: model.resume and model.pretrain are not read (no download, no file), and the
    variables are zeros that only give the tree its structure, shapes and dtypes (nothing is
    compiled).
    """
    model = geoloc_net.build(model_config, image_size)
    if weights_from_checkpoint:
        return model, geoloc_net.variable_shapes(model, image_size)
    variables = geoloc_net.init_variables(model, image_size, seed)
    if model_config.resume:
        if model_config.resume_format not in RESUME_FORMATS:
            raise ValueError(f"unknown model.resume_format {model_config.resume_format!r}; "
                             f"choose one of {RESUME_FORMATS}")
        if model_config.resume_format == "cosplace":
            return model, merge_variables(variables, load_cosplace_checkpoint(model_config.resume, model_config, image_size))
        if model_config.resume_format in _WHOLE_NETWORK_LOADERS:
            loader = _WHOLE_NETWORK_LOADERS[model_config.resume_format]
            return model, merge_variables(variables, loader(model_config.resume, model_config, image_size))
        return model, merge_variables(variables, _load_whole_network(model_config, image_size))
    backbone = load_pretrained_backbone(model_config, image_size)
    if backbone is None:
        logging.warning(f"model.pretrain={model_config.pretrain} and no model.resume: the network has "
                        "RANDOM weights")
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


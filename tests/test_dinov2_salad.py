"""DINOv2 backbones and the SALAD aggregation: parity with torch modules written from the
published dinov2 and serizba/salad code (random weights, LayerScales and norms included), the
position-embedding resize against torch's F.interpolate, SALAD's released file layout loaded
whole, export round trips and SALAD's freezing."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_helpers import nhwc, state_dict_numpy
from torch_reference import (DinoSwiGLU, DinoVisionTransformer, MegaLocNet, SaladDINOv2, SaladVPRModel,
                             TorchSALAD, get_matching_probs, torch_gem)

from vgjax import models
from vgjax.configs import common
from vgjax.data import augment
from vgjax.models import aggregators, export, geoloc_net, pretrained, zoo
from vgjax.models.backbones import dinov2
from vgjax.models.convert import StateDictReader

TOL = 1e-4
VITS = dict(dim=384, depth=12, heads=6)


def _randomize(module, seed):
    """Non-trivial norms, LayerScales and embeddings (their default init is 1/0/ones/small)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=gen))
            elif "norm" in name and name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            elif "token" in name or "pos_embed" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
            elif name.endswith("dust_bin"):
                param.fill_(0.7)
    return module.eval()


def _vit_s(registers=False, seed=0):
    torch.manual_seed(seed)
    return _randomize(DinoVisionTransformer(**VITS, registers=registers), seed)


def _import(module, prefix="", **fields):
    reader = StateDictReader({prefix + k: v for k, v in state_dict_numpy(module).items()})
    variables = dinov2.import_torch(reader, prefix, **fields)
    reader.finish()
    return variables


def _images(size, seed=0):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("registers", [False, True])
@pytest.mark.parametrize("size", [9, 16, 23, 37, 44])
def test_position_grid_resize_is_torch_bicubic(registers, size):
    grid = torch.randn(1, 5, 37, 37, generator=torch.Generator().manual_seed(size))
    if registers:
        expected = F.interpolate(grid, size=(size, size), mode="bicubic", antialias=True)
    else:
        scale = (size + 0.1) / 37
        expected = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    weights = dinov2.position_grid_weights(37, size, registers)
    ours = np.einsum("ih,jw,chw->cij", weights, weights, grid[0].numpy())
    np.testing.assert_allclose(ours, expected[0].numpy(), atol=2e-5)


@pytest.mark.parametrize(("registers", "size"), [(False, (224, 224)), (False, (322, 252)), (True, (224, 224))])
def test_dinov2_matches_torch(registers, size):
    torch_model = _vit_s(registers)
    x = _images(size)
    with torch.no_grad():
        expected = torch_model.forward_features(x)
    variables = _import(torch_model, size="vits14", registers=registers)
    module = dinov2.DINOv2(size="vits14", registers=registers, returns="map_and_cls")
    patch_map, cls = jax.jit(module.apply)(variables, nhwc(x))
    h, w = size[0] // 14, size[1] // 14
    np.testing.assert_allclose(np.asarray(patch_map).reshape(2, h * w, 384),
                               expected["x_norm_patchtokens"].numpy(), atol=TOL)
    np.testing.assert_allclose(np.asarray(cls), expected["x_norm_clstoken"].numpy(), atol=TOL)
    without_norm = dinov2.DINOv2(size="vits14", registers=registers, returns="map", final_norm=False)
    prenorm = expected["x_prenorm"][:, 1 + 4 * registers:].numpy()
    np.testing.assert_allclose(np.asarray(jax.jit(without_norm.apply)(variables, nhwc(x))).reshape(prenorm.shape),
                               prenorm, atol=TOL)


@pytest.mark.parametrize(("size", "registers", "image_size"), [("vitb14", False, (322, 322)), ("vitl14", True, (224, 224))])
def test_dinov2_base_and_large_match_torch(size, registers, image_size):
    """ViT-B/14 and ViT-L/14 (24 blocks) whole, one image; ViT-g/14 differs from them in widths,
    depth and its SwiGLU FFN (tested below)."""
    arch = dinov2.ARCHS[size]
    torch.manual_seed(1)
    torch_model = _randomize(DinoVisionTransformer(arch.width, arch.depth, arch.heads, registers=registers), 1)
    x = _images(image_size)[:1]
    with torch.no_grad():
        expected = torch_model.forward_features(x)
    variables = _import(torch_model, size=size, registers=registers)
    patch_map, cls = jax.jit(dinov2.DINOv2(size=size, registers=registers, returns="map_and_cls").apply)(variables, nhwc(x))
    tokens = expected["x_norm_patchtokens"].numpy()
    np.testing.assert_allclose(np.asarray(patch_map).reshape(tokens.shape), tokens, atol=TOL)
    np.testing.assert_allclose(np.asarray(cls), expected["x_norm_clstoken"].numpy(), atol=TOL)


def test_giant_swiglu_ffn_matches_torch():
    torch.manual_seed(0)
    torch_ffn = DinoSwiGLU(1536, 4 * 1536).eval()
    arch = dinov2.ARCHS["vitg14"]
    assert torch_ffn.w3.in_features == arch.hidden == 4096
    x = torch.randn(2, 5, 1536)
    params = {name: {"kernel": getattr(torch_ffn, name).weight.detach().numpy().T,
                     "bias": getattr(torch_ffn, name).bias.detach().numpy()} for name in ("w12", "w3")}
    ours = dinov2._FFN(arch).apply({"params": params}, x.numpy())
    np.testing.assert_allclose(np.asarray(ours), torch_ffn(x).detach().numpy(), atol=TOL)


def test_wrong_sizes_are_refused():
    module = dinov2.DINOv2(size="vits14")
    with pytest.raises(ValueError, match="multiples of 14"):
        module.init(jax.random.key(0), np.zeros((1, 100, 112, 3), np.float32))
    config = common.get_config().model
    config.update(backbone="dinov2_vitb14", aggregation="salad")
    with pytest.raises(ValueError, match="sides that are multiples of 14"):
        geoloc_net.build(config, (224, 230))
    with pytest.raises(ValueError, match="needs more local features than clusters"):
        aggregators.log_optimal_transport(np.zeros((1, 64, 49), np.float32), np.float32(1))


def test_salad_matches_torch():
    torch.manual_seed(1)
    torch_salad = _randomize(TorchSALAD(num_channels=96, num_clusters=16, cluster_dim=8, token_dim=32), 1)
    maps, token = torch.randn(2, 96, 9, 11), torch.randn(2, 96)
    with torch.no_grad():
        expected = torch_salad((maps, token)).numpy()
    config = common.get_config().model
    config.update(salad_clusters=16, salad_cluster_dim=8, salad_token_dim=32)
    reader = StateDictReader(state_dict_numpy(torch_salad))
    variables = aggregators.import_torch(reader, "", "salad", 96, model_config=config)
    reader.finish()
    module = aggregators.create("salad", model_config=config)
    ours = module.apply(variables, (nhwc(maps), token.numpy()))
    assert ours.shape == (2, 32 + 16 * 8) == (2, aggregators.output_dim("salad", 96, model_config=config))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=TOL)
    # The Sinkhorn alone, on scores of a larger magnitude.
    scores = torch.randn(3, 16, 99) * 4
    ours = aggregators.log_optimal_transport(scores.numpy(), np.float32(0.7))
    np.testing.assert_allclose(np.asarray(ours), get_matching_probs(scores, torch.tensor(0.7), 3).numpy(), atol=TOL)


def _salad_network(seed=0):
    torch.manual_seed(seed)
    backbone = SaladDINOv2(DinoVisionTransformer(**VITS))
    return _randomize(SaladVPRModel(backbone, TorchSALAD(num_channels=384)), seed)


def test_salad_release_layout_loads_whole_and_matches(tmp_path):
    """A file in dino_salad.ckpt's layout (here with ViT-S) loads with every tensor used, and the
    network's descriptors equal the torch model's."""
    torch_model = _salad_network()
    path = tmp_path / "dino_salad.ckpt"
    torch.save({"state_dict": torch_model.state_dict()}, path)  # a Lightning checkpoint
    config = common.get_config().model
    config.update(backbone="dinov2_vits14", aggregation="salad", resume=str(path), resume_format="gsv", pretrain="none")
    model, variables = pretrained.build_and_load(config, (224, 224))
    x = _images((224, 224), seed=3)
    with torch.no_grad():
        expected = torch_model(x).numpy()
    ours = np.asarray(jax.jit(model.apply)(variables, nhwc(x)))
    assert ours.shape == (2, 8448)
    np.testing.assert_allclose(ours, expected, atol=TOL)
    # --mode export writes it back in the same layout: SALAD's network loads it strictly.
    again = _salad_network(seed=5)
    state = export.benchmark_state_dict(config, variables, (224, 224))
    again.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()}, strict=True)
    with torch.no_grad():
        np.testing.assert_allclose(again(x).numpy(), expected, atol=TOL)


def test_export_round_trips_into_the_torch_modules():
    torch_model = _salad_network(seed=2)
    state = state_dict_numpy(torch_model)
    reader = StateDictReader(state)
    config = common.get_config().model
    backbone = dinov2.import_torch(reader, "backbone.model.", size="vits14")
    aggregation = aggregators.import_torch(reader, "aggregator.", "salad", 384, model_config=config)
    reader.finish()
    exported = {**dinov2.export_torch(backbone, "backbone.model.", size="vits14"),
                **aggregators.export_torch(aggregation, "aggregator.", "salad")}
    assert exported.keys() == state.keys()
    mask_token = exported.pop("backbone.model.mask_token")  # pre-training only: written as zeros
    assert mask_token.shape == (1, 384) and not mask_token.any()
    for key, value in exported.items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)


def test_unfreeze_n_blocks_trains_the_last_blocks_and_the_norm():
    config = common.get_config().model
    config.update(backbone="dinov2_vits14", aggregation="salad", unfreeze_n_blocks=4)
    model = geoloc_net.build(config, (224, 224))
    params = geoloc_net.variable_shapes(model, (224, 224))["params"]
    mask = geoloc_net.trainable_mask(config, params)
    trained = {name for name, subtree in mask["backbone"].items() if all(jax.tree.leaves(subtree))}
    assert trained == {"block_8", "block_9", "block_10", "block_11", "norm"}
    assert all(jax.tree.leaves(mask["aggregation"]))
    config.unfreeze_n_blocks = None
    assert all(jax.tree.leaves(geoloc_net.trainable_mask(config, params)))
    config.unfreeze_n_blocks = 13
    with pytest.raises(ValueError, match="unfreeze_n_blocks=13: must be between 0 and 12"):
        geoloc_net.trainable_mask(config, params)


def _serve(monkeypatch, tmp_path, name, source, **changes):
    """The zoo entry `name` served from a local file (file:// URL, no sha256 published)."""
    monkeypatch.setenv("VGJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VGJAX_OFFLINE", raising=False)
    entry = dataclasses.replace(zoo.ENTRIES[name], url=source.as_uri(), sha256=None, **changes)
    monkeypatch.setitem(zoo.ENTRIES, name, entry)


def _uint8_images(size, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (2, *size, 3), dtype=np.uint8)
    return images, torch.from_numpy(np.ascontiguousarray(np.asarray(augment.normalize_uint8(images)).transpose(0, 3, 1, 2)))


def test_salad_loads_by_name_offline_from_its_release_file(tmp_path, monkeypatch):
    torch_model = _salad_network(seed=4)
    source = tmp_path / "remote" / "dino_salad.ckpt"
    source.parent.mkdir()
    torch.save({"state_dict": torch_model.state_dict()}, source)
    _serve(monkeypatch, tmp_path, "salad_dinov2", source, model={"backbone": "dinov2_vits14", "aggregation": "salad"})
    images, x = _uint8_images((224, 224))
    loaded = models.load("salad_dinov2", image_size=(224, 224))
    with torch.no_grad():
        np.testing.assert_allclose(loaded.embed_fn(images), torch_model(x).numpy(), atol=TOL)
    source.unlink()  # now from the cache only
    again = models.load("salad_dinov2", image_size=(224, 224), offline=True)
    np.testing.assert_array_equal(again.embed_fn(images), loaded.embed_fn(images))


def test_a_dinov2_hub_file_is_a_backbone_with_gem(tmp_path, monkeypatch):
    torch_model = _vit_s(registers=True, seed=6)
    source = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(torch_model.state_dict(), source)
    _serve(monkeypatch, tmp_path, "dinov2_vits14_reg_gem", source)
    assert zoo.ENTRIES["dinov2_vits14_reg_gem"].image_size == (322, 322)
    images, x = _uint8_images((224, 224), seed=1)
    loaded = models.load("dinov2_vits14_reg_gem", image_size=(224, 224))
    with torch.no_grad():
        tokens = torch_model.forward_features(x)["x_norm_patchtokens"]
        maps = tokens.transpose(1, 2).reshape(2, 384, 16, 16)
        expected = torch_gem(F.normalize(maps, dim=1), 3.0).numpy()  # l2=before_pool, as the benchmark's GeM
    np.testing.assert_allclose(loaded.embed_fn(images), expected, atol=TOL)
    assert pretrained.dinov2_url("dinov2_vitg14") == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_pretrain.pth")
    assert zoo.default_image_size("dinov2_vitb14") == (476, 630)


def test_megaloc_loads_by_name_from_its_safetensors_and_exports_back(tmp_path, monkeypatch):
    import safetensors.torch

    torch.manual_seed(7)
    torch_model = _randomize(MegaLocNet(**VITS, clusters=64, cluster_dim=8, out_dim=48), 7)
    source = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, source)
    _serve(monkeypatch, tmp_path, "megaloc", source, model={"backbone": "dinov2_vits14", "aggregation": "salad",
                                                            "salad_cluster_dim": 8, "fc_output_dim": 48})
    images, x = _uint8_images((224, 224), seed=2)
    loaded = models.load("megaloc", image_size=(224, 224))
    with torch.no_grad():
        expected = torch_model(x).numpy()
    np.testing.assert_allclose(loaded.embed_fn(images), expected, atol=TOL)
    state = export.benchmark_state_dict(zoo.model_config(zoo.ENTRIES["megaloc"].model), loaded.variables, (224, 224))
    assert state.keys() == torch_model.state_dict().keys()

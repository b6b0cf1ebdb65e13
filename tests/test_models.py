"""Whole networks: every backbone x aggregation the benchmark allows, built in torch with the
benchmark's state-dict layout, saved, loaded through vgjax's importers and compared (reference
§1.1, §2, §2.8, §5.1). Plus the registry, config validation, dims, freezing, initialisation,
the embed functions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from vgjax.configs import common
from torch_helpers import import_torchvision, nhwc, randomize_batch_norm, state_dict_numpy
from torch_reference import (BenchmarkNet, CCTBackbone, Flatten, GeM, L2Norm, ViTBackbone,
                             benchmark_aggregation)
from vgjax import embed, sharding
from vgjax.data import augment, synthetic
from vgjax.data import images as image_ops
from vgjax.models import geoloc_net, netvlad_init, pretrained, registry

TOL = 1e-4
CLUSTERS = 8
IMAGE_SIZES = {"alexnet": (88, 88), "vit": (224, 224), "cct384": (384, 384)}  # others: 64x64
# The benchmark's combinations (its state-dict layout has no Conv-AP or MixVPR: those are
# checked against their own torch modules and release layouts in test_aggregators / test_zoo).
# The benchmark's networks (DINOv2, BoQ and the GSV-Cities family have their own parity tests).
COMBINATIONS = [(backbone, aggregation) for backbone in registry.BACKBONES
                for aggregation in registry.backbone(backbone).aggregations
                if aggregation not in (*registry.GSV_AGGREGATIONS, "boq") and not backbone.startswith("dinov2_")]


@pytest.fixture(autouse=True)
def _exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def model_config(backbone, aggregation, l2="before_pool", fc_output_dim=None, **overrides):
    config = common.get_config().model
    config.backbone, config.aggregation, config.l2 = backbone, aggregation, l2
    config.fc_output_dim = fc_output_dim
    config.netvlad_clusters = CLUSTERS
    if registry.backbone(backbone).tokens:
        config.trunc_te = 1  # one transformer block keeps the test fast; the rest is ignored
    config.update(overrides)
    return config


@functools.lru_cache(maxsize=None)
def _torchvision_model(arch):
    torch.manual_seed(0)
    return getattr(import_torchvision().models, arch)()


def torch_backbone(name, output):
    """The benchmark's truncated backbone (its children, so keys are backbone.<index>...)."""
    if name.startswith("resnet"):
        model = _torchvision_model(name[:name.index("conv")])
        return tnn.Sequential(*list(model.children())[:-3 if name.endswith("conv4") else -2])
    if name in ("vgg16", "alexnet"):
        return tnn.Sequential(*list(_torchvision_model(name).features.children())[:-2])
    return ViTBackbone(output, depth=1) if name == "vit" else CCTBackbone(output, depth=1)


def torch_network(config):
    entry = registry.backbone(config.backbone)
    output = config.aggregation if config.aggregation in registry.TOKEN_OUTPUTS else "tokens"
    torch.manual_seed(1)
    aggregation = benchmark_aggregation(config.aggregation, config.l2, entry.channels, CLUSTERS,
                                        tokens=entry.tokens, fc_output_dim=config.fc_output_dim)
    network = BenchmarkNet(torch_backbone(config.backbone, output), aggregation)
    randomize_batch_norm(network)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if name.endswith(".p"):
                param.fill_(2.5)  # not GeM's initial 3: a missed load would show
    return network.eval()


def images(size, batch=2, seed=0):
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((batch, 3, *size)).astype(np.float32))
    return x, nhwc(x)


def assert_loads_completely(model, variables, size):
    """The loaded variables are exactly the model's (same tree, same shapes)."""
    abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                              jnp.zeros((1, *size, 3)))
    shapes = jax.tree_util.tree_map(lambda a: tuple(a.shape), abstract)
    assert jax.tree_util.tree_map(np.shape, variables) == shapes


def check_parity(config, path):
    size = IMAGE_SIZES.get(config.backbone, (64, 64))
    network = torch_network(config)
    state = state_dict_numpy(network)
    np.savez(path, **state)
    model = geoloc_net.build(config, size)
    variables = pretrained.load_benchmark_checkpoint(path, config, size)
    assert_loads_completely(model, variables, size)
    x_torch, x = images(size)
    with torch.no_grad():
        expected = network(x_torch).numpy()
    got = np.asarray(model.apply(variables, x))
    assert got.shape == expected.shape == (2, geoloc_net.descriptor_dim(config))
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("backbone, aggregation", COMBINATIONS)
def test_benchmark_checkpoint_parity_every_combination(backbone, aggregation, tmp_path):
    check_parity(model_config(backbone, aggregation), tmp_path / "net.npz")


@pytest.mark.parametrize("aggregation", registry.POOLINGS)
@pytest.mark.parametrize("l2", ["after_pool", "none"])
def test_benchmark_checkpoint_parity_l2_modes(aggregation, l2, tmp_path):
    check_parity(model_config("resnet18conv4", aggregation, l2), tmp_path / "net.npz")


@pytest.mark.parametrize("backbone, aggregation, l2", [
    ("resnet18conv4", "gem", "before_pool"), ("resnet50conv5", "gem", "after_pool"),
    ("resnet18conv4", "rrm", "none"), ("vit", "cls", "none"), ("resnet18conv4", "netvlad", "none"),
])
def test_benchmark_checkpoint_parity_with_fc(backbone, aggregation, l2, tmp_path):
    # netvlad + fc: vgjax sizes the FC K*C (the benchmark's own is broken, see geoloc_net).
    check_parity(model_config(backbone, aggregation, l2, fc_output_dim=32), tmp_path / "net.npz")


def test_train_checkpoint_file_and_wrong_configuration(tmp_path):
    config = model_config("resnet18conv4", "netvlad")
    network = torch_network(config)
    torch.save({"epoch_num": 2, "model_state_dict": {"module." + k: v for k, v in network.state_dict().items()},
                "recalls": np.array([1.0, 2.0]), "best_r5": np.float64(2.0)}, tmp_path / "best_model.pth")
    variables = pretrained.load_benchmark_checkpoint(tmp_path / "best_model.pth", config, (64, 64))
    x_torch, x = images((64, 64))
    np.testing.assert_allclose(np.asarray(geoloc_net.build(config, (64, 64)).apply(variables, x)),
                               network(x_torch).detach().numpy(), atol=TOL)
    with pytest.raises(pretrained.WeightImportError, match="shape"):
        pretrained.load_benchmark_checkpoint(tmp_path / "best_model.pth",
                                             model_config("resnet18conv4", "netvlad", netvlad_clusters=16), (64, 64))
    with pytest.raises(pretrained.WeightImportError, match="missing tensor 'aggregation.1.p'"):
        pretrained.load_benchmark_checkpoint(tmp_path / "best_model.pth", model_config("resnet18conv4", "gem"), (64, 64))


def test_cosplace_checkpoint_parity(tmp_path):
    torch.manual_seed(2)
    head = tnn.Sequential(L2Norm(), GeM(), Flatten(), tnn.Linear(512, 64), L2Norm())
    network = BenchmarkNet(torch_backbone("resnet18conv5", "tokens"), head).eval()
    randomize_batch_norm(network)
    torch.save(network.state_dict(), tmp_path / "ResNet18_64_cosplace.pth")
    config = model_config("resnet18conv5", "gem", fc_output_dim=64)
    variables = pretrained.load_cosplace_checkpoint(tmp_path / "ResNet18_64_cosplace.pth", config, (64, 64))
    x_torch, x = images((64, 64))
    np.testing.assert_allclose(np.asarray(geoloc_net.build(config, (64, 64)).apply(variables, x)),
                               network(x_torch).detach().numpy(), atol=TOL)
    with pytest.raises(ValueError, match="a CosPlace network is"):
        pretrained.load_cosplace_checkpoint(tmp_path / "ResNet18_64_cosplace.pth",
                                            model_config("resnet18conv4", "gem", fc_output_dim=64))


def test_torchvision_backbone_into_a_fresh_network(tmp_path):
    tv_model = _torchvision_model("resnet18")
    randomize_batch_norm(tv_model, seed=3)
    torch.save(tv_model.state_dict(), tmp_path / "resnet18.pth")  # includes layer4 and fc
    config = model_config("resnet18conv4", "gem")
    model = geoloc_net.build(config, (64, 64))
    fresh = geoloc_net.init_variables(model, (64, 64))
    variables = pretrained.merge_variables(fresh, pretrained.load_torchvision_backbone(tmp_path / "resnet18.pth", config))
    network = BenchmarkNet(torch_backbone("resnet18conv4", "tokens"), benchmark_aggregation("gem", "before_pool", 256, 0, False)).eval()
    x_torch, x = images((64, 64))
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)), network(x_torch).detach().numpy(), atol=TOL)


def test_pretrain_option_resolves_local_files_and_none(tmp_path):
    config = model_config("resnet18conv4", "gem", pretrain="none")
    assert pretrained.load_pretrained_backbone(config, (64, 64)) is None
    config.pretrain = "random"  # the same, asked for on purpose
    assert pretrained.load_pretrained_backbone(config, (64, 64)) is None
    config.pretrain = str(tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="neither 'imagenet', 'places365', 'dinov2', 'none', 'random' nor an existing weights file"):
        pretrained.load_pretrained_backbone(config, (64, 64))
    config.backbone = "cct384"
    config.pretrain = "imagenet"
    with pytest.raises(ValueError, match="for cct384 pass a local weights file"):
        pretrained.load_pretrained_backbone(config, (384, 384))


# ---------------------------------------------------------------------------------------------
# Configuration, dimensions, freezing, embedding.


@pytest.mark.parametrize("name", registry.BACKBONES)
def test_every_backbone_name_resolves_to_a_complete_entry(name):
    entry = registry.backbone(name)
    assert entry.name == name and entry.channels > 0 and entry.aggregations
    assert set(entry.aggregations) <= set(registry.AGGREGATIONS)
    assert callable(entry.family.import_torch) and callable(entry.family.trainable_mask)
    side = 64 - 64 % entry.size_multiple
    size = entry.image_sizes[0] if entry.image_sizes else (side, side)
    backbone = geoloc_net.build(model_config(name, entry.aggregations[0]), size).backbone
    assert isinstance(backbone, entry.module)
    assert {k: getattr(backbone, k) for k in entry.fields} == dict(entry.fields)


def test_an_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet34conv4'; choose one of .*'resnet18conv4'.*'vit'"):
        registry.backbone("resnet34conv4")


@pytest.mark.parametrize("backbone, aggregation, size", [
    ("resnet18conv4", "netvlad", (48, 64)), ("vit", "cls", (224, 224))])
def test_init_variables_has_the_tree_and_values_of_model_init(backbone, aggregation, size):
    model = geoloc_net.build(model_config(backbone, aggregation), size)
    expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                              jnp.zeros((1, *size, 3)))
    variables = geoloc_net.init_variables(model, size, seed=3)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(expected)
    as_spec = lambda leaf: (tuple(leaf.shape), leaf.dtype)
    assert jax.tree_util.tree_map(as_spec, variables) == jax.tree_util.tree_map(as_spec, expected)
    # The fast-compiled init draws the same bits as model.init under a plain jit (XLA's defaults).
    plain = jax.jit(functools.partial(model.init, train=False))(jax.random.key(3), jnp.zeros((1, *size, 3)))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(variables),
                                                     jax.tree_util.tree_leaves(plain)))


def test_build_and_load_for_a_checkpoint_reads_no_weights(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VGJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VGJAX_OFFLINE", "1")  # pretrain=imagenet would have to download
    config = model_config("resnet18conv4", "gem", pretrain="imagenet", resume=str(tmp_path / "missing.pth"))
    model, variables = pretrained.build_and_load(config, (32, 32), weights_from_checkpoint=True)
    as_spec = lambda leaf: (tuple(leaf.shape), leaf.dtype)
    assert jax.tree_util.tree_map(as_spec, variables) == jax.tree_util.tree_map(
        as_spec, geoloc_net.init_variables(model, (32, 32)))
    config.resume, config.pretrain = "", "none"
    pretrained.build_and_load(config, (32, 32), weights_from_checkpoint=True)
    assert "RANDOM weights" not in caplog.text
    pretrained.build_and_load(config, (32, 32))
    assert "RANDOM weights" in caplog.text
    with pytest.raises(FileNotFoundError):
        pretrained.build_and_load(model_config("resnet18conv4", "gem", pretrain="imagenet"), (32, 32))


@pytest.mark.parametrize("overrides, message", [
    (dict(backbone="resnet18conv4", aggregation="cls"), "does not support aggregation 'cls'"),
    (dict(backbone="vit", aggregation="spoc"), "vit does not support aggregation 'spoc'"),
    (dict(backbone="cct384", aggregation="crn"), "cct384 does not support"),
    (dict(backbone="resnet34conv4"), "unknown model.backbone 'resnet34conv4'"),
    (dict(l2="after"), "unknown model.l2 'after'"),
    (dict(dtype="float16"), "unknown model.dtype 'float16'"),
])
def test_invalid_configurations(overrides, message):
    config = model_config("resnet18conv4", "gem")
    config.update(overrides)
    with pytest.raises(ValueError, match=message):
        geoloc_net.build(config)


def test_token_backbones_need_their_resolution():
    with pytest.raises(ValueError, match=r"vit needs resize \(224, 224\) or \(384, 384\)"):
        geoloc_net.build(model_config("vit", "cls"), (480, 640))
    with pytest.raises(ValueError, match=r"cct384 needs resize \(384, 384\)"):
        geoloc_net.build(model_config("cct384", "seqpool"), (224, 224))


@pytest.mark.parametrize("backbone, aggregation, dim", [
    ("resnet18conv4", "netvlad", 16384), ("resnet50conv4", "netvlad", 65536),
    ("vgg16", "netvlad", 32768), ("cct384", "netvlad", 24576), ("vit", "netvlad", 49152),
    ("resnet50conv5", "gem", 2048), ("alexnet", "gem", 256), ("vit", "cls", 768),
    ("cct384", "seqpool", 384), ("resnet101conv4", "crn", 65536),
])
def test_descriptor_dims_of_the_benchmark(backbone, aggregation, dim):
    config = model_config(backbone, aggregation, netvlad_clusters=64)
    assert geoloc_net.descriptor_dim(config) == dim


def test_trainable_mask_freezes_what_the_benchmark_freezes():
    config = model_config("resnet18conv4", "netvlad")
    model = geoloc_net.build(config, (64, 64))
    params = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jnp.zeros((1, 64, 64, 3)))["params"]
    mask = geoloc_net.trainable_mask(config, params)
    count = lambda keep: sum(int(np.prod(p.shape)) for p, m in zip(jax.tree_util.tree_leaves(params),
                                                                  jax.tree_util.tree_leaves(mask)) if m == keep)
    torch_resnet = torch_backbone("resnet18conv4", "tokens")
    frozen = sum(p.numel() for i, child in enumerate(torch_resnet.children()) if i < 6 for p in child.parameters())
    assert count(False) == frozen  # conv1, bn1, layer1, layer2
    assert count(True) == sum(p.numel() for p in torch_resnet[6].parameters()) + CLUSTERS * 256 * 2
    assert all(jax.tree_util.tree_leaves(mask["aggregation"]))


def test_embed_fn_normalizes_uint8_on_device_and_bfloat16_is_close():
    config = model_config("resnet18conv4", "gem", "after_pool")  # after_pool: unit-norm output
    model = geoloc_net.build(config, (64, 64))
    variables = geoloc_net.init_variables(model, (64, 64))
    batch = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    embedded = embed.make_embed_fn(model, variables)(batch)
    normalized = (batch / 255.0 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
    np.testing.assert_allclose(embedded, np.asarray(model.apply(variables, jnp.asarray(normalized, jnp.float32))), atol=1e-5)
    assert embedded.dtype == np.float32 and np.allclose(np.linalg.norm(embedded, axis=1), 1, atol=1e-5)
    config.dtype = "bfloat16"
    low = embed.make_embed_fn(geoloc_net.build(config, (64, 64)), variables)(batch)
    assert low.dtype == np.float32
    assert np.abs(low - embedded).max() < 0.05


def test_sharded_embed_fn_takes_the_variables_at_each_call():
    config = model_config("resnet18conv4", "gem")
    model = geoloc_net.build(config, (32, 32))
    variables = geoloc_net.init_variables(model, (32, 32))
    embed_fn = embed.make_sharded_embed_fn(model, sharding.make_mesh())
    batch = np.random.default_rng(1).integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(embed_fn(variables, batch), embed.make_embed_fn(model, variables)(batch))
    other = geoloc_net.init_variables(model, (32, 32), seed=1)
    assert not np.allclose(embed_fn(other, batch), embed_fn(variables, batch))
    assert embed_fn.jitted(variables, batch).shape == (2, 256)


def test_the_two_normalizations_agree():
    images = np.random.default_rng(0).integers(0, 256, size=(2, 4, 5, 3), dtype=np.uint8)
    np.testing.assert_allclose(augment.normalize_uint8(images), augment.normalize(images / np.float32(255)),
                               rtol=0, atol=1e-5)
    assert augment.normalize_uint8(images).dtype == jnp.float32


def test_initialize_netvlad_from_dataset_images(tmp_path):
    synthetic.build_aerial_dataset(tmp_path / "world", size_m=120.0, image_size=(64, 64), progress=False)
    paths = sorted(str(p) for p in (tmp_path / "world").rglob("*.jpg"))
    config = model_config("resnet18conv4", "netvlad")
    model = geoloc_net.build(config, (64, 64))
    variables = geoloc_net.init_variables(model, (64, 64))
    features_fn = embed.make_features_fn(model, variables)
    initialized = netvlad_init.initialize_netvlad(features_fn, variables, paths, (64, 64), CLUSTERS,
                                                  batch_size=4, descriptors_num=160, per_image=16)
    # The same steps by hand: the 10 images the seed draws, their features, the k-means.
    rng = np.random.default_rng(0)
    chosen = [paths[i] for i in rng.choice(len(paths), 10, replace=False)]
    features = features_fn(np.stack([image_ops.load_rgb(p) for p in chosen]))
    descriptors = netvlad_init.sample_local_descriptors([features], 16, rng)
    expected = netvlad_init.init_params(netvlad_init.kmeans_centroids(descriptors, CLUSTERS), descriptors)
    for name in ("centroids", "assignment_kernel"):
        np.testing.assert_allclose(initialized["params"]["aggregation"][name], expected[name], rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(model.apply(initialized, images((64, 64))[1]))).all()


def test_crn_starts_from_a_netvlad_checkpoint(tmp_path):
    netvlad = torch_network(model_config("resnet18conv4", "netvlad"))
    np.savez(tmp_path / "netvlad.npz", **state_dict_numpy(netvlad))
    config = model_config("resnet18conv4", "crn", resume=str(tmp_path / "netvlad.npz"), pretrain="none")
    model, variables = pretrained.build_and_load(config, (64, 64))
    np.testing.assert_array_equal(variables["params"]["aggregation"]["centroids"],
                                  netvlad.aggregation.centroids.detach().numpy())
    fresh = geoloc_net.init_variables(model, (64, 64))
    np.testing.assert_array_equal(variables["params"]["aggregation"]["crn"]["filter_3_3"]["kernel"],
                                  fresh["params"]["aggregation"]["crn"]["filter_3_3"]["kernel"])
    # With the CRN module in place it is the CRN that matters: CRN + NetVLAD weights both load.
    check_parity(model_config("resnet18conv4", "crn"), tmp_path / "crn.npz")


@pytest.mark.parametrize("backbone", [name for name in registry.BACKBONES  # DINOv2: multiples of 14
                                      if not registry.backbone(name).tokens and registry.backbone(name).size_multiple == 1])
def test_min_size_is_the_smallest_input_with_a_non_empty_feature_map(backbone):
    model = geoloc_net.build(model_config(backbone, "gem"), (64, 64))
    smallest = registry.backbone(backbone).min_size
    for side, expected in ((smallest - 1, 0), (smallest, 1)):
        if side < 1:
            continue
        images = jax.ShapeDtypeStruct((1, side, side + 5, 3), jnp.float32)
        features = jax.eval_shape(
            lambda x: model.backbone.init_with_output(jax.random.key(0), x, train=False)[0], images)
        assert min(features.shape[1:3]) == expected


def test_a_resize_too_small_for_the_backbone_names_data_resize():
    config = model_config("vgg16", "netvlad", pretrain="none")
    with pytest.raises(ValueError, match=r"^backbone vgg16 needs data.resize of at least 16x16 "
                                         r"\(.*empty feature map.*\), got \(12, 16\)$"):
        pretrained.build_and_load(config, (12, 16))
    model = geoloc_net.build(config, (16, 16))
    descriptors = model.apply(geoloc_net.init_variables(model, (16, 16)),
                              jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32))
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, rtol=1e-5)  # not all-zero
    assert not np.allclose(*descriptors)


BF16_MIN_COSINE = 0.995  # the stated tolerance of bfloat16 descriptors against float32 ones


@pytest.mark.parametrize("aggregation", ["netvlad", "crn", "rrm"])
def test_bfloat16_descriptors_stay_close_to_float32(aggregation):
    """model.dtype=bfloat16 through the whole embed path (the one mining, validation and
    evaluation use): each image's descriptor keeps a cosine similarity >= BF16_MIN_COSINE with
    the float32 one; the parameters stay float32 and the descriptors come back as float32.
    The aggregations with learned matmuls; GeM through the network is tested above, and every
    aggregation module alone in test_aggregators.py (within 3% of the float32 output's scale)."""
    size = (32, 32)
    config = model_config("resnet18conv4", aggregation)
    variables = geoloc_net.init_variables(geoloc_net.build(config, size), size)
    batch = np.random.default_rng(0).integers(0, 256, size=(3, *size, 3), dtype=np.uint8)
    reference = embed.make_embed_fn(geoloc_net.build(config, size), variables)(batch)
    config.dtype = "bfloat16"
    low = embed.make_embed_fn(geoloc_net.build(config, size), variables)(batch)
    assert low.dtype == np.float32 and low.shape == reference.shape
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    cosine = np.sum(low * reference, 1) / (np.linalg.norm(low, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() >= BF16_MIN_COSINE, cosine

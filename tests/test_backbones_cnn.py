"""CNN backbones (ResNet-18/50/101 conv4/conv5, VGG-16, AlexNet) against torchvision.

Parity: torchvision models with random weights and randomized BN statistics, cut the way the
benchmark cuts them, in eval mode, vs the Flax modules loaded through `import_torch`. The
tolerance is max |err| <= 1e-4 * max(1, max |reference|): with random weights the deep ResNets'
activations grow to ~1e6, so the error is measured relative to the output scale there.
"""

import copy
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_helpers import import_torchvision, nhwc, randomize_batch_norm, state_dict_numpy

from vgjax.models.backbones import alexnet, resnet, vgg
from vgjax.models.convert import StateDictReader, WeightImportError

RESNET_INPUT = (1, 3, 64, 80)  # NCHW
VGG_INPUT = (1, 3, 64, 80)
ALEXNET_INPUT = (1, 3, 96, 128)  # AlexNet needs >= 63 px


def _torchvision_model(name, seed=0):
    """torchvision model `name` with random weights, randomized BN and eval mode."""
    torch.manual_seed(seed)
    model = getattr(import_torchvision().models, name)()
    randomize_batch_norm(model, seed + 1)
    return model.eval()


def _input(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _load(import_fn, state_dict, **config):
    reader = StateDictReader(state_dict)
    variables = import_fn(reader, "", **config)
    reader.finish()
    return variables


def _forward(model, variables, x_nchw, **kwargs):
    return np.asarray(jax.jit(model.apply, static_argnames="train")(
        variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), **kwargs))


def _assert_close(out, ref, tol=1e-4):
    assert out.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(out - ref).max() <= tol * scale, (np.abs(out - ref).max(), scale)


def _subtree(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _resnet_torch_features(model, x_nchw):
    """NHWC outputs of torch's children()[:-3] (after layer3) and children()[:-2] (after layer4)."""
    h = torch.from_numpy(x_nchw)
    outputs = {}
    with torch.no_grad():
        for name, child in list(model.named_children())[:-2]:  # drop avgpool, fc
            h = child(h)
            if name in ("layer3", "layer4"):
                outputs[4 if name == "layer3" else 5] = nhwc(h)
    return outputs


def _benchmark_requires_grad(name, model, resnet_cut):
    """Applies the benchmark's freezing (reference §2.1) to a torchvision model; returns the kept
    layers (ResNet: children()[:resnet_cut], -3 = conv4, -2 = conv5)."""
    if name.startswith("resnet"):
        for child_name, child in model.named_children():
            if child_name == "layer3":
                break
            child.requires_grad_(False)
        return torch.nn.Sequential(*list(model.children())[:resnet_cut])
    layers = list(model.features.children())[:-2]
    for layer in layers[:-5] if name == "vgg16" else layers[:5]:
        layer.requires_grad_(False)
    return torch.nn.Sequential(*layers)


@pytest.fixture(scope="module")
def torchvision_models():
    """name -> (eval-mode torchvision model, a copy of its state dict as numpy), built on demand
    and shared by the tests of this file. Tests that change a model work on a deepcopy."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _torchvision_model(name)
            cache[name] = model, {k: v.copy() for k, v in state_dict_numpy(model).items()}
        return cache[name]
    return get


@pytest.fixture(scope="module")
def resnet18(torchvision_models):
    return torchvision_models("resnet18")


@pytest.mark.parametrize("depth", [18, 50, 101])
def test_resnet_matches_torchvision_both_cuts(depth, torchvision_models):
    model, state_dict = torchvision_models(f"resnet{depth}")
    x = _input(RESNET_INPUT)
    refs = _resnet_torch_features(model, x)
    for last_stage, ref in refs.items():
        # The full torchvision state dict: fc.* (and layer4.* for conv4) must be ignored.
        variables = _load(resnet.import_torch, state_dict, depth=depth, last_stage=last_stage)
        out = _forward(resnet.ResNet(depth, last_stage), variables, x)
        assert out.shape[-1] == resnet.resnet_channels(depth, last_stage)
        _assert_close(out, ref)


def test_vgg16_matches_torchvision(torchvision_models):
    model, state_dict = torchvision_models("vgg16")
    x = _input(VGG_INPUT)
    with torch.no_grad():
        ref = nhwc(torch.nn.Sequential(*list(model.features.children())[:-2])(torch.from_numpy(x)))
    variables = _load(vgg.import_torch, state_dict)
    out = _forward(vgg.VGG16(), variables, x)
    assert out.shape == (1, 4, 5, 512)
    assert ref.min() < 0  # pre-ReLU output
    _assert_close(out, ref)


def test_alexnet_matches_torchvision(torchvision_models):
    model, state_dict = torchvision_models("alexnet")
    x = _input(ALEXNET_INPUT)
    with torch.no_grad():
        ref = nhwc(torch.nn.Sequential(*list(model.features.children())[:-2])(torch.from_numpy(x)))
    variables = _load(alexnet.import_torch, state_dict)
    out = _forward(alexnet.AlexNet(), variables, x)
    assert out.shape == (1, 5, 7, 256)
    assert ref.min() < 0  # pre-ReLU output
    _assert_close(out, ref)


@pytest.mark.parametrize("model, shape", [
    (resnet.ResNet(18, 4), (30, 40, 256)), (resnet.ResNet(50, 5), (15, 20, 2048)),
    (vgg.VGG16(), (30, 40, 512)), (alexnet.AlexNet(), (29, 39, 256))],
    ids=["resnet18conv4", "resnet50conv5", "vgg16", "alexnet"])
def test_feature_map_shapes_at_480x640(model, shape):
    x = jax.ShapeDtypeStruct((1, 480, 640, 3), jnp.float32)
    out = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], x)
    assert out.shape == (1, *shape)


def test_resnet_train_mode_matches_torch_and_updates_bn(resnet18):
    """Benchmark default (frozen_bn=False): batch statistics everywhere, running stats updated
    with torch momentum 0.1. torch's running_var uses the unbiased batch variance, flax's the
    biased one: the test undoes the n / (n - 1) factor (negligible at 48 x 30 x 40 positions)."""
    model = copy.deepcopy(resnet18[0])  # train mode changes its running statistics
    x = _input((2, 3, 64, 80), seed=1)
    trunk = torch.nn.Sequential(*list(model.children())[:-3]).train()
    with torch.no_grad():
        ref = nhwc(trunk(torch.from_numpy(x)))
    variables = _load(resnet.import_torch, resnet18[1], depth=18, last_stage=4)
    apply = partial(resnet.ResNet(18, 4).apply, train=True, mutable=["batch_stats"])
    out, updates = jax.jit(apply)(variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
    _assert_close(np.asarray(out), ref)
    torch_sd = model.state_dict()  # the trunk shares model's modules
    # (torch BN, flax path, stride of its feature map)
    for torch_key, path, stride in [("bn1", ("bn1",), 2), ("layer1.1.bn2", ("layer1_1", "bn2"), 4),
                                    ("layer2.0.downsample.1", ("layer2_0", "downsample_bn"), 8),
                                    ("layer3.1.bn1", ("layer3_1", "bn1"), 16)]:
        new, old = _subtree(updates["batch_stats"], path), _subtree(variables["batch_stats"], path)
        np.testing.assert_allclose(new["mean"], torch_sd[f"{torch_key}.running_mean"], atol=1e-5)
        n = x.shape[0] * (x.shape[2] // stride) * (x.shape[3] // stride)
        torch_var, old_var = torch_sd[f"{torch_key}.running_var"].numpy(), np.asarray(old["var"])
        biased = 0.9 * old_var + (torch_var - 0.9 * old_var) * (n - 1) / n
        np.testing.assert_allclose(new["var"], biased, rtol=1e-4, atol=1e-5)


def test_frozen_bn_keeps_frozen_stage_statistics(resnet18):
    x = jnp.asarray(_input((2, 64, 80, 3), seed=2))
    variables = _load(resnet.import_torch, resnet18[1], depth=18, last_stage=4)
    paths = {"bn1": ("bn1",), "layer1_0": ("layer1_0", "bn1"), "layer2_1": ("layer2_1", "bn2"),
             "layer3_0": ("layer3_0", "downsample_bn"), "layer3_1": ("layer3_1", "bn1")}
    changed = {}
    for frozen_bn in (False, True):
        _, updates = jax.jit(partial(resnet.ResNet(18, 4, frozen_bn=frozen_bn).apply,
                                     train=True, mutable=["batch_stats"]))(variables, x)
        changed[frozen_bn] = {
            name: not np.allclose(_subtree(updates["batch_stats"], path)["mean"],
                                  _subtree(variables["batch_stats"], path)["mean"])
            for name, path in paths.items()}
    assert all(changed[False].values())
    assert changed[True] == {"bn1": False, "layer1_0": False, "layer2_1": False,
                             "layer3_0": True, "layer3_1": True}


@pytest.mark.parametrize("name, module, config", [
    ("resnet18", resnet, {"depth": 18, "last_stage": 5}),
    ("resnet50", resnet, {"depth": 50, "last_stage": 4}),
    ("vgg16", vgg, {}), ("alexnet", alexnet, {})],
    ids=["resnet18conv5", "resnet50conv4", "vgg16", "alexnet"])
def test_trainable_mask_matches_benchmark_freezing(name, module, config, torchvision_models):
    model, state_dict = torchvision_models(name)
    cut = -3 if config.get("last_stage") == 4 else -2
    kept = _benchmark_requires_grad(name, copy.deepcopy(model), cut)
    torch_counts = {flag: sum(p.numel() for p in kept.parameters() if p.requires_grad == flag)
                    for flag in (True, False)}
    params = _load(module.import_torch, state_dict, **config)["params"]
    mask = module.trainable_mask(params, **config)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    flax_counts = {flag: sum(p.size for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
                             if m is flag) for flag in (True, False)}
    assert flax_counts == torch_counts


def test_trainable_mask_rejects_variables_dict():
    with pytest.raises(ValueError, match="unexpected top-level"):
        resnet.trainable_mask({"params": {}, "batch_stats": {"bn1": {"mean": np.zeros(1)}}})


def test_import_errors(resnet18):
    state_dict = dict(resnet18[1])
    del state_dict["layer1.0.conv1.weight"]
    with pytest.raises(WeightImportError, match="missing tensor 'layer1.0.conv1.weight'"):
        resnet.import_torch(StateDictReader(state_dict), "", 18, 4)
    state_dict = dict(resnet18[1], **{"layer2.0.downsample.0.weight": np.zeros((128, 64, 3, 3))})
    with pytest.raises(WeightImportError, match="downsample.0.weight' has shape"):
        resnet.import_torch(StateDictReader(state_dict), "", 18, 4)
    vgg_sd = {f"features.{i}.{p}": np.zeros(1) for i in (0, 2) for p in ("weight", "bias")}
    with pytest.raises(WeightImportError, match="features.0.weight' has shape"):
        vgg.import_torch(StateDictReader(vgg_sd), "")
    with pytest.raises(WeightImportError, match="missing tensor 'backbone.features.0.weight'"):
        alexnet.import_torch(StateDictReader({}), "backbone.")


def test_ignored_and_unexpected_keys(resnet18):
    state_dict = resnet18[1]
    # A benchmark conv4 checkpoint has no layer4.* / fc.*; a torchvision file has both.
    conv4_only = {f"module.backbone.{k}": v for k, v in state_dict.items()
                  if not k.startswith(("layer4.", "fc."))}
    reader = StateDictReader(conv4_only)
    resnet.import_torch(reader, "module.backbone.", 18, 4)
    reader.finish()
    reader = StateDictReader(dict(state_dict, **{"layer5.0.conv1.weight": np.zeros(1)}))
    resnet.import_torch(reader, "", 18, 4)
    assert "layer4.1.bn2.running_var" in reader.ignored and "fc.weight" in reader.ignored
    with pytest.raises(WeightImportError, match="layer5.0.conv1.weight"):
        reader.finish()
    # ... and the conv5 network needs layer4.
    with pytest.raises(WeightImportError, match="missing tensor 'module.backbone.layer4.0.conv1"):
        resnet.import_torch(StateDictReader(conv4_only), "module.backbone.", 18, 5)


@pytest.mark.parametrize("name, module, network, size", [
    ("resnet18", resnet, resnet.ResNet(18, 4), (32, 48)), ("vgg16", vgg, vgg.VGG16(), (32, 48)),
    ("alexnet", alexnet, alexnet.AlexNet(), (64, 80))], ids=["resnet18", "vgg16", "alexnet"])
def test_bfloat16_close_to_float32(name, module, network, size, torchvision_models):
    config = {"depth": 18, "last_stage": 4} if module is resnet else {}
    state_dict = torchvision_models(name)[1]
    x = _input((1, 3, *size), seed=3)
    ref = _forward(network, _load(module.import_torch, state_dict, **config), x)
    low = {"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16}
    variables = _load(module.import_torch, state_dict, **config, **low)
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.bfloat16
    out = _forward(network.clone(**low), variables, x)
    assert out.dtype == jnp.bfloat16
    err = np.abs(out.astype(np.float32) - ref)
    assert err.max() <= 0.05 * np.abs(ref).max(), (err.max(), np.abs(ref).max())


@pytest.mark.parametrize("depth, last_stage", [(34, 4), (50, 3)])
def test_bad_resnet_config_is_named(depth, last_stage):
    with pytest.raises(ValueError, match="depth" if depth == 34 else "last_stage"):
        resnet.resnet_channels(depth, last_stage)

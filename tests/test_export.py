"""Export (vgjax.models.export, --mode export): the benchmark's state dict that its torch network
loads strictly with the same descriptors, the self-describing vgjax model file and its checks,
and .safetensors files read and written by the safetensors package."""

import json
import re

import jax
import numpy as np
import pytest
import safetensors.torch
import torch

from test_models import IMAGE_SIZES, images, model_config, torch_network
from torch_helpers import state_dict_numpy
from vgjax import embed, experiment, models
from vgjax.configs import common, validate
from vgjax.models import export, geoloc_net, pretrained
from vgjax.models.convert import WeightImportError, read_safetensors, read_state_dict, write_safetensors
from vgjax.train import checkpoint

SIZE = (64, 64)


@pytest.fixture(autouse=True)
def _exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def random_variables(config, size=SIZE, seed=0):
    """Variables of the right tree, shapes and dtypes with random values (no compilation):
    kernels ~ N(0, 1/fan_in), BatchNorm scales and variances in [0.5, 1.5), GeM p = 2.5."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name == "p":
            value = np.full(shape, 2.5)
        elif name in ("bias", "mean"):
            value = 0.1 * rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        return value.astype(leaf.dtype)

    model = geoloc_net.build(config, size)
    return model, jax.tree_util.tree_map_with_path(draw, geoloc_net.variable_shapes(model, size))


def _real_benchmark_state(state, config):
    """torch_reference's state dict as the benchmark's own network holds it: blocks cut by
    trunc_te removed, no CCT classifier.fc (the benchmark's CCT has none), ViT's unused pooler as
    vgjax writes it (zeros)."""
    depth = config.trunc_te or 99
    cut = re.compile(r"backbone\.(vit_model\.encoder\.layer|classifier\.blocks)\.(\d+)\.")
    kept = {key: value for key, value in state.items() if not key.startswith("backbone.classifier.fc.")
            and not ((match := cut.match(key)) and int(match.group(2)) >= depth)}
    return {key: np.zeros_like(value) if ".pooler." in key else value for key, value in kept.items()}


@pytest.mark.parametrize("backbone, aggregation, l2, fc_output_dim", [
    *(("resnet18conv4", aggregation, "before_pool", None)
      for aggregation in ("gem", "spoc", "mac", "rmac", "netvlad", "crn", "rrm")),
    ("resnet18conv4", "gem", "after_pool", 32), ("resnet18conv4", "netvlad", "none", 32),
    ("resnet50conv5", "gem", "none", None), ("vgg16", "netvlad", "none", None),
    ("alexnet", "mac", "after_pool", None), ("vit", "cls", "none", 16), ("vit", "netvlad", "none", None),
    ("cct384", "seqpool", "none", None), ("cct384", "gem", "before_pool", None),
])
def test_export_is_the_inverse_of_the_import(backbone, aggregation, l2, fc_output_dim, tmp_path):
    """benchmark state dict -> vgjax import -> export -> the same tensors, key for key, exactly."""
    config = model_config(backbone, aggregation, l2, fc_output_dim)
    size = IMAGE_SIZES.get(backbone, SIZE)
    state = state_dict_numpy(torch_network(config))
    np.savez(tmp_path / "benchmark.npz", **state)
    variables = pretrained.load_benchmark_checkpoint(tmp_path / "benchmark.npz", config, size)
    export.save_benchmark(tmp_path / "exported.safetensors", config, variables, size)
    exported, expected = read_state_dict(tmp_path / "exported.safetensors"), _real_benchmark_state(state, config)
    assert sorted(exported) == sorted(expected)
    for key, value in expected.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


@pytest.mark.parametrize("aggregation, l2, fc_output_dim", [
    ("gem", "before_pool", None), ("netvlad", "none", None), ("crn", "none", None), ("rrm", "none", 16),
])
def test_the_benchmark_network_loads_the_export_strictly_with_the_same_descriptors(
        aggregation, l2, fc_output_dim, tmp_path):
    config = model_config("resnet18conv4", aggregation, l2, fc_output_dim)
    model, variables = random_variables(config)
    path = tmp_path / "net.safetensors"
    export.save_benchmark(path, config, variables, SIZE)
    network = torch_network(config)
    network.load_state_dict(safetensors.torch.load_file(path), strict=True)
    x_torch, x = images(SIZE)
    with torch.no_grad():
        expected = network(x_torch).numpy()
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)), expected, atol=1e-4, rtol=0)


def test_the_vgjax_model_file_gives_back_the_same_network_and_descriptors(tmp_path):
    config = model_config("resnet18conv4", "netvlad", "none", 32)
    model, variables = random_variables(config)
    path = tmp_path / f"net{export.MODEL_SUFFIX}"
    export.save(path, config, variables, SIZE)
    network, loaded, image_size, embed_fn = models.load(path)
    assert network == model and image_size == SIZE
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    uint8 = np.random.default_rng(0).integers(0, 256, (3, *SIZE, 3), dtype=np.uint8)
    np.testing.assert_array_equal(embed_fn(uint8), embed.make_embed_fn(model, variables)(uint8))


def _edited(tmp_path, name, metadata=None, tensors=None):
    """A copy of a valid vgjax model file with its metadata and tensors changed by the callables."""
    config = model_config("resnet18conv4", "gem")
    _, variables = random_variables(config)
    export.save(tmp_path / "good.vgjax.safetensors", config, variables, SIZE)
    state, header = read_safetensors(tmp_path / "good.vgjax.safetensors")
    path = tmp_path / name
    write_safetensors(path, (tensors or dict)(state), (metadata or dict)(header))
    return path


@pytest.mark.parametrize("metadata, tensors, message", [
    (lambda m: {"format": "pt"}, None, "not a vgjax model file"),
    (lambda m: {**m, "format_version": "9"}, None, "vgjax model format version '9'; this vgjax reads version 1"),
    (lambda m: {k: v for k, v in m.items() if k != "image_size"}, None, "bad vgjax model metadata: no image_size entry"),
    (lambda m: {**m, "image_size": "[64]"}, None, r"bad vgjax model metadata: image_size \[64\] is not \[H, W\]"),
    (lambda m: {**m, "model": "{not json"}, None, "bad vgjax model metadata: Expecting property name"),
    (lambda m: {**m, "model": json.dumps({"backbone": "resnet18conv4"})}, None, "bad vgjax model metadata: model keys"),
    (lambda m: {**m, "model": m["model"].replace("resnet18conv4", "resnet7")}, None, "unknown model.backbone 'resnet7'"),
    (None, lambda t: {k: v for k, v in t.items() if k != "params/aggregation/p"},
     "missing params/aggregation/p; unexpected none"),
    (None, lambda t: {**t, "params/aggregation/p": np.ones(2, np.float32)},
     r"tensor 'params/aggregation/p' has shape \(2,\), the network expects \(1,\)"),
])
def test_a_bad_vgjax_model_file_is_one_line_naming_it(metadata, tensors, message, tmp_path):
    path = _edited(tmp_path, "bad.vgjax.safetensors", metadata, tensors)
    with pytest.raises(WeightImportError, match=f"^{re.escape(str(path))}: .*{message}") as error:
        models.load(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage", [
    lambda data: data[:-7],  # truncated
    lambda data: data[:8] + bytes(b ^ 0xFF for b in data[8:20]) + data[20:],  # header bytes flipped
    lambda data: (2 ** 40).to_bytes(8, "little") + data[8:],  # header size past the end
])
def test_a_corrupt_safetensors_file_raises_weight_import_error_naming_it(damage, tmp_path):
    path = tmp_path / "net.safetensors"
    write_safetensors(path, {"w": np.ones((2, 3), np.float32)})
    path.write_bytes(damage(path.read_bytes()))
    for reader in (read_state_dict, models.load):
        with pytest.raises(WeightImportError, match=f"^{re.escape(str(path))}: not a valid .safetensors file"):
            reader(path)


# ---------------------------------------------------------------------------------------------
# --mode export.


def _config(**model):
    config = common.get_config()
    config.data.resize = SIZE
    config.model.update({"backbone": "resnet18conv4", "aggregation": "gem", "pretrain": "none", **model})
    return config


def _fake_run(workdir, config, variables):
    """A training workdir as vgjax.train.loop leaves it: config.json and a committed best checkpoint."""
    workdir.mkdir()
    (workdir / checkpoint.RUN_CONFIG).write_text(config.to_json_best_effort())
    checkpoints = checkpoint.Checkpoints(workdir / checkpoint.CHECKPOINT_FOLDER)
    train = {"trainable": variables["params"], "frozen": {}, "batch_stats": variables["batch_stats"]}
    checkpoints.save(3, {"train": train}, {}, best=True)
    checkpoints.close()


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_mode_on_a_run_and_on_a_weights_file(tmp_path):
    config = _config()
    _, variables = random_variables(config.model)
    run = tmp_path / "run"
    _fake_run(run, config, variables)
    before = _files(run)
    summary = experiment.run(_config(aggregation="netvlad"), run, "export")  # defaults: the run's
    assert {k: v for k, v in _files(run).items() if not k.startswith("export/")} == before
    assert summary["network"]["aggregation"] == "gem" and summary["network"]["checkpoint"] == "best"
    assert summary["vgjax_model"] == str(run / "export" / "resnet18conv4_gem_best.vgjax.safetensors")
    jax.tree.map(np.testing.assert_array_equal, models.load(summary["vgjax_model"]).variables, variables)
    # The benchmark file is a weights file for model.resume: exported again elsewhere, the same.
    other = tmp_path / "other"
    summary = experiment.run(_config(resume=summary["benchmark_state_dict"]), other, "export")
    assert summary["vgjax_model"] == str(other / "export" / "resnet18conv4_gem.vgjax.safetensors")
    jax.tree.map(np.testing.assert_array_equal, models.load(summary["vgjax_model"]).variables, variables)
    with pytest.raises(validate.ConfigError, match="model.pretrain='none': --mode export .* RANDOM weights"):
        experiment.run(_config(), tmp_path / "empty", "export")
    assert not (tmp_path / "empty").exists()

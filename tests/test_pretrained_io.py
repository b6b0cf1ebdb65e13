"""Reading weight files safely, and the download cache with its offline path."""

import hashlib
import json
import os
import pickle
import re
import struct
import zipfile

import numpy as np
import pytest
import torch

from vgjax.configs import common
from vgjax.models import pretrained, weights_cache
from vgjax.models.convert import WeightImportError, read_state_dict


def write_safetensors(path, tensors):
    """A minimal independent safetensors writer (the format: u64 header size, JSON, data)."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        dtype = {np.float32: "F32", np.int64: "I64", np.float16: "F16"}[array.dtype.type]
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_safetensors_npz_and_pth_give_the_same_state_dict(tmp_path):
    tensors = {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
               "bn.num_batches_tracked": np.array(7, dtype=np.int64)}
    write_safetensors(tmp_path / "w.safetensors", tensors)
    np.savez(tmp_path / "w.npz", **tensors)
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.npz", "w.pth"):
        state = read_state_dict(tmp_path / name)
        assert sorted(state) == sorted(tensors), name
        for key in tensors:
            np.testing.assert_array_equal(state[key], tensors[key])


def test_bfloat16_safetensors_are_widened(tmp_path):
    values = np.array([1.5, -2.0, 3.140625], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    text = json.dumps({"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bf16.tobytes())
    np.testing.assert_array_equal(read_state_dict(tmp_path / "b.safetensors")["x"], values)


def test_benchmark_train_checkpoint_with_numpy_values_and_module_prefix(tmp_path):
    checkpoint = {
        "epoch_num": 3,
        "model_state_dict": {"module.backbone.0.weight": torch.ones(2, 3, 1, 1),
                             "module.aggregation.1.p": torch.tensor([3.0])},
        "optimizer_state_dict": {"state": {}, "param_groups": []},
        "recalls": np.array([80.1, 90.2, 93.0, 95.5]),
        "best_r5": np.float64(90.2),
        "not_improved_num": 0,
    }
    torch.save(checkpoint, tmp_path / "last_model.pth")
    state = read_state_dict(tmp_path / "last_model.pth")
    assert sorted(state) == ["aggregation.1.p", "backbone.0.weight"]
    assert state["aggregation.1.p"].tolist() == [3.0]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/vgjax_pwned",))


def test_pickled_code_is_never_executed(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": _Exploit()}}, f)
    if os.path.exists("/tmp/vgjax_pwned"):
        os.remove("/tmp/vgjax_pwned")
    with pytest.raises(WeightImportError, match="not a loadable weights-only torch file"):
        read_state_dict(path)
    assert not os.path.exists("/tmp/vgjax_pwned")


@pytest.mark.parametrize("content, message", [
    (b"\x01\x02", "header too small"),
    (struct.pack("<Q", 10 ** 9) + b"{}", "header too large"),
])
def test_corrupt_safetensors_are_rejected(tmp_path, content, message):
    (tmp_path / "c.safetensors").write_bytes(content)
    with pytest.raises(WeightImportError, match=message):
        read_state_dict(tmp_path / "c.safetensors")


def test_safetensors_offsets_must_match_shapes(tmp_path):
    text = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "s.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(8))
    with pytest.raises(WeightImportError, match="s.safetensors: not a valid .safetensors file: .*invalid shape"):
        read_state_dict(tmp_path / "s.safetensors")


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file .*nope.pth does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    torch.save({"epoch": 1, "arch": "resnet"}, tmp_path / "meta.pth")
    with pytest.raises(WeightImportError, match="no state dict found"):
        read_state_dict(tmp_path / "meta.pth")


def _odd_npz(path, kind):
    """Writes an odd or corrupt .npz of one `kind` at `path`."""
    if kind == "text":
        path.write_bytes(b"not an archive")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "npy":
        with open(path, "wb") as file:
            np.save(file, np.zeros(3))
    elif kind == "objects":
        np.savez(path, w=np.array([{"a": 1}], dtype=object))
    elif kind == "strings":
        np.savez(path, w=np.array(["conv1"]))
    elif kind == "truncated":
        np.savez(path, w=np.zeros(1000))
        path.write_bytes(path.read_bytes()[:500])
    elif kind == "member":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("w.npy", b"not an npy file")


@pytest.mark.parametrize("kind, message", [
    ("text", "not a .npz archive of numeric arrays: "), ("empty", "not a .npz archive of numeric"),
    ("npy", "one array in .npy format"), ("objects", "not a .npz archive of numeric arrays: Object"),
    ("strings", "tensor 'w' has non-numeric dtype <U5"), ("truncated", "not a .npz archive of numeric"),
    ("member", "tensor 'w' has non-numeric dtype"),
])
def test_odd_npz_files_are_rejected_naming_the_file(tmp_path, kind, message):
    path = tmp_path / "w.npz"
    _odd_npz(path, kind)
    with pytest.raises(WeightImportError, match=f"^{path}: {message}"):
        read_state_dict(path)


def test_merge_variables_checks_names_and_shapes():
    variables = {"params": {"backbone": {"w": np.zeros((2, 2), np.float32)}, "fc": {"b": np.zeros(3, np.float32)}}}
    merged = pretrained.merge_variables(variables, {"params": {"backbone": {"w": np.ones((2, 2))}}})
    assert merged["params"]["backbone"]["w"].sum() == 4 and merged["params"]["fc"]["b"].sum() == 0
    assert merged["params"]["backbone"]["w"].dtype == np.float32
    with pytest.raises(WeightImportError, match=r"\['params'\]\['backbone'\]\['w'\] has shape \(3,\)"):
        pretrained.merge_variables(variables, {"params": {"backbone": {"w": np.ones(3)}}})
    with pytest.raises(WeightImportError, match=r"\['params'\]\['head'\]\['w'\] does not exist"):
        pretrained.merge_variables(variables, {"params": {"head": {"w": np.ones(3)}}})


# ---------------------------------------------------------------------------------------------
# Downloads: tested offline with file:// URLs and a pre-filled cache.


def _hashed_file(tmp_path, payload=b"weights"):
    digest = hashlib.sha256(payload).hexdigest()[:8]
    source = tmp_path / "remote" / f"net-{digest}.pth"
    source.parent.mkdir()
    source.write_bytes(payload)
    return source


def test_fetch_downloads_verifies_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("VGJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VGJAX_OFFLINE", raising=False)
    source = _hashed_file(tmp_path)
    path = weights_cache.fetch(source.as_uri())
    assert path == tmp_path / "cache" / "weights" / source.name and path.read_bytes() == b"weights"
    source.unlink()  # now only the cache has it
    assert weights_cache.fetch(source.as_uri(), offline=True) == path


def test_fetch_rejects_a_wrong_hash_and_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VGJAX_CACHE", str(tmp_path / "cache"))
    source = _hashed_file(tmp_path)
    tampered = source.with_name("net-00000000.pth")
    source.rename(tampered)
    with pytest.raises(WeightImportError, match="does not match the expected 00000000"):
        weights_cache.fetch(tampered.as_uri(), offline=False)
    assert not list((tmp_path / "cache" / "weights").iterdir())


def test_offline_fetch_of_an_uncached_file_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("VGJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VGJAX_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth is not cached and downloads are off"):
        weights_cache.fetch(pretrained.TORCHVISION_URLS["resnet18"])


def test_a_failed_download_says_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("VGJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VGJAX_OFFLINE", raising=False)
    url = (tmp_path / "unreachable" / "resnet18-f37072fd.pth").as_uri()  # no network needed
    monkeypatch.setitem(pretrained.TORCHVISION_URLS, "resnet18", url)
    config = common.get_config().model
    config.backbone, config.pretrain = "resnet18conv4", "imagenet"
    target = tmp_path / "cache" / "weights" / "resnet18-f37072fd.pth"
    with pytest.raises(FileNotFoundError, match=f"^cannot download {re.escape(url)} .*: put that "
                                                f"file at {re.escape(str(target))} .*VGJAX_CACHE"):
        pretrained.pretrained_backbone_file(config)
    assert not list(target.parent.iterdir())  # no partial file left

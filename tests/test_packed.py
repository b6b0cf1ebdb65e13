"""Packed splits: records, fields and paths round-trip; the pipelines read the packed form as the
folder; interrupted and inconsistent packs are rejected with errors naming the file."""

import functools
import json
import math
import shutil

import numpy as np
import pytest

from vgjax.data import images, packed, pipeline, synthetic, vg_folder
from vgjax.data.packed import PackedFormatError

SOURCE_SIZE = (48, 64)
SMALL = (24, 32)
# JPEG (quality 95, 4:4:4) of a 24x32 thumbnail vs the exact resize, measured on this dataset:
# max 17, mean 2.5 grey levels. At 480x640 it is max ~9, mean ~1 (benchmarks/pipeline.py).
JPEG_MAX_ERROR, JPEG_MEAN_ERROR = 24, 3.5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """36 database and 20 query JPEGs of 48x64 in the VG folder format."""
    root = tmp_path_factory.mktemp("aerial")
    synthetic.build_aerial_dataset(root, seed=0, splits=("test",), image_size=SOURCE_SIZE, num_queries=20,
                                   size_m=100.0, progress=False)
    return root


@pytest.fixture(scope="module")
def split(dataset):
    return vg_folder.load_split(dataset, "test")


@pytest.fixture(scope="module")
def packs(dataset, tmp_path_factory):
    """(encoding, size) -> packed folder, 16 records per shard (3 database shards)."""
    out = tmp_path_factory.mktemp("packed")
    return {(encoding, size): packed.pack_split(dataset, "test", out / f"{encoding}{size[0]}", size,
                                                encoding=encoding, records_per_shard=16, progress=False)
            for encoding, size in (("jpeg", SOURCE_SIZE), ("jpeg", SMALL), ("raw", SMALL))}


def _folder_images(paths, size):
    return [images.resize_pil_bilinear(images.load_rgb(p), size) for p in paths]


def _same_fields(a, b):
    return a.keys() == b.keys() and all(
        (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


@pytest.mark.parametrize("key", [("raw", SMALL), ("jpeg", SOURCE_SIZE)])
def test_records_round_trip_exactly(packs, split, key):
    """raw, and JPEGs already at the packed size (copied verbatim), equal the folder's images."""
    packed_split = packed.open_packed(packs[key], image_size=key[1])
    assert len(packed_split.database.shards) == 3
    for subset, paths in (("database", split.database_paths), ("queries", split.query_paths)):
        source = packed_split.subset(subset).data_source()
        assert len(source) == len(paths)
        for i, (path, expected) in enumerate(zip(paths, _folder_images(paths, key[1]))):
            record = packed.decode_record(source[i])
            np.testing.assert_array_equal(record.image, expected)
            assert record.path == f"{subset}/{path.rsplit('/', 1)[1]}"
            assert _same_fields(record.fields, vg_folder.parse_image_name(path))
    assert packed_split.database_paths == split.database_paths
    assert packed_split.query_paths == split.query_paths


def test_resized_jpeg_error_is_bounded(packs, split):
    loader = packed.open_packed(packs["jpeg", SMALL]).loader(split)
    paths = split.database_paths + split.query_paths
    errors = np.stack([np.abs(loader(p).astype(int) - expected)
                       for p, expected in zip(paths, _folder_images(paths, SMALL))])
    assert 0 < errors.mean() <= JPEG_MEAN_ERROR and errors.max() <= JPEG_MAX_ERROR


def test_inference_batches_from_packed_equal_folder(packs, split):
    loader = packed.open_packed(packs["jpeg", SOURCE_SIZE]).loader(split)
    transform = functools.partial(images.resize_bilinear, size=SOURCE_SIZE)  # a no-op at the packed size
    paths = split.query_paths + split.database_paths
    folder = list(pipeline.inference_batches(paths, transform, 16))
    from_pack = list(pipeline.inference_batches(paths, transform, 16, loader=loader))
    assert [(b.start, b.num_valid) for b in folder] == [(b.start, b.num_valid) for b in from_pack]
    for a, b in zip(folder, from_pack):
        np.testing.assert_array_equal(a.images, b.images)


def test_triplet_batches_from_packed_equal_folder(packs, split):
    rng = np.random.default_rng(0)
    tuples = [[split.query_paths[q], *(split.database_paths[i] for i in rng.choice(36, 3, replace=False))]
              for q in range(12)]
    loader = packed.open_packed(packs["raw", SMALL]).loader(split)
    folder = list(pipeline.triplet_batches(tuples, 4, SMALL, start_batch=1))
    from_pack = list(pipeline.triplet_batches(tuples, 4, SMALL, start_batch=1, loader=loader))
    assert len(folder) == len(from_pack) == 2 and folder[0].shape == (16, *SMALL, 3)
    for a, b in zip(folder, from_pack):
        np.testing.assert_array_equal(a, b)


def test_loader_addresses_relative_and_absolute_paths(packs, split, dataset, monkeypatch):
    loader = packed.open_packed(packs["raw", SMALL]).loader()
    monkeypatch.chdir(dataset)
    relative = "images/test/" + split.query_paths[5].rsplit("/images/test/", 1)[1]
    np.testing.assert_array_equal(loader(relative), loader(split.query_paths[5]))
    with pytest.raises(KeyError, match="nowhere.jpg is not in the packed split"):
        loader("nowhere.jpg")


def test_loader_rejects_a_split_with_other_images(packs, dataset, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(dataset, other)
    next((other / "images" / "test" / "queries").iterdir()).unlink()
    with pytest.raises(PackedFormatError, match="holds 20 queries images but .* has 19"):
        packed.open_packed(packs["raw", SMALL]).loader(vg_folder.load_split(other, "test"))


def _copy(pack, tmp_path):
    return shutil.copytree(pack, tmp_path / pack.name)


def test_manifest_validation_names_the_file(packs, tmp_path):
    pack = _copy(packs["raw", SMALL], tmp_path)
    manifest = pack / packed.MANIFEST
    with pytest.raises(PackedFormatError, match=f"{manifest}: images are packed at 24x32, but 48x64"):
        packed.open_packed(pack, image_size=SOURCE_SIZE)
    content = json.loads(manifest.read_text())
    content["subsets"]["database"]["shards"][1]["records"] = 15
    manifest.write_text(json.dumps(content))
    with pytest.raises(PackedFormatError, match="database-00001-of-00003.array_record holds 16 records"):
        packed.open_packed(pack)
    manifest.write_text(json.dumps(dict(content, version=0)))
    with pytest.raises(PackedFormatError, match="format version 0"):
        packed.open_packed(pack)
    shard = pack / "queries-00001-of-00002.array_record"
    shard.unlink()
    manifest.write_text(json.dumps(json.loads((packs["raw", SMALL] / packed.MANIFEST).read_text())))
    with pytest.raises(PackedFormatError, match=f"{shard} is missing"):
        packed.open_packed(pack)
    manifest.unlink()
    with pytest.raises(PackedFormatError, match=f"{manifest} is missing: .* interrupted pack"):
        packed.open_packed(pack)


def test_interrupted_pack_is_rejected(dataset, tmp_path, monkeypatch):
    out = tmp_path / "packed"
    payload = packed._image_payload

    def disk_full_at_queries(path, *args):
        if "/queries/" in path:
            raise OSError("disk full")
        return payload(path, *args)

    monkeypatch.setattr(packed, "_image_payload", disk_full_at_queries)
    with pytest.raises(OSError, match="disk full"):
        packed.pack_split(dataset, "test", out, SMALL, progress=False)
    assert not out.exists() and (tmp_path / "packed.partial").is_dir()
    with pytest.raises(FileNotFoundError, match="packed.partial is an interrupted pack"):
        packed.open_packed(out)
    with pytest.raises(PackedFormatError, match="manifest.json is missing"):
        packed.open_packed(tmp_path / "packed.partial")


def test_pack_errors_name_the_bad_file(dataset, packs, tmp_path):
    with pytest.raises(FileExistsError, match="already exists"):
        packed.pack_split(dataset, "test", packs["raw", SMALL], SMALL, progress=False)
    broken = shutil.copytree(dataset, tmp_path / "broken")
    bad = broken / "images" / "test" / "database" / vg_folder.format_image_name(1.0, 2.0)
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match=f"cannot read image {bad}"):
        packed.pack_split(broken, "test", tmp_path / "out", SMALL, progress=False)

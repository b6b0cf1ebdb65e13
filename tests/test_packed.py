"""Packs (vgjax.data.tfds_builders, read by vgjax.data.packed): records, fields and paths round-trip; grain reads
tfds's data source and the pipelines read the pack as the folder; GSV-Cities packs by place;
killed builds, damaged shards and missing images are errors naming the file."""

import functools
import io
import json
import math
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image

from vgjax.data import gsv_cities, images, packed, pipeline, synthetic, tfds_builders, vg_folder
from vgjax.data.packed import PackedFormatError

REPO = Path(__file__).resolve().parents[1]
SOURCE_SIZE = (48, 64)
SMALL = (24, 32)
# JPEG (quality 95, 4:4:4) of a 24x32 thumbnail vs the exact resize, measured on this dataset:
# max 17, mean 2.5 grey levels. At 480x640 it is max ~9, mean ~1 (benchmarks/pipeline.py).
JPEG_MAX_ERROR, JPEG_MEAN_ERROR = 24, 3.5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Splits val and test, each 36 database and 20 query JPEGs of 48x64 in the VG folder format."""
    root = tmp_path_factory.mktemp("data") / "aerial"
    synthetic.build_aerial_dataset(root, seed=0, splits=("val", "test"), image_size=SOURCE_SIZE, num_queries=20,
                                   size_m=100.0, progress=False)
    return root


@pytest.fixture(scope="module")
def split(dataset):
    return vg_folder.load_split(dataset, "test")


def _pack(data_dir, dataset, encoding, size, splits=("test",)):
    builder = tfds_builders.vg_folder_pack(data_dir, dataset, size, splits=splits, encoding=encoding, progress=False)
    tfds_builders.build(builder, dataset)
    return builder


@pytest.fixture(scope="module")
def packs(dataset, tmp_path_factory):
    """(encoding, size) -> the builder of the test split's pack, all in one tfds data_dir."""
    data_dir = tmp_path_factory.mktemp("packed")
    return {(encoding, size): _pack(data_dir, dataset, encoding, size)
            for encoding, size in (("jpeg", SOURCE_SIZE), ("jpeg", SMALL), ("raw", SMALL))}


def _folder_images(paths, size):
    return [images.resize_pil_bilinear(images.load_rgb(p), size) for p in paths]


def _decoded(record):
    image = record["image"]
    return image if isinstance(image, np.ndarray) else np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))


def _same_field(ours, theirs):
    if isinstance(theirs, float):
        return (math.isnan(ours) and math.isnan(theirs)) or ours == theirs
    return ours.decode() == theirs


@pytest.mark.parametrize("key", [("raw", SMALL), ("jpeg", SOURCE_SIZE)])
def test_records_round_trip_exactly(packs, split, dataset, key):
    """raw, and JPEGs already at the packed size (copied verbatim), equal the folder's images;
    each record carries its path and every @-field, in the folder's sorted order."""
    pack = packed.open_pack(packs[key])
    assert pack.folder.parent.name == f"aerial-test-{key[1][0]}x{key[1][1]}-{key[0]}"
    for role, paths in (("database", split.database_paths), ("queries", split.query_paths)):
        source = pack.data_source(f"test_{role}")
        assert len(source) == len(paths)
        assert [str(dataset / p) for p in pack.paths[f"test_{role}"]] == paths
        for i, (path, expected) in enumerate(zip(paths, _folder_images(paths, key[1]))):
            record = source[i]
            np.testing.assert_array_equal(_decoded(record), expected)
            assert record["path"].decode() == f"images/test/{role}/{Path(path).name}"
            fields = vg_folder.parse_image_name(path)
            assert all(_same_field(record[name], fields[name]) for name in vg_folder.FIELD_NAMES)


def test_grain_reads_tfds_data_source_as_the_folder(packs, split):
    """tfds.data_source -> grain MapDataset -> batches equal the folder's decoded images."""
    source = packed.open_pack(packs["raw", SMALL]).data_source("test_queries")
    batches = list(grain.MapDataset.source(source).map(lambda record: record["image"]).batch(8))
    expected = np.stack(_folder_images(split.query_paths, SMALL))
    np.testing.assert_array_equal(np.concatenate(batches), expected)


def test_resized_jpeg_error_is_bounded(packs, split):
    loader = packed.open_pack(packs["jpeg", SMALL]).loader()
    paths = split.database_paths + split.query_paths
    errors = np.stack([np.abs(loader(p).astype(int) - expected)
                       for p, expected in zip(paths, _folder_images(paths, SMALL))])
    assert 0 < errors.mean() <= JPEG_MEAN_ERROR and errors.max() <= JPEG_MAX_ERROR


def test_inference_batches_from_packed_equal_folder(packs, split):
    loader = packed.open_pack(packs["jpeg", SOURCE_SIZE]).loader(required=split.query_paths + split.database_paths)
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
    loader = pickle.loads(pickle.dumps(packed.open_pack(packs["raw", SMALL]).loader()))  # as grain workers get it
    folder = list(pipeline.triplet_batches(tuples, 4, SMALL, start_batch=1))
    from_pack = list(pipeline.triplet_batches(tuples, 4, SMALL, start_batch=1, loader=loader))
    assert len(folder) == len(from_pack) == 2 and folder[0].shape == (16, *SMALL, 3)
    for a, b in zip(folder, from_pack):
        np.testing.assert_array_equal(a, b)


def test_loader_addresses_relative_absolute_and_moved_paths(packs, split, dataset, monkeypatch, tmp_path):
    pack = packed.open_pack(packs["raw", SMALL])
    loader = pack.loader()
    monkeypatch.chdir(dataset)
    relative = "images/test/" + split.query_paths[5].rsplit("/images/test/", 1)[1]
    np.testing.assert_array_equal(loader(relative), loader(split.query_paths[5]))
    with pytest.raises(KeyError, match="nowhere.jpg is not in the pack"):
        loader("nowhere.jpg")
    moved = tmp_path / "moved"  # the dataset folder elsewhere: its paths are read from the pack
    np.testing.assert_array_equal(pack.loader(moved)(moved / relative), loader(relative))


def test_a_run_needing_images_the_pack_lacks_is_refused(packs, dataset, tmp_path):
    other = shutil.copytree(dataset, tmp_path / "other")
    extra = other / "images" / "test" / "queries" / vg_folder.format_image_name(584000.0, 4477000.0)
    shutil.copy(next((other / "images" / "test" / "queries").iterdir()), extra)
    split = vg_folder.load_split(other, "test")
    pack = packed.open_pack(packs["raw", SMALL])
    with pytest.raises(PackedFormatError, match=f"lacks 1 of the 57 images this run reads, e.g. {extra}"):
        pack.loader(other, required=split.database_paths + split.query_paths)


def test_every_split_of_a_dataset_packs_at_once(dataset, tmp_path):
    pack = packed.open_pack(_pack(tmp_path, dataset, "raw", SMALL, splits=("val", "test")))
    assert {split: len(paths) for split, paths in pack.paths.items()} == {
        "val_database": 36, "val_queries": 20, "test_database": 36, "test_queries": 20}
    val = vg_folder.load_split(dataset, "val")
    loader = pack.loader(required=val.database_paths + val.query_paths)
    np.testing.assert_array_equal(loader(val.query_paths[3]), _folder_images(val.query_paths[3:4], SMALL)[0])


def _copy(builder, tmp_path):
    """A copy of a built pack in its own data_dir, and its builder there."""
    data_dir = tmp_path / "copy"
    shutil.copytree(Path(builder.data_path).parents[2], data_dir)
    cfg = builder.builder_config
    return tfds_builders.vg_folder_pack(data_dir, Path(packed.open_pack(builder).source), cfg.image_size,
                                 splits=cfg.sources, encoding=cfg.encoding, progress=False)


def _shard(builder, role):
    return Path(builder.data_path) / f"vg_folder-test_{role}.array_record-00000-of-00001"


def test_damaged_shards_are_errors_naming_the_file(packs, split, tmp_path):
    builder = _copy(packs["raw", SMALL], tmp_path)
    shard = _shard(builder, "database")
    content = shard.read_bytes()
    shard.write_bytes(content[:len(content) // 3])  # truncated
    with pytest.raises(PackedFormatError, match=f"{shard}: unreadable array_record shard"):
        packed.open_pack(builder)
    flipped = bytearray(content)
    flipped[5000] ^= 0x10  # one bit inside the records: riegeli's chunk hash catches it when read
    shard.write_bytes(bytes(flipped))
    loader = packed.open_pack(builder).loader()
    with pytest.raises(OSError, match=f"pack {builder.data_path}: cannot read the record of .*Corrupted"):
        [loader(path) for path in split.database_paths]
    shard.unlink()
    with pytest.raises(PackedFormatError, match=f"{shard} is missing"):
        packed.open_pack(builder)


def test_damaged_metadata_is_an_error_naming_the_pack(packs, tmp_path):
    builder = _copy(packs["raw", SMALL], tmp_path)
    metadata = Path(builder.data_path) / "metadata.json"
    content = json.loads(metadata.read_text())
    content["paths"]["test_queries"].pop()
    metadata.write_text(json.dumps(content))
    with pytest.raises(PackedFormatError, match="metadata.json lists 19 test_queries paths, the shards hold 20"):
        packed.open_pack(builder)
    metadata.write_text(metadata.read_text()[:40])  # truncated
    with pytest.raises(PackedFormatError, match=f"{builder.data_path}: unreadable dataset_info.json"):
        packed.open_pack(builder)


_KILLED_BUILD = """
import os, signal, sys
from vgjax.data import tfds_builders
stored = tfds_builders.stored_image
def killed_at_the_queries(path, *args):
    if "/queries/" in path:
        os.kill(os.getpid(), signal.SIGKILL)
    return stored(path, *args)
tfds_builders.stored_image = killed_at_the_queries
builder = tfds_builders.vg_folder_pack(sys.argv[1], sys.argv[2], (24, 32), splits=("test",), encoding="raw",
                                       num_threads=1, progress=False)
tfds_builders.build(builder, sys.argv[2])
"""


def test_a_killed_build_is_named_then_rebuilt(dataset, packs, tmp_path):
    killed = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(tmp_path), str(dataset)], cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    builder = tfds_builders.vg_folder_pack(tmp_path, dataset, SMALL, splits=("test",), encoding="raw", progress=False)
    with pytest.raises(FileNotFoundError, match=r"incomplete\.\w+_1\.0\.0 is an interrupted build"):
        packed.open_pack(builder)
    pack = packed.open_or_build(builder, dataset)
    assert not list(Path(builder.data_path).parent.glob("incomplete.*"))
    clean = packed.open_pack(packs["raw", SMALL])
    for role in ("database", "queries"):
        ours, theirs = pack.data_source(f"test_{role}"), clean.data_source(f"test_{role}")
        for i in range(len(theirs)):
            np.testing.assert_array_equal(ours[i]["image"], theirs[i]["image"])


def test_build_errors_name_the_bad_file(dataset, tmp_path):
    broken = shutil.copytree(dataset, tmp_path / "broken")
    bad = broken / "images" / "test" / "database" / vg_folder.format_image_name(1.0, 2.0)
    bad.write_bytes(b"not a jpeg")
    builder = tfds_builders.vg_folder_pack(tmp_path / "packs", broken, SMALL, splits=("test",), progress=False)
    with pytest.raises(OSError, match=f"cannot read image {bad}"):
        tfds_builders.build(builder, broken)
    with pytest.raises(FileNotFoundError, match="does not exist$"):  # nothing half-built is left
        packed.open_pack(builder)
    with pytest.raises(FileNotFoundError, match=f"pack {builder.data_path} does not exist; build it once"):
        packed.open_or_build(builder, broken, may_build=False)
    with pytest.raises(ValueError, match="encoding must be one of"):
        tfds_builders.vg_folder_pack(tmp_path, broken, SMALL, encoding="png")


def test_gsv_cities_packs_every_image_with_its_place(tmp_path):
    root = gsv_cities.write_synthetic(tmp_path / "gsv", places_per_city=6, image_size=(16, 16))
    cities = ("Aville", "Btown")
    places = gsv_cities.read_places(root, cities, 1)
    builder = tfds_builders.gsv_cities_pack(tmp_path / "packs", cities, (16, 16), encoding="raw", progress=False)
    pack = packed.open_or_build(builder, root)
    assert pack.folder.parent.name.startswith("cities-") and pack.folder.parent.name.endswith("-16x16-raw")
    paths = [path for place in places.paths for path in place]
    assert pack.paths == {"train": paths}
    source = pack.data_source("train")
    place_of = np.repeat(np.arange(len(places.paths)), [len(p) for p in places.paths])
    for i in range(0, len(paths), 5):
        record = source[i]
        assert record["path"].decode() == paths[i]
        assert record["place_id"] == places.place_ids[place_of[i]]
        assert record["city"].decode() == cities[places.city[place_of[i]]]
        np.testing.assert_array_equal(record["image"], images.load_rgb(root / paths[i]))
    kept = gsv_cities.read_places(root, cities, 4)  # what a run reads: a subset of the pack
    pack.loader(root, required=[str(root / path) for place in kept.paths for path in place])
    default = tfds_builders.gsv_cities_pack(tmp_path / "packs", gsv_cities.TRAIN_CITIES, (16, 16))
    assert Path(default.data_path).parent.name == "train-cities-16x16-jpeg"

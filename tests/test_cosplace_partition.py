"""CosPlace's class/group partition: id formulas, CosPlace's orders, filtering, errors, cache."""

import collections
import glob
import json
import os
import time

import numpy as np
import pytest

from vgjax.data import cosplace_groups as cosplace
from vgjax.data.cosplace_groups import PartitionConfig, build_partition, class_and_group_ids
from vgjax.data.vg_folder import DatasetFormatError, parse_image_name


def _name(east, north, heading, tag="p"):
    """An SF-XL style name with east, north and heading (field 9); the pano_id makes it unique."""
    return f"@{east}@{north}@10@S@@@{tag}@@{heading}@@@@@@.jpg"


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _backdate(root, seconds=100):
    """Sets the mtime of root and every directory below it `seconds` into the past."""
    past = time.time() - seconds
    for directory, _, _ in os.walk(root):
        os.utime(directory, (past, past))


def _reference_partition(paths, config):
    """CosPlace's TrainDataset.initialize, written out with dicts and sets (reference.md §5.2).

    Returns [[((e, n, h), [image indices]), ...] per group], in CosPlace's orders."""
    rows = []
    for path in paths:
        parts = path.split("@")
        east, north, heading = float(parts[1]), float(parts[2]), float(parts[9])
        M, alpha, N, L = config.M, config.alpha, config.N, config.L
        e, n, h = int(east // M * M), int(north // M * M), int(heading // alpha * alpha)
        rows.append(((e, n, h), (e % (M * N) // M, n % (M * N) // M, h % (alpha * L) // alpha)))
    images_per_class = collections.defaultdict(list)
    for i, (class_id, _) in enumerate(rows):
        images_per_class[class_id].append(i)
    images_per_class = {c: v for c, v in images_per_class.items()
                        if len(v) >= config.min_images_per_class}
    classes_per_group = collections.defaultdict(set)
    for class_id, group_id in rows:
        if class_id in images_per_class:
            classes_per_group[group_id].add(class_id)
    return [[(c, images_per_class[c]) for c in classes] for classes in classes_per_group.values()]


def _as_lists(partition):
    return [[(tuple(group.class_ids[c].tolist()), group[c].tolist()) for c in range(len(group))]
            for group in partition.groups]


# ---------------------------------------------------------------------------------------------
# Ids.


def test_class_ids_floor_to_lower_multiples_including_cell_borders():
    config = PartitionConfig()  # M=10, alpha=30, N=5, L=2
    east = [0.0, 9.99, 10.0, 49.99, 50.0, 584543.41, -0.5, 584540.0]
    north = [4477244.62, 4477250.0, 4477249.999, 0.0, 10.0, 20.0, 30.0, 40.0]
    heading = [0.0, 29.99, 30.0, 59.9, 60.0, 359.9, 330.0, 89.0]
    class_ids, group_ids = class_and_group_ids(east, north, heading, config)
    assert class_ids.dtype == group_ids.dtype == np.int64
    assert class_ids.tolist() == [
        [0, 4477240, 0], [0, 4477250, 0], [10, 4477240, 30], [40, 0, 30],
        [50, 10, 60], [584540, 20, 330], [-10, 30, 330], [584540, 40, 60]]
    # (e % 50) // 10, (n % 50) // 10, (h % 60) // 30
    assert group_ids.tolist() == [
        [0, 4, 0], [0, 0, 0], [1, 4, 1], [4, 0, 1], [0, 1, 0], [4, 2, 1], [4, 3, 1], [4, 4, 0]]


def test_ids_match_python_float_floor_division_on_random_and_border_values():
    rng = np.random.default_rng(0)
    config = PartitionConfig(M=7, alpha=45, N=3, L=4, groups_num=1)
    borders = rng.integers(-10**6, 10**6, 2000) * 7.0
    east = np.concatenate([rng.uniform(-1e6, 1e7, 3000), borders, np.nextafter(borders, -np.inf)])
    north = rng.permutation(east)
    heading = np.concatenate([rng.uniform(0, 360, len(east) - 2), [np.nextafter(360.0, 0), 0.0]])
    class_ids, group_ids = class_and_group_ids(east, north, heading, config)
    for i in rng.choice(len(east), 3000, replace=False):
        e, n = int(east[i].item() // 7 * 7), int(north[i].item() // 7 * 7)
        h = int(heading[i].item() // 45 * 45)
        assert class_ids[i].tolist() == [e, n, h]
        assert group_ids[i].tolist() == [e % 21 // 7, n % 21 // 7, h % 180 // 45]
    assert group_ids.min() == 0 and group_ids[:, :2].max() == 2 and group_ids[:, 2].max() == 3


@pytest.mark.parametrize("heading, message", [
    (-0.5, r"heading must be in \[0, 360\).*-0.5"),
    (360.0, r"heading must be in \[0, 360\).*360"),
    (float("nan"), "heading .* is missing"),
])
def test_bad_headings_name_the_file(heading, message):
    paths = ["a.jpg", "b.jpg", "bad.jpg"]
    with pytest.raises(DatasetFormatError, match="'bad.jpg'.*" + message):
        class_and_group_ids([1.0, 2, 3], [1.0, 2, 3], [10.0, 20, heading], PartitionConfig(), paths)
    with pytest.raises(DatasetFormatError, match="image index 2"):
        class_and_group_ids([1.0, 2, 3], [1.0, 2, 3], [10.0, 20, heading], PartitionConfig())


def test_non_finite_coordinates_are_rejected():
    with pytest.raises(DatasetFormatError, match="'x.jpg'.*UTM north must be a finite"):
        class_and_group_ids([1.0], [np.inf], [0.0], PartitionConfig(), ["x.jpg"])


@pytest.mark.parametrize("options, option", [
    ({"M": 0}, "M"), ({"alpha": -30}, "alpha"), ({"N": 2.5}, "N"), ({"L": True}, "L"),
    ({"min_images_per_class": 0}, "min_images_per_class"), ({"groups_num": 51}, "groups_num"),
])
def test_bad_config_names_the_option(options, option):
    with pytest.raises(ValueError, match=rf"PartitionConfig\.{option}\b"):
        PartitionConfig(**options)
    assert PartitionConfig(groups_num=50).groups_num == 50
    assert type(PartitionConfig(M=np.int64(5)).M) is int


# ---------------------------------------------------------------------------------------------
# Grouping and CosPlace's orders.


def _random_names(rng, num_images):
    """Names spread over a 300 m square with integer and fractional headings, unsorted."""
    east = np.round(rng.uniform(550000, 550300, num_images), 2)
    north = np.round(rng.uniform(4180000, 4180300, num_images), 2)
    heading = np.where(rng.random(num_images) < 0.5, rng.integers(0, 360, num_images),
                       np.round(rng.uniform(0, 359.9, num_images), 1))
    return [_name(f"{e:010.2f}", f"{n:010.2f}", f"{h:g}", tag=i)
            for i, (e, n, h) in enumerate(zip(east, north, heading))]


def test_groups_and_classes_follow_cosplace_orders_on_a_random_dataset(tmp_path):
    rng = np.random.default_rng(1)
    names = _random_names(rng, 20000)
    folder = tmp_path / "train"
    _touch(folder / names[0])
    (tmp_path / "train_images_paths.txt").write_text("\n".join(names) + "\n")
    config = PartitionConfig(groups_num=50, min_images_per_class=3)
    partition = build_partition(folder, config, cache_dir=tmp_path / "cache", progress=False)
    assert partition.paths == names  # the paths file's order, as CosPlace keeps it
    expected = _reference_partition(names, config)
    assert len(expected) == 50 and _as_lists(partition) == expected
    # The test has teeth: set order is neither appearance order nor sorted order, and some
    # classes were dropped.
    classes = [c for c, _ in expected[0]]
    assert classes != sorted(classes)
    assert classes != [c for c, images in sorted(expected[0], key=lambda item: item[1][0])]
    kept = sum(len(v) for group in expected for _, v in group)
    assert 0 < kept < len(names)
    for group in partition.groups:
        assert all(np.all(np.diff(group[c]) > 0) for c in range(len(group)))


def test_min_images_per_class_and_too_many_groups(tmp_path):
    folder = tmp_path / "train"
    names = ([_name(5, 5, 10, tag=f"a{i}") for i in range(3)]  # class (0, 0, 0), group (0, 0, 0)
             + [_name(15, 5, 10, tag=f"b{i}") for i in range(2)]  # (10, 0, 0), group (1, 0, 0)
             + [_name(55, 5, 40, tag=f"c{i}") for i in range(4)])  # (50, 0, 30), group (0, 0, 1)
    for name in names:
        _touch(folder / "sub" / name)
    partition = build_partition(folder, PartitionConfig(groups_num=2, min_images_per_class=3),
                                cache_dir=tmp_path / "cache", progress=False)
    assert partition.paths == sorted("sub/" + n for n in names)
    # Sorted paths start with b (dropped), then c, then a: groups come in order of appearance.
    assert [g.class_ids.tolist() for g in partition.groups] == [[[50, 0, 30]], [[0, 0, 0]]]
    assert [[p.split("@")[7][0] for p in np.array(partition.paths)[g[0]]] for g in partition.groups
            ] == [["c"] * 4, ["a"] * 3]
    assert partition.groups[0].images_per_class().tolist() == [4]
    with pytest.raises(ValueError, match="groups_num=3, but only 2 groups have classes with >= "
                                         "min_images_per_class=3 images"):
        build_partition(folder, PartitionConfig(groups_num=3, min_images_per_class=3),
                        cache_dir=tmp_path / "cache", progress=False)
    three = build_partition(folder, PartitionConfig(groups_num=3, min_images_per_class=2),
                            cache_dir=tmp_path / "cache", progress=False)
    assert [g.class_ids.tolist() for g in three.groups] == [[[10, 0, 0]], [[50, 0, 30]],
                                                            [[0, 0, 0]]]


def test_bad_names_in_a_folder_are_named(tmp_path):
    folder = tmp_path / "train"
    _touch(folder / _name(5, 5, 10, tag="ok"))
    _touch(folder / _name(5, 5, "", tag="noheading"))
    with pytest.raises(DatasetFormatError, match="noheading.*heading .* is missing"):
        build_partition(folder, cache_dir=tmp_path / "cache", progress=False)
    os.remove(folder / _name(5, 5, "", tag="noheading"))
    bad = folder / "@1@2@3.jpg"
    _touch(bad)
    with pytest.raises(DatasetFormatError, match="@1@2@3.jpg: expected a name") as raised:
        build_partition(folder, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(DatasetFormatError) as direct:
        parse_image_name("@1@2@3.jpg")
    assert str(raised.value) == str(direct.value)  # the same error as vg_folder's
    os.remove(bad)
    _touch(folder / _name(5, 5, "north", tag="text"))
    with pytest.raises(DatasetFormatError, match="'heading' must be a number, got 'north'"):
        build_partition(folder, cache_dir=tmp_path / "cache", progress=False)


# ---------------------------------------------------------------------------------------------
# Listing and cache.


def test_listing_matches_cosplace_glob(tmp_path):
    folder = tmp_path / "train"
    names = ["b/" + _name(5, 5, 10, "1"), "a/deep/" + _name(6, 5, 10, "2"), _name(7, 5, 10, "3"),
             "a/" + _name(8, 5, 10, "4"), ".hidden/" + _name(9, 5, 10, "5"),
             "a/." + _name(9, 5, 10, "6"), "a/notes.txt", "a/" + _name(9, 5, 10, "7")[:-4] + ".png"]
    for name in names:
        _touch(folder / name)
    os.symlink(folder / "a", folder / "c_link")
    expected = sorted(os.path.relpath(p, folder)
                      for p in glob.glob(f"{folder}/**/*.jpg", recursive=True))
    os.symlink(folder, folder / "a" / "loop")  # a cycle: skipped, not followed forever
    partition = build_partition(folder, PartitionConfig(groups_num=1, min_images_per_class=1),
                                cache_dir=tmp_path / "cache", progress=False)
    assert partition.paths == expected
    assert len(expected) == 6 and "c_link/" + _name(8, 5, 10, "4") in expected


@pytest.mark.parametrize("name", [_name(5, 5, 10, "1"), "sub"])
def test_a_broken_link_is_an_error_naming_it(tmp_path, name):
    folder = tmp_path / "train"
    _touch(folder / _name(6, 5, 10, "2"))
    os.symlink(tmp_path / "gone", folder / name)
    with pytest.raises(DatasetFormatError, match=f"^{folder / name}: broken symbolic link"):
        build_partition(folder, cache_dir=tmp_path / "cache", progress=False)


def test_cache_is_reused_without_listing_and_rebuilt_after_a_change(tmp_path, monkeypatch):
    folder, cache = tmp_path / "train", tmp_path / "cache"
    for i in range(12):
        _touch(folder / f"d{i % 3}" / _name(5 + i, 5, 10 * i, tag=i))
    _backdate(folder)
    config = PartitionConfig(groups_num=1, min_images_per_class=1)
    first = build_partition(folder, config, cache_dir=cache, progress=False)
    stored = sorted(p.name for p in cache.iterdir())
    assert len(stored) == 2 and stored[0].endswith(".json") and stored[1].endswith(".npz")
    metadata = json.loads((cache / stored[0]).read_text())
    assert metadata["folder"] == str(folder) and metadata["num_images"] == 12
    with np.load(cache / stored[1], allow_pickle=False) as data:  # portable, no pickle
        assert data["fingerprint"].item() == metadata["fingerprint"]

    calls = collections.Counter()
    real_list, real_parse = cosplace._list_jpgs, cosplace._parse_coordinates

    def counting(function, name):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(cosplace, "_list_jpgs", counting(real_list, "list"))
    monkeypatch.setattr(cosplace, "_parse_coordinates", counting(real_parse, "parse"))
    again = build_partition(folder, config, cache_dir=cache, progress=False)
    assert calls == {} and again.paths == first.paths
    assert _as_lists(again) == _as_lists(first)
    # groups_num is not part of the key: more groups come from the same cache.
    assert len(build_partition(folder, PartitionConfig(groups_num=4, min_images_per_class=1),
                               cache_dir=cache, progress=False).groups) == 4
    assert calls == {} and len(list(cache.iterdir())) == 2

    _touch(folder / "d1" / _name(100, 5, 10, tag="new"))
    rebuilt = build_partition(folder, config, cache_dir=cache, progress=False)
    assert calls == {"list": 1, "parse": 1}
    assert "d1/" + _name(100, 5, 10, tag="new") in rebuilt.paths and len(rebuilt.paths) == 13
    # Just modified, the directory's mtime cannot prove the folder unchanged: it is listed again,
    # but the fingerprint matches, so nothing is parsed.
    build_partition(folder, config, cache_dir=cache, progress=False)
    assert calls == {"list": 2, "parse": 1}
    # A new sub-folder changes its parent's mtime.
    _backdate(folder)
    build_partition(folder, config, cache_dir=cache, progress=False)
    assert calls == {"list": 3, "parse": 1}
    build_partition(folder, config, cache_dir=cache, progress=False)
    assert calls == {"list": 3, "parse": 1}
    _touch(folder / "d2" / "e" / _name(200, 5, 10, tag="deeper"))
    os.utime(folder / "d2" / "e", (time.time() - 100,) * 2)
    assert len(build_partition(folder, config, cache_dir=cache, progress=False).paths) == 14
    assert calls == {"list": 4, "parse": 2}
    # Another M is another cache entry.
    build_partition(folder, PartitionConfig(M=20, groups_num=1, min_images_per_class=1),
                    cache_dir=cache, progress=False)
    assert calls == {"list": 5, "parse": 3} and len(list(cache.iterdir())) == 4


def test_paths_file_is_read_checked_and_invalidates_the_cache(tmp_path, monkeypatch):
    folder, cache = tmp_path / "train", tmp_path / "cache"
    names = ["z/" + _name(5, 5, 10, tag="z"), "a/" + _name(5, 5, 20, tag="a")]
    for name in names:
        _touch(folder / name)
    _touch(folder / "b" / _name(5, 5, 30, tag="unlisted"))
    paths_file = tmp_path / "train_images_paths.txt"
    paths_file.write_text("\n".join(names) + "\n")
    _backdate(folder)
    os.utime(paths_file, (time.time() - 100,) * 2)
    config = PartitionConfig(groups_num=1, min_images_per_class=1)
    partition = build_partition(str(folder) + "/", config, cache_dir=cache, progress=False)
    assert partition.paths == names  # file order, not sorted, and only the listed images
    assert partition.groups[0].class_ids.tolist() == [[0, 0, 0]]
    monkeypatch.setattr(cosplace, "_parse_coordinates", None)  # the cache must be used
    assert build_partition(folder, config, cache_dir=cache, progress=False).paths == names
    monkeypatch.undo()
    paths_file.write_text("\n".join(names[:1]) + "\n")
    assert build_partition(folder, config, cache_dir=cache, progress=False).paths == names[:1]
    paths_file.write_text("missing/" + names[0] + "\n")
    with pytest.raises(FileNotFoundError, match="train_images_paths.txt lists 'missing/"):
        build_partition(folder, config, cache_dir=cache, progress=False)
    os.remove(paths_file)  # back to listing the folder
    assert len(build_partition(folder, config, cache_dir=cache, progress=False).paths) == 3


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_partition(tmp_path / "nope", cache_dir=tmp_path / "cache", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFormatError, match="contains no .jpg files"):
        build_partition(tmp_path / "empty", cache_dir=tmp_path / "cache", progress=False)

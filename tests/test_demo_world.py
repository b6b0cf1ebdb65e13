"""The ViZDoom demo world: format, conditions, positives, determinism and the build cache."""

import json

import numpy as np
import pytest
from PIL import Image

from vgjax.data import demo_world
from vgjax.data.vg_folder import load_split

TINY = dict(frames_per_walk=20, image_size=(24, 32), splits={"train": "MAP01", "test": "MAP02"},
            progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return demo_world.build_demo_world(tmp_path_factory.mktemp("a") / "world", seed=0, **TINY)


def _mean_brightness(paths):
    return np.mean([np.asarray(Image.open(p), np.float32).mean() for p in paths])


def test_splits_parse_with_positions_headings_and_notes(world):
    for name in ("train", "test"):
        split = load_split(world, name)
        assert split.num_database == split.num_queries == 20
        assert set(split.database_fields["note"]) == {"day"}
        assert set(split.query_fields["note"]) == {"night"}
        headings = np.concatenate([split.database_fields["heading"], split.query_fields["heading"]])
        assert np.all((headings >= 0) & (headings < 360)) and len(np.unique(headings)) > 3
        assert Image.open(split.query_paths[0]).size == (32, 24)
    assert not np.array_equal(load_split(world, "train").database_utm,
                              load_split(world, "test").database_utm)
    manifest = json.loads((world / "vgjax_manifest.json").read_text())["folders"]  # load_split checks it
    assert manifest["images/train/queries"]["count"] == 20 and manifest["images/test/database"]["tool"].endswith("demo_world")


def test_queries_are_darker_other_viewpoints(world):
    split = load_split(world, "train")
    ratio = _mean_brightness(split.query_paths) / _mean_brightness(split.database_paths)
    assert 0.3 < ratio < 0.75
    same_place = np.linalg.norm(split.query_utm[:, None] - split.database_utm[None], axis=-1) < 0.01
    assert same_place.sum() < 0.5 * split.num_queries  # a different walk, not the database again


def test_positives_are_sensible(world):
    for name in ("train", "test"):
        split = load_split(world, name)
        counts = split.positives.counts()
        assert (counts > 0).mean() >= 0.8
        assert (counts < split.num_database).mean() > 0.5  # 25 m is not the whole map
        assert (split.positives_within(10.0).counts() > 0).sum() >= 5


def test_deterministic_in_the_seed(world, tmp_path):
    again = demo_world.build_demo_world(tmp_path / "again", seed=0, **TINY)
    other = demo_world.build_demo_world(tmp_path / "other", seed=1, **TINY)
    first, second, third = (load_split(root, "train") for root in (world, again, other))
    names = lambda split: [p.split("/")[-1] for p in split.database_paths + split.query_paths]
    assert names(first) == names(second)
    np.testing.assert_array_equal(first.query_utm, second.query_utm)
    assert names(first) != names(third)


def test_cache_returns_without_rendering_and_ignores_partial(tmp_path, monkeypatch):
    root = tmp_path / "world"
    leftover = tmp_path / "world.partial"
    (leftover / "images" / "train" / "database").mkdir(parents=True)
    (leftover / "images" / "train" / "database" / "stale.jpg").write_bytes(b"")
    small = dict(TINY, frames_per_walk=3, splits={"train": "MAP01"})
    assert demo_world.build_demo_world(root, **small) == root
    assert not leftover.exists() and not list(root.rglob("stale.jpg"))
    assert json.loads((root / demo_world.MANIFEST).read_text())["frames_per_walk"] == 3

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered again")

    monkeypatch.setattr(demo_world, "render_split", no_rendering)
    assert demo_world.build_demo_world(root, **small) == root
    with pytest.raises(FileExistsError, match="root="):
        demo_world.build_demo_world(root, **dict(small, seed=5))

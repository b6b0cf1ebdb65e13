"""Dataset folders and file names: parsing, layouts, positives, errors."""

import glob
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from vgjax.data import synthetic, vg_folder
from vgjax.data.vg_folder import DatasetFormatError

PITTS_NAME = "@0584543.41@4477244.62@17@T@040.44012@-079.95000@000001@05@@001@@@@pitch1_yaw6@.jpg"


def _touch_jpg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)


# ---------------------------------------------------------------------------------------------
# File names.


def test_parse_all_fields_of_a_full_name():
    name = ("@0584543.41@4477244.62@17@T@040.44012@-079.95000@pano_A1@05@123@-04@1.5@30@"
            "20200115_101010@night_sideways_cph@.jpg")
    fields = vg_folder.parse_image_name(name)
    assert fields == {
        "east": 584543.41, "north": 4477244.62, "zone_number": 17.0, "zone_letter": "T",
        "lat": 40.44012, "lon": -79.95, "pano_id": "pano_A1", "tile_num": 5.0, "heading": 123.0,
        "pitch": -4.0, "roll": 1.5, "height": 30.0, "timestamp": "20200115_101010",
        "note": "night_sideways_cph",
    }


def test_parse_empty_fields_pitts_style():
    fields = vg_folder.parse_image_name(PITTS_NAME)
    assert (fields["east"], fields["north"]) == (584543.41, 4477244.62)
    assert fields["pano_id"] == "000001" and fields["tile_num"] == 5.0
    assert math.isnan(fields["heading"]) and fields["pitch"] == 1.0
    assert math.isnan(fields["roll"]) and math.isnan(fields["height"])
    assert fields["timestamp"] == "" and fields["note"] == "pitch1_yaw6"


@pytest.mark.parametrize("name, east, north, pano", [
    ("@0@00002.4@@@@@7@@@@@@@@.jpg", 0.0, 2.4, "7"),  # Nordland's dummy labels
    ("@0@42000@@@@@42@@@@@@@@.jpg", 0.0, 42000.0, "42"),  # AmsterTime / SPED pairs
])
def test_parse_dummy_label_names(name, east, north, pano):
    fields = vg_folder.parse_image_name(name)
    assert (fields["east"], fields["north"], fields["pano_id"]) == (east, north, pano)


def test_format_matches_the_downloader_and_round_trips():
    name = vg_folder.format_image_name(584543.41, 4477244.62, zone_number=17, zone_letter="T",
                                       lat=40.44012, lon=-79.95, pano_id="000001", tile_num=5,
                                       pitch=1, note="pitch1_yaw6")
    assert name == PITTS_NAME
    assert vg_folder.format_image_name(12.3, 4.0) == "@0000012.30@0000004.00@@@@@@@@@@@@@.jpg"
    assert vg_folder.format_image_name(1, 2, heading=359.9)[:-5].split("@")[9] == "359"
    fields = vg_folder.parse_image_name(name)
    assert vg_folder.format_image_name(**{k: v for k, v in fields.items()
                                          if not (isinstance(v, float) and math.isnan(v))}) == name


def test_parse_uses_the_file_name_not_the_path():
    fields = vg_folder.parse_image_name("/data/odd@folder@1@2/" + PITTS_NAME)
    assert fields["east"] == 584543.41


@pytest.mark.parametrize("name, message", [
    ("photo.jpg", "14 @-separated fields"),
    ("@1@2@.jpg", "got 2 fields"),
    ("@1@2@@@@@@@@@@@@@.gif", "14 @-separated fields"),
    ("@abc@2@@@@@@@@@@@@@.jpg", "field 'east' must be a number, got 'abc'"),
    ("@1@2@@@@@@@x@@@@@@.jpg", "field 'heading' must be a number"),
    ("@@2@@@@@@@@@@@@@.jpg", "UTM east must be a finite number below 2..53 in magnitude, got ''"),
    ("@1@nan@@@@@@@@@@@@@.jpg", "UTM north must be a finite number .* got 'nan'"),
    ("@1e308@2@@@@@@@@@@@@@.jpg", "UTM east must be a finite number .* got '1e308'"),
    ("@inf@2@@@@@@@@@@@@@.jpg", "UTM east must be a finite number"),
])
def test_bad_names_raise_naming_the_file(name, message):
    with pytest.raises(DatasetFormatError, match="^" + name.replace(".", r"\.") + ".*" ):
        vg_folder.parse_image_name(name)
    with pytest.raises(DatasetFormatError, match=message.replace("(", r"\(")):
        vg_folder.parse_image_name(name)


# ---------------------------------------------------------------------------------------------
# Splits and positives.

# Database along the east axis; queries at hand-checkable distances.
DATABASE = np.array([[0, 0], [10, 0], [25, 0], [25.01, 0], [100, 0], [3, 4]], float) + synthetic.UTM_ORIGIN
QUERIES = np.array([[0, 0], [60, 0], [100, 10]], float) + synthetic.UTM_ORIGIN


@pytest.fixture
def toy_dataset(tmp_path):
    synthetic.write_split(tmp_path / "toy", "test", DATABASE, QUERIES)
    return tmp_path / "toy"


def test_load_split_positives_are_inclusive_and_sorted(toy_dataset):
    split = vg_folder.load_split(toy_dataset, "test")
    assert (split.num_database, split.num_queries) == (6, 3)
    # Paths are sorted; map each sorted database row back to its DATABASE row via its UTM.
    order = [int(np.flatnonzero((DATABASE == utm).all(1))[0]) for utm in split.database_utm]
    expected = [sorted(order.index(i) for i in (0, 1, 2, 5)), [], [order.index(4)]]
    assert [p.tolist() for p in split.positives] == expected
    assert split.positives.counts().tolist() == [4, 0, 1]
    hard = split.positives_within(10.0)
    assert hard[0].tolist() == sorted(order.index(i) for i in (0, 1, 5))
    assert split.database_paths == sorted(split.database_paths)
    assert split.database_utm.dtype == np.float64 and split.database_utm.shape == (6, 2)
    assert split.query_fields["zone_letter"].tolist() == ["T"] * 3
    assert "#database: 6; #queries: 3" in repr(split)


def test_msls_layout_nested_folders_and_custom_queries_folder(tmp_path):
    root = tmp_path / "msls" / "val"
    synthetic.write_images(root / "database" / "cph", DATABASE[:3])
    synthetic.write_images(root / "database" / "sf", DATABASE[3:])
    synthetic.write_images(root / "queries_v1", QUERIES)
    split = vg_folder.load_split(tmp_path / "msls", "val", queries_folder="queries_v1")
    assert (split.num_database, split.num_queries) == (6, 3)
    assert split.folder == root


def test_positives_match_brute_force_including_the_boundary():
    rng = np.random.default_rng(0)
    database = rng.uniform(0, 300, size=(2000, 2)).round(0)  # integer grid: many exact 25 m pairs
    queries = rng.uniform(0, 300, size=(500, 2)).round(0)
    positives = vg_folder.positives_within(queries, database, 25.0, chunk_size=97)
    distance = np.linalg.norm(queries[:, None] - database[None], axis=-1)
    assert (distance == 25.0).sum() > 50
    for q in range(len(queries)):
        np.testing.assert_array_equal(positives[q], np.flatnonzero(distance[q] <= 25.0))


def test_positives_memory_stays_bounded_at_scale():
    # 200k database x 100k queries: a dense distance matrix would need 160 GB. The positives
    # computation must stay within a small multiple of its output.
    script = textwrap.dedent("""
        import numpy as np
        from vgjax.data.vg_folder import positives_within
        rng = np.random.default_rng(0)
        database = rng.uniform(0, 20000, size=(200_000, 2))
        queries = rng.uniform(0, 20000, size=(100_000, 2))
        def status_mb(key):  # VmRSS: now; VmHWM: peak of this process image (not the parent's)
            line = next(l for l in open('/proc/self/status') if l.startswith(key + ':'))
            return int(line.split()[1]) / 1024
        before = status_mb('VmRSS')
        positives = positives_within(queries, database, 25.0)
        print(len(positives), len(positives.indices), status_mb('VmHWM') - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    num_queries, num_pairs, extra_mb = out.stdout.split()
    assert int(num_queries) == 100_000 and int(num_pairs) > 50_000
    assert float(extra_mb) < 150, f"positives used {extra_mb} MB above the inputs"


# ---------------------------------------------------------------------------------------------
# Bad folders.


def test_missing_dataset_split_and_subfolders(tmp_path, toy_dataset):
    with pytest.raises(FileNotFoundError, match="dataset folder .*nowhere does not exist"):
        vg_folder.load_split(tmp_path / "nowhere", "test")
    with pytest.raises(FileNotFoundError, match=r"split 'val' not found.*splits found in .*: \['test'\]"):
        vg_folder.load_split(toy_dataset, "val")
    with pytest.raises(FileNotFoundError, match="image folder .*queries_v1 does not exist"):
        vg_folder.load_split(toy_dataset, "test", queries_folder="queries_v1")
    (toy_dataset / "images" / "train" / "queries").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="image folder .*train/database does not exist"):
        vg_folder.load_split(toy_dataset, "train")


def test_empty_folder_and_other_image_types(tmp_path):
    folder = tmp_path / "d" / "images" / "test"
    (folder / "database").mkdir(parents=True)
    synthetic.write_images(folder / "queries", QUERIES)
    with pytest.raises(DatasetFormatError, match="database contains no .jpg files$"):
        vg_folder.load_split(tmp_path / "d", "test")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / "database" / "@1@2@@@@@@@@@@@@@.png")
    with pytest.raises(DatasetFormatError, match=r"1 files of other image types.*convert them"):
        vg_folder.load_split(tmp_path / "d", "test")
    synthetic.write_images(folder / "database", DATABASE)
    with pytest.warns(UserWarning, match="ignoring 1 non-.jpg image files"):
        vg_folder.load_split(tmp_path / "d", "test")


def test_unparsable_file_in_a_dataset_names_the_file(toy_dataset):
    bad = toy_dataset / "images" / "test" / "database" / "sub" / "IMG_0001.jpg"
    _touch_jpg(bad)
    with pytest.raises(DatasetFormatError, match=f"^{bad}: expected a name"):
        vg_folder.load_split(toy_dataset, "test")


def test_non_finite_coordinates_in_a_dataset(toy_dataset):
    bad = toy_dataset / "images" / "test" / "queries" / "@nan@4477000.00@17@T@@@x@@@@@@@@.jpg"
    _touch_jpg(bad)
    with pytest.raises(DatasetFormatError, match="UTM east must be a finite number"):
        vg_folder.load_split(toy_dataset, "test")


def test_mixed_utm_zones_warn(tmp_path):
    folder = tmp_path / "d" / "images" / "test"
    synthetic.write_images(folder / "database", DATABASE)
    synthetic.write_images(folder / "queries", QUERIES[:2])
    synthetic.write_images(folder / "queries", QUERIES[2:], zone_number=[18], pano_id=["other"])
    with pytest.warns(UserWarning, match=r"several UTM zones \{'17T': 8, '18T': 1\}"):
        vg_folder.load_split(tmp_path / "d", "test")


def test_write_images_refuses_duplicate_names(tmp_path):
    with pytest.raises(FileExistsError, match="share all their fields"):
        synthetic.write_images(tmp_path, DATABASE[:2], pano_id=["same", "same"])
        synthetic.write_images(tmp_path, DATABASE[:2], pano_id=["same", "same"])
    assert len(os.listdir(tmp_path)) == 2


def test_symlinked_sub_folders_are_followed_as_the_recursive_glob_does(tmp_path, toy_dataset):
    database = toy_dataset / "images" / "test" / "database"
    synthetic.write_images(tmp_path / "elsewhere", DATABASE[:2] + 1000)
    (database / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    _touch_jpg(database / ".hidden" / "@1@2@@@@@@@@@@@@@.jpg")  # glob skips hidden entries
    expected = sorted(glob.glob(f"{database}/**/*.jpg", recursive=True))
    (tmp_path / "elsewhere" / "loop").symlink_to(database, target_is_directory=True)  # a cycle
    split = vg_folder.load_split(toy_dataset, "test")
    assert split.database_paths == expected and split.num_database == 8
    assert sum("/linked/" in path for path in expected) == 2


def test_a_broken_image_link_is_an_error_naming_it(toy_dataset):
    link = toy_dataset / "images" / "test" / "queries" / "@1@2@@@@@@@@@@@@@.jpg"
    link.symlink_to(toy_dataset / "gone.jpg")
    with pytest.raises(DatasetFormatError, match=f"^{link}: broken symbolic link .*gone.jpg does not exist"):
        vg_folder.load_split(toy_dataset, "test")


def test_a_coordinate_beyond_2_53_names_the_file(toy_dataset):
    bad = toy_dataset / "images" / "test" / "queries" / "@1e308@4477000.00@17@T@@@x@@@@@@@@.jpg"
    _touch_jpg(bad)
    with pytest.raises(DatasetFormatError, match=f"^{bad}: UTM east must be a finite number below 2\\*\\*53"):
        vg_folder.load_split(toy_dataset, "test")


def test_latitude_longitude_from_the_name_else_from_utm_and_zone():
    from vgjax.data.vg_folder import _field_table, format_image_name, latitude_longitude

    names = [format_image_name(500000.0, 0.0, zone_number=17, zone_letter="N"),  # zone 17's central meridian
             format_image_name(1.0, 2.0, zone_number=17, zone_letter="N", lat=45.5, lon=7.25),  # the name's own
             format_image_name(1.0, 2.0, pano_id="x")]  # no zone: unknown
    lat, lon = latitude_longitude(_field_table(names))
    np.testing.assert_allclose(lat[:2], [0.0, 45.5], atol=1e-9)
    np.testing.assert_allclose(lon[:2], [-81.0, 7.25], atol=1e-9)
    assert np.isnan(lat[2]) and np.isnan(lon[2])

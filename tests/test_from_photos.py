"""Your own photos to a VG split: EXIF GPS written with PIL, read back into file names."""

import numpy as np
import pytest
from PIL import Image

from vgjax.data.vg_folder import load_split, parse_image_name
from vgjax.datasets import from_photos


def _photo(path, gps=None, orientation=None, taken=None, size=(10, 20)):
    image = Image.fromarray(np.full((*size, 3), 100, np.uint8))
    exif = image.getexif()
    if gps:
        exif[from_photos.GPS_IFD] = gps
    if orientation:
        exif[0x0112] = orientation
    if taken:
        exif[from_photos.EXIF_IFD] = {from_photos.DATE_TIME_ORIGINAL: taken}
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif)


EQUATOR_81W = {1: "N", 2: (0.0, 0.0, 0.0), 3: "W", 4: (81.0, 0.0, 0.0)}  # zone 17's central meridian


def test_photos_become_a_split_with_their_positions(tmp_path):
    photos = tmp_path / "photos"
    _photo(photos / "IMG_0001.jpg", {**EQUATOR_81W, 17: 90.5}, orientation=6, taken="2024:05:06 07:08:09")
    _photo(photos / "trip" / "sydney.PNG", {1: "S", 2: (33.0, 52.0, 7.68), 3: "E", 4: (151.0, 12.0, 33.48)})
    _photo(photos / "no_gps.jpeg")
    summary = from_photos.convert(photos, tmp_path / "mine", "test", "database")
    assert summary["written"] == 2 and summary["without_gps"] == 1
    assert (tmp_path / "mine" / "from_photos_test_database_without_gps.txt").read_text() == f"{photos / 'no_gps.jpeg'}\n"
    written = sorted((tmp_path / "mine" / "images" / "test" / "database").iterdir())
    fields = {parse_image_name(path)["pano_id"]: (parse_image_name(path), path) for path in written}
    first, path = fields["IMG_0001"]
    assert (first["east"], first["north"], first["zone_number"], first["zone_letter"]) == (500000.0, 0.0, 17.0, "N")
    assert (first["lat"], first["lon"], first["heading"], first["timestamp"]) == (0.0, -81.0, 90.0, "20240506_070809")
    assert Image.open(path).size == (10, 20)  # stored upright: the 20x10 landscape rotated to portrait
    sydney, _ = fields["sydney"]
    assert (sydney["zone_number"], sydney["zone_letter"]) == (56.0, "H")
    assert sydney["lat"] == pytest.approx(-33.8688, abs=1e-5) and sydney["lon"] == pytest.approx(151.2093, abs=1e-5)

    _photo(tmp_path / "queries" / "q.jpg", EQUATOR_81W)
    assert from_photos.main(["--photos", str(tmp_path / "queries"), "--out", str(tmp_path / "mine"),
                             "--role", "queries"]) == 0
    with pytest.warns(UserWarning, match="several UTM zones"):  # Sydney and the equator: said, not hidden
        split = load_split(tmp_path / "mine", "test")  # the folders load as a dataset split
    ours = [i for i, path in enumerate(split.database_paths) if "@IMG_0001@" in path]
    assert split.num_database == 2 and split.num_queries == 1 and list(split.positives[0]) == ours
    # The manifest notices a folder changed since vgjax wrote it.
    written[0].unlink()
    with pytest.warns(UserWarning, match=r"images/test/database no longer matches .*vgjax_manifest.json: 1 images "
                                         r"where vgjax .* from_photos --role database wrote 2"):
        load_split(tmp_path / "mine", "test")


def test_nothing_is_overwritten_and_photos_without_any_gps_are_an_error(tmp_path, capsys):
    photos = tmp_path / "photos"
    _photo(photos / "a.jpg", EQUATOR_81W)
    from_photos.convert(photos, tmp_path / "mine", "test", "queries")
    with pytest.raises(FileExistsError, match="already exists: vgjax never overwrites"):
        from_photos.convert(photos, tmp_path / "mine", "test", "queries")
    _photo(tmp_path / "plain" / "b.jpg")
    with pytest.raises(SystemExit) as exit_info:
        from_photos.main(["--photos", str(tmp_path / "plain"), "--out", str(tmp_path / "other"), "--role", "database"])
    assert exit_info.value.code == 2 and "none of its 1 photos has a GPS position" in capsys.readouterr().err
    assert not (tmp_path / "other" / "images" / "test" / "database").exists()

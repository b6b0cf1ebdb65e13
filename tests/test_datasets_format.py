"""Raw downloads to the VG format: each format on a small raw tree in its dataset's exact raw
layout (.mat structs written with scipy, csv columns, file names), checked field by field."""

import json
import math

import numpy as np
import pytest
import utm
from PIL import Image
from scipy.io import savemat

from vgjax.data import synthetic
from vgjax.data.vg_folder import load_split, parse_image_name
from vgjax.datasets import format as formats


def _image(path, size=(8, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(len(str(path))).integers(0, 255, (*size, 3), np.uint8)).save(path)


def _cells(names):
    cells = np.empty((len(names), 1), dtype=object)
    for i, name in enumerate(names):
        cells[i, 0] = name
    return cells


def _db_struct(path, db_names, db_utm, q_names, q_utm):
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"dbStruct": {"whichSet": "x", "dbImageFns": _cells(db_names), "utmDb": np.asarray(db_utm, float).T,
                                "qImageFns": _cells(q_names), "utmQ": np.asarray(q_utm, float).T, "numImages": len(db_names),
                                "numQueries": len(q_names), "posDistThr": 25.0}})


def _fields(folder):
    return {path.name: parse_image_name(path) for path in folder.iterdir()}


def test_pitts30k_from_its_db_structs(tmp_path):
    raw = tmp_path / "raw"
    east, north = 584543.41, 4477244.62
    for split in ("train", "val", "test"):
        db = [f"000/00000{i}_pitch{p}_yaw{y}.jpg" for i, (p, y) in enumerate([(1, 1), (2, 3)])]
        _db_struct(raw / "datasets" / f"pitts30k_{split}.mat", db, [(east, north), (east + 100, north)],
                   ["000000_pitch1_yaw4.jpg"], [(east + 3, north + 4)])
        for name in db:
            _image(raw / name)
        _image(raw / "queries_real" / "000000_pitch1_yaw4.jpg")
    dataset = formats.format_dataset("pitts30k", raw, tmp_path / "datasets")
    database = _fields(dataset / "images" / "test" / "database")
    second = database[[name for name in database if "@000001@" in name][0]]
    assert (second["zone_number"], second["zone_letter"], second["pano_id"]) == (17.0, "T", "000001")
    assert (second["tile_num"], second["note"]) == ((2 - 1) * 24 + (3 - 1), "pitch2_yaw3")
    assert second["east"] == pytest.approx(east + 100, abs=0.006) and second["north"] == pytest.approx(north, abs=0.006)
    lat, lon = utm.to_latlon(east + 100, north, 17, "T")
    assert second["lat"] == pytest.approx(lat, abs=6e-6) and second["lon"] == pytest.approx(lon, abs=6e-6)
    split = load_split(dataset, "test")
    assert split.num_database == 2 and split.num_queries == 1 and [list(p) for p in split.positives] == [[0]]
    assert (dataset / "map_pitts30k.png").is_file() and not (tmp_path / "datasets" / "pitts30k.partial").exists()
    manifest = json.loads((dataset / "vgjax_manifest.json").read_text())["folders"]
    assert manifest["images/test/queries"]["count"] == 1 and manifest["images/train/database"]["count"] == 2
    (next((dataset / "images" / "test" / "queries").iterdir())).rename(dataset / "images" / "test" / "queries" / "@1@2@@@@@@@@@@@@@.jpg")
    with pytest.warns(UserWarning, match="images/test/queries no longer matches .* with other names"):
        load_split(dataset, "test")
    with pytest.raises(FileExistsError, match="already exists: vgjax never overwrites"):
        formats.format_dataset("pitts30k", raw, tmp_path / "datasets")


def test_tokyo247_database_png_to_jpeg_and_queries_resized(tmp_path):
    raw = tmp_path / "raw"
    db = "03814/03814_1234567890123456_012_0090.jpg"  # listed .jpg, stored .png
    _db_struct(raw / "datasets" / "tokyo247.mat", [db], [(384000.0, 3950000.0)], [], np.zeros((0, 2)))
    _image(raw / "tokyo247" / db.replace(".jpg", ".png"))
    queries = raw / "tokyo247" / "247query_subset_v2"
    _image(queries / "q1.jpg", size=(600, 800))
    (queries / "q1.csv").write_text("q1.jpg,35.6581,139.7017,more\nignored\n")
    dataset = formats.format_dataset("tokyo247", raw, tmp_path / "datasets")
    (name, fields), = _fields(dataset / "images" / "test" / "database").items()
    assert (fields["pano_id"], fields["tile_num"], fields["zone_number"], fields["zone_letter"]) == (
        "03814_1234567890123456", 3.0, 54.0, "S")
    assert Image.open(dataset / "images" / "test" / "database" / name).format == "JPEG"
    (name, fields), = _fields(dataset / "images" / "test" / "queries").items()
    assert (fields["pano_id"], fields["lat"], fields["lon"]) == ("q1.jpg", 35.6581, 139.7017)
    assert Image.open(dataset / "images" / "test" / "queries" / name).size == (640, 480)  # shorter side 480


def _msls_city(raw, city, role, rows):
    folder = raw / "train_val" / city / role
    folder.mkdir(parents=True)
    (folder / "raw.csv").write_text("index,key,lon,lat,ca,captured_at,pano\n" + "".join(
        f"{i},{key},{lon},{lat},0,{when},{pano}\n" for i, (key, lat, lon, when, pano, _, _) in enumerate(rows)))
    (folder / "postprocessed.csv").write_text("index,key,utm,night,view_direction\n" + "".join(
        f"{i},{key},x,{night},{view}\n" for i, (key, _, _, _, _, night, view) in enumerate(rows)))
    for key, *_ in rows:
        _image(folder / "images" / f"{key}.jpg")


def test_msls_cities_splits_notes_and_panoramas(tmp_path):
    raw = tmp_path / "mapillary_sls"
    _msls_city(raw, "london", "database", [("k1", 51.5, -0.12, "2016-05-04_10", "False", "False", "Forward"),
                                           ("k2", 51.5, -0.12, "2016-05-04_10", "True", "False", "Forward")])
    _msls_city(raw, "london", "query", [("k3", 51.5001, -0.12, "2017-01-02", "False", "True", "Sideways")])
    _msls_city(raw, "cph", "database", [("k4", 55.67, 12.56, "2018", "False", "False", "Backward")])
    dataset = formats.format_dataset("msls", raw, tmp_path / "datasets")
    database = _fields(dataset / "train" / "database")
    assert [f["pano_id"] for f in database.values()] == ["k1"]  # the panorama k2 skipped
    (k1,) = database.values()
    assert (k1["timestamp"], k1["note"]) == ("20160504_10", "day_forward_london")
    (k3,) = _fields(dataset / "train" / "queries").values()
    assert k3["note"] == "night_sideways_london"
    assert [f["pano_id"] for f in _fields(dataset / "val" / "database").values()] == ["k4"]
    assert (dataset / "test").is_symlink() and (dataset / "test" / "database").is_dir()


def test_san_francisco_pcis_and_posed_queries(tmp_path):
    raw = tmp_path / "raw"
    _image(raw / "00011000_00012000_3" / "PCI_sp_11841_37.789727_-122.386935_937762214_0_727386213_246.802_-37.304.jpg")
    _image(raw / "BuildingQueryImagesCartoIDCorrected-Upright" / "0001.jpg")
    poses = raw / "reference_poses_598" / "reference_poses_addTM_all_598.txt"
    poses.parent.mkdir(parents=True)
    x, y, w, z = 0.1, 0.2, 0.3, 0.9
    poses.write_text("header\n" + f"0 0001 {x} {y} {w} {z} 551000.0 4182000.0 0\n")
    dataset = formats.format_dataset("san_francisco", raw, tmp_path / "datasets")
    (db,) = _fields(dataset / "images" / "test" / "database").values()
    assert (db["pano_id"], db["tile_num"], db["heading"], db["pitch"]) == ("11841", 0.0, 246.0, -37.0)
    (query,) = _fields(dataset / "images" / "test" / "queries").values()
    yaw = math.atan2(2 * (z * x + y * w), -1 + 2 * (x * x + y * y))
    assert query["heading"] == int((((yaw / math.pi) + 1) * 180 + 180) % 360)
    assert (query["east"], query["north"], query["zone_number"]) == (551000.0, 4182000.0, 10.0)


def test_nordland_amstertime_and_sped_made_up_positions(tmp_path):
    raw = tmp_path / "nordland"
    for season in ("summer", "winter"):
        for i in range(4):
            _image(raw / season / f"{i:05d}.png")
    (raw / "cleanImageNames.txt").write_text("00000.png\n00002.png\n00003.png\n")
    dataset = formats.format_dataset("nordland", raw, tmp_path / "datasets")
    assert sorted(p.name for p in (dataset / "images" / "test" / "database").iterdir()) == [
        "@0@00000.0@@@@@0@@@@@@@@.jpg", "@0@00002.4@@@@@1@@@@@@@@.jpg", "@0@00004.8@@@@@2@@@@@@@@.jpg"]

    raw = tmp_path / "amstertime"
    for stem in ("0007", "0012"):
        _image(raw / "new" / f"{stem}.png")
        _image(raw / "old" / f"{stem}.jpg")
    dataset = formats.format_dataset("amstertime", raw, tmp_path / "datasets")
    assert sorted(p.name for p in (dataset / "images" / "test" / "queries").iterdir()) == [
        "@0@12000@@@@@0012@@@@@@@@.jpg", "@0@7000@@@@@0007@@@@@@@@.jpg"]
    split = load_split(dataset, "test")
    assert [[split.database_paths[i].split("@")[7] for i in p] for p in split.positives] == [["0012"], ["0007"]]

    raw = tmp_path / "sped"
    _image(raw / "SPEDTEST" / "ref" / "3.jpg")
    _image(raw / "SPEDTEST" / "query" / "4.jpg")
    with pytest.raises(ValueError, match="do not pair up by name"):
        formats.format_dataset("sped", raw, tmp_path / "datasets")
    assert not (tmp_path / "datasets" / "sped").exists()


def test_sf_xl_processed_folders_are_checked_not_converted(tmp_path, capsys):
    root = synthetic.build_cosplace_dataset(tmp_path / "sf_xl", progress=False)
    assert formats.main(["sf_xl", "--raw", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "sf_xl train: 108 images, names checked" in printed and "test/queries_v1: 20 images" in printed
    with pytest.raises(SystemExit) as exit_info:
        formats.main(["nowhere", "--raw", str(root), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "unknown dataset 'nowhere'; choose one of amstertime" in capsys.readouterr().err


def test_eynsham_route_points_tiles_and_utc_times(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "EYNSHAM_DATABASE_PANORAMAS", 2)  # 2 database points, 1 query point
    raw = tmp_path / "raw"
    points = [(-1.38012, 51.77771), (-1.38040, 51.77790), (-1.38071, 51.77812), (-1.38100, 51.77830)]
    kml = raw / "Eynsham" / "Route_map" / "Eynsham.kml"
    kml.parent.mkdir(parents=True)
    coordinates = " ".join(f"{lon},{lat},0" for lon, lat in points) + " "  # last point and "" dropped
    kml.write_text("\n".join(["<?xml version='1.0'?>", *["<kml>"] * 10, f"<coordinates>{coordinates}</coordinates>"]))
    for k in range(5 + 5 * 3):
        _image(raw / "Eynsham" / "Images" / f"grab_{1186475400 + k}.ppm")
    dataset = formats.format_dataset("eynsham", raw, tmp_path / "datasets")
    database = _fields(dataset / "images" / "test" / "database")
    queries = _fields(dataset / "images" / "test" / "queries")
    assert len(database) == 10 and len(queries) == 5
    first = next(f for f in database.values() if f["pano_id"] == "0000" and f["tile_num"] == 0)
    east, north = utm.from_latlon(51.77771, -1.38012)[:2]
    assert (first["lat"], first["lon"]) == (51.77771, -1.38012)
    assert abs(first["east"] - east) < 0.01 and abs(first["north"] - north) < 0.01
    assert first["timestamp"] == "20070807_083005"  # grab_1186475405 (the first 5 frames skipped), UTC
    assert sorted((f["pano_id"], int(f["tile_num"])) for f in queries.values()) == [("0002", t) for t in range(5)]
    Image.open(next((dataset / "images" / "test" / "queries").iterdir())).verify()  # PPM converted to JPEG


def test_st_lucia_frames_5_m_apart_from_the_two_videos(tmp_path):
    import cv2  # the test extra installs it (vgjax's video extra)

    raw = tmp_path / "raw"
    north_step = {"100909_0845": 2.0, "180809_1545": 6.0}  # metres between frames
    for sequence, step in north_step.items():
        (raw / sequence).mkdir(parents=True)
        writer = cv2.VideoWriter(str(raw / sequence / "webcam_video.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 15, (32, 24))
        lines = []
        for i in range(6):
            writer.write(np.full((24, 32, 3), (40 * i, 10, 200 - 30 * i), np.uint8))  # BGR
            lat, lon = utm.to_latlon(502000.0, 6958000.0 + step * i, 56, "J")
            lines.append(f"{-lat:.7f},{lon:.7f}")  # fGPS.txt writes the latitude without its sign
        writer.release()
        (raw / sequence / "fGPS.txt").write_text("\n".join(lines) + "\n")
    dataset = formats.format_dataset("st_lucia", raw, tmp_path / "datasets")
    database = _fields(dataset / "images" / "test" / "database")
    queries = _fields(dataset / "images" / "test" / "queries")
    # 2 m apart: frames 0, 3 (6 m) are kept (frames 1, 2, 4, 5 are under 5 m from the last kept)
    assert sorted(f["pano_id"] for f in database.values()) == ["100909_0845_00000", "100909_0845_00003"]
    assert len(queries) == 6 and all(f["lat"] < 0 and f["zone_number"] == 56 for f in queries.values())
    name, fields = next((n, f) for n, f in database.items() if f["pano_id"].endswith("00003"))
    assert abs(fields["north"] - 6958006.0) < 0.02
    pixels = np.asarray(Image.open(dataset / "images" / "test" / "database" / name), np.float32).mean(axis=(0, 1))
    np.testing.assert_allclose(pixels, (200 - 90, 10, 120), atol=6)  # RGB of the frame written as BGR
    (raw / "180809_1545").rename(raw / "other")  # sequences by other names are given on the command line
    assert formats.main(["st_lucia", "--raw", str(raw), "--out", str(tmp_path / "again"),
                         "--st-lucia-sequences", "100909_0845,other"]) == 0
    assert len(list((tmp_path / "again" / "st_lucia" / "images" / "test" / "queries").iterdir())) == 6
    with pytest.raises(FileNotFoundError, match="St Lucia sequences 100909_0845 and 180809_1545; found: 100909_0845, other"):
        formats.format_dataset("st_lucia", raw, tmp_path / "third")

"""Raw downloads to the VG folder format, as VPR-datasets-downloader writes it.

  python -m vgjax.datasets.format NAME --raw RAW_FOLDER --out DATASETS_FOLDER

NAME is one of FORMATS; RAW_FOLDER is what the downloader unpacks (its `raw_data` folder; for
msls the `mapillary_sls` folder). Each format writes `DATASETS_FOLDER/<name>/images/<split>/
{database,queries}` (msls: `DATASETS_FOLDER/msls/{train,val}/...` with `test` a link to `val`,
as the downloader does) with the downloader's names and fields, and `map_<name>.png`, a plot
of the positions (the downloader draws them on map tiles from the internet; vgjax draws no
tiles), and `vgjax_manifest.json` (vgjax.data.vg_folder.write_manifest). Raw files are read, never moved or deleted. The dataset is built under
`<name>.partial` and renamed when complete; an existing dataset is refused, never overwritten.
`sf_xl` checks SF-XL's processed folders (every name parses, the folders CosPlace reads exist)
and writes nothing.

st_lucia reads videos: it needs OpenCV, the decoder the downloader uses (`pip install
'vgjax[video]'`). Not here: svox (published already formatted).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import utm
from PIL import Image

from vgjax.data import images, vg_folder
from vgjax.data.vg_folder import format_image_name


@dataclass(frozen=True, eq=False)
class Item:
    """One output image: its split and role, its source file and name, and how it is written
    ("copy" as is, "jpeg" converted to JPEG, "resize480" converted with its shorter side 480,
    "pixels" the decoded video frame `pixels`, uint8 [H, W, 3] RGB, saved as JPEG)."""

    split: str
    role: str
    source: Path
    name: str
    write: str = "copy"
    pixels: np.ndarray | None = None


def _name(lat: float, lon: float, **fields) -> str:
    """The downloader's name for a position given as lat/lon (UTM from the utm package)."""
    east, north, zone_number, zone_letter = utm.from_latlon(float(lat), float(lon))
    return format_image_name(east, north, zone_number=zone_number, zone_letter=zone_letter, lat=lat, lon=lon, **fields)


def _mock_name(north: str, pano_id: str) -> str:
    """Nordland / AmsterTime / SPED's names: east 0, a made-up north, the pano id, nothing else."""
    return f"@0@{north}@@@@@{pano_id}@@@@@@@@.jpg"


def _mat_struct(path: Path):
    from scipy.io import loadmat  # scipy: a vgjax dependency, imported for .mat files only

    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (the dataset's .mat file)")
    return loadmat(str(path))["dbStruct"].item()


def _mat_names(cells) -> list[str]:
    return [str(cell[0].item()) for cell in cells]


# ---------------------------------------------------------------------------------------------
# The formats.


def pittsburgh(raw: Path, name: str) -> Iterator[Item]:
    """pitts30k / pitts250k: raw/datasets/<name>_{train,val,test}.mat (dbStruct: [1] database
    names, [2] their UTM, [3] query names under queries_real/, [4] their UTM, zone 17T)."""
    for split in ("train", "val", "test"):
        struct = _mat_struct(raw / "datasets" / f"{name}_{split}.mat")
        for role, names, utms, folder in (("database", struct[1], struct[2], ""), ("queries", struct[3], struct[4], "queries_real")):
            for path, (east, north) in zip(_mat_names(names), np.asarray(utms, np.float64).T):
                lat, lon = utm.to_latlon(east, north, 17, "T")
                base = os.path.basename(path)
                pitch = int(re.findall(r"pitch(\d+)_", base)[0]) - 1
                yaw = int(re.findall(r"yaw(\d+)\.", base)[0]) - 1
                yield Item(split, role, raw / folder / path, _name(lat, lon, pano_id=base.split("_")[0],
                                                                   tile_num=pitch * 24 + yaw,
                                                                   note=re.findall(r"_(.+)\.jpg", base)[0]))


def tokyo247(raw: Path, name: str) -> Iterator[Item]:
    """raw/datasets/tokyo247.mat (database, UTM zone 54S; its .jpg names are .png files under
    raw/tokyo247/) and raw/tokyo247/247query_subset_v2/*.jpg with a .csv each (pano id, lat, lon);
    queries resized to a shorter side of 480."""
    struct = _mat_struct(raw / "datasets" / "tokyo247.mat")
    for path, (east, north) in zip(_mat_names(struct[1]), np.asarray(struct[2], np.float64).T):
        source = raw / "tokyo247" / path.replace(".jpg", ".png")
        lat, lon = utm.to_latlon(east, north, 54, "S")
        tile = int(re.findall(r"_012_(\d+)\.png", source.name)[0]) // 30
        if not 0 <= tile < 12:
            raise ValueError(f"{source}: tile {tile} is not in [0, 12)")
        yield Item("test", "database", source, _name(lat, lon, pano_id=source.name[:22], tile_num=tile), "jpeg")
    queries = sorted((raw / "tokyo247" / "247query_subset_v2").glob("*.jpg"))
    if not queries:
        raise FileNotFoundError(f"{raw / 'tokyo247' / '247query_subset_v2'} holds no query .jpg")
    for source in queries:
        pano_id, lat, lon = source.with_suffix(".csv").read_text().splitlines()[0].split(",")[:3]
        yield Item("test", "queries", source, _name(float(lat), float(lon), pano_id=pano_id), "resize480")


TIMESTAMP = re.compile(r"(\d{4}(\d{2}(\d{2}(_(\d{2})(\d{2})?(\d{2})?)?)?)?)?")  # the downloader's rule
MSLS_TRAIN_CITIES = ("trondheim", "london", "boston", "melbourne", "amsterdam", "helsinki", "tokyo", "toronto",
                     "saopaulo", "moscow", "zurich", "paris", "bangkok", "budapest", "austin", "berlin", "ottawa",
                     "phoenix", "goa", "amman", "nairobi", "manila")


def msls(raw: Path, name: str) -> Iterator[Item]:
    """raw/<train_val|test>/<city>/<query|database>/{postprocessed.csv, raw.csv, images/<key>.jpg}:
    panoramas skipped, the timestamp without dashes, note "<day|night>_<view direction>_<city>";
    the MSLS training cities go to train, the others (cph, sf) to val."""
    frames = sorted(raw.glob("*/*/*/postprocessed.csv"))
    if not frames:
        raise FileNotFoundError(f"{raw}: no <train_val>/<city>/<database|query>/postprocessed.csv")
    for post in frames:
        folder, city = post.parent, post.parent.parent.name
        raw_lines = post.with_name("raw.csv").read_text().splitlines()[1:]
        post_lines = post.read_text().splitlines()[1:]
        if len(raw_lines) != len(post_lines):
            raise ValueError(f"{folder}: raw.csv has {len(raw_lines)} rows, postprocessed.csv {len(post_lines)}")
        split = "train" if city in MSLS_TRAIN_CITIES else "val"
        role = "database" if folder.name == "database" else "queries"
        for raw_line, post_line in zip(raw_lines, post_lines):
            _, key, lon, lat, _, timestamp, panorama = raw_line.split(",")
            if panorama == "True":
                continue
            columns = post_line.split(",")
            note = f"{'day' if columns[-2] == 'False' else 'night'}_{columns[-1].lower()}_{city}"
            timestamp = timestamp.replace("-", "")
            if not TIMESTAMP.fullmatch(timestamp):
                raise ValueError(f"{folder / 'raw.csv'}: captured_at {timestamp!r} is not YYYYMMDD_hhmmss")
            yield Item(split, role, folder / "images" / f"{key}.jpg",
                       _name(float(lat), float(lon), pano_id=key, timestamp=timestamp, note=note))


def san_francisco(raw: Path, name: str) -> Iterator[Item]:
    """Database: every PCIs .jpg below raw (names of 10 '_' fields: pano, lat, lon, building,
    tile, carto, heading, pitch); queries: raw/BuildingQueryImagesCartoIDCorrected-Upright/<id>.jpg
    posed by raw/reference_poses_598/reference_poses_addTM_all_598.txt (quaternion, UTM zone 10S)."""
    queries = raw / "BuildingQueryImagesCartoIDCorrected-Upright"
    for source in sorted(raw.rglob("*.jpg")):
        if queries in source.parents:
            continue
        _, _, pano_id, lat, lon, _, tile, _, heading, pitch = source.name.split("_")
        yield Item("test", "database", source, _name(float(lat), float(lon), pano_id=pano_id, tile_num=tile,
                                                     heading=heading, pitch=pitch.replace(".jpg", "")))
    poses = raw / "reference_poses_598" / "reference_poses_addTM_all_598.txt"
    for line in poses.read_text().splitlines()[1:]:
        _, image_id, x, y, w, z, east, north, _ = line.split(" ")
        x, y, w, z = map(float, (x, y, w, z))
        lat, lon = utm.to_latlon(float(east), float(north), 10, "S")
        yaw = math.atan2(2.0 * (z * x + y * w), -1.0 + 2.0 * (x * x + y * y))
        heading = (((yaw / math.pi) + 1) * 180 + 180) % 360
        yield Item("test", "queries", queries / f"{image_id}.jpg", _name(lat, lon, pano_id=image_id, heading=heading))


NORDLAND_FRAME_METRES = 25 / (10 + 0.5)  # +-10 frames fall within the 25 m threshold


def nordland(raw: Path, name: str) -> Iterator[Item]:
    """raw/summer/*.png (database) and raw/winter/*.png (queries), those listed in
    raw/cleanImageNames.txt (the Patch-NetVLAD split), as made-up positions along a line: the
    i-th kept frame of each season at north i * 25 / 10.5 m."""
    selected = set((raw / "cleanImageNames.txt").read_text().split())
    for season, role in (("summer", "database"), ("winter", "queries")):
        kept = [path for path in sorted((raw / season).glob("*.png")) if path.name in selected]
        for index, source in enumerate(kept):
            north = vg_folder.format_coord(index * NORDLAND_FRAME_METRES, 5, 1)
            yield Item("test", role, source, _mock_name(north, str(index)), "jpeg")


def _pairs(database: list[Path], queries: list[Path], where: Path) -> Iterator[tuple[Path, Path, str]]:
    """Database/query files paired by stem (an integer): (database, query, its north)."""
    if [path.stem for path in database] != [path.stem for path in queries] or not database:
        raise ValueError(f"{where}: the database and query files do not pair up by name")
    for db, query in zip(database, queries):
        yield db, query, str(int(db.stem) * 1000)


def amstertime(raw: Path, name: str) -> Iterator[Item]:
    """raw/new/*.png (database) and raw/old/*.jpg (queries), pairs of one name: north = the
    pair's number x 1000 m, so only the partner is within 25 m."""
    for db, query, north in _pairs(sorted((raw / "new").glob("*.png")), sorted((raw / "old").glob("*.jpg")), raw):
        yield Item("test", "database", db, _mock_name(north, db.stem), "jpeg")
        yield Item("test", "queries", query, _mock_name(north, db.stem))


def sped(raw: Path, name: str) -> Iterator[Item]:
    """raw/SPEDTEST/ref/*.jpg (database) and raw/SPEDTEST/query/*.jpg, pairs as AmsterTime's."""
    folder = raw / "SPEDTEST"
    for db, query, north in _pairs(sorted((folder / "ref").glob("*.jpg")), sorted((folder / "query").glob("*.jpg")), folder):
        yield Item("test", "database", db, _mock_name(north, db.stem))
        yield Item("test", "queries", query, _mock_name(north, db.stem))


EYNSHAM_DATABASE_PANORAMAS = 4787  # the first sequence; the rest of the route is the queries
EYNSHAM_SKIPPED_FRAMES = 5  # the downloader drops the first 5 PPM frames


def eynsham(raw: Path, name: str) -> Iterator[Item]:
    """raw/Eynsham/Route_map/Eynsham.kml (the route's lon,lat,alt in its first <coordinates>,
    the last two entries dropped as the downloader does) and raw/Eynsham/Images/grab_<unix
    time>.ppm, sorted, the first 5 skipped, then 5 tiles per route point; points before 4787
    are the database. Timestamps are the file's time in UTC."""
    kml = raw / "Eynsham" / "Route_map" / "Eynsham.kml"
    if not kml.is_file():
        raise FileNotFoundError(f"{kml} does not exist (Eynsham's route)")
    line = next((line for line in kml.read_text().splitlines() if "<coordinates>" in line), None)
    if line is None:
        raise ValueError(f"{kml}: no <coordinates> element")
    points = line.split("<coordinates>")[1].split("</coordinates>")[0].split(" ")[:-2]
    frames = sorted((raw / "Eynsham" / "Images").glob("*.ppm"))[EYNSHAM_SKIPPED_FRAMES:]
    if len(frames) < 5 * len(points):
        raise ValueError(f"{raw / 'Eynsham' / 'Images'}: {len(frames) + EYNSHAM_SKIPPED_FRAMES} PPM frames, "
                         f"the route needs {EYNSHAM_SKIPPED_FRAMES} + 5 x {len(points)}")
    for pano, point in enumerate(points):
        lon, lat = (float(value) for value in point.split(",")[:2])
        for tile in range(5):
            source = frames[pano * 5 + tile]
            seconds = int(source.name.split("grab_")[1].split(".")[0])
            timestamp = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y%m%d_%H%M%S")
            role = "database" if pano < EYNSHAM_DATABASE_PANORAMAS else "queries"
            yield Item("test", role, source, _name(lat, lon, pano_id=f"{pano:04d}", tile_num=tile, timestamp=timestamp),
                       "jpeg")


# Database and queries: the first and last of the ten sequences, which the downloader takes
# from Mega links that do not name them; these are the names VPR papers use for that pair.
ST_LUCIA_SEQUENCES = ("100909_0845", "180809_1545")
ST_LUCIA_SPACING_M = 5  # a frame is kept only this far from the last kept one


def st_lucia(raw: Path, name: str, sequences: tuple[str, str] = ST_LUCIA_SEQUENCES) -> Iterator[Item]:
    """raw/<sequence>/{webcam_video.avi, fGPS.txt} of the database and query sequences: frame
    i is kept when its position (line i of fGPS.txt: latitude without its minus sign,
    longitude) is at least 5 m, in the names' centimetre-rounded UTM, from the last kept frame.
    Frames are decoded with OpenCV as the downloader does (seek to the frame, read, BGR -> RGB);
    pano_id is `<sequence>_<frame:05d>`."""
    try:
        import cv2  # the optional `video` extra: the decoder the downloader uses
    except ImportError as error:
        raise ImportError("st_lucia's raw data are videos: pip install 'vgjax[video]' (OpenCV, the decoder "
                          "VPR-datasets-downloader uses)") from error
    for sequence, role in zip(sequences, ("database", "queries")):
        video, gps = raw / sequence / "webcam_video.avi", raw / sequence / "fGPS.txt"
        for path in (video, gps):
            if not path.is_file():
                present = sorted(p.name for p in raw.iterdir() if (p / "fGPS.txt").is_file())
                raise FileNotFoundError(f"{path} does not exist (St Lucia sequences {sequences[0]} and "
                                        f"{sequences[1]}; found: {', '.join(present) or 'none'})")
        capture = cv2.VideoCapture(str(video))
        try:
            frames = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
            last = None
            for index, line in zip(range(frames), gps.read_text().splitlines()):
                latitude, longitude = line.split(",")
                latitude = "-" + latitude.strip()  # written positive; St Lucia is in the southern hemisphere
                east, north = utm.from_latlon(float(latitude), float(longitude))[:2]
                here = (float(vg_folder.format_coord(east, 7, 2)), float(vg_folder.format_coord(north, 7, 2)))
                if last is not None and math.dist(last, here) < ST_LUCIA_SPACING_M:
                    continue
                last = here
                capture.set(cv2.CAP_PROP_POS_FRAMES, index)
                ok, frame = capture.read()
                if not ok or frame is None:
                    raise ValueError(f"{video}: frame {index} cannot be decoded")
                yield Item("test", role, video, _name(float(latitude), float(longitude), pano_id=f"{sequence}_{index:05d}"),
                           "pixels", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
        finally:
            capture.release()


FORMATS: dict[str, Callable[[Path, str], Iterator[Item]]] = {
    "pitts30k": pittsburgh, "pitts250k": pittsburgh, "tokyo247": tokyo247, "msls": msls,
    "san_francisco": san_francisco, "nordland": nordland, "amstertime": amstertime, "sped": sped,
    "eynsham": eynsham, "st_lucia": st_lucia}


# ---------------------------------------------------------------------------------------------
# Writing.


def _write(item: Item, folder: Path) -> None:
    target = folder / item.name
    if target.exists():
        raise FileExistsError(f"{item.source} and another file both become {target}")
    if not item.source.is_file():
        raise FileNotFoundError(f"{item.source} does not exist (listed by the raw data)")
    if item.write == "copy":
        shutil.copyfile(item.source, target)
        return
    if item.write == "pixels":
        Image.fromarray(item.pixels).save(target)
        return
    with Image.open(item.source) as image:
        image = image.convert("RGB")
        if item.write == "resize480":  # torchvision Resize(480) on a PIL image
            height, width = images.shorter_side_size(image.height, image.width, 480)
            image = image.resize((width, height), Image.BILINEAR)
        image.save(target)


def save_map(dataset: Path, name: str) -> Path:
    """map_<name>.png: the images' lat/lon (or east/north when they have none) per split and role."""
    from matplotlib.figure import Figure  # matplotlib: imported for the map only

    figure = Figure(figsize=(7, 7), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for folder in sorted({path.parent for path in dataset.rglob("*.jpg")}):
        fields = [vg_folder.parse_image_name(path) for path in folder.glob("*.jpg")]
        lat = np.array([f["lat"] for f in fields])
        x, y = ((np.array([f["lon"] for f in fields]), lat) if not np.isnan(lat).any()
                else (np.array([f["east"] for f in fields]), np.array([f["north"] for f in fields])))
        axes.scatter(x, y, s=3, label=f"{folder.parent.name} - {folder.name} - {len(fields)}")
    axes.legend(loc="lower left")
    axes.set_title(name)
    path = dataset / f"map_{name}.png"
    figure.savefig(path, format="png")
    return path


def format_dataset(name: str, raw: str | os.PathLike, out: str | os.PathLike, *,
                   st_lucia_sequences: tuple[str, str] = ST_LUCIA_SEQUENCES) -> Path:
    """Writes dataset `name` from its raw folder into `out`/<name> (msls: `out`/msls with a
    test link to val); returns the dataset folder. St Lucia's database and query sequences
    are `st_lucia_sequences`.

    Raises:
      ValueError: an unknown name. FileExistsError: the dataset exists already.
      FileNotFoundError: a raw file is missing (named).
    """
    if name not in FORMATS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(FORMATS))} (or sf_xl to check it)")
    raw, dataset = Path(raw), Path(out) / name
    if not raw.is_dir():
        raise FileNotFoundError(f"--raw {raw}: no such folder")
    if dataset.exists():
        raise FileExistsError(f"{dataset} already exists: vgjax never overwrites a dataset; remove it or choose another --out")
    partial = dataset.with_name(dataset.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    counts: dict[tuple[str, str], int] = {}
    items = st_lucia(raw, name, st_lucia_sequences) if name == "st_lucia" else FORMATS[name](raw, name)
    for item in items:
        folder = partial / (item.split if name == "msls" else Path("images") / item.split) / item.role
        folder.mkdir(parents=True, exist_ok=True)
        _write(item, folder)
        counts[item.split, item.role] = counts.get((item.split, item.role), 0) + 1
    if name == "msls":
        (partial / "test").symlink_to("val")
    save_map(partial, name)
    vg_folder.write_manifest(partial, f"format {name}")
    partial.rename(dataset)
    for (split, role), count in sorted(counts.items()):
        print(f"{name} {split} {role}: {count} images")
    return dataset


def check_sf_xl(folder: str | os.PathLike) -> dict[str, int]:
    """Checks SF-XL's processed folders (train/, val/{database,queries}, test/{database,
    queries_v1}): every image name parses; returns the image count of each folder."""
    folder = Path(folder)
    counts = {}
    for part in ("train", "val/database", "val/queries", "test/database", "test/queries_v1"):
        paths = vg_folder.list_images(folder / part)
        for path in paths:
            vg_folder.parse_image_name(path)
        counts[part] = len(paths)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vgjax.datasets.format", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help=f"{', '.join(sorted(FORMATS))}, or sf_xl (check only)")
    parser.add_argument("--raw", required=True, help="the raw download (the downloader's raw_data folder; "
                        "msls: mapillary_sls; sf_xl: its processed folder)")
    parser.add_argument("--out", help="the datasets folder to write into (not for sf_xl)")
    parser.add_argument("--st-lucia-sequences", default=",".join(ST_LUCIA_SEQUENCES), metavar="DATABASE,QUERIES",
                        help="st_lucia: the sequence folders of the database and the queries (default: %(default)s)")
    args = parser.parse_args(argv)
    sequences = tuple(args.st_lucia_sequences.split(","))
    if len(sequences) != 2:
        parser.error(f"--st-lucia-sequences {args.st_lucia_sequences!r}: give two folder names, DATABASE,QUERIES")
    try:
        if args.name == "sf_xl":
            for part, count in check_sf_xl(args.raw).items():
                print(f"sf_xl {part}: {count} images, names checked")
            return 0
        if not args.out:
            parser.error("--out is required")
        print(f"Wrote {format_dataset(args.name, args.raw, args.out, st_lucia_sequences=sequences)}")
    except (OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

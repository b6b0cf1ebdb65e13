"""Your own photos as a VG-format split: EXIF GPS -> lat/lon -> UTM in the file names.

  python -m vgjax.datasets.from_photos --photos DIR --out DATASETS_FOLDER/NAME --split test --role database

Every .jpg/.jpeg/.png below DIR (any letter case) with a GPS position in its EXIF becomes
`<out>/images/<split>/<role>/@east@north@zone@letter@lat@lon@<name>@@<heading>@@@@<timestamp>@@.jpg`:
UTM from the `utm` package, heading from GPSImgDirection when the photo has one, timestamp from
DateTimeOriginal, the original file name (without its extension, '@' replaced) as pano_id. The
image is stored upright (its EXIF orientation applied) as a JPEG. Photos without a GPS
position are never dropped silently: they are counted on the console and listed in
`<out>/from_photos_<split>_<role>_without_gps.txt`. The folder is written under a temporary
name and renamed when complete; an existing one is refused, never overwritten; the dataset's
vgjax_manifest.json records it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import utm
from PIL import Image, ImageOps

from vgjax.data import images as image_ops
from vgjax.data import vg_folder
from vgjax.data.vg_folder import format_image_name

GPS_IFD, EXIF_IFD = 0x8825, 0x8769
GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE = 1, 2, 3, 4
GPS_IMG_DIRECTION = 17
DATE_TIME_ORIGINAL = 0x9003
ROLES = ("database", "queries")


@dataclass(frozen=True)
class PhotoPosition:
    """What a photo's EXIF says of where and when it was taken (heading/timestamp may be None)."""

    lat: float
    lon: float
    heading: float | None
    timestamp: str | None


def _degrees(value) -> float:
    """EXIF (degrees, minutes, seconds) rationals -> decimal degrees."""
    d, m, s = (float(part) for part in value)
    return d + m / 60.0 + s / 3600.0


def read_position(image: Image.Image) -> PhotoPosition | None:
    """The EXIF GPS position (and heading, DateTimeOriginal) of an opened image; None without
    a usable latitude and longitude."""
    if image.format == "PNG":
        image.load()  # a PNG's eXIf chunk may follow its pixels
    exif = image.getexif()
    gps = exif.get_ifd(GPS_IFD)
    try:
        lat = _degrees(gps[GPS_LATITUDE]) * (-1 if str(gps.get(GPS_LATITUDE_REF, "N")).upper().startswith("S") else 1)
        lon = _degrees(gps[GPS_LONGITUDE]) * (-1 if str(gps.get(GPS_LONGITUDE_REF, "E")).upper().startswith("W") else 1)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    if not (-80.0 <= lat <= 84.0 and -180.0 <= lon <= 180.0):  # outside UTM's range
        return None
    heading = float(gps[GPS_IMG_DIRECTION]) % 360 if GPS_IMG_DIRECTION in gps else None
    taken = exif.get_ifd(EXIF_IFD).get(DATE_TIME_ORIGINAL)
    timestamp = None
    if isinstance(taken, str) and len(taken) >= 19:  # "YYYY:MM:DD hh:mm:ss"
        timestamp = taken[:10].replace(":", "") + "_" + taken[11:19].replace(":", "")
    return PhotoPosition(lat, lon, heading, timestamp)


def photo_name(position: PhotoPosition, pano_id: str) -> str:
    """The VG-format file name of a photo at `position`."""
    east, north, zone_number, zone_letter = utm.from_latlon(position.lat, position.lon)
    return format_image_name(east, north, zone_number=zone_number, zone_letter=zone_letter, lat=position.lat,
                             lon=position.lon, pano_id=pano_id, heading=position.heading,
                             timestamp=position.timestamp)


def convert(photos: str | os.PathLike, out: str | os.PathLike, split: str, role: str, *,
            jpeg_quality: int = 95) -> dict:
    """Writes `out`/images/`split`/`role` from the photos; returns the counts and the report path.

    Raises:
      FileNotFoundError: `photos` is not a folder. DatasetFormatError: it holds no image.
      FileExistsError: the destination folder already exists.
    """
    photos, out = Path(photos), Path(out)
    if role not in ROLES:
        raise ValueError(f"role {role!r}: choose one of {', '.join(ROLES)}")
    if not photos.is_dir():
        raise FileNotFoundError(f"--photos {photos}: no such folder")
    paths = [Path(path) for path in vg_folder.list_images(photos, any_type=True)]
    destination = out / "images" / split / role
    if destination.exists():
        raise FileExistsError(f"{destination} already exists: vgjax never overwrites a dataset; remove it or "
                              "choose another --out")
    partial = destination.with_name(destination.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    without_gps, names = [], set()
    for path in paths:
        with image_ops.open_image(path) as image:
            position = read_position(image)
            if position is None:
                without_gps.append(path)
                continue
            stem = path.stem.replace("@", "_").replace(os.sep, "_")
            name, copy = photo_name(position, stem), 1
            while name in names:  # two photos with one name and one position: keep both
                copy += 1
                name = photo_name(position, f"{stem}_{copy}")
            names.add(name)
            ImageOps.exif_transpose(image).convert("RGB").save(partial / name, quality=jpeg_quality)
    report = out / f"from_photos_{split}_{role}_without_gps.txt"
    if without_gps:
        report.write_text("".join(f"{path}\n" for path in without_gps))
    if not names:
        partial.rmdir()
        raise ValueError(f"--photos {photos}: none of its {len(paths)} photos has a GPS position in its EXIF "
                         f"(they are listed in {report})")
    partial.rename(destination)
    vg_folder.write_manifest(out, f"from_photos --role {role}", [destination])
    return {"written": len(names), "without_gps": len(without_gps), "folder": str(destination),
            "report": str(report) if without_gps else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vgjax.datasets.from_photos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", required=True, help="folder of photos (searched recursively)")
    parser.add_argument("--out", required=True, help="the dataset folder, e.g. DATASETS_FOLDER/my_city")
    parser.add_argument("--split", default="test", help="train, val or test")
    parser.add_argument("--role", required=True, choices=ROLES)
    args = parser.parse_args(argv)
    try:
        summary = convert(args.photos, args.out, args.split, args.role)
    except (OSError, ValueError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(f"Wrote {summary['written']} photos to {summary['folder']}")
    if summary["without_gps"]:
        print(f"{summary['without_gps']} photos have no GPS position in their EXIF and were not written; "
              f"they are listed in {summary['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GSV-Cities (Ali-bey et al., Neurocomputing 2022) as published, and its places x K batches.

Layout: `<root>/Dataframes/<City>.csv` (columns place_id, year, month, northdeg, city_id, lat,
lon, panoid; one row per image) and `<root>/Images/<city_id>/<name>.jpg` with

    <city_id>_<place_id:07d>_<year:04d>_<month:02d>_<northdeg:03d>_<lat>_<lon>_<panoid>.jpg

where lat and lon are written as Python writes the floats read from the CSV. Place ids are made
unique across cities as GSV-Cities does (place_id + city index * 10^5); places with fewer than
min_images_per_place images are dropped (and counted). A missing image is an error naming it,
before any training.

Batches (`epoch_places`, `epoch_tuples`): P places per batch, K of each place's images drawn at
random without replacement, a new draw and a new place order every epoch; by default places are
shuffled within each city and cities kept in order, as GSV-Cities' loader does (so a batch
holds one city's places), or all together with shuffle_all. Everything is a pure function of
(seed, epoch, batch), so a run resumes exactly. Deliberate difference: the last incomplete
batch of an epoch is dropped (every step has the same shapes; GSV-Cities keeps it).

`write_synthetic` renders a small dataset in this layout (tests, the smoke config).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import utm
from PIL import Image

from vgjax.data import synthetic
from vgjax.data.vg_folder import DatasetFormatError

COLUMNS = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")
PLACE_ID_OFFSET = 10**5
# GSV-Cities' training cities (its TRAIN_CITIES, in its order).
TRAIN_CITIES = ("Bangkok", "BuenosAires", "LosAngeles", "MexicoCity", "OSL", "Rome", "Barcelona", "Chicago",
                "Madrid", "Miami", "Phoenix", "TRT", "Boston", "Lisbon", "Medellin", "Minneapolis", "PRG",
                "WashingtonDC", "Brussels", "London", "Melbourne", "Osaka", "PRS")


def image_name(row: dict) -> str:
    """The file name of one CSV row (values as the CSV holds them; the place id without its
    city offset)."""
    return (f"{row['city_id']}_{int(row['place_id']) % PLACE_ID_OFFSET:07d}_{int(row['year']):04d}_"
            f"{int(row['month']):02d}_{int(row['northdeg']):03d}_{float(row['lat'])}_{float(row['lon'])}_"
            f"{row['panoid']}.jpg")


@dataclasses.dataclass(frozen=True)
class Places:
    """The kept places of the chosen cities.

    Attributes:
      root: the dataset folder.
      cities: the city names, in order.
      place_ids: int64 [P], GSV-Cities' unique ids (place_id + city index * 10^5).
      city: int32 [P], each place's index in `cities`.
      paths: per place, its image paths relative to `root`, in CSV order.
      dropped: places dropped for having fewer than min_images_per_place images.
    """

    root: Path
    cities: tuple[str, ...]
    place_ids: np.ndarray
    city: np.ndarray
    paths: list[list[str]]
    dropped: int

    @property
    def num_images(self) -> int:
        return sum(len(paths) for paths in self.paths)


def read_places(root: str | os.PathLike, cities: Sequence[str], min_images_per_place: int) -> Places:
    """Reads the dataframes of `cities` and checks every image exists.

    Raises:
      FileNotFoundError: a dataframe or an image folder is missing (named).
      DatasetFormatError: a dataframe lacks a column, holds a bad value, or names an image that
        is not there (the first few named, with the count).
    """
    root = Path(root)
    place_ids, city_of, paths, dropped = [], [], [], 0
    for index, city in enumerate(cities):
        places = _read_city(root, city)
        for place_id, names in places.items():
            if len(names) < min_images_per_place:
                dropped += 1
                continue
            place_ids.append(place_id + index * PLACE_ID_OFFSET)
            city_of.append(index)
            paths.append(names)
    if not paths:
        raise DatasetFormatError(f"{root}: no place of {', '.join(cities)} has {min_images_per_place} images or more")
    return Places(root, tuple(cities), np.asarray(place_ids, np.int64), np.asarray(city_of, np.int32), paths, dropped)


def _read_city(root: Path, city: str) -> dict[int, list[str]]:
    """{place_id: [relative image paths]} of one city's dataframe, places in first-row order."""
    frame = root / "Dataframes" / f"{city}.csv"
    if not frame.is_file():
        raise FileNotFoundError(f"GSV-Cities dataframe {frame} does not exist (city {city!r})")
    places: dict[int, list[str]] = {}
    with open(frame, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [column for column in COLUMNS if column not in (reader.fieldnames or ())]
        if missing:
            raise DatasetFormatError(f"{frame}: no column {', '.join(missing)} (expected {', '.join(COLUMNS)})")
        for line, row in enumerate(reader, start=2):
            try:
                name = image_name(row)
            except ValueError as error:
                raise DatasetFormatError(f"{frame}, line {line}: {error}") from None
            places.setdefault(int(row["place_id"]), []).append(f"Images/{row['city_id']}/{name}")
    _check_images(root, frame, [path for names in places.values() for path in names])
    return places


def _check_images(root: Path, frame: Path, paths: list[str]) -> None:
    listed: dict[str, set[str]] = {}
    for folder in sorted({os.path.dirname(path) for path in paths}):
        directory = root / folder
        if not directory.is_dir():
            raise FileNotFoundError(f"GSV-Cities image folder {directory} does not exist (named in {frame})")
        listed[folder] = set(os.listdir(directory))
    absent = [path for path in paths if os.path.basename(path) not in listed[os.path.dirname(path)]]
    if absent:
        raise DatasetFormatError(f"{frame}: {len(absent)} of its images are missing, e.g. {root / absent[0]}")


def epoch_places(places: Places, *, seed: int, epoch: int, shuffle_all: bool = False) -> np.ndarray:
    """int64 [P]: the order of the places in an epoch (indices into `places`)."""
    if shuffle_all:
        return np.random.default_rng([seed, epoch]).permutation(len(places.paths))
    return np.concatenate([np.random.default_rng([seed, epoch, index]).permutation(np.flatnonzero(places.city == index))
                           for index in range(len(places.cities))])


def batches_per_epoch(places: Places, places_per_batch: int) -> int:
    """Full batches of an epoch (the last incomplete one is dropped)."""
    return len(places.paths) // places_per_batch


def epoch_tuples(places: Places, *, seed: int, epoch: int, places_per_batch: int, images_per_place: int,
                 shuffle_all: bool = False) -> tuple[list[list[str]], np.ndarray]:
    """The epoch's full batches, place-major: (per place, its K chosen image paths relative to
    the root; int32 [batches * P] the places' indices, their labels). Batch b is rows
    [b * P, (b + 1) * P)."""
    order = epoch_places(places, seed=seed, epoch=epoch, shuffle_all=shuffle_all)
    order = order[:batches_per_epoch(places, places_per_batch) * places_per_batch]
    images = []
    for place in order.tolist():
        names = places.paths[place]
        picks = np.random.default_rng([seed, epoch, place, 1]).choice(len(names), images_per_place, replace=False)
        images.append([names[i] for i in picks])
    return images, order.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# A synthetic dataset in the published layout.


def write_synthetic(root: str | os.PathLike, *, cities: Sequence[str] = ("Aville", "Btown"), places_per_city: int = 24,
                    image_size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    """Renders GSV-Cities' layout: each city an aerial world (vgjax.data.synthetic), each place
    a spot 30 m from its neighbours seen 3 to 6 times (about 1 in 8 places has 3 images, below
    the usual minimum of 4) from within 2 m, turned by up to 30 degrees, some under changed
    appearance, with dates, headings, lat/lon (UTM zone 17T) and panorama ids.

    Returns:
      root.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(places_per_city)))  # places on a side x side grid, 30 m apart
    for index, city in enumerate(cities):
        world = synthetic.AerialWorld(seed=seed + 100 + index, size_m=40.0 + 30.0 * side)
        texture = world.texture()
        spots = (np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:places_per_city] * 30.0 + 35.0)
        rows = []
        (root / "Images" / city).mkdir(parents=True, exist_ok=True)
        for place_id, (east, north) in enumerate(spots):
            for _ in range(int(rng.choice([3, 4, 4, 5, 5, 6, 6, 6]))):
                jitter = rng.uniform(-2, 2, 2)
                heading = float(rng.uniform(-30, 30))
                view = synthetic.render_view(texture, world, east + jitter[0], north + jitter[1], heading, 24.0, image_size)
                if rng.random() < 0.5:
                    view = synthetic.change_appearance(view, rng)
                lat, lon = utm.to_latlon(synthetic.UTM_ORIGIN[0] + east, synthetic.UTM_ORIGIN[1] + north, 17, "T")
                row = {"place_id": place_id, "year": int(rng.integers(2007, 2022)), "month": int(rng.integers(1, 13)),
                       "northdeg": int(heading % 360), "city_id": city, "lat": round(float(lat), 7),
                       "lon": round(float(lon), 7), "panoid": "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz0123456789_-"), 22))}
                rows.append(row)
                Image.fromarray(view).save(root / "Images" / city / image_name(row), quality=95)
        (root / "Dataframes").mkdir(parents=True, exist_ok=True)
        with open(root / "Dataframes" / f"{city}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    return root

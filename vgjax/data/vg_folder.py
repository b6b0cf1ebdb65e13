"""Datasets in the VPR-datasets-downloader folder format (reference.md §6).

Layout: `<dataset_dir>/images/<split>/{database,queries}/**/*.jpg`, or MSLS's layout without the
`images/` level: `<dataset_dir>/<split>/{database,queries}/**/*.jpg`.

File names carry 14 `@`-separated fields:
`@east@north@zone_number@zone_letter@lat@lon@pano_id@tile_num@heading@pitch@roll@height@timestamp@note@.jpg`
Any field but east/north may be empty. Positives are database images within a radius (metres,
planar UTM distance, inclusive) of a query, as the benchmark defines them.

Deliberate differences from the PyTorch benchmark:
- Fields are parsed from the file *name*, not the full path, so an `@` in a parent folder is
  harmless (the original splits the whole path and then reads wrong coordinates).
- A name that does not parse, or non-finite coordinates (or beyond 2**53 in magnitude), raise an
  error naming the file instead of crashing later or being skipped.
- Directory links are followed as the original's recursive glob follows them, but a link back to
  one of its own ancestors is skipped (glob follows it until the path is too long); a broken link
  is an error naming it (glob lists it and the image fails to open later).
- Positives are stored sorted (the original's radius search returns them unsorted); recall is
  unaffected.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import utm
from PIL import Image
from scipy.spatial import cKDTree

FIELD_NAMES = (
    "east", "north", "zone_number", "zone_letter", "lat", "lon", "pano_id", "tile_num",
    "heading", "pitch", "roll", "height", "timestamp", "note",
)
NUMERIC_FIELDS = frozenset(
    {"east", "north", "zone_number", "lat", "lon", "tile_num", "heading", "pitch", "roll", "height"}
)
IMAGE_SUFFIX = ".jpg"  # what dataset folders hold (the benchmark reads nothing else)
ANY_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what `load_folders` reads, in any letter case
# East/north beyond this magnitude are not exact integers, and their squared distances lose all
# precision (1e308 overflows the positives search).
MAX_COORDINATE = 2.0**53
_OTHER_IMAGE_SUFFIXES = (".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


class DatasetFormatError(ValueError):
    """A dataset folder or file name does not follow the VG folder format."""


# ---------------------------------------------------------------------------------------------
# File names.


def parse_image_name(path: str | os.PathLike) -> dict[str, float | str]:
    """Parses the 14 @-fields of one image file name.

    Args:
      path: a file name or path; only the last path component is parsed.

    Returns:
      A dict over FIELD_NAMES. Numeric fields are floats (NaN when empty), the others strings.

    Raises:
      DatasetFormatError: naming the file, if the name does not have the 14 fields, a numeric
        field is not a number, or east/north are missing, not finite or beyond MAX_COORDINATE.
    """
    name = os.path.basename(os.fspath(path))
    parts = name.split("@")
    if len(parts) != len(FIELD_NAMES) + 2 or not parts[-1].lower() in ANY_IMAGE_SUFFIXES:
        raise DatasetFormatError(
            f"{path}: expected a name of the form "
            f"'@{'@'.join(FIELD_NAMES)}@{IMAGE_SUFFIX}' (14 @-separated fields, empty ones "
            f"allowed), got {len(parts) - 2} fields"
        )
    fields: dict[str, float | str] = {}
    for field_name, text in zip(FIELD_NAMES, parts[1:-1]):
        if field_name not in NUMERIC_FIELDS:
            fields[field_name] = text
            continue
        try:
            fields[field_name] = float(text) if text else math.nan
        except ValueError:
            raise DatasetFormatError(
                f"{path}: field '{field_name}' must be a number, got {text!r}"
            ) from None
    for coord in ("east", "north"):
        if not abs(fields[coord]) < MAX_COORDINATE:
            raise DatasetFormatError(
                f"{path}: UTM {coord} must be a finite number below 2**53 in magnitude, "
                f"got {parts[1 + FIELD_NAMES.index(coord)]!r}"
            )
    return fields


def format_coord(value: float, left: int, right: int) -> str:
    """Zero-padded fixed-point, e.g. (584543.41, 7, 2) -> '0584543.41', (-79.95, 4, 5) -> '-079.95000'."""
    return f"{value:0={left + right + 1}.{right}f}"


def format_image_name(east: float, north: float, **fields) -> str:
    """Formats an image file name the way VPR-datasets-downloader writes it.

    Args:
      east, north: UTM coordinates in metres.
      **fields: any other field of FIELD_NAMES; missing ones are left empty. Numbers are
        formatted as the downloader does (zone and tile as 2 digits, lat/lon with 5 decimals,
        heading/pitch as 3-digit integers).

    Returns:
      The base name, e.g. '@0584543.41@4477244.62@17@T@040.44012@-079.95000@...@.jpg'.
    """
    unknown = set(fields) - set(FIELD_NAMES)
    if unknown:
        raise ValueError(f"unknown file-name fields {sorted(unknown)}; valid: {FIELD_NAMES}")
    formatters = {
        "zone_number": lambda v: f"{int(v):02d}",
        "lat": lambda v: format_coord(float(v), 3, 5),
        "lon": lambda v: format_coord(float(v), 4, 5),
        "tile_num": lambda v: f"{int(v):02d}",
        "heading": lambda v: f"{int(float(v)):03d}",
        "pitch": lambda v: f"{int(float(v)):03d}",
        "roll": lambda v: f"{float(v):g}",
        "height": lambda v: f"{float(v):g}",
    }
    texts = [format_coord(east, 7, 2), format_coord(north, 7, 2)]
    for field_name in FIELD_NAMES[2:]:
        value = fields.get(field_name)
        if value is None or value == "":
            texts.append("")
        else:
            texts.append(formatters.get(field_name, str)(value))
    if any("@" in t or os.sep in t for t in texts):
        raise ValueError(f"field values may not contain '@' or '{os.sep}': {texts}")
    return "@" + "@".join(texts) + "@" + IMAGE_SUFFIX


def _field_table(paths: Sequence[str]) -> dict[str, np.ndarray]:
    """Parses the names of `paths` into columns: float64 [N] (NaN = empty) or str [N]."""
    columns = {name: [] for name in FIELD_NAMES}
    for path in paths:
        for name, value in parse_image_name(path).items():
            columns[name].append(value)
    return {
        name: np.asarray(values, dtype=np.float64 if name in NUMERIC_FIELDS else str)
        for name, values in columns.items()
    }


def latitude_longitude(fields: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) float64 [N] of a field table: the names' own lat/lon, else converted from
    east/north and the UTM zone (utm package) where the name gives the zone, else NaN."""
    lat, lon = fields["lat"].astype(np.float64), fields["lon"].astype(np.float64)
    missing = np.isnan(lat) | np.isnan(lon)
    zones = {(fields["zone_number"][i], fields["zone_letter"][i]) for i in np.flatnonzero(missing)}
    for number, letter in zones:
        if np.isnan(number) or not letter:
            continue
        rows = missing & (fields["zone_number"] == number) & (fields["zone_letter"] == letter)
        try:
            lat[rows], lon[rows] = utm.to_latlon(fields["east"][rows], fields["north"][rows], int(number), str(letter))
        except utm.error.OutOfRangeError:  # not a real UTM position (e.g. a synthetic world's): left unknown
            continue
    return lat, lon


# ---------------------------------------------------------------------------------------------
# Folders.


def find_split_folder(dataset_dir: str | os.PathLike, split: str) -> Path:
    """Returns `<dataset_dir>/images/<split>`, or `<dataset_dir>/<split>` (MSLS layout)."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder {dataset_dir} does not exist")
    candidates = [dataset_dir / "images" / split, dataset_dir / split]
    for folder in candidates:
        if folder.is_dir():
            return folder
    available = sorted(
        {p.name for base in (dataset_dir / "images", dataset_dir) if base.is_dir()
         for p in base.iterdir() if (p / "database").is_dir()}
    )
    raise FileNotFoundError(
        f"split '{split}' not found: neither {candidates[0]} nor {candidates[1]} exists "
        f"(splits found in {dataset_dir}: {available or 'none'})"
    )


def _check_not_broken_link(entry: os.DirEntry) -> None:
    """DatasetFormatError naming `entry` if it is a symbolic link to nothing."""
    if entry.is_symlink() and not os.path.exists(entry.path):
        raise DatasetFormatError(f"{entry.path}: broken symbolic link (its target "
                                 f"{os.readlink(entry.path)} does not exist)")


def walk_folder(folder: str | os.PathLike) -> Iterator[tuple[str, int, list[str]]]:
    """The directories below `folder` as the benchmark's and CosPlace's recursive globs visit
    them: hidden entries skipped, directory links followed, except a link back to one of its
    own ancestors (a cycle). Yields, per directory, (its path relative to `folder` with a
    trailing "/", "" for `folder` itself; its mtime in ns; the names of its non-hidden files).

    Raises:
      DatasetFormatError: naming a broken symbolic link (glob would list it silently).
    """
    stack = [("", ())]
    while stack:
        relative, ancestors = stack.pop()
        directory = os.path.join(folder, relative)
        stat = os.stat(directory)
        inode = (stat.st_dev, stat.st_ino)
        if inode in ancestors:
            continue
        files = []
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    stack.append((relative + entry.name + "/", ancestors + (inode,)))
                else:
                    _check_not_broken_link(entry)
                    files.append(entry.name)
        yield relative, stat.st_mtime_ns, files


def resize_percentage(resize) -> float | None:
    """The percentage of a data.resize given as a share of the dataset's image size: "80%" (a
    command line gives ("80%",)) -> 80.0; None for a (height, width) size. ValueError for a
    text that is not a positive percentage."""
    if isinstance(resize, (tuple, list)) and len(resize) == 1:
        resize = resize[0]
    if not isinstance(resize, str):
        return None
    text = resize.strip()
    try:
        percent = float(text[:-1]) if text.endswith("%") else math.nan
    except ValueError:
        percent = math.nan
    if not 0 < percent <= 1000:
        raise ValueError(f"{resize!r} is not a percentage such as 80%")
    return percent


def native_image_size(dataset_dir: str | os.PathLike, splits: Sequence[str] = ("train", "val", "test")) -> tuple[int, int]:
    """(height, width) of the database images of the first of `splits` the dataset has (read from
    the first, middle and last image's headers). ValueError naming two files when they differ
    in size: the dataset has no one size a percentage could be taken of."""
    dataset_dir = Path(dataset_dir)
    for split in splits:
        try:
            paths = list_images(find_split_folder(dataset_dir, split) / "database")
        except FileNotFoundError:
            continue
        sizes = {}
        for path in dict.fromkeys((paths[0], paths[len(paths) // 2], paths[-1])):
            with Image.open(path) as image:
                sizes[path] = (image.height, image.width)
        (first, size), *others = sizes.items()
        for path, other in others:
            if other != size:
                raise ValueError(f"the images of {dataset_dir} differ in size ({size[0]}x{size[1]}: {first}; "
                                 f"{other[0]}x{other[1]}: {path}); give the size as (height, width)")
        return size
    raise FileNotFoundError(f"{dataset_dir} has none of the splits {', '.join(splits)} to measure its image size")


def list_images(folder: str | os.PathLike, *, any_type: bool = False) -> list[str]:
    """Sorted paths of all `*.jpg` files below `folder` (recursive), as the benchmark's
    recursive glob lists them (see `walk_folder`); with `any_type`, of every ANY_IMAGE_SUFFIXES
    file in any letter case.

    Raises:
      FileNotFoundError: the folder does not exist.
      DatasetFormatError: it holds no image file (other image types are named in the message),
        or a broken symbolic link.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = [os.path.join(folder, relative + name) for relative, _, names in walk_folder(folder) for name in names]
    if any_type:
        paths = sorted(path for path in files if os.path.splitext(path)[1].lower() in ANY_IMAGE_SUFFIXES)
        if not paths:
            raise DatasetFormatError(f"image folder {folder} contains no {'/'.join(ANY_IMAGE_SUFFIXES)} files")
        return paths
    paths = sorted(path for path in files if path.endswith(IMAGE_SUFFIX))
    others = [Path(path) for path in files if os.path.splitext(path)[1] in _OTHER_IMAGE_SUFFIXES]
    if not paths:
        hint = f" ({len(others)} files of other image types, e.g. {others[0].name}; convert them to .jpg)" if others else ""
        raise DatasetFormatError(f"image folder {folder} contains no {IMAGE_SUFFIX} files{hint}")
    if others:
        warnings.warn(
            f"{folder}: ignoring {len(others)} non-{IMAGE_SUFFIX} image files (e.g. {others[0].name}); "
            f"the benchmark reads {IMAGE_SUFFIX} only",
            stacklevel=2,
        )
    return paths


# ---------------------------------------------------------------------------------------------
# Positives.


@dataclasses.dataclass(frozen=True, repr=False)
class Positives(Sequence):
    """For each query, the sorted database indices within a radius; compressed-row storage.

    positives[q] is an int64 array (a view, no copy). Storage is O(number of positive pairs),
    so it scales to millions of queries.

    Attributes:
      indptr: int64 [Q + 1]; query q's positives are indices[indptr[q]:indptr[q + 1]].
      indices: int64 [P], database indices, ascending within each query.
    """

    indptr: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, q: int) -> np.ndarray:
        if isinstance(q, slice):
            raise TypeError("Positives supports integer indexing only")
        q = range(len(self))[q]
        return self.indices[self.indptr[q]:self.indptr[q + 1]]

    def counts(self) -> np.ndarray:
        """int64 [Q]: number of positives of each query."""
        return np.diff(self.indptr)

    def __repr__(self) -> str:
        counts = self.counts()
        return (f"Positives({len(self)} queries, {len(self.indices)} pairs, "
                f"{int((counts == 0).sum())} without any positive)")


def positives_within(query_utm: np.ndarray, database_utm: np.ndarray, radius_m: float,
                     chunk_size: int = 65536) -> Positives:
    """Database points within `radius_m` (Euclidean, inclusive) of each query.

    Uses KD-trees over query chunks, so memory is O(DB + pairs), never O(Q x DB).

    Args:
      query_utm: float [Q, 2] east/north in metres.
      database_utm: float [DB, 2].
      radius_m: the radius; a database point at exactly this distance is a positive.
      chunk_size: queries per KD-tree pass (bounds the temporary pair buffer).
    """
    if not radius_m >= 0:
        raise ValueError(f"radius_m must be >= 0, got {radius_m}")
    query_utm = np.asarray(query_utm, dtype=np.float64).reshape(-1, 2)
    database_tree = cKDTree(np.asarray(database_utm, dtype=np.float64).reshape(-1, 2))
    counts, indices = [], []
    for start in range(0, len(query_utm), chunk_size):
        chunk = query_utm[start:start + chunk_size]
        pairs = cKDTree(chunk).sparse_distance_matrix(database_tree, radius_m, output_type="ndarray")
        order = np.lexsort((pairs["j"], pairs["i"]))
        indices.append(pairs["j"][order].astype(np.int64))
        counts.append(np.bincount(pairs["i"], minlength=len(chunk)))
    indptr = np.zeros(len(query_utm) + 1, dtype=np.int64)
    if counts:
        np.cumsum(np.concatenate(counts), out=indptr[1:])
    flat = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    return Positives(indptr=indptr, indices=flat)


# ---------------------------------------------------------------------------------------------
# Splits.


@dataclasses.dataclass(frozen=True, repr=False)
class Split:
    """One split (train/val/test) of a dataset: images, their positions and positives.

    Indices: database image i is database_paths[i]; query q is query_paths[q].

    Attributes:
      name: the split name, e.g. "test".
      folder: the split folder (holding database/ and the queries folder).
      database_paths, query_paths: sorted absolute-or-given paths (str).
      database_utm, query_utm: float64 [N, 2], east/north in metres.
      database_fields, query_fields: every @-field as a column (see FIELD_NAMES):
        float64 [N] with NaN for empty numeric fields, str [N] for the others.
      positive_dist_m: the radius used for `positives`.
      positives: for each query, sorted database indices within positive_dist_m (inclusive).
      has_labels: False for queries without coordinates (`load_folders(labels=False)`): their
        UTM is NaN, they have no positives, and no recall is computed.
    """

    name: str
    folder: Path
    database_paths: list[str]
    query_paths: list[str]
    database_utm: np.ndarray
    query_utm: np.ndarray
    database_fields: dict[str, np.ndarray]
    query_fields: dict[str, np.ndarray]
    positive_dist_m: float
    positives: Positives
    has_labels: bool = True

    @property
    def num_database(self) -> int:
        return len(self.database_paths)

    @property
    def num_queries(self) -> int:
        return len(self.query_paths)

    def positives_within(self, radius_m: float) -> Positives:
        """Positives for another radius, e.g. the 10 m hard positives used in training."""
        return positives_within(self.query_utm, self.database_utm, radius_m)

    def __repr__(self) -> str:
        return (f"< Split {self.folder} - #database: {self.num_database}; "
                f"#queries: {self.num_queries}; positives within {self.positive_dist_m:g} m >")


def _warn_on_mixed_zones(split_folder: Path, *field_tables: dict[str, np.ndarray]) -> None:
    zones = collections.Counter()
    for table in field_tables:
        numbers, letters = table["zone_number"], table["zone_letter"]
        for number, letter in zip(numbers, letters):
            if not math.isnan(number) or letter:
                zones[f"{'' if math.isnan(number) else int(number)}{letter}"] += 1
    if len(zones) > 1:
        warnings.warn(
            f"{split_folder}: images span several UTM zones {dict(zones)}; distances are planar in "
            "metres and assume a single zone, so positives across zones are wrong",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------
# Manifests: what a vgjax tool wrote, so that a folder changed since is noticed.

MANIFEST = "vgjax_manifest.json"


def _names_digest(paths: Sequence[str]) -> str:
    """sha256 of the sorted base names, one per line."""
    return hashlib.sha256("\n".join(sorted(os.path.basename(p) for p in paths)).encode()).hexdigest()


def write_manifest(dataset_dir: str | os.PathLike, tool: str, folders: Sequence[Path] | None = None) -> Path:
    """Writes (or updates) `dataset_dir`/vgjax_manifest.json: for each image folder (`folders`,
    default every one below it), its image count, the sha256 of its sorted names, and the tool
    and vgjax version that wrote it."""
    from vgjax import __version__  # the package's version, read when a manifest is written

    dataset_dir = Path(dataset_dir)
    path = dataset_dir / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {"folders": {}}
    for folder in folders if folders is not None else sorted({image.parent for image in dataset_dir.rglob("*.jpg")}):
        names = [image.name for image in folder.glob("*.jpg")]
        manifest["folders"][folder.relative_to(dataset_dir).as_posix()] = {
            "count": len(names), "names_sha256": _names_digest(names), "tool": f"vgjax {__version__} {tool}"}
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def _check_manifest(dataset_dir: Path, folder: Path, paths: Sequence[str]) -> None:
    """Warns when `folder`'s images differ from what the dataset's manifest recorded."""
    manifest = dataset_dir / MANIFEST
    if not manifest.is_file():
        return
    try:
        relative = folder.resolve().relative_to(dataset_dir.resolve()).as_posix()
        entry = json.loads(manifest.read_text())["folders"].get(relative)
    except (ValueError, KeyError, json.JSONDecodeError):
        warnings.warn(f"{manifest}: not a vgjax manifest, or {folder} is not in it", stacklevel=3)
        return
    if entry is None:
        return
    if entry["count"] != len(paths) or entry["names_sha256"] != _names_digest(paths):
        warnings.warn(f"{folder} no longer matches {manifest}: {len(paths)} images where {entry['tool']} wrote "
                      f"{entry['count']}{'' if entry['count'] != len(paths) else ', with other names'}", stacklevel=3)


def _empty_fields(count: int) -> dict[str, np.ndarray]:
    """Columns of `count` names without fields: NaN numbers, empty strings."""
    return {name: np.full(count, np.nan) if name in NUMERIC_FIELDS else np.full(count, "", dtype=str)
            for name in FIELD_NAMES}


def _fields_or_empty(paths: Sequence[str]) -> dict[str, np.ndarray]:
    """The @-fields of `paths` when every name carries them, else `_empty_fields`."""
    try:
        return _field_table(paths)
    except DatasetFormatError:
        return _empty_fields(len(paths))


def load_folders(database_folder: str | os.PathLike, queries_folder: str | os.PathLike,
                 positive_dist_m: float = 25.0, *, labels: bool = True) -> Split:
    """Any two folders of images (.jpg, .jpeg, .png, recursive) as a split named "folders".

    With `labels`, every file name must carry its position in the VG format (its UTM east and
    north) and the positives are computed as in `load_split`. Without, the queries' positions
    are unknown (NaN, no positives, has_labels False); the database's fields are kept when all
    its names carry them, so predictions can still give positions.

    Raises:
      FileNotFoundError, DatasetFormatError: naming the folder or the file.
    """
    database_paths = list_images(database_folder, any_type=True)
    query_paths = list_images(queries_folder, any_type=True)
    if labels:
        try:
            database_fields, query_fields = _field_table(database_paths), _field_table(query_paths)
        except DatasetFormatError as error:
            raise DatasetFormatError(f"{error}; for images without coordinates in their names, evaluate "
                                     "without labels (--no_labels)") from None
    else:
        database_fields, query_fields = _fields_or_empty(database_paths), _empty_fields(len(query_paths))
    database_utm = np.stack([database_fields["east"], database_fields["north"]], axis=1)
    query_utm = np.stack([query_fields["east"], query_fields["north"]], axis=1)
    positives = (positives_within(query_utm, database_utm, positive_dist_m) if labels
                 else Positives(np.zeros(len(query_paths) + 1, np.int64), np.zeros(0, np.int64)))
    folder = Path(os.path.commonpath([os.path.abspath(database_folder), os.path.abspath(queries_folder)]))
    return Split(name="folders", folder=folder, database_paths=database_paths, query_paths=query_paths,
                 database_utm=database_utm, query_utm=query_utm, database_fields=database_fields,
                 query_fields=query_fields, positive_dist_m=float(positive_dist_m), positives=positives,
                 has_labels=labels)


def load_split(dataset_dir: str | os.PathLike, split: str, positive_dist_m: float = 25.0, *,
               queries_folder: str = "queries") -> Split:
    """Loads one split of a dataset in the VG folder format.

    Args:
      dataset_dir: the dataset root, e.g. `datasets/pitts30k` (holding images/<split>/), or an
        MSLS-style root holding <split>/ directly.
      split: "train", "val" or "test" (any folder name works).
      positive_dist_m: radius for positives (25 m in the benchmark for val/test).
      queries_folder: name of the queries folder; SF-XL's test split uses "queries_v1".

    Returns:
      A Split. Queries without positives are kept (they count as misses in recall). A folder
      whose images differ from the dataset's vgjax_manifest.json (written by vgjax's dataset
      tools) gives a UserWarning.
    """
    folder = find_split_folder(dataset_dir, split)
    database_paths = list_images(folder / "database")
    query_paths = list_images(folder / queries_folder)
    for role, paths in (("database", database_paths), (queries_folder, query_paths)):
        _check_manifest(Path(dataset_dir), folder / role, paths)
    database_fields = _field_table(database_paths)
    query_fields = _field_table(query_paths)
    _warn_on_mixed_zones(folder, database_fields, query_fields)
    database_utm = np.stack([database_fields["east"], database_fields["north"]], axis=1)
    query_utm = np.stack([query_fields["east"], query_fields["north"]], axis=1)
    return Split(
        name=split,
        folder=folder,
        database_paths=database_paths,
        query_paths=query_paths,
        database_utm=database_utm,
        query_utm=query_utm,
        database_fields=database_fields,
        query_fields=query_fields,
        positive_dist_m=float(positive_dist_m),
        positives=positives_within(query_utm, database_utm, positive_dist_m),
    )

"""CosPlace's partition of a training folder into classes and groups (reference.md §5.2).

Every image falls into a class: a UTM cell of side M metres and a heading bin of alpha degrees,
`(e, n, h)` with e, n, h floored to multiples of M, M and alpha. Classes whose UTM cells are
M*N metres apart and whose headings are alpha*L degrees apart share a group
`((e % (M*N)) // M, (n % (M*N)) // M, (h % (alpha*L)) // alpha)`; CosPlace trains one classifier
per group. Classes with fewer than `min_images_per_class` images are dropped.

Orders reproduce CosPlace's `TrainDataset.initialize`, so classifier rows line up with its
released code and checkpoints:
- paths: `<folder>_images_paths.txt` in file order if that file exists, else the sorted
  non-hidden `**/*.jpg` below the folder (what `sorted(glob(..., recursive=True))` returns);
- groups: in order of first appearance (in path order) of a kept class of the group;
- classes inside a group: the iteration order of a Python set of `(e, n, h)` int tuples filled
  in order of first appearance, as CosPlace's `defaultdict(set)` is. Int tuple hashes do not
  depend on PYTHONHASHSEED, so the order is reproducible; it is the order CosPlace gets under the
  same CPython set and tuple-hash implementation (tuple hashing last changed in CPython 3.8).

The partition is cached (see `build_partition`): `<cache_dir>/<stem>.npz` holds the arrays
(no pickle), `<stem>.json` the metadata used to decide whether the cache is still valid.

Deliberate differences from CosPlace:
- East/north/heading are parsed from the file *name* (fields 1, 2 and 9), not from the whole
  relative path, so an `@` in a sub-folder name is harmless. Names are checked as
  `vg_folder.parse_image_name` checks them (14 fields, numbers), but only the three fields used
  are converted; the others are not validated.
- A missing heading, a heading outside [0, 360) or a non-finite east/north raise a
  DatasetFormatError naming the file (CosPlace crashes on the first, silently accepts the others).
- The cache is keyed by the folder's absolute path and all parameters, and is rebuilt when the
  folder's file names change (CosPlace keys it by the folder's base name and never rebuilds it).
- Directory symlink cycles are skipped instead of being followed until the path is too long, and
  a broken link is an error naming it (CosPlace's glob lists a broken `.jpg` link, which fails
  to open later, and drops a broken directory link silently).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vgjax.data.vg_folder import (
    FIELD_NAMES,
    IMAGE_SUFFIX,
    MAX_COORDINATE,
    DatasetFormatError,
    parse_image_name,
    walk_folder,
)

PATHS_FILE_SUFFIX = "_images_paths.txt"
CACHE_FORMAT_VERSION = 1
# A directory modified less than this before the listing started may change again within the same
# file-system timestamp tick, so its mtime cannot prove that it is unchanged (git's "racy" rule).
_RACY_MARGIN_NS = 2 * 10**9
_PARSE_CHUNK = 65536
_NUM_PARTS = len(FIELD_NAMES) + 2
_EAST, _NORTH, _HEADING = (1 + FIELD_NAMES.index(f) for f in ("east", "north", "heading"))


# ---------------------------------------------------------------------------------------------
# Configuration and ids.


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
    """CosPlace's partition options (reference.md §1.2; names as in its parser).

    Attributes:
      M: side of a UTM cell, metres.
      alpha: width of a heading bin, degrees.
      N: cells per side of the group lattice (same-group classes are M*N metres apart).
      L: heading groups (same-group classes are alpha*L degrees apart).
      groups_num: groups used for training, at most N*N*L.
      min_images_per_class: classes with fewer images are dropped.
    """

    M: int = 10
    alpha: int = 30
    N: int = 5
    L: int = 2
    groups_num: int = 8
    min_images_per_class: int = 10

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"PartitionConfig.{field.name} must be a positive integer, "
                                 f"got {value!r}")
            object.__setattr__(self, field.name, int(value))
        if self.groups_num > self.N * self.N * self.L:
            raise ValueError(
                f"PartitionConfig.groups_num={self.groups_num} exceeds N*N*L = "
                f"{self.N}*{self.N}*{self.L} = {self.N * self.N * self.L}, the number of groups")


def _describe(paths: Sequence[str] | None, i: int) -> str:
    return repr(paths[i]) if paths is not None else f"image index {i}"


def _first_bad(bad: np.ndarray, paths: Sequence[str] | None) -> tuple[int, str]:
    """Index of the first True in `bad` and a description naming its file and the count."""
    i = int(np.argmax(bad))
    others = int(bad.sum()) - 1
    return i, _describe(paths, i) + (f" (and {others} more)" if others else "")


def _check_coordinates(east: np.ndarray, north: np.ndarray, heading: np.ndarray,
                       paths: Sequence[str] | None) -> None:
    for name, values in (("east", east), ("north", north)):
        bad = ~(np.abs(values) < MAX_COORDINATE)
        if bad.any():
            i, where = _first_bad(bad, paths)
            raise DatasetFormatError(f"{where}: UTM {name} must be a finite number below 2**53 "
                                     f"in magnitude, got {float(values[i])}")
    missing = np.isnan(heading)
    if missing.any():
        _, where = _first_bad(missing, paths)
        raise DatasetFormatError(f"{where}: the heading (name field 9) is missing; CosPlace's "
                                 "classes need a heading in [0, 360) degrees")
    bad = ~((heading >= 0) & (heading < 360))
    if bad.any():
        i, where = _first_bad(bad, paths)
        raise DatasetFormatError(f"{where}: the heading must be in [0, 360) degrees, "
                                 f"got {float(heading[i])}")


def class_and_group_ids(east, north, heading, config: PartitionConfig,
                        paths: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CosPlace's class and group of each image (`get__class_id__group_id`, vectorized).

    Args:
      east, north: float [n], UTM metres.
      heading: float [n], degrees in [0, 360); NaN (an empty name field) is an error.
      config: the partition options (M, alpha, N, L are used).
      paths: optional [n] file names, only to name an offending file in errors.

    Returns:
      class_ids: int64 [n, 3], (e, n, h) = (east // M * M, north // M * M, heading // alpha * alpha)
        with float floor division as Python does it, truncated to int.
      group_ids: int64 [n, 3], ((e % (M*N)) // M, (n % (M*N)) // M, (h % (alpha*L)) // alpha),
        in [0, N) x [0, N) x [0, L).

    Raises:
      DatasetFormatError: non-finite east/north, or a missing or out-of-range heading.
    """
    east, north, heading = (np.asarray(x, dtype=np.float64).reshape(-1)
                            for x in (east, north, heading))
    if not len(east) == len(north) == len(heading):
        raise ValueError(f"east, north and heading must have the same length, got "
                         f"{len(east)}, {len(north)}, {len(heading)}")
    _check_coordinates(east, north, heading, paths)
    M, alpha, N, L = config.M, config.alpha, config.N, config.L
    e, n, h = ((np.floor_divide(x, step) * step).astype(np.int64)
               for x, step in ((east, M), (north, M), (heading, alpha)))
    class_ids = np.stack([e, n, h], axis=1)
    group_ids = np.stack([e % (M * N) // M, n % (M * N) // M, h % (alpha * L) // alpha], axis=1)
    return class_ids, group_ids


# ---------------------------------------------------------------------------------------------
# Grouping.


@dataclasses.dataclass(frozen=True, repr=False)
class ClassGroup(Sequence):
    """The classes of one group, in CosPlace's order; a list of classes in compressed rows.

    group[c] is an int64 array (a view) of the indices into Partition.paths of class c's images,
    ascending. Class c of group g is row c of CosPlace's classifier g.

    Attributes:
      class_ids: int64 [C, 3], (e, n, h) of each class.
      indptr: int64 [C + 1]; class c's images are indices[indptr[c]:indptr[c + 1]].
      indices: int64 [P].
    """

    class_ids: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.class_ids)

    def __getitem__(self, c: int) -> np.ndarray:
        if isinstance(c, slice):
            raise TypeError("ClassGroup supports integer indexing only")
        c = range(len(self))[c]
        return self.indices[self.indptr[c]:self.indptr[c + 1]]

    def images_per_class(self) -> np.ndarray:
        """int64 [C]: number of images of each class."""
        return np.diff(self.indptr)

    def __repr__(self) -> str:
        return f"ClassGroup({len(self)} classes, {len(self.indices)} images)"


@dataclasses.dataclass
class Partition:
    """A training folder split into CosPlace's groups of classes.

    Attributes:
      paths: image paths relative to the folder, in CosPlace's order (see the module docstring).
      groups: the first `groups_num` groups, in CosPlace's order.
    """

    paths: list[str]
    groups: list[ClassGroup]


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + size) for each (s, size); int64."""
    offsets = np.cumsum(sizes) - sizes
    return np.repeat(starts - offsets, sizes) + np.arange(int(sizes.sum()), dtype=np.int64)


def _set_order(class_ids: np.ndarray) -> np.ndarray:
    """Permutation giving the iteration order of a Python set filled with these rows in order.

    `set(list)` adds the items one by one, like CosPlace's `set.add` in image order (later adds
    of a class already present change nothing), so the layout, hence the order, is the same.
    """
    tuples = list(map(tuple, class_ids.tolist()))
    position = {t: i for i, t in enumerate(tuples)}
    return np.fromiter((position[t] for t in set(tuples)), np.int64, count=len(tuples))


def _group_arrays(class_ids: np.ndarray, group_ids: np.ndarray, config: PartitionConfig
                  ) -> dict[str, np.ndarray]:
    """All groups of kept classes, in CosPlace's order, as flat arrays.

    Returns:
      A dict with class_ids int64 [K, 3] (all kept classes, group by group), class_indptr
      int64 [K + 1] and indices int64 [P] (the images of each class, ascending), group_indptr
      int64 [G + 1] (group g holds classes group_indptr[g]:group_indptr[g + 1]).
    """
    n = len(class_ids)
    order = np.lexsort(class_ids.T[::-1])  # stable, so each class's images stay ascending
    sorted_ids = class_ids[order]
    is_start = np.ones(n, bool)
    is_start[1:] = (sorted_ids[1:] != sorted_ids[:-1]).any(axis=1)
    starts = np.flatnonzero(is_start)
    sizes = np.diff(np.append(starts, n))
    kept = sizes >= config.min_images_per_class
    starts, sizes = starts[kept], sizes[kept]
    by_appearance = np.argsort(order[starts])  # order[start] is the class's first image
    starts, sizes = starts[by_appearance], sizes[by_appearance]
    group_codes = group_ids[order[starts]] @ np.array([config.N * config.L, config.L, 1])
    _, first_class = np.unique(group_codes, return_index=True)
    group_rank = np.empty(config.N * config.N * config.L, np.int64)
    group_rank[group_codes[np.sort(first_class)]] = np.arange(len(first_class))
    class_rank = group_rank[group_codes]
    grouped = np.argsort(class_rank, kind="stable")
    starts, sizes = starts[grouped], sizes[grouped]
    group_indptr = np.zeros(len(first_class) + 1, np.int64)
    np.cumsum(np.bincount(class_rank, minlength=len(first_class)), out=group_indptr[1:])
    within = [a + _set_order(sorted_ids[starts[a:b]])
              for a, b in zip(group_indptr[:-1].tolist(), group_indptr[1:].tolist())]
    if within:
        permutation = np.concatenate(within)
        starts, sizes = starts[permutation], sizes[permutation]
    class_indptr = np.zeros(len(starts) + 1, np.int64)
    np.cumsum(sizes, out=class_indptr[1:])
    return {"class_ids": sorted_ids[starts], "class_indptr": class_indptr,
            "indices": order[_ranges(starts, sizes)], "group_indptr": group_indptr}


def _select_groups(arrays: dict[str, np.ndarray], config: PartitionConfig) -> list[ClassGroup]:
    group_indptr, class_indptr = arrays["group_indptr"], arrays["class_indptr"]
    available = len(group_indptr) - 1
    if config.groups_num > available:
        raise ValueError(
            f"groups_num={config.groups_num}, but only {available} groups have classes with >= "
            f"min_images_per_class={config.min_images_per_class} images; lower groups_num or "
            "min_images_per_class")
    groups = []
    for g in range(config.groups_num):
        first, last = int(group_indptr[g]), int(group_indptr[g + 1])
        begin, end = int(class_indptr[first]), int(class_indptr[last])
        groups.append(ClassGroup(class_ids=arrays["class_ids"][first:last],
                                 indptr=class_indptr[first:last + 1] - begin,
                                 indices=arrays["indices"][begin:end]))
    return groups


# ---------------------------------------------------------------------------------------------
# Listing and parsing.


def _list_jpgs(folder: str, progress: bool) -> tuple[list[str], dict[str, int]]:
    """Sorted relative paths of the non-hidden `*.jpg` below `folder`, as CosPlace's glob finds
    them (vg_folder.walk_folder), and the mtime (ns) of each directory visited, by its path."""
    names, mtimes = [], {}
    with tqdm(desc=f"listing {folder}", unit=" img", disable=not progress) as bar:
        for relative, mtime, files in walk_folder(folder):
            mtimes[os.path.join(folder, relative)] = mtime
            jpgs = [relative + name for name in files if name.endswith(IMAGE_SUFFIX)]
            names += jpgs
            bar.update(len(jpgs))
    if not names:
        raise DatasetFormatError(f"image folder {folder} contains no {IMAGE_SUFFIX} files")
    names.sort()
    return names, mtimes


def _read_paths_file(folder: str, paths_file: str) -> tuple[list[str], dict[str, int]]:
    """The relative paths in `paths_file` (in file order, as CosPlace keeps them), its mtime."""
    mtime = os.stat(paths_file).st_mtime_ns
    with open(paths_file, encoding="utf-8") as file:
        names = file.read().splitlines()
    if not names:
        raise DatasetFormatError(f"{paths_file} lists no image")
    if not os.path.exists(os.path.join(folder, names[0])):
        raise FileNotFoundError(f"{paths_file} lists {names[0]!r}, which does not exist in "
                                f"{folder}; the file is probably wrong or stale")
    return names, {paths_file: mtime}


def _read_images_paths(folder: str, paths_file: str, progress: bool
                       ) -> tuple[list[str], dict[str, int]]:
    if os.path.exists(paths_file):
        return _read_paths_file(folder, paths_file)
    return _list_jpgs(folder, progress)


def _east_north_heading(path: str) -> tuple[float, float, float]:
    """Fields 1, 2, 9 of the name (NaN heading if empty); errors as parse_image_name's."""
    name = path.rpartition("/")[2]
    parts = name.split("@")
    if len(parts) == _NUM_PARTS and name.endswith("@" + IMAGE_SUFFIX):
        try:
            return float(parts[_EAST]), float(parts[_NORTH]), float(parts[_HEADING] or "nan")
        except ValueError:
            pass
    fields = parse_image_name(path)  # raises the error naming the file
    return fields["east"], fields["north"], fields["heading"]


def _parse_coordinates(paths: Sequence[str], progress: bool) -> np.ndarray:
    """float64 [n, 3]: east, north, heading of each path."""
    coordinates = np.empty((len(paths), 3))
    with tqdm(total=len(paths), desc="parsing names", unit=" img", disable=not progress) as bar:
        for start in range(0, len(paths), _PARSE_CHUNK):
            chunk = paths[start:start + _PARSE_CHUNK]
            coordinates[start:start + len(chunk)] = [_east_north_heading(p) for p in chunk]
            bar.update(len(chunk))
    return coordinates


def _encoded_chunks(paths: Sequence[str]):
    """The paths as \\0-separated UTF-8, in chunks; b"\\0".join(chunks) holds them all."""
    for start in range(0, len(paths), _PARSE_CHUNK):
        yield "\0".join(paths[start:start + _PARSE_CHUNK]).encode("utf-8", "surrogateescape")


def _fingerprint(paths: Sequence[str]) -> str:
    """'<count>-<sha256 of the paths, in order>'."""
    digest = hashlib.sha256()
    for chunk in _encoded_chunks(paths):
        digest.update(chunk)
        digest.update(b"\0")
    return f"{len(paths)}-{digest.hexdigest()}"


# ---------------------------------------------------------------------------------------------
# Cache.


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/vgjax/partitions`, or `~/.cache/vgjax/partitions`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vgjax" / "partitions"


def _cache_stem(folder: str, config: PartitionConfig) -> str:
    """`<basename>_M.._alpha.._N.._L.._mipc.._<hash of folder, options and format version>`.

    groups_num is not part of it: every group is cached."""
    key = {"folder": folder, "M": config.M, "alpha": config.alpha, "N": config.N, "L": config.L,
           "min_images_per_class": config.min_images_per_class, "version": CACHE_FORMAT_VERSION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (f"{os.path.basename(folder)}_M{config.M}_alpha{config.alpha}_N{config.N}_L{config.L}"
            f"_mipc{config.min_images_per_class}_{digest}")


def _write_atomic(path: Path, write) -> None:
    """Calls write(binary file) on a temporary file next to `path`, then renames it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _read_metadata(path: Path) -> dict | None:
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return metadata if metadata.get("format_version") == CACHE_FORMAT_VERSION else None


def _unchanged_since_listing(metadata: dict, paths_file: str) -> bool:
    """Whether the recorded mtimes prove that the listing would give the same paths.

    Adding, removing or renaming an entry changes its directory's mtime, and a new sub-folder
    changes its parent's, so stat-ing the recorded directories (or the paths file) suffices."""
    if (metadata["paths_file"] is not None) != os.path.exists(paths_file):
        return False
    for path, mtime in metadata["sources"].items():
        if mtime >= metadata["listed_at_ns"] - _RACY_MARGIN_NS:
            return False
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return False
        except OSError:
            return False
    return True


def _load_arrays(path: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    """The cached arrays if `path` holds a readable cache of that fingerprint, else None."""
    try:
        with np.load(path) as data:
            if str(data["fingerprint"]) != fingerprint:
                return None
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


def _save_arrays(path: Path, arrays: dict[str, np.ndarray], paths: Sequence[str],
                 fingerprint: str) -> None:
    blob = b"\0".join(_encoded_chunks(paths))
    _write_atomic(path, lambda file: np.savez(
        file, paths=np.frombuffer(blob, np.uint8), fingerprint=np.array(fingerprint), **arrays))


def _paths_from_arrays(arrays: dict[str, np.ndarray]) -> list[str]:
    return arrays["paths"].tobytes().decode("utf-8", "surrogateescape").split("\0")


def build_partition(folder: str | os.PathLike, config: PartitionConfig = PartitionConfig(),
                    cache_dir: str | os.PathLike | None = None, progress: bool = True
                    ) -> Partition:
    """CosPlace's classes and groups of a training folder, cached on disk.

    Args:
      folder: the training images, `<folder>/**/*.jpg`, or listed (relative paths, one per line)
        in `<folder>_images_paths.txt` if that file exists.
      config: the partition options.
      cache_dir: where to cache; default `default_cache_dir()`. The cache is
        `<stem>.npz` (paths as \\0-separated UTF-8 bytes, all groups' arrays, the fingerprint;
        no pickle) plus `<stem>.json` (metadata), stem from `_cache_stem`: the folder's
        absolute path and every option but groups_num (all groups are cached). Both are
        written atomically (temporary file + rename).
      progress: show tqdm bars while listing and parsing.

    The cache is reused without listing the folder when the mtimes recorded for every directory
    (or for the paths file) are unchanged and older than the listing by 2 s (else they cannot
    prove it). Otherwise the folder is listed and the cache reused only if the fingerprint (count
    and SHA-256 of the relative paths) matches, then its metadata are refreshed.

    Raises:
      FileNotFoundError: no such folder.
      DatasetFormatError: no images, or a bad name (see class_and_group_ids).
      ValueError: fewer groups than config.groups_num have kept classes.
    """
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"training folder {folder} does not exist")
    paths_file = folder + PATHS_FILE_SUFFIX
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = cache_dir / _cache_stem(folder, config)
    npz_path, json_path = Path(f"{stem}.npz"), Path(f"{stem}.json")
    metadata = _read_metadata(json_path)
    if metadata is not None and _unchanged_since_listing(metadata, paths_file):
        arrays = _load_arrays(npz_path, metadata["fingerprint"])
        if arrays is not None:
            return Partition(paths=_paths_from_arrays(arrays),
                             groups=_select_groups(arrays, config))
    listed_at_ns = time.time_ns()
    paths, sources = _read_images_paths(folder, paths_file, progress)
    fingerprint = _fingerprint(paths)
    arrays = _load_arrays(npz_path, fingerprint)
    if arrays is None:
        coordinates = _parse_coordinates(paths, progress)
        arrays = _group_arrays(*class_and_group_ids(*coordinates.T, config, paths=paths), config)
        _save_arrays(npz_path, arrays, paths, fingerprint)
    metadata = {"format_version": CACHE_FORMAT_VERSION, "folder": folder,
                "config": {k: v for k, v in dataclasses.asdict(config).items()
                           if k != "groups_num"},
                "paths_file": paths_file if paths_file in sources else None,
                "fingerprint": fingerprint, "num_images": len(paths),
                "listed_at_ns": listed_at_ns, "sources": sources}
    _write_atomic(json_path, lambda file: file.write(json.dumps(metadata, indent=1).encode()))
    return Partition(paths=paths, groups=_select_groups(arrays, config))

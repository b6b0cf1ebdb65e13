"""Packed splits: a VG folder split in array_record shards, images already at the training size.

`pack_split` writes, for the database and the queries of one split, array_record shards
(`group_size:1`, uncompressed: random access by index, as grain wants) with one record per image
in the folder's (sorted) order, and a `manifest.json`. `open_packed` validates a packed folder and
gives each subset's `grain.sources.ArrayRecordDataSource` and paths; `PackedSplit.loader` is a
path -> image function the pipelines take instead of decoding the folder's files.

Record format (version 1), no pickle:
  b"VGP1" | uint32 little-endian n | n bytes of UTF-8 JSON metadata | image payload
  metadata: {"path": path relative to the split folder, "fields": the 14 @-fields (numbers as
  floats, empty numeric fields as null), "encoding": "jpeg" | "raw", "shape": [H, W, 3]}
  payload: JPEG file bytes, or raw uint8 [H, W, 3] in C order.

Encodings, measured with benchmarks/pipeline.py --quick (3 runs on 2 shared cores, warm page
cache, 480x640 photo-like source JPEGs of 67 KB; ranges span the runs):
- "jpeg" (default): the image resized with the training resize (PIL bilinear,
  `images.resize_pil_bilinear`) and re-encoded at `quality` with 4:4:4 chroma. A source JPEG
  that already has the target size is stored *verbatim* (no re-encoding), so it decodes
  bit-exactly as the folder does, packing is a copy, and reading runs at the folder's rate
  (0.8-1.15x: same decode). When the sources are larger than the training size the resize is
  paid once at packing: 480x640 -> 120x160 reads 6-15x faster (1300-2800 vs 170-290 img/s).
  Re-encoding costs a JPEG error of mean ~1, max ~9-12 grey levels at 480x640 (quality 95).
- "raw": exact and 2.3-4.4x faster to read than decoding a 480x640 JPEG (1000-2300 img/s), but
  923 KB per 480x640 image, 13x the JPEG's 69 KB. Read from disk at this machine's 0.6-1 GB/s
  that is 0.9-1.6 ms per image, no faster than decoding the JPEG (~2 ms), so raw pays only when
  the packed split stays in the page cache; hence JPEG is the default.

Images are stored at one size. The pipelines' resize to that size is then a no-op, so packed
training batches equal the folder's (exactly for raw and verbatim JPEG). Evaluation differs:
hard_resize uses torch's bilinear (`images.resize_bilinear`, no antialiasing), so packed images
match it only where the sources already have the packed size (Pitts30k at 480x640); the other
test methods need the original resolution and must read the folder.

A pack is built in `<out_dir>.partial` and renamed when complete, and the manifest is written
last: a folder without a manifest is an interrupted pack and is rejected.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from PIL import Image
from tqdm.auto import tqdm

from vgjax.data import images as image_ops
from vgjax.data import vg_folder

FORMAT = "vgjax-packed-split"
VERSION = 1
MANIFEST = "manifest.json"
SUBSETS = ("database", "queries")
ENCODINGS = ("jpeg", "raw")
WRITER_OPTIONS = "group_size:1,uncompressed"  # JPEG does not compress further; raw is read as-is
_MANIFEST_KEYS = ("image_size", "encoding", "source", "subsets")
_HEADER = struct.Struct("<4sI")
_MAGIC = b"VGP1"


class PackedFormatError(ValueError):
    """A packed split is incomplete, inconsistent or does not match what the caller needs."""


# ---------------------------------------------------------------------------------------------
# Records.


@dataclasses.dataclass(frozen=True)
class PackedRecord:
    """One decoded record: image uint8 [H, W, 3], its path relative to the split folder and its
    @-fields (as `vg_folder.parse_image_name` returns them: NaN for empty numeric fields)."""

    image: np.ndarray
    path: str
    fields: dict[str, float | str]


def _json_fields(fields: dict[str, float | str]) -> dict[str, float | str | None]:
    return {name: None if isinstance(value, float) and math.isnan(value) else value
            for name, value in fields.items()}


def encode_record(relative_path: str, fields: dict[str, float | str], encoding: str,
                  shape: Sequence[int], payload: bytes) -> bytes:
    """Serializes one record (see the module docstring for the layout)."""
    metadata = json.dumps({"path": relative_path, "fields": _json_fields(fields),
                           "encoding": encoding, "shape": list(shape)}).encode()
    return _HEADER.pack(_MAGIC, len(metadata)) + metadata + payload


def _split_record(record: bytes) -> tuple[dict, memoryview]:
    """(metadata, payload) of a serialized record."""
    if len(record) < _HEADER.size:
        raise PackedFormatError(f"record of {len(record)} bytes is shorter than its header")
    magic, length = _HEADER.unpack_from(record)
    if magic != _MAGIC:
        raise PackedFormatError(f"record starts with {magic!r}, expected {_MAGIC!r} "
                                f"(format version {VERSION})")
    end = _HEADER.size + length
    return json.loads(record[_HEADER.size:end]), memoryview(record)[end:]


def _decode_payload(metadata: dict, payload: memoryview) -> np.ndarray:
    """uint8 [H, W, 3] from a record's payload, checked against its recorded shape."""
    shape = tuple(metadata["shape"])
    if metadata["encoding"] == "raw":
        if len(payload) != math.prod(shape):
            raise PackedFormatError(f"{metadata['path']}: raw payload of {len(payload)} bytes, "
                                    f"expected {math.prod(shape)} for shape {shape}")
        return np.frombuffer(payload, np.uint8).reshape(shape)
    with Image.open(io.BytesIO(payload)) as image:
        decoded = np.asarray(image.convert("RGB"))
    if decoded.shape != shape:
        raise PackedFormatError(f"{metadata['path']}: JPEG of shape {decoded.shape}, recorded {shape}")
    return decoded


def decode_record(record: bytes) -> PackedRecord:
    """Parses a serialized record, decoding its image."""
    metadata, payload = _split_record(record)
    fields = {name: math.nan if value is None else value for name, value in metadata["fields"].items()}
    return PackedRecord(image=_decode_payload(metadata, payload), path=metadata["path"], fields=fields)


def decode_image(record: bytes) -> np.ndarray:
    """uint8 [H, W, 3]: the image of a serialized record."""
    return _decode_payload(*_split_record(record))


# ---------------------------------------------------------------------------------------------
# Writing.


def _jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    """JPEG with 4:4:4 chroma: PIL's default 4:2:0 about doubles the error for 25% fewer bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def _image_payload(path: str, image_size: tuple[int, int], encoding: str, quality: int) -> bytes:
    """The stored bytes of one image at image_size (H, W): a same-size source JPEG verbatim, else
    decoded, resized as the training pipeline does and encoded."""
    try:
        with image_ops.open_image(path) as image:
            if (encoding == "jpeg" and image.format == "JPEG" and image.size == image_size[::-1]
                    and not image_ops.is_rotated(image)):
                return Path(path).read_bytes()
            rgb = image_ops.upright_rgb(image)
    except image_ops.OPEN_ERRORS as error:
        raise OSError(f"cannot read image {path}: {error}") from error
    resized = image_ops.resize_pil_bilinear(rgb, image_size)
    return resized.tobytes() if encoding == "raw" else _jpeg_bytes(resized, quality)


class _EncodeImage(grain.transforms.Map):
    """path -> serialized record; runs on grain's reader threads."""

    def __init__(self, split_folder: Path, image_size: tuple[int, int], encoding: str, quality: int):
        self._split_folder = split_folder
        self._image_size = image_size
        self._encoding = encoding
        self._quality = quality

    def map(self, path: str) -> bytes:
        payload = _image_payload(path, self._image_size, self._encoding, self._quality)
        return encode_record(os.path.relpath(path, self._split_folder), vg_folder.parse_image_name(path),
                             self._encoding, (*self._image_size, 3), payload)


def _shard_name(subset: str, shard: int, num_shards: int) -> str:
    return f"{subset}-{shard:05d}-of-{num_shards:05d}.array_record"


def _write_subset(out_dir: Path, subset: str, paths: list[str], split_folder: Path, encoder: _EncodeImage,
                  records_per_shard: int, num_threads: int, progress: bool) -> dict:
    """Writes the shards of one subset (paths under split_folder); returns its manifest entry."""
    num_shards = max(1, math.ceil(len(paths) / records_per_shard))
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * num_threads)
    records = grain.MapDataset.source(paths).map(encoder).to_iter_dataset(read_options)
    shards, writer = [], None
    try:
        for i, record in enumerate(tqdm(records, total=len(paths), desc=f"packing {subset}", unit="img",
                                        disable=not progress, leave=False)):
            if i % records_per_shard == 0:
                if writer:
                    writer.close()
                shards.append({"file": _shard_name(subset, len(shards), num_shards), "records": 0})
                writer = ArrayRecordWriter(str(out_dir / shards[-1]["file"]), WRITER_OPTIONS)
            writer.write(record)
            shards[-1]["records"] += 1
    finally:
        if writer:
            writer.close()
    return {"count": len(paths), "shards": shards,
            "paths": [os.path.relpath(p, split_folder) for p in paths]}


def pack_split(dataset_dir: str | os.PathLike, split: str, out_dir: str | os.PathLike,
               image_size: tuple[int, int], *, encoding: str = "jpeg", quality: int = 95,
               records_per_shard: int = 1000, queries_folder: str = "queries", num_threads: int = 2,
               progress: bool = True) -> Path:
    """Packs one split of a VG folder dataset into `out_dir`.

    Args:
      dataset_dir, split, queries_folder: as `vg_folder.load_split`.
      out_dir: the packed folder to create (it must not exist).
      image_size: (H, W) the images are resized to (the training `config.data.resize`).
      encoding: "jpeg" (re-encoded at `quality`; same-size source JPEGs copied verbatim) or "raw".
      records_per_shard: images per array_record file.
      num_threads: threads decoding, resizing and encoding.

    Returns:
      out_dir, holding `{database,queries}-NNNNN-of-NNNNN.array_record` and `manifest.json`.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; delete it to pack again")
    split_folder = vg_folder.find_split_folder(dataset_dir, split)
    image_size = (int(image_size[0]), int(image_size[1]))
    encoder = _EncodeImage(split_folder, image_size, encoding, quality)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    subsets = {}
    for subset, folder_name in zip(SUBSETS, ("database", queries_folder)):
        paths = vg_folder.list_images(split_folder / folder_name)
        subsets[subset] = _write_subset(partial, subset, paths, split_folder, encoder, records_per_shard,
                                        num_threads, progress)
    manifest = {"format": FORMAT, "version": VERSION, "image_size": list(image_size),
                "encoding": encoding, "quality": quality if encoding == "jpeg" else None,
                "source": os.path.abspath(split_folder), "split": split, "subsets": subsets}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")  # last: marks completion
    partial.rename(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass(frozen=True)
class PackedSubset:
    """The database or the queries of a packed split: record i is the image relative_paths[i]."""

    shards: tuple[Path, ...]
    relative_paths: tuple[str, ...]

    def data_source(self) -> grain.sources.ArrayRecordDataSource:
        """Random access to the serialized records (decode them with `decode_record`)."""
        return grain.sources.ArrayRecordDataSource([str(s) for s in self.shards])


class PackedLoader:
    """path -> uint8 [H, W, 3], read from a packed split instead of the image file.

    Thread-safe and picklable (grain threads and worker processes). Paths are matched after
    `os.path.abspath`, so relative and absolute spellings of the same file both work.
    """

    def __init__(self, packed: PackedSplit, split_folder: str | os.PathLike):
        self._name = f"packed split {packed.folder}"
        self._sources = {subset: packed.subset(subset).data_source() for subset in SUBSETS}
        self._index = {os.path.abspath(os.path.join(split_folder, rel)): (subset, i)
                       for subset in SUBSETS for i, rel in enumerate(packed.subset(subset).relative_paths)}

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        key = os.path.abspath(path)
        if key not in self._index:
            raise KeyError(f"{path} is not in the {self._name}")
        subset, index = self._index[key]
        try:
            return decode_image(self._sources[subset][index])
        except (OSError, ValueError) as error:
            raise OSError(f"{self._name}: cannot decode the record of {path}: {error}") from error


@dataclasses.dataclass(frozen=True)
class PackedSplit:
    """A validated packed split (see `open_packed`).

    Attributes:
      folder: the packed folder.
      source: the split folder it was packed from (images/<split>).
      image_size: (H, W) of every stored image.
      encoding: "jpeg" or "raw".
      database, queries: the two subsets, in the folder's sorted order.
    """

    folder: Path
    source: Path
    image_size: tuple[int, int]
    encoding: str
    database: PackedSubset
    queries: PackedSubset

    def subset(self, name: str) -> PackedSubset:
        if name not in SUBSETS:
            raise ValueError(f"subset must be one of {SUBSETS}, got {name!r}")
        return getattr(self, name)

    @property
    def database_paths(self) -> list[str]:
        """The original paths (under `source`), in record order, as `load_split` lists them."""
        return [str(self.source / rel) for rel in self.database.relative_paths]

    @property
    def query_paths(self) -> list[str]:
        return [str(self.source / rel) for rel in self.queries.relative_paths]

    def loader(self, split: vg_folder.Split | None = None) -> PackedLoader:
        """A path -> image function for `pipeline.inference_batches` / `triplet_batches`.

        Args:
          split: the folder split whose paths the pipelines will ask for; its images must be the
            packed ones in the same order (checked). None: the paths under `source`.
        """
        if split is None:
            return PackedLoader(self, self.source)
        for subset, paths in zip(SUBSETS, (split.database_paths, split.query_paths)):
            _check_same_images(self, subset, [os.path.relpath(p, split.folder) for p in paths], split.folder)
        return PackedLoader(self, split.folder)


def _check_same_images(packed: PackedSplit, subset: str, relative_paths: list[str], folder: Path) -> None:
    packed_paths = packed.subset(subset).relative_paths
    if len(packed_paths) != len(relative_paths):
        raise PackedFormatError(f"{packed.folder} holds {len(packed_paths)} {subset} images but {folder} "
                                f"has {len(relative_paths)}; pack the split again")
    for i, (ours, theirs) in enumerate(zip(packed_paths, relative_paths)):
        if ours != theirs:
            raise PackedFormatError(f"{packed.folder}: {subset} image {i} is {ours} but {folder} has "
                                    f"{theirs}; pack the split again")


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".partial")
        hint = f" ({partial} is an interrupted pack: delete it and pack again)" if partial.exists() else ""
        raise FileNotFoundError(f"packed split {folder} does not exist{hint}")
    if not path.is_file():
        raise PackedFormatError(f"{path} is missing: {folder} is an interrupted pack or not a packed "
                                "split; delete it and pack again")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PackedFormatError(f"{path}: unreadable manifest: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PackedFormatError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise PackedFormatError(f"{path}: format version {manifest.get('version')}, this vgjax reads "
                                f"version {VERSION}; pack the split again")
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
    missing += [f"subsets.{name}" for name in SUBSETS if name not in manifest.get("subsets", {})]
    if missing:
        raise PackedFormatError(f"{path}: manifest lacks {missing}")
    return manifest


def _open_subset(folder: Path, name: str, entry: dict) -> PackedSubset:
    """Checks that every shard exists and holds the records the manifest lists."""
    manifest = folder / MANIFEST
    shards = []
    for shard in entry["shards"]:
        path = folder / shard["file"]
        if not path.is_file():
            raise PackedFormatError(f"{path} is missing ({manifest} lists it)")
        try:
            reader = ArrayRecordReader(str(path))
            records = reader.num_records()
            reader.close()
        except (OSError, RuntimeError, ValueError) as error:
            raise PackedFormatError(f"{path}: unreadable array_record shard: {error}") from error
        if records != shard["records"]:
            raise PackedFormatError(f"{path} holds {records} records, {manifest} says {shard['records']}")
        shards.append(path)
    total = sum(shard["records"] for shard in entry["shards"])
    if not total == entry["count"] == len(entry["paths"]):
        raise PackedFormatError(f"{manifest}: {name} has {entry['count']} images, {len(entry['paths'])} "
                                f"paths and {total} records in its shards")
    return PackedSubset(shards=tuple(shards), relative_paths=tuple(entry["paths"]))


def open_packed(folder: str | os.PathLike, image_size: tuple[int, int] | None = None) -> PackedSplit:
    """Opens and validates a packed split.

    Args:
      folder: written by `pack_split`.
      image_size: (H, W) the caller needs; a pack of another size is an error. None: any.

    Raises:
      FileNotFoundError: the folder does not exist (an interrupted pack is named).
      PackedFormatError: naming the file, if the manifest is missing (interrupted pack), of
        another format or version, of another image size, or a shard is missing or incomplete.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    stored = tuple(manifest["image_size"])
    if image_size is not None and stored != tuple(image_size):
        raise PackedFormatError(f"{folder / MANIFEST}: images are packed at {stored[0]}x{stored[1]}, "
                                f"but {image_size[0]}x{image_size[1]} is needed; pack the split at that size")
    subsets = {name: _open_subset(folder, name, manifest["subsets"][name]) for name in SUBSETS}
    return PackedSplit(folder=folder, source=Path(manifest["source"]), image_size=stored,
                       encoding=manifest["encoding"], **subsets)

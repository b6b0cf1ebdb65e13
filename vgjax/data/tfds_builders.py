"""tensorflow-datasets builders that pack images at the training size in array_record: the
splits of a VG folder dataset (`VgFolderPack`), or GSV-Cities' cities (`GsvCitiesPack`).

The source folder is tfds's manual data. tfds does the record format (tf.Example), the shards,
`dataset_info.json` / `features.json` / `metadata.json` (counts per split, feature specs,
version) and the build in an `incomplete.*` folder renamed when complete; `build` adds deleting
what a killed build left, and writes the records uncompressed (`_UncompressedArrayRecord`).
Examples keep the source's order (`disable_shuffling`, keyed by index). Features:
  image: the image at `image_size` (H, W): JPEG bytes (`tfds.features.Image`) or raw uint8
    [H, W, 3] (`tfds.features.Tensor`, stored as bytes), see `stored_image`;
  path: the file's path relative to the source folder;
  VG folders: the 14 @-fields of the name (exact float64 for numeric ones, NaN when empty; text
    else), one split per (split, database|queries), e.g. `train_database`;
  GSV-Cities: place_id (GSV-Cities' unique id, city offset included) and city; one split `train`.
The relative paths, in record order, are also in the metadata, so a reader maps a path to its
record without decoding anything (vgjax.data.packed reads the packs).

Encodings, measured with benchmarks/pipeline.py --quick (2 shared cores, warm page cache, 480x640
photo-like source JPEGs of 67 KB; figures in benchmarks/README.md):
- "jpeg" (default): the image resized with the training resize (PIL bilinear,
  `images.resize_pil_bilinear`) and re-encoded at `quality` with 4:4:4 chroma. A source JPEG
  that already has the target size (and no EXIF rotation) is stored *verbatim*, so it decodes
  bit-exactly as the folder does and reads at the folder's rate. When the sources are larger
  than the training size the resize is paid once at packing (480x640 -> 120x160 reads several
  times faster). Re-encoding costs a JPEG error of mean ~1, max ~9-12 grey levels at 480x640
  (quality 95).
- "raw": exact and faster to read than decoding a JPEG, but 923 KB per 480x640 image, 13x the
  JPEG's 69 KB: it pays only when the pack stays in the page cache; hence JPEG is the default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import grain
import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image
from tqdm.auto import tqdm

from vgjax.data import gsv_cities
from vgjax.data import images as image_ops
from vgjax.data import vg_folder

ENCODINGS = ("jpeg", "raw")
VERSION = "1.0.0"


# ---------------------------------------------------------------------------------------------
# Stored images.


def _jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    """JPEG with 4:4:4 chroma: PIL's default 4:2:0 about doubles the error for 25% fewer bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def stored_image(path: str, image_size: tuple[int, int], encoding: str, quality: int) -> bytes | np.ndarray:
    """What a pack stores for one image at image_size (H, W): JPEG bytes (a same-size upright
    source JPEG verbatim, else resized as the training pipeline does and encoded) or raw uint8
    [H, W, 3].

    Raises:
      OSError: naming the file if it cannot be read.
    """
    try:
        with image_ops.open_image(path) as image:
            if (encoding == "jpeg" and image.format == "JPEG" and image.size == image_size[::-1]
                    and not image_ops.is_rotated(image)):
                return Path(path).read_bytes()
            rgb = image_ops.upright_rgb(image)
    except image_ops.OPEN_ERRORS as error:
        raise OSError(f"cannot read image {path}: {error}") from error
    resized = image_ops.resize_pil_bilinear(rgb, image_size)
    return resized if encoding == "raw" else _jpeg_bytes(resized, quality)


def _image_feature(image_size: tuple[int, int], encoding: str) -> tfds.features.FeatureConnector:
    shape = (*image_size, 3)
    if encoding == "raw":
        return tfds.features.Tensor(shape=shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)
    return tfds.features.Image(shape=shape, encoding_format="jpeg")


class _StoredImage(grain.transforms.Map):
    """relative path -> (relative path, stored image); runs on grain's threads while packing."""

    def __init__(self, root: Path, image_size: tuple[int, int], encoding: str, quality: int):
        self._root, self._image_size, self._encoding, self._quality = root, image_size, encoding, quality

    def map(self, relative_path: str) -> tuple[str, bytes | np.ndarray]:
        return relative_path, stored_image(str(self._root / relative_path), self._image_size, self._encoding,
                                           self._quality)


# ---------------------------------------------------------------------------------------------
# Builders.


@dataclasses.dataclass(eq=False)
class PackConfig(tfds.core.BuilderConfig):
    """What a pack holds: images at image_size (H, W) stored as `encoding`, of `sources` (VG
    folders: split names; GSV-Cities: city names)."""

    image_size: tuple[int, int] = (480, 640)
    encoding: str = "jpeg"
    quality: int = 95
    sources: tuple[str, ...] = ()


class PackBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Examples {image, path, **fields} of every image `_listing` names, in its order."""

    VERSION = tfds.core.Version(VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = "The source folder (a VG folder dataset, or GSV-Cities)."

    def __init__(self, *, num_threads: int = 2, progress: bool = True, **kwargs):
        self._num_threads, self._progress = num_threads, progress
        self._manual_dir = None  # the source folder, set by `build`
        super().__init__(**kwargs)

    def _listing(self, root: Path) -> dict[str, list[str]]:
        """{tfds split: image paths relative to root, in record order}."""
        raise NotImplementedError

    def _field_features(self) -> dict:
        raise NotImplementedError

    def _fields(self, split: str, index: int, relative_path: str) -> dict:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        features = {"image": _image_feature(cfg.image_size, cfg.encoding), "path": tfds.features.Text(),
                    **self._field_features()}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                     disable_shuffling=True, metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        from vgjax import __version__  # the package's version, recorded with the pack
        root = Path(dl_manager.manual_dir).resolve()
        listing = self._listing(root)
        self.info.metadata.update(source=str(root), paths=listing, vgjax_version=__version__)
        return {split: self._generate_examples(root, split, paths) for split, paths in listing.items()}

    def _generate_examples(self, root: Path, split: str, paths: list[str]) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        read_options = grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=4 * self._num_threads)
        stored = (grain.MapDataset.source(paths)
                  .map(_StoredImage(root, cfg.image_size, cfg.encoding, cfg.quality))
                  .to_iter_dataset(read_options))
        for index, (relative_path, image) in enumerate(tqdm(stored, total=len(paths), desc=f"packing {split}",
                                                            unit="img", disable=not self._progress, leave=False)):
            yield index, {"image": image, "path": relative_path, **self._fields(split, index, relative_path)}

    # tfds's own messages, in vgjax's words (its progress bars are off while vgjax builds).
    def _log_download_bytes(self) -> None:
        cfg = self.builder_config
        print(f"Packing {self._manual_dir} at {cfg.image_size[0]}x{cfg.image_size[1]} ({cfg.encoding}) "
              f"into {self.data_path}")

    def _log_download_done(self) -> None:
        print(f"Packed {sum(info.num_examples for info in self.info.splits.values())} images into {self.data_path}")


class VgFolderPack(PackBuilder):
    """A VG folder dataset's splits (config.sources), database and queries each a tfds split
    `<split>_database` / `<split>_queries`, with the names' @-fields as features."""

    name = "vg_folder"

    def _listing(self, root: Path) -> dict[str, list[str]]:
        listing = {}
        for split in self.builder_config.sources:
            folder = vg_folder.find_split_folder(root, split)
            for role in ("database", "queries"):
                listing[f"{split}_{role}"] = [os.path.relpath(path, root)
                                              for path in vg_folder.list_images(folder / role)]
        return listing

    def _field_features(self) -> dict:
        # float64 as bytes: a plain float feature is a tf.Example float_list, float32, which
        # rounds UTM metres (584025.47 -> 584025.5).
        float64 = tfds.features.Tensor(shape=(), dtype=np.float64, encoding=tfds.features.Encoding.BYTES)
        return {name: float64 if name in vg_folder.NUMERIC_FIELDS else tfds.features.Text()
                for name in vg_folder.FIELD_NAMES}

    def _fields(self, split: str, index: int, relative_path: str) -> dict:
        return vg_folder.parse_image_name(relative_path)


class GsvCitiesPack(PackBuilder):
    """GSV-Cities' images of the cities config.sources (every image their dataframes list, places
    in dataframe order), one tfds split `train`, with each image's place id and city."""

    name = "gsv_cities"

    def _listing(self, root: Path) -> dict[str, list[str]]:
        self._places = gsv_cities.read_places(root, self.builder_config.sources, min_images_per_place=1)
        self._place_of = np.repeat(np.arange(len(self._places.paths)), [len(p) for p in self._places.paths])
        return {"train": [path for paths in self._places.paths for path in paths]}

    def _field_features(self) -> dict:
        return {"place_id": np.int64, "city": tfds.features.Text()}

    def _fields(self, split: str, index: int, relative_path: str) -> dict:
        place = self._place_of[index]
        return {"place_id": self._places.place_ids[place],
                "city": self._places.cities[self._places.city[place]]}


def _config(name: str, image_size: Sequence[int], encoding: str, quality: int, sources: Sequence[str]) -> PackConfig:
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    height, width = (int(side) for side in image_size)
    return PackConfig(name=f"{name}-{height}x{width}-{encoding}", image_size=(height, width), encoding=encoding,
                      quality=quality, sources=tuple(sources))


def _builder(cls: type[PackBuilder], data_dir: str | os.PathLike, config: PackConfig, num_threads: int,
             progress: bool) -> PackBuilder:
    with quiet_tfds():
        return cls(config=config, data_dir=os.fspath(data_dir), file_format="array_record", num_threads=num_threads,
                   progress=progress)


def vg_folder_pack(data_dir: str | os.PathLike, dataset_dir: str | os.PathLike, image_size: Sequence[int], *,
                   splits: Sequence[str] = ("train",), encoding: str = "jpeg", quality: int = 95,
                   num_threads: int = 2, progress: bool = True) -> VgFolderPack:
    """The builder of `dataset_dir`'s `splits` packed at image_size (H, W) in tfds `data_dir`
    (`<data_dir>/vg_folder/<dataset>-<splits>-<H>x<W>-<encoding>/1.0.0`); `build` writes it."""
    name = "-".join((Path(dataset_dir).name, *splits))
    return _builder(VgFolderPack, data_dir, _config(name, image_size, encoding, quality, splits), num_threads, progress)


def gsv_cities_pack(data_dir: str | os.PathLike, cities: Sequence[str], image_size: Sequence[int], *,
                    encoding: str = "jpeg", quality: int = 95, num_threads: int = 2,
                    progress: bool = True) -> GsvCitiesPack:
    """The builder of GSV-Cities' `cities` packed at image_size (H, W) in tfds `data_dir`
    (`<data_dir>/gsv_cities/<cities>-<H>x<W>-<encoding>/1.0.0`, the cities named "train-cities"
    when they are GSV-Cities' own training cities, else by a digest); `build` writes it."""
    cities = tuple(cities)
    name = "train-cities" if cities == gsv_cities.TRAIN_CITIES else (
        "cities-" + hashlib.sha256("\n".join(cities).encode()).hexdigest()[:10])
    return _builder(GsvCitiesPack, data_dir, _config(name, image_size, encoding, quality, cities), num_threads,
                    progress)


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
    """Silences tfds's absl warnings (a custom config, a pack folder not built yet) and progress bars."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        absl_logger.setLevel(level)
        tfds.display_progress_bar(True)


class _UncompressedArrayRecord(tfds.core.file_adapters.ArrayRecordFileAdapter):
    """tfds's array_record adapter writing uncompressed records. tfds writes `group_size:1` with
    riegeli's default zstd, which gains nothing on JPEG and makes raw pixels slow: at 480x640
    raw packed at 48 img/s and read at about the folder's JPEG rate (benchmarks/pipeline.py)."""

    @classmethod
    def write_examples(cls, path, iterator):
        writer = ArrayRecordWriter(os.fspath(path), "group_size:1,uncompressed")
        for _, serialized_example in iterator:
            writer.write(serialized_example)
        writer.close()


@contextlib.contextmanager
def _writing_uncompressed() -> Iterator[None]:
    adapters = tfds.core.file_adapters.ADAPTER_FOR_FORMAT
    array_record = tfds.core.file_adapters.FileFormat.ARRAY_RECORD
    adapters[array_record] = _UncompressedArrayRecord
    try:
        yield
    finally:
        adapters[array_record] = tfds.core.file_adapters.ArrayRecordFileAdapter


def is_built(builder: PackBuilder) -> bool:
    with quiet_tfds():
        return builder.is_prepared()


def interrupted_builds(builder: PackBuilder) -> list[Path]:
    """The `incomplete.*` folders a killed build of this pack left."""
    folder = Path(builder.data_path)
    return sorted(folder.parent.glob(f"incomplete.*_{folder.name}"))


def build(builder: PackBuilder, source: str | os.PathLike) -> Path:
    """Packs the images of `source` (the dataset folder, or GSV-Cities' root) with `builder`,
    unless that pack exists; a folder a killed build left is deleted first. Returns the pack's
    folder."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"cannot pack {source}: no such folder")
    if not is_built(builder):
        for stale in interrupted_builds(builder):
            shutil.rmtree(stale)
        builder._manual_dir = source
        with (quiet_tfds(), _writing_uncompressed(),
              tempfile.TemporaryDirectory(prefix="vgjax-pack-") as downloads):  # nothing is downloaded
            builder.download_and_prepare(download_dir=downloads, download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(source)))
    return Path(builder.data_path)

"""Reading packs (vgjax.data.tfds_builders) by path: what the pipelines take instead of the
image files.

`open_pack` checks a built pack (every shard present and holding its records, the path lists
matching the splits); `Pack.data_source` is tfds's own random-access source of a split;
`Pack.loader` is a path -> uint8 [H, W, 3] function for `pipeline.inference_batches` /
`triplet_batches`, after checking the pack holds every image the run needs. JPEG records are
decoded with PIL, as the source files are (tfds would decode with OpenCV where it is installed,
which rounds differently).

Images are stored at one size, so the pipelines' resize to it is a no-op and packed training
batches equal the folder's (exactly for raw and verbatim JPEG). Evaluation reads the folders:
hard_resize uses torch's bilinear (`images.resize_bilinear`), and the other test methods need
the original resolution.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader
from google.protobuf.message import DecodeError
from PIL import Image
from tensorflow_datasets.proto import tf_example_pb2

from vgjax.data import tfds_builders


class PackedFormatError(ValueError):
    """A pack is incomplete, damaged, or lacks images the caller needs."""


# ---------------------------------------------------------------------------------------------
# Reading.


class PackedLoader:
    """path -> uint8 [H, W, 3], read from a pack instead of the image file.

    Reads each record's serialized tf.Example (tfds's RAW_BYTES) and parses only its image:
    tfds's full decode of all 16 features costs about 0.4 ms per record, more than decoding a
    120x160 JPEG, and the pipelines need the image alone. Thread-safe and picklable (grain
    threads and worker processes). Paths are matched after `os.path.abspath`, so relative and
    absolute spellings of the same file both work.
    """

    def __init__(self, pack: Pack, root: str | os.PathLike):
        self.folder = pack.folder
        self._name = f"pack {pack.folder}"
        self._encoding, self._shape = pack.encoding, (*pack.image_size, 3)
        self._records = {split: pack.data_source(split, serialized=True) for split in pack.paths}
        self._index = {os.path.abspath(os.path.join(root, relative)): (split, i)
                       for split, paths in pack.paths.items() for i, relative in enumerate(paths)}

    def __contains__(self, path: str | os.PathLike) -> bool:
        return os.path.abspath(path) in self._index

    def __call__(self, path: str | os.PathLike) -> np.ndarray:
        key = os.path.abspath(path)
        if key not in self._index:
            raise KeyError(f"{path} is not in the {self._name}")
        split, index = self._index[key]
        try:
            example = tf_example_pb2.Example.FromString(self._records[split][index])
            stored = example.features.feature["image"].bytes_list.value[0]
            if self._encoding == "raw":
                return np.frombuffer(stored, np.uint8).reshape(self._shape)
            with Image.open(io.BytesIO(stored)) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, ValueError, RuntimeError, IndexError, DecodeError) as error:
            raise OSError(f"{self._name}: cannot read the record of {path}: {error}") from error


@dataclasses.dataclass(frozen=True)
class Pack:
    """A built pack (see `open_pack`).

    Attributes:
      folder: its tfds folder (`<data_dir>/<builder>/<config>/<version>`).
      source: the folder it was packed from.
      image_size: (H, W) of every stored image.
      encoding: "jpeg" or "raw".
      paths: {tfds split: image paths relative to `source`, in record order}.
    """

    folder: Path
    source: Path
    image_size: tuple[int, int]
    encoding: str
    paths: dict[str, list[str]]

    def data_source(self, split: str, *, serialized: bool = False):
        """tfds's random-access source of one split: record i is {"image", "path", **fields}, the
        image JPEG bytes (undecoded) or uint8 [H, W, 3]; with `serialized`, the tf.Example bytes."""
        decoders = {"image": tfds.decode.SkipDecoding()} if self.encoding == "jpeg" else None
        method = tfds.decode.DeserializeMethod
        with tfds_builders.quiet_tfds():
            return tfds.data_source(f"{self.folder.parent.parent.name}/{self.folder.parent.name}",
                                    data_dir=os.fspath(self.folder.parent.parent.parent), split=split,
                                    decoders=None if serialized else decoders,
                                    deserialize_method=method.RAW_BYTES if serialized else method.DESERIALIZE_AND_DECODE)

    def loader(self, root: str | os.PathLike | None = None, required: Sequence[str] = ()) -> PackedLoader:
        """A path -> image function for `pipeline.inference_batches` / `triplet_batches`.

        Args:
          root: the folder the pipelines' paths are under (the source folder, perhaps moved);
            default `source`.
          required: paths the run will ask for; each must be in the pack (checked here).
        """
        loader = PackedLoader(self, root if root is not None else self.source)
        missing = [path for path in required if path not in loader]
        if missing:
            raise PackedFormatError(f"{self.folder} lacks {len(missing)} of the {len(required)} images this run reads, "
                                    f"e.g. {missing[0]}; delete the pack to build it again")
        return loader


def _check_shards(builder: tfds.core.DatasetBuilder, folder: Path) -> None:
    """Every shard dataset_info.json lists exists and holds its number of records."""
    for split, info in builder.info.splits.items():
        for instruction in info.file_instructions:
            path = Path(instruction.filename)
            if not path.is_file():
                raise PackedFormatError(f"{path} is missing ({folder / 'dataset_info.json'} lists it)")
            try:
                reader = ArrayRecordReader(str(path))
                records = reader.num_records()
                reader.close()
            except (OSError, RuntimeError, ValueError) as error:
                raise PackedFormatError(f"{path}: unreadable array_record shard: {error}") from error
            if records != instruction.examples_in_shard:
                raise PackedFormatError(f"{path} holds {records} records, {folder / 'dataset_info.json'} says "
                                        f"{instruction.examples_in_shard}")


def open_pack(builder: tfds_builders.PackBuilder) -> Pack:
    """Opens and checks the pack `builder` writes (every shard present and complete, the path
    lists matching the splits' counts).

    Raises:
      FileNotFoundError: the pack is not built (an interrupted build is named).
      PackedFormatError: naming the file, if a shard is missing, truncated or unreadable, or
        the metadata does not match the records.
    """
    folder = Path(builder.data_path)
    if not tfds_builders.is_built(builder):
        interrupted = tfds_builders.interrupted_builds(builder)
        hint = f" ({interrupted[0]} is an interrupted build: building again deletes it)" if interrupted else ""
        raise FileNotFoundError(f"pack {folder} does not exist{hint}")
    try:
        with tfds_builders.quiet_tfds():
            stored = tfds.builder_from_directory(os.fspath(folder))
            metadata = stored.info.metadata or {}  # read lazily: here
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PackedFormatError(f"{folder}: unreadable dataset_info.json, features.json or metadata.json: "
                                f"{error}; delete the pack to build it again") from error
    paths = metadata.get("paths")
    if not isinstance(paths, dict) or "source" not in metadata:
        raise PackedFormatError(f"{folder / 'metadata.json'} lacks the source folder or the path lists")
    _check_shards(stored, folder)
    for split, info in stored.info.splits.items():
        if len(paths.get(split, ())) != info.num_examples:
            raise PackedFormatError(f"{folder / 'metadata.json'} lists {len(paths.get(split, ()))} {split} paths, "
                                    f"the shards hold {info.num_examples} records")
    cfg = builder.builder_config
    return Pack(folder=folder, source=Path(metadata["source"]), image_size=tuple(cfg.image_size),
                encoding=cfg.encoding, paths={split: list(paths[split]) for split in stored.info.splits})


def open_or_build(builder: tfds_builders.PackBuilder, source: str | os.PathLike, *, may_build: bool = True) -> Pack:
    """`open_pack`, building the pack first if it does not exist and `may_build` (else
    FileNotFoundError naming the command that builds it)."""
    if not tfds_builders.is_built(builder):
        if not may_build:
            raise FileNotFoundError(f"pack {builder.data_path} does not exist; build it once before a "
                                    "multi-host run: python launch.py --config ... --mode pack")
        tfds_builders.build(builder, source)
    return open_pack(builder)


def training_loader(builder: tfds_builders.PackBuilder, source: str | os.PathLike, required: Sequence[str], *,
                    may_build: bool) -> PackedLoader:
    """What a training method reads its images with: the pack `builder` writes, built from
    `source` first if missing and `may_build` (single-process runs), holding every path of
    `required`."""
    return open_or_build(builder, source, may_build=may_build).loader(source, required=required)

"""grain input pipelines.

Inference: images in a fixed order, decoded and transformed on host threads, batched to a
fixed batch size (the last batch is padded with zeros and carries its number of valid rows), so
a jit-compiled embed function sees one shape for a whole split.

Triplets: the images of query tuples (query, positive, negatives), tuple-major, resized to the
training size on host and shipped as uint8; augmentation and normalization run on device.
Batches are a pure function of (tuples, batch index), so training resumes at any batch.

Both read images through a `loader` (path -> uint8 [H, W, 3]): by default the image file is
decoded; `vgjax.data.packed.PackedSplit.loader()` reads the same paths from a packed split
instead (images stored at the training size, so the resize to it is a no-op).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np

from vgjax.data import images as image_ops

ImageTransform = Callable[[np.ndarray], np.ndarray]
ImageLoader = Callable[[str], np.ndarray]


@dataclasses.dataclass(frozen=True)
class InferenceBatch:
    """images: uint8 [batch_size, ...] (rows >= num_valid are zero padding); start: index of row 0."""

    images: np.ndarray
    num_valid: int
    start: int


class _DecodeAndTransform(grain.transforms.Map):
    def __init__(self, transform: ImageTransform, loader: ImageLoader | None):
        self._transform = transform
        self._loader = loader or image_ops.load_rgb

    def map(self, path: str) -> np.ndarray:
        return self._transform(self._loader(path))


def _pad_to(batch: np.ndarray, batch_size: int) -> np.ndarray:
    missing = batch_size - len(batch)
    if missing == 0:
        return batch
    return np.concatenate([batch, np.zeros((missing, *batch.shape[1:]), batch.dtype)])


def inference_batches(paths: Sequence[str], transform: ImageTransform, batch_size: int, *,
                      num_threads: int = 2, prefetch: int = 4,
                      loader: ImageLoader | None = None) -> Iterator[InferenceBatch]:
    """Yields the images of `paths`, in order, as fixed-size batches.

    Args:
      paths: image files.
      transform: uint8 [H, W, 3] -> uint8 array of a fixed shape per dataset (or any shape with
        batch_size=1), e.g. a resize or five crops [5, S, S, 3].
      batch_size: rows per batch; the last batch is zero-padded to this size.
      num_threads: host threads decoding in parallel (2 suits a 2-core machine).
      prefetch: batches' worth of images decoded ahead.
      loader: path -> uint8 [H, W, 3]; default `images.load_rgb` (decodes the file).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = (
        grain.MapDataset.source(list(paths))
        .map(_DecodeAndTransform(transform, loader))
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                           prefetch_buffer_size=prefetch * batch_size))
        .batch(batch_size, drop_remainder=False)
    )
    start = 0
    for batch in dataset:
        yield InferenceBatch(images=_pad_to(batch, batch_size), num_valid=len(batch), start=start)
        start += len(batch)


def _resize_for_training(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return image_ops.resize_pil_bilinear(image, size)


def process_share(rows: Sequence, per_batch: int, batch: int, process_index: int, process_count: int) -> Sequence:
    """Process `process_index`'s contiguous share (per_batch / process_count rows) of global
    batch `batch` of `rows`, taken per_batch at a time: what each process loads of a batch."""
    local = per_batch // process_count
    start = batch * per_batch + process_index * local
    return rows[start:start + local]


def triplet_batches(tuples: Sequence[Sequence[str]], tuples_per_batch: int, image_size: tuple[int, int],
                    *, start_batch: int = 0, process_index: int = 0, process_count: int = 1,
                    num_threads: int = 2, prefetch: int = 2,
                    loader: ImageLoader | None = None) -> Iterator[np.ndarray]:
    """Yields uint8 [tuples_per_batch / process_count * T, H, W, 3] batches of query tuples.

    Args:
      tuples: per tuple, its T image paths [query, positive, negatives...].
      tuples_per_batch: tuples in a global batch; an incomplete last batch is dropped (as the
        benchmark's drop_last).
      image_size: (H, W) every image is resized to (PIL bilinear, as the benchmark's training).
      start_batch: the first batch to yield (to resume inside a round).
      process_index, process_count: multi-host; each process loads its contiguous share of
        every global batch, so the global batch is the same as on one host.
      loader: path -> uint8 [H, W, 3]; default `images.load_rgb` (decodes the file).
    """
    if tuples_per_batch % process_count:
        raise ValueError(f"train_batch_size {tuples_per_batch} is not divisible by the "
                         f"{process_count} processes")
    local = tuples_per_batch // process_count
    num_batches = len(tuples) // tuples_per_batch
    paths = [path
             for batch in range(start_batch, num_batches)
             for tuple_paths in process_share(tuples, tuples_per_batch, batch, process_index, process_count)
             for path in tuple_paths]
    if not paths:
        return
    tuple_size = len(tuples[0])
    dataset = (
        grain.MapDataset.source(paths)
        .map(_DecodeAndTransform(functools.partial(_resize_for_training, size=tuple(image_size)), loader))
        .to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                           prefetch_buffer_size=prefetch * local * tuple_size))
        .batch(local * tuple_size, drop_remainder=True)
    )
    yield from dataset


"""The one jitted inference path: uint8 images -> ImageNet normalization on device -> network.

`make_sharded_embed_fn(model, mesh)` gives `embed(variables, images) -> numpy [B, D]`: one
compiled function for a run, fed the current variables ({"params", "batch_stats"}) at every
call, as mining, validation and profiling do. A batch whose size divides by the number of local
devices is sharded over the mesh's data axis (each process passes its own rows); other batches
run unsharded. `make_embed_fn(model, variables)` binds fixed variables on top of it, over the
devices of this process (evaluation, the demo); `make_features_fn` returns backbone features
instead of descriptors (NetVLAD init). `embed_images(embed_fn, paths, transform, batch_size)`
runs any such function over image files (grain pipeline, fixed batch shape, the last batch
padded): evaluation, mining and PCA embed through it.

vgjax.models never imports this module; it imports the models.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from vgjax import sharding
from vgjax.data import augment, pipeline
from vgjax.models.geoloc_net import GeoLocalizationNet

EmbedFn = Callable[[np.ndarray], np.ndarray]
"""uint8 [B, H, W, 3] RGB images (not normalized) -> float [B, D] descriptors."""


def make_sharded_embed_fn(model: GeoLocalizationNet, mesh: Mesh) -> Callable[[dict, np.ndarray], np.ndarray]:
    """`embed(variables, images)`: uint8 [B, H, W, 3] -> float32 numpy [B, D] in inference mode.

    `variables` should be replicated over `mesh` (sharding.replicate), or not yet placed. The
    jitted function (variables, images) -> descriptors, e.g. for cost analysis, is
    `embed.jitted`.

    Over a mesh of several processes, every process calls it together, each with its own rows
    (the same number), and each gets the descriptors of all of them, in process order:
    [process_count * B, D]; `embed.process_count` says how many processes a call joins, and
    `embed_images` splits its batches accordingly.
    """
    jitted = jax.jit(lambda variables, images: model.apply(
        variables, augment.normalize_uint8(images), train=False))
    local_devices = len(mesh.local_devices)
    processes = mesh.devices.size // local_devices

    def embed(variables: dict, images) -> np.ndarray:
        if processes > 1:
            return _embed_across_processes(jitted, variables, np.asarray(images), mesh, processes)
        if len(images) % local_devices == 0:
            images = sharding.shard_batch(images, mesh)
        return np.asarray(jitted(variables, images))

    embed.jitted = jitted
    embed.process_count = processes
    return embed


def _embed_across_processes(jitted, variables: dict, images: np.ndarray, mesh: Mesh, processes: int) -> np.ndarray:
    """This process's [B, ...] rows -> the [processes * B, D] descriptors of every process's rows
    (each process's rows padded to a multiple of its devices, and the padding dropped)."""
    rows, local_devices = len(images), len(mesh.local_devices)
    padded = -(-rows // local_devices) * local_devices
    images = np.concatenate([images, np.zeros((padded - rows, *images.shape[1:]), images.dtype)])
    out = sharding.gather(jitted(variables, sharding.shard_batch(images, mesh)))
    return out.reshape(processes, padded, *out.shape[1:])[:, :rows].reshape(processes * rows, *out.shape[1:])


def make_embed_fn(model: GeoLocalizationNet, variables: dict, mesh: Mesh | None = None) -> EmbedFn:
    """uint8 [B, H, W, 3] -> float32 numpy [B, D] with fixed `variables`, over `mesh`: by
    default this process's devices (so each process may embed its own images independently);
    over a mesh of several processes, every process calls it together (make_sharded_embed_fn)."""
    mesh = mesh or Mesh(np.asarray(jax.local_devices()), (sharding.DATA_AXIS,))
    embed, variables = make_sharded_embed_fn(model, mesh), sharding.replicate(variables, mesh)

    def embed_fn(images: np.ndarray) -> np.ndarray:
        return embed(variables, images)

    embed_fn.process_count = embed.process_count
    return embed_fn


def make_features_fn(model: GeoLocalizationNet, variables: dict) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 [B, H, W, 3] -> float32 numpy backbone outputs, maps [B, h, w, C] or tokens
    [B, T, C] (inference mode), e.g. for netvlad_init.initialize_netvlad."""
    jitted = jax.jit(lambda variables, images: model.apply(
        variables, augment.normalize_uint8(images), method=GeoLocalizationNet.backbone_features))
    return lambda images: np.asarray(jitted(variables, images))


@dataclasses.dataclass
class EmbedTiming:
    """first_batch_seconds includes compilation; steady_* cover the later batches."""

    images: int = 0
    wall_seconds: float = 0.0
    first_batch_seconds: float = 0.0
    steady_images: int = 0
    steady_seconds: float = 0.0


def embed_images(embed_fn: EmbedFn, paths: Sequence[str], transform: pipeline.ImageTransform,
                 batch_size: int, *, desc: str = "embedding", progress: bool = True,
                 num_threads: int = 2, loader: pipeline.ImageLoader | None = None
                 ) -> tuple[np.ndarray, EmbedTiming]:
    """Descriptors of images: float32 [N * crops, D] (crops = 5 for five-crop transforms).

    Every batch handed to `embed_fn` has the same shape (the last is zero-padded). `loader`
    (path -> uint8 image) replaces decoding the files, e.g. a packed split's. When `embed_fn`
    joins several processes (its `process_count`, as `make_sharded_embed_fn`'s over a mesh of
    several processes), every process calls this with the same arguments, decodes only its
    share of each batch of `batch_size`, and gets all N descriptors.
    """
    processes = getattr(embed_fn, "process_count", 1)
    local_batch = -(-batch_size // processes)
    rows, counts = process_rows(len(paths), batch_size, processes, jax.process_index() if processes > 1 else 0)
    timing = EmbedTiming(images=len(paths))
    kept: list[np.ndarray] = []
    start = time.perf_counter()
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    for batch in pipeline.inference_batches([paths[i] for i in rows], transform, local_batch,
                                            num_threads=num_threads, loader=loader):
        images = batch.images
        crops = images.shape[1] if images.ndim == 5 else 1
        tick = time.perf_counter()
        # A copy: TensorRT/ONNX-style functions return one preallocated buffer every call.
        out = np.array(embed_fn(images.reshape(-1, *images.shape[-3:])), dtype=np.float32)
        seconds = time.perf_counter() - tick
        if out.ndim != 2 or len(out) != processes * len(images) * crops:
            raise ValueError(f"embed_fn returned shape {out.shape} for {processes * len(images) * crops} images; "
                             "expected [num_images, D]")
        valid = counts[batch.start // local_batch]  # real rows of each process
        chunk = local_batch * crops
        kept.extend(out[q * chunk:q * chunk + count * crops] for q, count in enumerate(valid))
        if batch.start == 0:
            timing.first_batch_seconds = seconds
        else:
            timing.steady_seconds += seconds
            timing.steady_images += sum(valid)
        bar.update(sum(valid))
    bar.close()
    timing.wall_seconds = time.perf_counter() - start
    descriptors = np.concatenate(kept)
    if not np.isfinite(descriptors).all():
        raise FloatingPointError(f"{desc}: embed_fn produced non-finite descriptors")
    return descriptors, timing


def process_rows(num: int, batch_size: int, processes: int, index: int) -> tuple[list[int], list[list[int]]]:
    """How `processes` processes share `num` rows in batches of `batch_size`: (the rows process
    `index` loads, ceil(batch_size / processes) per batch, the last ones repeating a row of the
    batch where its share is short; for each batch, the number of real rows of each process).
    One process: (every row, [[rows of each batch]])."""
    if processes == 1:
        return list(range(num)), [[min(batch_size, num - lo)] for lo in range(0, num, batch_size)]
    local = -(-batch_size // processes)
    rows, counts = [], []
    for lo in range(0, num, batch_size):
        hi = min(lo + batch_size, num)
        shares = [range(min(lo + q * local, hi), min(lo + (q + 1) * local, hi)) for q in range(processes)]
        counts.append([len(share) for share in shares])
        mine = list(shares[index])
        rows.extend(mine + [lo] * (local - len(mine)))
    return rows, counts

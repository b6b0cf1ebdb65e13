"""NetVLAD initialisation from data, as the benchmark does it (reference §2.3, §9.4).

0. `initialize_netvlad` puts the result into a network's variables; `init_from_images` runs the
   steps below from image files and a features function (`vgjax.embed.make_features_fn`).
1. `sample_local_descriptors`: the caller embeds ceil(50000 / 100) = 500 random training images
   (database + queries, hard-resized, backbone in inference mode); 100 random local descriptors
   per image, each L2-normalized over channels.
2. `kmeans_centroids`: faiss k-means, 100 iterations, seed 1234, faiss's default subsampling to
   256 points per centroid (16384 of the 50000 descriptors for K=64).
3. `init_params`: NetVLAD params. centroids = the raw k-means centroids; assignment kernel =
   alpha * unit centroids, alpha = -ln(0.01) / mean(top-1 - top-2 similarity).

Deliberate fix: for token backbones (CCT/ViT) the benchmark normalizes its [N, T, C] outputs
along the token axis and then reinterprets memory with `view(N, C, T)` instead of transposing,
so its k-means runs on scrambled vectors. Here a token is a local descriptor like a map
position: normalized over channels, sampled as it is. The forward pass is the same in both.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import faiss
import numpy as np

from vgjax.data import images as image_ops
from vgjax.data import pipeline

DESCRIPTORS_NUM = 50_000
DESCRIPTORS_PER_IMAGE = 100


def images_needed(descriptors_num: int = DESCRIPTORS_NUM,
                  per_image: int = DESCRIPTORS_PER_IMAGE) -> int:
    """How many images to embed: ceil(50000 / 100) = 500 in the benchmark."""
    return math.ceil(descriptors_num / per_image)


def check_positions(positions: int, per_image: int = DESCRIPTORS_PER_IMAGE) -> None:
    """ValueError when an image's backbone output has fewer positions (map cells or tokens) than
    the `per_image` local descriptors drawn from it."""
    if per_image > positions:
        raise ValueError(f"cannot sample {per_image} descriptors per image from {positions} positions")


def sample_local_descriptors(features_batches: Iterable[np.ndarray],
                             per_image: int = DESCRIPTORS_PER_IMAGE,
                             rng: np.random.Generator | int = 0) -> np.ndarray:
    """`per_image` local descriptors from every image, drawn without replacement.

    Args:
      features_batches: batches of backbone outputs, maps [B, H, W, C] or tokens [B, T, C]
        (numpy or jax arrays).
      per_image: descriptors sampled per image (the benchmark's 100).
      rng: numpy Generator or seed for the position draws.

    Returns:
      float32 [num_images * per_image, C], each row L2-normalized (divided by max(norm, 1e-12)).
    """
    rng = np.random.default_rng(rng)
    chunks = []
    for batch in features_batches:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim not in (3, 4):
            raise ValueError(f"features must be maps [B, H, W, C] or tokens [B, T, C], "
                             f"got shape {batch.shape}")
        batch = batch.reshape(batch.shape[0], -1, batch.shape[-1])
        positions = batch.shape[1]
        check_positions(positions, per_image)
        picks = np.stack([rng.choice(positions, per_image, replace=False) for _ in batch])
        chunks.append(np.take_along_axis(batch, picks[:, :, None], axis=1))
    if not chunks:
        raise ValueError("no feature batches to sample descriptors from")
    descriptors = np.concatenate(chunks).reshape(-1, chunks[0].shape[-1])
    norms = np.linalg.norm(descriptors, axis=1, keepdims=True)
    return descriptors / np.maximum(norms, 1e-12)


def kmeans_centroids(descriptors: np.ndarray, clusters: int, niter: int = 100,
                     seed: int = 1234) -> np.ndarray:
    """faiss k-means centroids, float32 [clusters, C].

    faiss draws its initial centroids and its subsample (at most 256 points per centroid, the
    default, pinned here) from `seed`, so equal inputs give equal centroids; the result was
    also checked to be independent of the number of OpenMP threads.
    """
    descriptors = np.ascontiguousarray(descriptors, dtype=np.float32)
    if descriptors.ndim != 2 or descriptors.shape[0] < clusters:
        raise ValueError(f"k-means needs at least {clusters} descriptors [N, C], "
                         f"got shape {descriptors.shape}")
    kmeans = faiss.Kmeans(descriptors.shape[1], clusters, niter=niter, seed=seed,
                          max_points_per_centroid=256, verbose=False)
    kmeans.train(descriptors)
    return np.asarray(kmeans.centroids, dtype=np.float32)


def assignment_alpha(centroids: np.ndarray, descriptors: np.ndarray) -> float:
    """-ln(0.01) / mean over descriptors of (top-1 - top-2) cosine to the unit centroids."""
    unit = _unit_rows(centroids)
    dots = np.sort(unit @ np.asarray(descriptors, dtype=np.float32).T, axis=0)
    gap = float(np.mean(dots[-1] - dots[-2], dtype=np.float64))
    if not gap > 0:
        raise ValueError("NetVLAD init: every descriptor is equally close to its two nearest "
                         "centroids, so alpha is undefined")
    return float(-np.log(0.01) / gap)


def init_params(centroids: np.ndarray, descriptors: np.ndarray) -> dict:
    """NetVLAD params {"centroids": [K, C], "assignment_kernel": [C, K]} (float32) from
    k-means centroids and the descriptors they were fitted on (all of them, as the benchmark).
    CRN uses the same two entries next to its `crn` sub-tree."""
    centroids = np.asarray(centroids, dtype=np.float32)
    alpha = assignment_alpha(centroids, descriptors)
    kernel = (alpha * _unit_rows(centroids).astype(np.float64)).T
    return {"centroids": centroids, "assignment_kernel": kernel.astype(np.float32)}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def init_from_images(features_fn: Callable[[np.ndarray], np.ndarray], paths: Sequence[str],
                     transform: pipeline.ImageTransform, clusters: int, *, batch_size: int = 16,
                     seed: int = 0, descriptors_num: int = DESCRIPTORS_NUM,
                     per_image: int = DESCRIPTORS_PER_IMAGE, num_threads: int = 2) -> dict:
    """NetVLAD params initialised from images, as the benchmark's initialize_netvlad_layer.

    Args:
      features_fn: uint8 images [B, H, W, 3] -> backbone features (maps or tokens), e.g.
        `vgjax.embed.make_features_fn(model, variables)`.
      paths: the candidate images (the benchmark uses the train split's database + queries).
      transform: host preprocessing to the training size (the benchmark hard-resizes).
      clusters: K.
      seed: draws the images and the positions.

    Returns:
      {"centroids": float32 [K, C], "assignment_kernel": float32 [C, K]}.
    """
    rng = np.random.default_rng(seed)
    count = min(images_needed(descriptors_num, per_image), len(paths))
    chosen = [paths[i] for i in rng.choice(len(paths), count, replace=False)]
    batches = (np.asarray(features_fn(batch.images))[:batch.num_valid]
               for batch in pipeline.inference_batches(chosen, transform, batch_size,
                                                       num_threads=num_threads))
    descriptors = sample_local_descriptors(batches, per_image, rng)
    return init_params(kmeans_centroids(descriptors, clusters), descriptors)


def initialize_netvlad(features_fn: Callable[[np.ndarray], np.ndarray], variables: dict,
                       paths: Sequence[str], image_size: tuple[int, int], clusters: int, *,
                       batch_size: int = 16, seed: int = 0, **kwargs) -> dict:
    """`variables` with the NetVLAD/CRN centroids and assignment kernel initialised by k-means
    over local features of random images in `paths`, hard-resized to `image_size`.

    Args:
      features_fn: uint8 images -> backbone features of the network `variables` belong to,
        `vgjax.embed.make_features_fn(model, variables)`.
      variables: {"params": {"aggregation": ...}, ...}; the other entries are kept.
      kwargs: descriptors_num, per_image, num_threads of `init_from_images`.
    """
    transform = functools.partial(image_ops.resize_bilinear, size=tuple(image_size))
    params = init_from_images(features_fn, paths, transform, clusters, batch_size=batch_size,
                              seed=seed, **kwargs)
    new_params = dict(variables["params"])
    new_params["aggregation"] = {**variables["params"]["aggregation"], **params}
    return {**variables, "params": new_params}

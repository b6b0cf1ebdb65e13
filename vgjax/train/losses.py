"""Triplet-training losses of the benchmark (reference.md §3.3, §9.12): pure, jit-able functions.

Every loss takes the descriptors of a batch of B tuples laid out tuple-major, as the benchmark's
batch is: rows `t * (2 + N) + [0, 1, 2 .. N + 1]` are tuple t's query, positive and N negatives.
Each returns a float32 scalar normalized by B·N, the number of triplets (the benchmark divides
every criterion by `train_batch_size · negs_num_per_query`).

- `triplet_loss`: mean over the B·N triplets of `max(d(q, p) - d(q, n) + margin, 0)` with the
  non-squared `d(a, b) = ||a - b + 1e-6||_2` of torch's `pairwise_distance`.
- `sare_ind_loss`: per triplet `softplus(||q - p||^2 - ||q - n||^2)` (squared distances).
- `sare_joint_loss`: per query `-log(e^{-dp} / (e^{-dp} + sum_j e^{-dn_j}))` over its N
  negatives, summed over queries and divided by B·N.

`LOSSES` maps the benchmark's `--criterion` names to them; all share the signature
`loss(descriptors, *, negs_per_query, margin)` (SARE ignores margin). `negs_per_query` fixes a
shape, so it must be static under `jax.jit`. Descriptors of any float dtype are promoted to
float32, so the loss of a bfloat16 model is computed in float32.

Deliberate difference from the PyTorch benchmark: sare_joint works with any N (the original's
`view(B, 10, 3)` hard-codes 10 negatives).

CosPlace (reference.md §5.4): `cosface_logits` / `cosface_loss`, the large-margin cosine
classifier (s=30, m=0.4) whose weight rows are normalized inside, with cross-entropy;
`cosface_init` draws its weight like torch's xavier_uniform_.

GSV-Cities (places x K batches): `multi_similarity_miner` and `multi_similarity_loss`, the
pytorch-metric-learning MultiSimilarityMiner / MultiSimilarityLoss as GSV-Cities and MixVPR
configure them, on the similarity matrix of the batch with fixed shapes (boolean masks of the
mined pairs instead of index lists).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAIRWISE_DISTANCE_EPS = 1e-6


def _split_tuples(descriptors: jax.Array, negs_per_query: int):
    """[B·(2+N), D] -> float32 query [B, D], positive [B, D], negatives [B, N, D]."""
    if negs_per_query < 1:
        raise ValueError(f"negs_per_query must be >= 1, got {negs_per_query}")
    rows, dim = descriptors.shape
    tuple_size = 2 + negs_per_query
    if rows % tuple_size:
        raise ValueError(f"descriptors have {rows} rows, not a multiple of 2 + negs_per_query = "
                         f"{tuple_size} (one query, one positive, {negs_per_query} negatives)")
    tuples = descriptors.astype(jnp.float32).reshape(rows // tuple_size, tuple_size, dim)
    return tuples[:, 0], tuples[:, 1], tuples[:, 2:]


def _squared_distances(descriptors: jax.Array, negs_per_query: int):
    """Squared L2 query-positive [B] and query-negative [B, N] distances."""
    query, positive, negatives = _split_tuples(descriptors, negs_per_query)
    positive_d = jnp.sum(jnp.square(query - positive), axis=-1)
    negative_d = jnp.sum(jnp.square(query[:, None] - negatives), axis=-1)
    return positive_d, negative_d


def triplet_loss(descriptors: jax.Array, *, negs_per_query: int, margin: float = 0.1) -> jax.Array:
    """Triplet margin loss, averaged over the B·N triplets.

    Equals torch `TripletMarginLoss(margin, p=2, reduction="sum")` applied to each of the N
    negative slots, summed, then divided by B·N, as the benchmark computes it.

    Args:
      descriptors: float [B·(2+N), D], tuple-major [query, positive, negative_1..N] rows.
      negs_per_query: N (static).
      margin: the triplet margin.

    Returns:
      float32 scalar.
    """
    query, positive, negatives = _split_tuples(descriptors, negs_per_query)
    positive_d = jnp.linalg.norm(query - positive + PAIRWISE_DISTANCE_EPS, axis=-1)
    negative_d = jnp.linalg.norm(query[:, None] - negatives + PAIRWISE_DISTANCE_EPS, axis=-1)
    hinge = jnp.maximum(positive_d[:, None] - negative_d + margin, 0.0)
    return jnp.sum(hinge) / hinge.size


def sare_ind_loss(descriptors: jax.Array, *, negs_per_query: int, margin: float = 0.1) -> jax.Array:
    """SARE, independent triplets: mean over the B·N triplets of softplus(dp - dn).

    softplus(dp - dn) = -log_softmax([-dp, -dn])[0] with squared L2 distances dp = ||q - p||^2
    and dn = ||q - n||^2. `margin` is accepted for a uniform signature and ignored.

    Args:
      descriptors: float [B·(2+N), D], tuple-major rows.
      negs_per_query: N (static).

    Returns:
      float32 scalar.
    """
    del margin
    positive_d, negative_d = _squared_distances(descriptors, negs_per_query)
    losses = jax.nn.softplus(positive_d[:, None] - negative_d)
    return jnp.sum(losses) / losses.size


def sare_joint_loss(descriptors: jax.Array, *, negs_per_query: int,
                    margin: float = 0.1) -> jax.Array:
    """SARE, joint: per query -log(e^{-dp} / (e^{-dp} + sum_j e^{-dn_j})), summed, / (B·N).

    Computed as dp + logsumexp([-dp, -dn_1, ..., -dn_N]) (squared L2 distances), which stays
    finite for any distance. `margin` is accepted for a uniform signature and ignored.

    Args:
      descriptors: float [B·(2+N), D], tuple-major rows.
      negs_per_query: N (static).

    Returns:
      float32 scalar.
    """
    del margin
    positive_d, negative_d = _squared_distances(descriptors, negs_per_query)
    logits = jnp.concatenate([-positive_d[:, None], -negative_d], axis=1)
    losses = positive_d + jax.nn.logsumexp(logits, axis=1)
    return jnp.sum(losses) / negative_d.size


LOSSES = {
    "triplet": triplet_loss,
    "sare_ind": sare_ind_loss,
    "sare_joint": sare_joint_loss,
}


COSFACE_SCALE = 30.0
COSFACE_MARGIN = 0.4


def cosface_init(key: jax.Array, num_classes: int, dim: int) -> jax.Array:
    """float32 [num_classes, dim] ~ U(-b, b), b = sqrt(6 / (dim + num_classes)) (xavier uniform)."""
    bound = (6.0 / (dim + num_classes)) ** 0.5
    return jax.random.uniform(key, (num_classes, dim), jnp.float32, -bound, bound)


def cosface_logits(descriptors: jax.Array, weight: jax.Array, labels: jax.Array,
                   scale: float = COSFACE_SCALE, margin: float = COSFACE_MARGIN) -> jax.Array:
    """CosPlace's MarginCosineProduct: s * (cos(x, w_j) - m * [j == label]).

    Args:
      descriptors: [B, D]; weight: [C, D]; labels: int [B] in [0, C).

    Returns:
      float32 logits [B, C]; cosines divide by max(||x|| ||w_j||, 1e-8).
    """
    x = descriptors.astype(jnp.float32)
    w = weight.astype(jnp.float32)
    norms = jnp.linalg.norm(x, axis=1, keepdims=True) * jnp.linalg.norm(w, axis=1)[None, :]
    cosine = (x @ w.T) / jnp.maximum(norms, 1e-8)
    return scale * (cosine - margin * jax.nn.one_hot(labels, w.shape[0], dtype=jnp.float32))


def cosface_loss(descriptors: jax.Array, weight: jax.Array, labels: jax.Array,
                 scale: float = COSFACE_SCALE, margin: float = COSFACE_MARGIN) -> jax.Array:
    """Mean cross-entropy of `cosface_logits` (torch CrossEntropyLoss). float32 []."""
    logits = cosface_logits(descriptors, weight, labels, scale, margin)
    picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)



# ---------------------------------------------------------------------------------------------
# Multi-similarity (GSV-Cities).


def similarity_matrix(descriptors: jax.Array, *, normalize: bool) -> jax.Array:
    """float32 [B, B] dot products of the rows, L2-normalized first when `normalize` (cosine)."""
    x = descriptors.astype(jnp.float32)
    if normalize:
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x @ x.T


def pair_masks(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bool [B, B] (positive pairs: same label, not the diagonal; negative pairs: other label)."""
    same = labels[:, None] == labels[None, :]
    return same & ~jnp.eye(len(labels), dtype=bool), ~same


def multi_similarity_miner(descriptors: jax.Array, labels: jax.Array, *, epsilon: float = 0.1
                           ) -> tuple[jax.Array, jax.Array]:
    """The pairs pytorch-metric-learning's MultiSimilarityMiner(epsilon) keeps, on cosine
    similarities: positive (a, p) when s(a, p) - epsilon < the hardest negative similarity of a,
    negative (a, n) when s(a, n) + epsilon > the hardest positive similarity of a. A batch
    without any positive or any negative pair mines nothing.

    Args:
      descriptors: [B, D]; labels: int [B] (the place of each image).

    Returns:
      (positive, negative): bool [B, B] masks of the mined pairs.
    """
    sim = similarity_matrix(descriptors, normalize=True)
    positives, negatives = pair_masks(labels)
    hardest_negative = jnp.max(jnp.where(negatives, sim, -jnp.inf), axis=1, keepdims=True)
    hardest_positive = jnp.min(jnp.where(positives, sim, jnp.inf), axis=1, keepdims=True)
    any_pairs = jnp.any(positives) & jnp.any(negatives)
    mined_positives = positives & (sim - epsilon < hardest_negative) & any_pairs
    mined_negatives = negatives & (sim + epsilon > hardest_positive) & any_pairs
    return mined_positives, mined_negatives


def _log_one_plus_sum_exp(x: jax.Array, mask: jax.Array) -> jax.Array:
    """[B]: log(1 + sum_j exp(x[i, j]) over mask[i]) (0 where the row's mask is empty)."""
    masked = jnp.where(mask, x, -jnp.inf)
    return jax.nn.logsumexp(jnp.concatenate([masked, jnp.zeros((len(x), 1), x.dtype)], axis=1), axis=1)


def multi_similarity_loss(descriptors: jax.Array, positive: jax.Array, negative: jax.Array, *,
                          alpha: float = 1.0, beta: float = 50.0, base: float = 0.0) -> jax.Array:
    """pytorch-metric-learning's MultiSimilarityLoss(alpha, beta, base) with GSV-Cities'
    DotProductSimilarity, which (the library's default) L2-normalizes the descriptors first, so
    s is the cosine similarity, gradients included. Over the given pairs, the mean over the B
    anchors of

        1/alpha log(1 + sum_p exp(-alpha (s(a, p) - base))) + 1/beta log(1 + sum_n exp(beta (s(a, n) - base))),

    and 0 when at most one positive and at most one negative pair are given (the library then
    returns no loss).

    Args:
      descriptors: [B, D]; positive, negative: bool [B, B] pair masks (multi_similarity_miner).

    Returns:
      float32 [].
    """
    sim = similarity_matrix(descriptors, normalize=True)
    per_anchor = (_log_one_plus_sum_exp(alpha * (base - sim), positive) / alpha
                  + _log_one_plus_sum_exp(beta * (sim - base), negative) / beta)
    enough = (jnp.sum(positive) > 1) | (jnp.sum(negative) > 1)
    return jnp.where(enough, jnp.mean(per_anchor), 0.0)

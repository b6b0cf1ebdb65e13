"""Triplet-training losses against torch, a numpy transcription and hand values."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vgjax.train import losses

B, N, D = 3, 4, 8


def _descriptors(seed=0, scale=1.0, b=B, n=N, d=D):
    return (np.random.default_rng(seed).normal(size=(b * (2 + n), d)) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# References: torch as the benchmark calls it, and numpy.


def _torch_loss(name, descriptors, n, margin):
    """The benchmark's loop: triplets (q, p, n_k) over the N negative slots, summed, / (B·N)."""
    x = torch.from_numpy(descriptors).double().reshape(-1, 2 + n, descriptors.shape[1])
    query, positive, negatives = x[:, 0], x[:, 1], x[:, 2:]
    b = x.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    if name == "triplet":
        criterion = torch.nn.TripletMarginLoss(margin=margin, p=2, reduction="sum")
        for k in range(n):
            total = total + criterion(query, positive, negatives[:, k])
    elif name == "sare_ind":
        for t in range(b):
            for k in range(n):
                dp = ((query[t] - positive[t]) ** 2).sum()
                dn = ((query[t] - negatives[t, k]) ** 2).sum()
                total = total - torch.log_softmax(torch.stack([-dp, -dn]), dim=0)[0]
    else:
        for t in range(b):
            dp = ((query[t] - positive[t]) ** 2).sum()
            dn = ((query[t] - negatives[t]) ** 2).sum(dim=1)
            total = total - torch.log_softmax(torch.cat([-dp[None], -dn]), dim=0)[0]
    return float(total / (b * n))


def _numpy_loss(name, descriptors, n, margin):
    x = descriptors.astype(np.float64).reshape(-1, 2 + n, descriptors.shape[1])
    q, p, negs = x[:, :1], x[:, 1:2], x[:, 2:]
    if name == "triplet":
        dp = np.linalg.norm(q - p + 1e-6, axis=-1)
        dn = np.linalg.norm(q - negs + 1e-6, axis=-1)
        return np.maximum(dp - dn + margin, 0).sum() / dn.size
    dp = ((q - p) ** 2).sum(-1)
    dn = ((q - negs) ** 2).sum(-1)
    if name == "sare_ind":
        return np.log1p(np.exp(dp - dn)).sum() / dn.size
    return (np.log(np.exp(-dp) + np.exp(-dn).sum(1, keepdims=True)) + dp).sum() / dn.size


# ---------------------------------------------------------------------------------------------
# Values.


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
@pytest.mark.parametrize("margin", [0.1, 2.0])
def test_matches_torch_and_numpy(name, margin):
    x = _descriptors(seed=1)
    value = losses.LOSSES[name](jnp.asarray(x), negs_per_query=N, margin=margin)
    assert value.dtype == jnp.float32 and value.shape == ()
    np.testing.assert_allclose(value, _torch_loss(name, x, N, margin), rtol=2e-6)
    np.testing.assert_allclose(value, _numpy_loss(name, x, N, margin), rtol=2e-6)


def test_triplet_margin_matters_and_sare_ignores_it():
    x = jnp.asarray(_descriptors(seed=2))
    triplet = [losses.triplet_loss(x, negs_per_query=N, margin=m) for m in (0.1, 5.0)]
    assert triplet[1] > triplet[0] + 1.0
    for name in ("sare_ind", "sare_joint"):
        values = [losses.LOSSES[name](x, negs_per_query=N, margin=m) for m in (0.1, 5.0)]
        assert values[0] == values[1]


def _tiny_batch():
    """One tuple in 2-D: q at the origin, p at distance 1, negatives at distances 2 and 3."""
    return jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])


def test_hand_values_tiny_case():
    x = _tiny_batch()
    eps = 1e-6
    dp = math.hypot(-1 + eps, eps)
    dn = [math.hypot(eps, -2 + eps), math.hypot(-3 + eps, eps)]
    assert float(losses.triplet_loss(x, negs_per_query=2, margin=0.1)) == 0.0
    expected = (max(dp - dn[0] + 1.5, 0) + max(dp - dn[1] + 1.5, 0)) / 2  # 0.5 + 0 over 2
    np.testing.assert_allclose(losses.triplet_loss(x, negs_per_query=2, margin=1.5), expected,
                               rtol=1e-6)
    np.testing.assert_allclose(expected, 0.25, atol=2e-6)
    # sare_ind: dp = 1, dn = 4 and 9 (squared).
    expected_ind = (math.log1p(math.exp(1 - 4)) + math.log1p(math.exp(1 - 9))) / 2
    np.testing.assert_allclose(losses.sare_ind_loss(x, negs_per_query=2), expected_ind, rtol=3e-6)
    # sare_joint: -log(e^-1 / (e^-1 + e^-4 + e^-9)) = log(1 + e^-3 + e^-8), over B·N = 2.
    expected_joint = math.log(1 + math.exp(-3) + math.exp(-8)) / 2
    np.testing.assert_allclose(losses.sare_joint_loss(x, negs_per_query=2), expected_joint,
                               rtol=3e-6)


def test_tuple_major_layout():
    """Swapping the roles of positive and a negative inside a tuple changes the loss."""
    x = _tiny_batch()
    swapped = x[jnp.array([0, 2, 1, 3])]
    for name, loss in losses.LOSSES.items():
        kwargs = dict(negs_per_query=2, margin=1.5)
        assert loss(swapped, **kwargs) > loss(x, **kwargs), name


@pytest.mark.parametrize("name", ["sare_ind", "sare_joint"])
def test_sare_is_stable_for_large_distances(name):
    """Squared distances in the thousands would overflow/underflow a naive exp/log."""
    x = _descriptors(seed=3, scale=30.0)
    value = losses.LOSSES[name](jnp.asarray(x), negs_per_query=N)
    assert np.isfinite(float(value))
    np.testing.assert_allclose(value, _torch_loss(name, x, N, 0.1), rtol=2e-5)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_bfloat16_inputs_give_a_float32_loss(name):
    x = _descriptors(seed=4)
    as_bf16 = jnp.asarray(x, dtype=jnp.bfloat16)
    value = losses.LOSSES[name](as_bf16, negs_per_query=N, margin=0.5)
    assert value.dtype == jnp.float32
    rounded = np.asarray(as_bf16.astype(jnp.float32))
    np.testing.assert_allclose(value, _numpy_loss(name, rounded, N, 0.5), rtol=2e-6)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_jit_and_gradients_are_finite_and_match_torch(name):
    x = _descriptors(seed=5, scale=3.0)
    loss = functools.partial(losses.LOSSES[name], negs_per_query=N, margin=0.5)
    value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(x))
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    x_torch = torch.from_numpy(x).double().requires_grad_()
    reference = _torch_value(name, x_torch, N, 0.5)
    reference.backward()
    np.testing.assert_allclose(value, reference.item(), rtol=2e-6)
    np.testing.assert_allclose(grad, x_torch.grad.numpy(), rtol=1e-4, atol=1e-5)


def _torch_value(name, x, n, margin):
    """Differentiable version of `_torch_loss` (vectorized; same formulas)."""
    t = x.reshape(-1, 2 + n, x.shape[1])
    query, positive, negatives = t[:, 0], t[:, 1], t[:, 2:]
    if name == "triplet":
        criterion = torch.nn.TripletMarginLoss(margin=margin, p=2, reduction="sum")
        total = sum(criterion(query, positive, negatives[:, k]) for k in range(n))
    else:
        dp = ((query - positive) ** 2).sum(-1)
        dn = ((query[:, None] - negatives) ** 2).sum(-1)
        if name == "sare_ind":
            pairs = torch.stack([-dp[:, None].expand_as(dn), -dn], dim=-1)
            total = -torch.log_softmax(pairs, dim=-1)[..., 0].sum()
        else:
            total = -torch.log_softmax(torch.cat([-dp[:, None], -dn], dim=1), dim=1)[:, 0].sum()
    return total / (t.shape[0] * n)


def test_sare_joint_any_number_of_negatives():
    for n in (1, 3, 10, 13):
        x = _descriptors(seed=6 + n, b=2, n=n)
        np.testing.assert_allclose(losses.sare_joint_loss(jnp.asarray(x), negs_per_query=n),
                                   _torch_loss("sare_joint", x, n, 0.1), rtol=2e-6)


def test_sare_joint_with_one_negative_equals_sare_ind():
    x = jnp.asarray(_descriptors(seed=7, n=1))
    np.testing.assert_allclose(losses.sare_joint_loss(x, negs_per_query=1),
                               losses.sare_ind_loss(x, negs_per_query=1), rtol=1e-6)


def test_bad_shapes_raise():
    x = jnp.zeros((11, 4))
    with pytest.raises(ValueError, match="not a multiple of 2 \\+ negs_per_query = 12"):
        losses.triplet_loss(x, negs_per_query=10)
    with pytest.raises(ValueError, match="negs_per_query must be >= 1"):
        losses.sare_ind_loss(jnp.zeros((4, 4)), negs_per_query=0)


# ---------------------------------------------------------------------------------------------
# CosFace (CosPlace, reference §5.4).


def numpy_cosface_loss(x, w, labels, s=30.0, m=0.4):
    x, w = x.astype(np.float64), w.astype(np.float64)
    cosine = (x @ w.T) / np.maximum(np.linalg.norm(x, axis=1)[:, None] * np.linalg.norm(w, axis=1)[None], 1e-8)
    logits = s * (cosine - m * np.eye(w.shape[0])[labels])
    logits -= logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels].mean(), logits


def test_cosface_matches_numpy_and_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 16)).astype(np.float32)
    w = rng.normal(size=(5, 16)).astype(np.float32) * 3  # rows of any norm: normalized inside
    labels = np.array([0, 4, 2, 2, 1, 3])
    expected, _ = numpy_cosface_loss(x, w, labels)
    np.testing.assert_allclose(float(losses.cosface_loss(x, w, labels)), expected, rtol=1e-5)
    cosine = torch.nn.functional.linear(torch.nn.functional.normalize(torch.from_numpy(x)),
                                        torch.nn.functional.normalize(torch.from_numpy(w)))
    logits = 30.0 * (cosine - 0.4 * torch.nn.functional.one_hot(torch.from_numpy(labels), 5))
    torch_loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
    np.testing.assert_allclose(float(losses.cosface_loss(x, w, labels)), torch_loss.item(), rtol=1e-5)
    # The margin only touches the target logit.
    logits = np.asarray(losses.cosface_logits(x, w, labels))
    no_margin = np.asarray(losses.cosface_logits(x, w, labels, margin=0.0))
    np.testing.assert_allclose(no_margin - logits, 12.0 * np.eye(5)[labels], atol=1e-4)


def test_cosface_init_is_xavier_uniform():
    w = np.asarray(losses.cosface_init(jax.random.key(0), 300, 512))
    bound = np.sqrt(6.0 / (300 + 512))
    assert w.shape == (300, 512) and np.abs(w).max() <= bound
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.02)


# ---------------------------------------------------------------------------------------------
# Multi-similarity, against pytorch-metric-learning as GSV-Cities configures it.


def _places_batch(seed, places=6, per_place=4, dim=16, spread=0.6):
    """Descriptors of places x K images (L2-normalized), place-major, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((places, dim))
    x = np.repeat(centres, per_place, axis=0) + spread * rng.standard_normal((places * per_place, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.repeat(np.arange(places), per_place).astype(np.int32)


def _pml(x, labels, epsilon=0.1, alpha=1.0, beta=50.0, base=0.0):
    from pytorch_metric_learning import distances, losses as pml_losses, miners

    miner = miners.MultiSimilarityMiner(epsilon=epsilon, distance=distances.CosineSimilarity())
    loss = pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base, distance=distances.DotProductSimilarity())
    embeddings, targets = torch.from_numpy(x), torch.from_numpy(labels).long()
    pairs = miner(embeddings, targets)
    return float(loss(embeddings, targets, pairs)), [t.numpy() for t in pairs]


def _as_pairs(mask):
    rows, cols = np.nonzero(np.asarray(mask))
    return sorted(zip(rows.tolist(), cols.tolist()))


@pytest.mark.parametrize("seed, spread", [(0, 0.6), (1, 0.9), (2, 0.3), (3, 1.5)])
def test_multi_similarity_miner_and_loss_match_pytorch_metric_learning(seed, spread):
    x, labels = _places_batch(seed, spread=spread)
    expected_loss, (a1, p, a2, n) = _pml(x, labels)
    positive, negative = losses.multi_similarity_miner(jnp.asarray(x), jnp.asarray(labels), epsilon=0.1)
    assert _as_pairs(positive) == sorted(zip(a1.tolist(), p.tolist()))
    assert _as_pairs(negative) == sorted(zip(a2.tolist(), n.tolist()))
    loss = losses.multi_similarity_loss(jnp.asarray(x), positive, negative, alpha=1.0, beta=50.0, base=0.0)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5, atol=1e-6)


def test_multi_similarity_gradients_match_pytorch_metric_learning():
    from pytorch_metric_learning import distances, losses as pml_losses, miners

    x, labels = _places_batch(4, places=5, per_place=3)
    embeddings, targets = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(labels).long()
    pairs = miners.MultiSimilarityMiner(epsilon=0.1)(embeddings.detach(), targets)
    pml_losses.MultiSimilarityLoss(alpha=1.0, beta=50.0, base=0.0, distance=distances.DotProductSimilarity())(
        embeddings, targets, pairs).backward()
    positive, negative = losses.multi_similarity_miner(jnp.asarray(x), jnp.asarray(labels))
    grads = jax.grad(lambda d: losses.multi_similarity_loss(d, positive, negative))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grads), embeddings.grad.numpy(), atol=1e-6)


def test_multi_similarity_edge_cases_match_pytorch_metric_learning():
    x, _ = _places_batch(5, places=4, per_place=2)
    for labels in (np.arange(8, dtype=np.int32),          # no positive pair at all: nothing mined
                   np.zeros(8, np.int32),                  # no negative pair at all
                   np.array([0, 0, 1, 2, 3, 4, 5, 6], np.int32)):  # a single positive pair
        expected_loss, (a1, _, a2, _) = _pml(x, labels)
        positive, negative = losses.multi_similarity_miner(jnp.asarray(x), jnp.asarray(labels))
        assert int(positive.sum()) == len(a1) and int(negative.sum()) == len(a2)
        loss = losses.multi_similarity_loss(jnp.asarray(x), positive, negative)
        np.testing.assert_allclose(float(loss), expected_loss, atol=1e-6)

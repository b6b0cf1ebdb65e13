"""Aggregation layers and NetVLAD init against small torch implementations written from the spec
(reference §2.2, §2.3, §2.5): parity on random inputs, weight import, R-MAC regions, CRN shapes,
NetVLAD init formulas, bfloat16."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch_helpers import state_dict_numpy
from torch_reference import TorchConvAP, TorchCRN, TorchMixVPR, TorchNetVLAD, TorchRRM, torch_gem, torch_rmac
from vgjax.models import aggregators as agg
from vgjax.models import netvlad_init
from vgjax.models.convert import StateDictReader, WeightImportError

TOL = 1e-5


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """Full float32 matmuls/convs, so parity holds on accelerators with TF32 defaults too."""
    with jax.default_matmul_precision("highest"):
        yield


# ------------------------------------------------------------------------------ helpers

def randomize(module, seed, scale=1.0):
    """Random values for every tensor except CRN's fixed acc_w (fresh LNs and zero biases would
    hide mapping bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            if "acc_w" not in name:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale)
    return module


def load(torch_module, aggregation, channels, clusters=8, prefix="aggregation.", model_config=None):
    state = {prefix + k: v for k, v in state_dict_numpy(torch_module).items()}
    reader = StateDictReader(state, "test")
    variables = agg.import_torch(reader, prefix, aggregation, channels, clusters, model_config=model_config)
    reader.finish()
    return variables


def maps(seed, shape=(2, 6, 8, 16)):
    """Random NHWC maps (or [B, T, C] tokens) in numpy and the same values in torch's layout
    (NCHW; tokens stay [B, T, C] as the benchmark's layers receive them)."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x_torch = torch.from_numpy(x)
    return x, x_torch.permute(0, 3, 1, 2).contiguous() if x.ndim == 4 else x_torch


def max_err(jax_out, torch_out):
    return float(np.max(np.abs(np.asarray(jax_out, np.float32) - torch_out.detach().numpy())))


# ------------------------------------------------------------------------------ R-MAC regions

def _grid(tops, lefts, size):
    return [(t, l, size) for t in tops for l in lefts]


def test_rmac_regions_match_the_spec_table():
    expected_30x40 = (_grid([0], [0, 10], 30) + _grid([0, 10], [0, 10, 20], 20)
                      + _grid([0, 7, 15], [0, 8, 16, 25], 15))
    assert agg.rmac_regions(30, 40) == expected_30x40
    assert agg.rmac_regions(29, 39) == (_grid([0], [0, 10], 29) + _grid([0, 10], [0, 10, 20], 19)
                                        + _grid([0, 7, 15], [0, 8, 16, 25], 14))
    assert agg.rmac_regions(15, 20) == (_grid([0], [0, 5], 15) + _grid([0, 5], [0, 5, 10], 10)
                                        + _grid([0, 4, 8], [0, 4, 8, 13], 7))
    for h, w in ((30, 40), (29, 39), (15, 20)):
        assert len(agg.rmac_regions(h, w)) == 20


def test_rmac_regions_match_cirtorch_on_many_sizes():
    for h in range(1, 42, 4):
        for w in range(1, 42, 3):
            _, regions = torch_rmac(torch.zeros(1, 1, h, w))
            assert agg.rmac_regions(h, w) == regions, (h, w)


# ------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("shape", [(2, 6, 8, 16), (3, 10, 16)])
def test_gem_parity_maps_and_tokens(shape):
    x, x_torch = maps(0, shape)
    p = torch.tensor([2.7])
    reader = StateDictReader({"aggregation.1.p": p.numpy()})
    variables = agg.import_torch(reader, "aggregation.1.", "gem", shape[-1])
    reader.finish()
    out = agg.GeM().apply(variables, x)
    assert out.shape == (shape[0], shape[-1])
    assert max_err(out, torch_gem(x_torch, p)) <= TOL


def test_spoc_mac_parity():
    x, xt = maps(1)
    assert agg.import_torch(StateDictReader({}), "aggregation.", "spoc", 16) == {"params": {}}
    assert max_err(agg.SPoC().apply({}, x), F.adaptive_avg_pool2d(xt, 1)[:, :, 0, 0]) <= TOL
    assert max_err(agg.MAC().apply({}, x), F.adaptive_max_pool2d(xt, 1)[:, :, 0, 0]) == 0.0


@pytest.mark.parametrize("hw", [(30, 40), (15, 20), (29, 39), (20, 13), (9, 9)])
def test_rmac_parity(hw):
    x, xt = maps(2, (2, *hw, 8))
    reference, _ = torch_rmac(xt)
    assert max_err(agg.RMAC().apply({"params": {}}, x), reference) <= TOL


def test_rrm_parity():
    x, xt = maps(3)
    torch_rrm = randomize(TorchRRM(16), seed=3, scale=0.5)
    out = agg.RRM().apply(load(torch_rrm, "rrm", 16), x)
    assert max_err(out, torch_rrm(xt)) <= TOL


@pytest.mark.parametrize("hw, pool", [((6, 8), (2, 2)), ((7, 5), (3, 2)), ((20, 20), (2, 2))])
def test_convap_parity_with_its_torch_module(hw, pool):
    x, xt = maps(11, (2, *hw, 16))
    torch_convap = randomize(TorchConvAP(16, out_channels=12, s1=pool[0], s2=pool[1]), seed=11, scale=0.3)
    options = {"convap_out_channels": 12, "convap_pool": pool}
    variables = load(torch_convap, "convap", 16, prefix="aggregator.", model_config=options)
    out = agg.create("convap", model_config=options).apply(variables, x)
    assert out.shape == (2, 12 * pool[0] * pool[1]) and max_err(out, torch_convap(xt)) <= TOL
    exported = agg.export_torch(variables, "aggregator.", "convap")
    assert exported.keys() == {"aggregator.channel_pool.weight", "aggregator.channel_pool.bias"}
    np.testing.assert_array_equal(exported["aggregator.channel_pool.weight"], torch_convap.channel_pool.weight.detach())


@pytest.mark.parametrize("depth, ratio, rows", [(4, 1, 4), (2, 2, 2), (1, 0.5, 3)])
def test_mixvpr_parity_with_its_torch_module(depth, ratio, rows):
    x, xt = maps(12, (2, 5, 4, 16))
    torch_mixvpr = randomize(TorchMixVPR(16, 5, 4, out_channels=8, mix_depth=depth, mlp_ratio=ratio, out_rows=rows),
                             seed=12, scale=0.3)
    options = {"mixvpr_out_channels": 8, "mixvpr_out_rows": rows, "mixvpr_mix_depth": depth, "mixvpr_mlp_ratio": ratio}
    variables = load(torch_mixvpr, "mixvpr", 16, prefix="aggregator.", model_config=options)
    out = agg.create("mixvpr", model_config=options).apply(variables, x)
    assert out.shape == (2, 8 * rows) and max_err(out, torch_mixvpr(xt)) <= TOL
    exported = agg.export_torch(variables, "aggregator.", "mixvpr")
    expected = state_dict_numpy(torch_mixvpr)
    assert exported.keys() == {"aggregator." + key for key in expected}
    for key, value in expected.items():
        np.testing.assert_array_equal(exported["aggregator." + key], value)


def test_mixvpr_initialisation_follows_mixvpr():
    params = agg.MixVPR(out_channels=32, out_rows=4).init(jax.random.key(0), jnp.ones((1, 20, 20, 64)))["params"]
    fc1 = np.asarray(params["mix_0"]["fc1"]["kernel"])
    assert fc1.shape == (400, 400) and abs(fc1.std() - 0.02) < 0.001 and not np.any(params["mix_0"]["fc1"]["bias"])
    assert float(np.abs(params["channel_proj"]["kernel"]).max()) <= 1 / math.sqrt(64)
    assert float(np.abs(params["row_proj"]["kernel"]).max()) <= 1 / math.sqrt(400)
    assert agg.output_dim("mixvpr", 1024, model_config={"mixvpr_out_channels": 1024, "mixvpr_out_rows": 4,
                                                        "mixvpr_mix_depth": 4, "mixvpr_mlp_ratio": 1}) == 4096
    assert agg.output_dim("convap", 2048, model_config={"convap_out_channels": 2048, "convap_pool": (2, 2)}) == 8192


@pytest.mark.parametrize("tokens", [False, True])
def test_netvlad_parity_maps_and_tokens(tokens):
    x, xt = maps(4, (2, 12, 16) if tokens else (2, 6, 8, 16))
    torch_vlad = TorchNetVLAD(16, 8, tokens=tokens)
    randomize(torch_vlad, seed=4, scale=4.0)  # peaked soft assignments
    variables = load(torch_vlad, "netvlad", 16)
    out = agg.NetVLAD(clusters=8).apply(variables, x)
    assert out.shape == (2, 8 * 16)
    assert max_err(out, torch_vlad(xt)) <= TOL


@pytest.mark.parametrize("hw", [(6, 8), (10, 4)])
def test_crn_parity(hw):
    x, xt = maps(5, (2, *hw, 16))
    torch_crn = TorchCRN(16, 8)
    randomize(torch_crn, seed=5, scale=2.0)
    variables = load(torch_crn, "crn", 16)
    out = agg.CRN(clusters=8).apply(variables, x)
    assert max_err(out, torch_crn(xt)) <= TOL
    crn_variables = {"params": variables["params"]["crn"]}
    mask = agg.CRNModule().apply(crn_variables, agg.l2_normalize(jnp.asarray(x)))
    reference = torch_crn.crn(F.normalize(xt, p=2, dim=1))[:, 0].detach()
    assert mask.shape == (2, *hw) and float(reference.min()) >= 0.0
    assert max_err(mask, reference) <= TOL * float(reference.abs().max())  # mask values ~100


def test_crn_odd_maps_raise():
    crn = agg.CRN(clusters=4)
    for hw in ((15, 20), (6, 9), (1, 4)):
        with pytest.raises(ValueError, match="CRN: a .* feature map gives a"):
            crn.init(jax.random.key(0), jnp.zeros((1, *hw, 8)))


def test_token_inputs_rejected_where_the_benchmark_forbids_them():
    tokens = jnp.ones((1, 6, 8))
    for name in ("spoc", "mac", "rmac", "rrm", "crn"):
        with pytest.raises(ValueError, match="expected CNN feature maps"):
            agg.create(name, clusters=4).init(jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="unknown aggregation 'cls'"):
        agg.create("cls")


# ------------------------------------------------------------------------------ import errors

def test_import_errors():
    torch_crn = TorchCRN(16, 8)
    state = {"aggregation." + k: v for k, v in state_dict_numpy(torch_crn).items()}
    missing = {k: v for k, v in state.items() if k != "aggregation.crn.filter_5_5.bias"}
    with pytest.raises(WeightImportError, match="missing tensor 'aggregation.crn.filter_5_5.bias'"):
        agg.import_torch(StateDictReader(missing), "aggregation.", "crn", 16, 8)
    expected = re.escape("expected (4, 16, 1, 1) (Conv2d) or (4, 16, 1) (Conv1d)")
    with pytest.raises(WeightImportError, match=expected):
        agg.import_torch(StateDictReader(state), "aggregation.", "crn", 16, clusters=4)
    with pytest.raises(WeightImportError, match="has shape"):
        agg.import_torch(StateDictReader(state), "aggregation.", "crn", 12, 8)
    changed = dict(state, **{"aggregation.crn.acc_w.bias": np.array([0.5], np.float32)})
    with pytest.raises(WeightImportError, match="acc_w"):
        agg.import_torch(StateDictReader(changed), "aggregation.", "crn", 16, 8)
    rrm = {"aggregation." + k: v for k, v in state_dict_numpy(TorchRRM(16)).items()}
    reader = StateDictReader(dict(rrm, **{"aggregation.extra": np.zeros(1)}))
    agg.import_torch(reader, "aggregation.", "rrm", 16)
    with pytest.raises(WeightImportError, match="aggregation.extra"):
        reader.finish()
    with pytest.raises(WeightImportError, match="'aggregation.1.p' has shape"):
        agg.import_torch(StateDictReader({"aggregation.1.p": np.ones(2)}), "aggregation.1.",
                         "gem", 8)


# ------------------------------------------------------------------------------ shapes and init

def test_output_dims():
    assert agg.output_dim("netvlad", 256, 64) == 16384
    assert agg.output_dim("crn", 1024, 64) == 65536
    assert agg.output_dim("gem", 384) == agg.output_dim("rrm", 384) == 384
    variables = jax.eval_shape(agg.NetVLAD().init, jax.random.key(0), jnp.zeros((2, 30, 40, 256)))
    out = jax.eval_shape(agg.NetVLAD().apply, variables, jnp.zeros((2, 30, 40, 256)))
    assert out.shape == (2, 16384)
    tokens = jnp.zeros((1, 576, 384))
    variables = jax.eval_shape(agg.NetVLAD().init, jax.random.key(0), tokens)
    assert jax.eval_shape(agg.NetVLAD().apply, variables, tokens).shape == (1, 24576)
    crn = jax.eval_shape(agg.CRN().init, jax.random.key(0), jnp.zeros((1, 30, 40, 256)))
    assert crn["params"]["crn"]["filter_7_7"]["kernel"].shape == (7, 7, 256, 20)


def test_initial_params():
    x = jnp.ones((1, 6, 8, 16))
    assert float(agg.GeM().init(jax.random.key(0), x)["params"]["p"][0]) == 3.0
    params = agg.CRN(clusters=8).init(jax.random.key(0), x)["params"]
    assert params["centroids"].shape == (8, 16) and params["assignment_kernel"].shape == (16, 8)
    assert 0.0 <= float(params["centroids"].min()) and float(params["centroids"].max()) < 1.0
    assert float(jnp.abs(params["assignment_kernel"]).max()) <= 0.25
    assert set(params["crn"]) == {"filter_3_3", "filter_5_5", "filter_7_7"}
    assert not any(np.any(p["bias"]) for p in params["crn"].values())
    rrm = agg.RRM().init(jax.random.key(0), x)["params"]
    assert rrm["fc1"]["kernel"].shape == (16, 16) and set(rrm) == {"ln1", "fc1", "fc2", "ln2"}


@pytest.mark.parametrize("name", sorted(agg.AGGREGATIONS))
def test_bfloat16_close_to_float32(name):
    x = jax.random.normal(jax.random.key(1), (2, 6, 8, 16))
    if name == "salad":  # DINOv2's (patch map, CLS token), more patches than its 64 clusters
        x = (jax.random.normal(jax.random.key(1), (2, 9, 9, 16)), jax.random.normal(jax.random.key(2), (2, 16)))
    variables = agg.create(name, clusters=8).init(jax.random.key(0), x)
    reference = agg.create(name, clusters=8).apply(variables, x)
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), x)
    out = agg.create(name, clusters=8, dtype=jnp.bfloat16).apply(variables, low)
    assert out.dtype == jnp.bfloat16 and out.shape == reference.shape
    scale = float(jnp.abs(reference).max())
    assert float(jnp.abs(out.astype(jnp.float32) - reference).max()) <= 0.03 * scale


# ------------------------------------------------------------------------------ NetVLAD init

def benchmark_init_params(centroids, descriptors):
    """The benchmark's init_params formulas, transcribed literally in numpy."""
    centroids_assign = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    dots = np.dot(centroids_assign, descriptors.T)
    dots.sort(0)
    dots = dots[::-1, :]
    alpha = (-np.log(0.01) / np.mean(dots[0, :] - dots[1, :])).item()
    return alpha, centroids, alpha * centroids_assign  # conv.weight[:, :, 0, 0]


def clustered(rng, clusters=8, dim=32, per_cluster=400, spread=0.15):
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    points = centres[:, None] + spread * rng.standard_normal((clusters, per_cluster, dim))
    return centres, points.astype(np.float32)


def test_sample_local_descriptors_maps_and_tokens():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((3, 4, 5, 8)).astype(np.float32) for _ in range(2)]
    out = netvlad_init.sample_local_descriptors(batches, per_image=7, rng=1)
    assert out.shape == (6 * 7, 8) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    image = batches[1][2].reshape(20, 8)
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    rows = out[5 * 7:]
    match = np.abs(rows[:, None] - image[None]).max(-1) < 1e-6  # each row is one distinct position
    assert (match.sum(1) == 1).all() and len(set(match.argmax(1))) == 7
    again = netvlad_init.sample_local_descriptors(iter(batches), per_image=7, rng=1)
    np.testing.assert_array_equal(out, again)
    tokens = [jnp.asarray(b.reshape(3, 20, 8)) for b in batches]
    np.testing.assert_array_equal(netvlad_init.sample_local_descriptors(tokens, 7, rng=1), out)
    with pytest.raises(ValueError, match="cannot sample 21 descriptors per image from 20"):
        netvlad_init.sample_local_descriptors(batches, per_image=21)
    assert netvlad_init.images_needed() == 500


def test_init_params_matches_the_benchmark_formulas():
    rng = np.random.default_rng(1)
    descriptors = rng.standard_normal((3000, 24)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    centroids = rng.random((8, 24)).astype(np.float32)
    alpha, raw, weight = benchmark_init_params(centroids, descriptors)
    params = netvlad_init.init_params(centroids, descriptors)
    assert math.isclose(netvlad_init.assignment_alpha(centroids, descriptors), alpha, rel_tol=1e-5)
    np.testing.assert_array_equal(params["centroids"], raw)
    np.testing.assert_allclose(params["assignment_kernel"], weight.T, rtol=1e-5, atol=1e-6)


def test_kmeans_and_init_recover_clusters():
    rng = np.random.default_rng(2)
    centres, points = clustered(rng)
    features = [points.reshape(8, 20, 20, 32)]  # 8 images of 20x20 positions, one cluster each
    descriptors = netvlad_init.sample_local_descriptors(features, per_image=300, rng=3)
    centroids = netvlad_init.kmeans_centroids(descriptors, 8, niter=20)
    again = netvlad_init.kmeans_centroids(descriptors, 8, niter=20)
    np.testing.assert_array_equal(centroids, again)
    units = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    similarity = units @ centres.T
    assert sorted(similarity.argmax(1)) == list(range(8)) and similarity.max(1).min() > 0.95
    kernel = netvlad_init.init_params(centroids, descriptors)["assignment_kernel"]
    units = points / np.linalg.norm(points, axis=-1, keepdims=True)
    assignment = np.asarray(jax.nn.softmax(jnp.asarray(units @ kernel), axis=-1))
    owner = similarity.argmax(0)  # the centroid of each true cluster
    assert (assignment.argmax(-1) == owner[:, None]).mean() > 0.99
    assert np.median(assignment.max(-1)) > 0.9  # alpha makes the soft assignment sharp

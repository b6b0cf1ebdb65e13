"""ViT-B/16 and CCT-14/7x2-384 backbones: torch parity, truncation, freezing, weight import.

The torch references below are written from the reference spec (§2.4, §2.8) with the exact state
dict key names of HF's `ViTModel` and of the benchmark's CCT; they implement the eval-mode
forward only (no dropout / drop path). Weights are random, LayerNorms and embeddings included.
Outputs are LayerNorm-scaled (magnitude ~1-5), so the 1e-4 tolerance is absolute.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_helpers import nhwc, state_dict_numpy
from torch_reference import TorchCCT, TorchViTModel

from vgjax.models.backbones import cct, vit
from vgjax.models.convert import StateDictReader, WeightImportError

TOL = 1e-4
VIT_PREFIX = "backbone.vit_model."
CCT_PREFIX = "backbone."
KEY = jax.random.key(0)


def _randomize(module, seed):
    """Non-trivial LayerNorms and embedding parameters (their default init is 1/0/zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=gen))
            elif "norm" in name and name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            elif "emb" in name or "token" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    return module.eval()


def _prefixed(module, prefix):
    return {prefix + k: v for k, v in state_dict_numpy(module).items()}


def _image(size, batch, seed):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _load(import_fn, state, prefix, **config):
    """Imports through a StateDictReader and checks that every tensor was used or ignored."""
    reader = StateDictReader(state)
    variables = import_fn(reader, prefix, **config)
    reader.finish()
    return variables


def _assert_close_bf16(low, ref):
    """bfloat16 compute: within 5% of the float32 output's scale."""
    assert low.dtype == jnp.bfloat16
    err = float(jnp.max(jnp.abs(low.astype(jnp.float32) - ref)))
    assert err < 0.05 * float(jnp.max(jnp.abs(ref))), err


def _max_err(jax_out, torch_out):
    return float(np.max(np.abs(np.asarray(jax_out) - torch_out.detach().numpy())))


@pytest.fixture(scope="module")
def torch_vit():
    torch.manual_seed(0)
    return _randomize(TorchViTModel(224), 1)


@pytest.fixture(scope="module")
def torch_cct():
    torch.manual_seed(0)
    return _randomize(TorchCCT(), 2)


# ----------------------------------------------------------------------------------------------
# ViT


@pytest.mark.parametrize("trunc_te", [2, None])
def test_vit_parity_224(torch_vit, trunc_te):
    image = _image(224, 2 if trunc_te else 1, seed=3)
    variables = _load(vit.import_torch, _prefixed(torch_vit, VIT_PREFIX), VIT_PREFIX,
                      image_size=224, trunc_te=trunc_te)
    assert sum(k.startswith("layer_") for k in variables["params"]) == (trunc_te or 12)
    with torch.no_grad():
        hidden = torch_vit(image, depth=trunc_te)
    x = jnp.asarray(nhwc(image))
    for output, expected in (("tokens", hidden[:, 1:]), ("cls", hidden[:, 0])):
        model = vit.ViT(image_size=224, trunc_te=trunc_te, output=output)
        out = jax.jit(model.apply)(variables, x)
        assert out.shape == expected.shape
        assert _max_err(out, expected) <= TOL, output


def test_vit_384_parity_and_token_count():
    torch.manual_seed(1)
    torch_model = _randomize(TorchViTModel(384, layers=1), 4)
    variables = _load(vit.import_torch, state_dict_numpy(torch_model), "", image_size=384,
                      trunc_te=1)
    assert variables["params"]["position_embeddings"].shape == (1, 577, 768)
    image = _image(384, 1, seed=5)
    with torch.no_grad():
        expected = torch_model(image)[:, 1:]
    out = jax.jit(vit.ViT(image_size=384, trunc_te=1).apply)(variables, jnp.asarray(nhwc(image)))
    assert out.shape == (1, 576, 768)
    assert _max_err(out, expected) <= TOL


@pytest.mark.parametrize("size, tokens", [(224, 196), (384, 576)])
def test_vit_shapes(size, tokens):
    x = jnp.zeros((2, size, size, 3))
    params = jax.eval_shape(vit.ViT(image_size=size, trunc_te=0).init, KEY, x)["params"]
    assert params["position_embeddings"].shape == (1, tokens + 1, 768)
    assert sum(k.startswith("layer_") for k in params) == 12  # trunc_te=0: no truncation
    for output, shape in (("tokens", (2, tokens, 768)), ("cls", (2, 768))):
        model = vit.ViT(image_size=size, trunc_te=1, output=output)
        assert jax.eval_shape(lambda v: model.apply({"params": v}, x), params).shape == shape


def test_vit_bad_config_and_inputs():
    with pytest.raises(ValueError, match="no position-embedding interpolation"):
        vit.ViT(image_size=224, trunc_te=1).init(KEY, jnp.zeros((1, 384, 384, 3)))
    with pytest.raises(ValueError, match="no position-embedding interpolation"):
        vit.ViT(image_size=224, trunc_te=1).init(KEY, jnp.zeros((1, 224, 384, 3)))
    with pytest.raises(ValueError, match="image_size=256"):
        vit.ViT(image_size=256).init(KEY, jnp.zeros((1, 256, 256, 3)))
    with pytest.raises(ValueError, match="output='gem'"):
        vit.ViT(output="gem").init(KEY, jnp.zeros((1, 224, 224, 3)))
    with pytest.raises(ValueError, match="trunc_te=-1"):
        vit.ViT(trunc_te=-1).init(KEY, jnp.zeros((1, 224, 224, 3)))


def test_vit_import_errors(torch_vit):
    state = _prefixed(torch_vit, VIT_PREFIX)
    with pytest.raises(WeightImportError, match="position_embeddings"):
        vit.import_torch(StateDictReader(state), VIT_PREFIX, image_size=384, trunc_te=1)
    missing = dict(state)
    del missing[VIT_PREFIX + "encoder.layer.1.attention.attention.key.bias"]
    with pytest.raises(WeightImportError, match="missing tensor"):
        vit.import_torch(StateDictReader(missing), VIT_PREFIX, trunc_te=2)
    vit.import_torch(StateDictReader(missing), VIT_PREFIX, trunc_te=1)  # layer 1 is cut away
    with pytest.raises(WeightImportError, match="missing tensor"):
        vit.import_torch(StateDictReader(state), "module.", trunc_te=1)
    extra = dict(state, **{VIT_PREFIX + "embeddings.mask_token": np.zeros((1, 1, 768))})
    reader = StateDictReader(extra)
    vit.import_torch(reader, VIT_PREFIX, trunc_te=1)
    with pytest.raises(WeightImportError, match="mask_token"):
        reader.finish()


def _mask_summary(mask):
    """(set of trainable top-level names, every leaf of each subtree agrees)."""
    trainable = set()
    for name, subtree in mask.items():
        leaves = jax.tree.leaves(subtree)
        assert all(isinstance(leaf, bool) for leaf in leaves) and len(set(leaves)) == 1, name
        if leaves[0]:
            trainable.add(name)
    return trainable


@pytest.mark.parametrize("freeze_te, trained", [
    (None, "all"), (0, "all"), (-1, range(12)), (1, range(2, 12)), (5, range(6, 12))])
def test_vit_trainable_mask(freeze_te, trained):
    params = jax.eval_shape(vit.ViT().init, KEY, jnp.zeros((1, 224, 224, 3)))["params"]
    mask = vit.trainable_mask(params, freeze_te=freeze_te)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    expected = set(params) if trained == "all" else {f"layer_{i}" for i in trained}
    assert _mask_summary(mask) == expected
    if trained != "all":
        assert not {"patch_embeddings", "cls_token", "position_embeddings", "layernorm"} & expected


def test_vit_bfloat16(torch_vit):
    variables = _load(vit.import_torch, _prefixed(torch_vit, VIT_PREFIX), VIT_PREFIX, trunc_te=1)
    x = jnp.asarray(nhwc(_image(224, 1, seed=6)))
    ref = vit.ViT(trunc_te=1, output="cls").apply(variables, x)
    low = vit.ViT(trunc_te=1, output="cls", dtype=jnp.bfloat16).apply(variables, x)
    _assert_close_bf16(low, ref)


# ----------------------------------------------------------------------------------------------
# CCT


def _cct_outputs(variables, x, trunc_te):
    return {output: jax.jit(cct.CCT(trunc_te=trunc_te, output=output).apply)(variables, x)
            for output in cct.OUTPUTS}


@pytest.mark.parametrize("trunc_te", [2, None])
def test_cct_parity_384(torch_cct, trunc_te):
    image = _image(384, 2 if trunc_te else 1, seed=7)
    variables = _load(cct.import_torch, _prefixed(torch_cct, CCT_PREFIX), CCT_PREFIX,
                      trunc_te=trunc_te)
    assert sum(k.startswith("blocks_") for k in variables["params"]) == (trunc_te or 14)
    outputs = _cct_outputs(variables, jnp.asarray(nhwc(image)), trunc_te)
    shapes = {"tokens": (len(image), 576, 384), "cls": (len(image), 384),
              "seqpool": (len(image), 384)}
    for output, out in outputs.items():
        with torch.no_grad():
            expected = torch_cct(image, depth=trunc_te, output=output)
        assert out.shape == shapes[output]
        assert _max_err(out, expected) <= TOL, output
    np.testing.assert_array_equal(outputs["cls"], outputs["tokens"][:, 0])  # first patch token


def test_cct_train_mode(torch_cct):
    variables = _load(cct.import_torch, _prefixed(torch_cct, CCT_PREFIX), CCT_PREFIX, trunc_te=2)
    x = jnp.asarray(nhwc(_image(384, 2, seed=8)))
    model = cct.CCT(trunc_te=2, output="seqpool")
    run = jax.jit(lambda v, x, rng: model.apply(v, x, train=True, rngs={"dropout": rng}))
    eval_out = jax.jit(model.apply)(variables, x)
    first, again, other = (run(variables, x, jax.random.key(s)) for s in (0, 0, 1))
    assert bool(jnp.all(jnp.isfinite(first)))
    assert float(jnp.max(jnp.abs(first - eval_out))) > 1e-3
    np.testing.assert_array_equal(first, again)
    assert float(jnp.max(jnp.abs(first - other))) > 1e-3
    np.testing.assert_allclose(cct.drop_path_rates()[[0, 1, 13]], [0.0, 0.1 / 13, 0.1])


def test_cct_drop_path_per_sample():
    x = jnp.ones((256, 3, 4))
    block = cct.CCTBlock(drop_path_rate=0.25)
    out = block.apply({}, x, True, rngs={"dropout": jax.random.key(0)}, method=block._drop_path)
    kept = np.asarray(out[:, 0, 0]) != 0
    expected = np.broadcast_to(np.where(kept[:, None, None], 1 / 0.75, 0.0), x.shape)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert 0.6 < kept.mean() < 0.9
    np.testing.assert_array_equal(block.apply({}, x, False, method=block._drop_path), x)


def test_cct_bad_inputs():
    with pytest.raises(ValueError, match=r"needs \[B, 384, 384, 3\]"):
        cct.CCT(trunc_te=1).init(KEY, jnp.zeros((1, 224, 224, 3)))
    with pytest.raises(ValueError, match="output='mean'"):
        cct.CCT(output="mean").init(KEY, jnp.zeros((1, 384, 384, 3)))
    with pytest.raises(ValueError, match="trunc_te=-2"):
        cct.CCT(trunc_te=-2).init(KEY, jnp.zeros((1, 384, 384, 3)))


def test_cct_import_errors(torch_cct):
    state = _prefixed(torch_cct, CCT_PREFIX)
    wrong = dict(state, **{CCT_PREFIX + "classifier.positional_emb": np.zeros((1, 577, 384))})
    with pytest.raises(WeightImportError, match="positional_emb"):
        cct.import_torch(StateDictReader(wrong), CCT_PREFIX, trunc_te=1)
    for key in ("classifier.attention_pool.bias", "classifier.blocks.0.self_attn.qkv.weight"):
        missing = {k: v for k, v in state.items() if k != CCT_PREFIX + key}
        with pytest.raises(WeightImportError, match="missing tensor"):
            cct.import_torch(StateDictReader(missing), CCT_PREFIX, output="tokens", trunc_te=1)
    reader = StateDictReader(dict(state, **{CCT_PREFIX + "classifier.class_emb": np.zeros(384)}))
    cct.import_torch(reader, CCT_PREFIX, trunc_te=3)
    with pytest.raises(WeightImportError, match="class_emb"):
        reader.finish()


@pytest.mark.parametrize("freeze_te, trunc_te, trained", [
    (None, None, "all"), (0, None, "all"), (-1, None, range(14)), (1, None, range(2, 14)),
    (5, None, range(6, 14)), (1, 8, range(2, 8))])
def test_cct_trainable_mask(freeze_te, trunc_te, trained):
    params = jax.eval_shape(cct.CCT(trunc_te=trunc_te, output="cls").init, KEY,
                            jnp.zeros((1, 384, 384, 3)))["params"]
    assert "attention_pool" in params
    mask = cct.trainable_mask(params, freeze_te=freeze_te)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    expected = set(params) if trained == "all" else {f"blocks_{i}" for i in trained}
    assert _mask_summary(mask) == expected


def test_cct_bfloat16(torch_cct):
    variables = _load(cct.import_torch, _prefixed(torch_cct, CCT_PREFIX), CCT_PREFIX, trunc_te=1)
    x = jnp.asarray(nhwc(_image(384, 1, seed=9)))
    ref = cct.CCT(trunc_te=1, output="seqpool").apply(variables, x)
    low = cct.CCT(trunc_te=1, output="seqpool", dtype=jnp.bfloat16).apply(variables, x)
    _assert_close_bf16(low, ref)

"""On-device query augmentations against torchvision's functional ops and its parameter draws.

Tolerances (float32 images in [0, 1]):
- brightness/contrast/saturation: 1e-6 (same formula; float rounding of the blend and mean).
- hue: 5e-6 (the same HSV round trip written with different divisions; measured 9e-7).
- resized_crop: 2e-5 (torch's CPU upsample kernel orders its float ops differently; 4e-6).
- rotate: bit-exact except pixels whose source point lies within float noise of a
  half-pixel tie, where the two sides may pick neighbouring pixels (0 pixels here).
- perspective: the homography is solved in float32 here and in float64 by torchvision, so
  source points differ by about 1e-4 pixel: interior pixels agree with torchvision's tensor op
  to 2e-4 on random-noise images (measured 2.4e-5). The border follows PIL (what the benchmark
  runs): vs torchvision on uint8 PIL images pixels agree to 2/255 (PIL rounds to uint8), except
  those whose source point lies exactly on the image edge (3 of 18432 here).
"""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image
from torch_helpers import import_torchvision

from vgjax.data import augment

F = import_torchvision().transforms.functional
Interpolation = import_torchvision().transforms.InterpolationMode
TV_RRC = import_torchvision().transforms.RandomResizedCrop

FULL = augment.AugmentConfig(brightness=0.7, contrast=0.7, saturation=0.7, hue=0.5,
                             rand_perspective=0.5, random_resized_crop=0.5, random_rotation=20.0)


def _images(batch=4, height=24, width=32, seed=0):
    """uint8 [B, H, W, 3] noise and the same as float32 in [0, 1]."""
    uint8 = np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), np.uint8)
    return uint8, uint8.astype(np.float32) / 255


def _torch_each(fn, images, *per_image_args):
    """Applies fn(chw_tensor, *args_i) to every image of float [B, H, W, 3]."""
    outs = [fn(torch.from_numpy(image).permute(2, 0, 1), *(a[i] for a in per_image_args))
            for i, image in enumerate(images)]
    return np.stack([out.permute(1, 2, 0).numpy() for out in outs])


# Ops with given parameters.


@pytest.mark.parametrize("ours, theirs, factors, atol", [
    (augment.adjust_brightness, F.adjust_brightness, [0.0, 0.3, 1.0, 1.7], 1e-6),
    (augment.adjust_contrast, F.adjust_contrast, [0.0, 0.3, 1.0, 1.7], 1e-6),
    (augment.adjust_saturation, F.adjust_saturation, [0.0, 0.3, 1.0, 1.7], 1e-6),
    (augment.adjust_hue, F.adjust_hue, [-0.5, -0.2, 0.13, 0.5], 5e-6),
])
def test_colour_ops_match_torchvision(ours, theirs, factors, atol):
    _, images = _images()
    got = np.asarray(ours(images, jnp.asarray(factors, jnp.float32)))
    np.testing.assert_allclose(got, _torch_each(theirs, images, factors), rtol=0, atol=atol)
    assert np.abs(got - images).max() > 0.1  # the factors do something


def test_resized_crop_matches_torchvision_without_antialias():
    _, images = _images(height=25, width=32)
    top, left, height, width = [0, 5, 10, 0], [0, 3, 20, 0], [25, 13, 15, 25], [32, 9, 12, 31]
    got = np.asarray(augment.resized_crop(images, *map(jnp.asarray, (top, left, height, width))))
    want = _torch_each(lambda x, *box: F.resized_crop(x, *map(int, box), [25, 32], antialias=False),
                       images, top, left, height, width)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(got[0], images[0])  # the whole image: exactly itself


def test_rotate_matches_torchvision_nearest_with_zero_fill():
    # Both sides odd: 90 degrees on H, W of different parities maps pixel centres exactly onto
    # half-pixel ties, which each implementation breaks by its own float noise.
    _, images = _images(batch=6, height=25, width=33)
    angles = [0.0, 10.0, -33.3, 90.0, 180.0, 7.5]
    got = np.asarray(augment.rotate(images, jnp.asarray(angles)))
    want = _torch_each(lambda x, a: F.rotate(x, float(a), Interpolation.NEAREST), images, angles)
    mismatched = np.abs(got - want).max(axis=-1) > 0
    assert mismatched.mean() < 2e-3, mismatched.sum()
    np.testing.assert_array_equal(got[0], images[0])
    assert (got[1, 0, 0] == 0).all() and (got[1, -1, -1] == 0).all()  # corners come from outside


def _source_points(startpoints, endpoints, height, width):
    """float64 source point of every output pixel centre, from torchvision's coefficients."""
    a, b, c, d, e, f, g, h = F._get_perspective_coeffs(startpoints, endpoints)
    y, x = np.mgrid[0:height, 0:width] + 0.5
    denominator = g * x + h * y + 1
    return (a * x + b * y + c) / denominator, (d * x + e * y + f) / denominator


def test_perspective_matches_torchvision_tensor_inside_and_pil_everywhere():
    uint8, images = _images(batch=6, height=48, width=64)
    pil_rule_holds = np.ones((6, 48, 64), bool)
    start, end, _ = augment.sample_perspective(jax.random.key(1), 6, 48, 64, 0.6)
    got = np.asarray(augment.perspective(images, start, end))
    start, end = np.asarray(start).tolist(), np.asarray(end).tolist()
    tensor = _torch_each(lambda x, s, e: F.perspective(x, s, e, Interpolation.BILINEAR),
                         images, start, end)
    pil = np.stack([np.asarray(F.perspective(Image.fromarray(image), s, e,
                                             Interpolation.BILINEAR, fill=0))
                    for image, s, e in zip(uint8, start, end)]) / 255
    assert start[0] != end[0]
    for i in range(6):
        x, y = _source_points(start[i], end[i], 48, 64)
        # All four bilinear taps inside: both border rules agree.
        inside = (x > 0.5 + 1e-3) & (x < 63.5 - 1e-3) & (y > 0.5 + 1e-3) & (y < 47.5 - 1e-3)
        assert inside.mean() > 0.3
        np.testing.assert_allclose(got[i][inside], tensor[i][inside], rtol=0, atol=2e-4)
        outside = (x < -1) | (x > 65) | (y < -1) | (y > 49)
        assert (got[i][outside] == 0).all()
        # Integer corners put some source points exactly on the image edge, where float
        # rounding decides between a pixel value and the fill.
        edge_distance = np.minimum(np.minimum(abs(x), abs(x - 64)), np.minimum(abs(y), abs(y - 48)))
        pil_rule_holds[i] = edge_distance > 1e-3
    assert pil_rule_holds.mean() > 0.99
    np.testing.assert_allclose(got[pil_rule_holds], pil[pil_rule_holds], rtol=0, atol=2 / 255)


# Parameter draws.


def test_colour_factors_cover_their_range():
    assert augment.jitter_range("brightness", 0.7) == pytest.approx((0.3, 1.7))
    assert augment.jitter_range("contrast", 1.5) == (0.0, 2.5)
    assert augment.jitter_range("hue", 0.5) == (-0.5, 0.5)
    factors = np.asarray(augment.sample_factors(jax.random.key(0), 2000, -0.5, 0.5))
    assert factors.min() >= -0.5 and factors.max() < 0.5
    assert factors.min() < -0.45 and factors.max() > 0.45 and len(np.unique(factors)) > 1900


def test_perspective_corners_take_torchvisions_integer_offsets():
    height, width, scale = 9, 13, 0.5  # max offsets: int(0.5 * 6) = 3 in x, int(0.5 * 4) = 2 in y
    start, end, apply = augment.sample_perspective(jax.random.key(0), 4000, height, width, scale)
    start, end, apply = np.asarray(start), np.asarray(end), np.asarray(apply)
    np.testing.assert_array_equal(start[0], [[0, 0], [12, 0], [12, 8], [0, 8]])
    offsets = np.abs(end - start)
    for axis, high in ((0, 3), (1, 2)):  # torchvision's randint(0, max + 1): every value occurs
        for corner in range(4):
            assert set(offsets[:, corner, axis].tolist()) == set(range(high + 1))
    assert (end[:, :2, 1] >= 0).all() and (end[:, 1:3, 0] <= 12).all()  # moved inwards
    assert 0.45 < apply.mean() < 0.55


def test_resized_crop_draw_matches_torchvision():
    n, height, width = 3000, 48, 64
    top, left, h, w = map(np.asarray, augment.sample_resized_crop(
        jax.random.key(0), n, height, width, (0.5, 1.0)))
    assert (h >= 1).all() and (top + h <= height).all() and (left + w <= width).all()
    area, ratio = h * w / (height * width), w / h
    assert area.min() > 0.45 and ratio.min() > 0.7 and ratio.max() < 1.4  # rounding slack
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = np.array([TV_RRC.get_params(image, (0.5, 1.0), augment.RATIO) for _ in range(n)])
    their_area = theirs[:, 2] * theirs[:, 3] / (height * width)
    assert abs(area.mean() - their_area.mean()) < 0.01
    assert abs(ratio.mean() - (theirs[:, 3] / theirs[:, 2]).mean()) < 0.01
    assert len(set(zip(top.tolist(), left.tolist()))) > 100  # placed at random


def test_resized_crop_fallback_is_central_with_the_ratio_clamped():
    assert augment._crop_fallback(60, 128) == (0, 24, 60, 80)  # w = round(60 * 4/3)
    assert augment._crop_fallback(128, 60) == (24, 0, 80, 60)  # h = round(60 / (3/4))
    assert augment._crop_fallback(480, 640) == (0, 0, 480, 640)
    draws = augment.sample_resized_crop(jax.random.key(0), 64, 60, 128, (1.0, 1.0))
    assert {tuple(map(int, d)) for d in zip(*draws)} == {(0, 24, 60, 80)}  # tries never fit


def test_rotation_angles_stay_in_range():
    angles = np.asarray(augment.sample_rotation(jax.random.key(0), 2000, 20.0))
    assert angles.min() >= -20 and angles.max() < 20 and angles.min() < -19 and angles.max() > 19


# The query transform.


def test_identity_config_changes_nothing_on_4_3_images():
    _, images = _images(batch=8, height=96, width=128)
    config = augment.AugmentConfig(horizontal_flip=True)
    assert augment.is_identity(config, (96, 128)) and augment.is_identity(config, (64, 64))
    assert not augment.is_identity(augment.AugmentConfig(hue=0.1), (96, 128))
    out = augment.augment_queries(jnp.asarray(images), jax.random.key(0), config)
    np.testing.assert_array_equal(np.asarray(out), images)


def test_crop_is_always_on_for_other_aspect_ratios():
    _, images = _images(batch=2, height=60, width=128)
    assert not augment.is_identity(augment.AugmentConfig(), (60, 128))
    out = augment.augment_queries(jnp.asarray(images), jax.random.key(0), augment.AugmentConfig())
    want = F.resized_crop(torch.from_numpy(images).permute(0, 3, 1, 2), 0, 24, 60, 80, [60, 128],
                          antialias=False)
    np.testing.assert_allclose(np.asarray(out), want.permute(0, 2, 3, 1).numpy(), atol=2e-5)


@pytest.mark.parametrize("option, value", [("brightness", 0.5), ("hue", 0.3),
                                           ("rand_perspective", 0.8), ("random_rotation", 30.0)])
def test_each_image_gets_its_own_parameters(option, value):
    _, image = _images(batch=1, height=24, width=32)
    images = jnp.asarray(np.repeat(image, 8, axis=0))
    out = np.asarray(augment.augment_queries(images, jax.random.key(3),
                                             augment.AugmentConfig(**{option: value})))
    changed = np.abs(out - image).reshape(8, -1).max(axis=1) > 0
    distinct = {out[i].tobytes() for i in range(8) if changed[i]}
    assert len(distinct) == changed.sum() >= 2
    if option == "rand_perspective":  # p = 0.5: some images stay as they are
        assert not changed.all()


def test_ops_run_in_the_benchmarks_order_like_torchvision():
    _, images = _images(batch=4, height=30, width=40)
    config = augment.AugmentConfig(brightness=0.7, contrast=0.7, saturation=0.7, hue=0.5,
                                   random_resized_crop=0.6, random_rotation=30.0)
    params = augment.sample_query_params(jax.random.key(5), 4, 30, 40, config)
    assert list(params) == ["brightness", "contrast", "saturation", "hue", "crop", "rotation"]
    got = np.asarray(augment.apply_query_params(jnp.asarray(images), params))
    p = {k: [np.asarray(v).tolist() for v in vs] for k, vs in params.items()}

    def torchvision_chain(x, i):
        x = F.adjust_brightness(x, p["brightness"][0][i])
        x = F.adjust_contrast(x, p["contrast"][0][i])
        x = F.adjust_saturation(x, p["saturation"][0][i])
        x = F.adjust_hue(x, p["hue"][0][i])
        x = F.resized_crop(x, *(p["crop"][k][i] for k in range(4)), [30, 40], antialias=False)
        return F.rotate(x, p["rotation"][0][i], Interpolation.NEAREST)

    want = _torch_each(torchvision_chain, images, range(4))
    close = np.abs(got - want).max(axis=-1) < 5e-5
    assert close.mean() > 0.998


def test_order_does_not_depend_on_the_params_dict():
    _, images = _images()
    b, c = (jnp.asarray([0.4, 1.6, 0.8, 1.2]),), (jnp.asarray([1.7, 0.2, 1.3, 0.6]),)
    got = augment.apply_query_params(jnp.asarray(images), {"contrast": c, "brightness": b})
    want = augment.adjust_contrast(augment.adjust_brightness(images, *b), *c)
    other_order = augment.adjust_brightness(augment.adjust_contrast(images, *c), *b)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.abs(np.asarray(got) - np.asarray(other_order)).max() > 0.01


def test_flip_flips_the_whole_batch_or_nothing():
    _, images = _images(batch=5, height=6, width=8)
    images = jnp.asarray(images)
    outcomes = []
    for seed in range(16):
        out = np.asarray(augment.flip_batch(images, jax.random.key(seed), True))
        flipped = np.array_equal(out, np.asarray(images)[:, :, ::-1])
        assert flipped or np.array_equal(out, images)
        outcomes.append(flipped)
    assert any(outcomes) and not all(outcomes)
    np.testing.assert_array_equal(augment.flip_batch(images, jax.random.key(0), False), images)


def test_full_config_compiles_once_and_runs_fast_at_96x128():
    _, images = _images(batch=8, height=96, width=128)
    images = jnp.asarray(images)
    start = time.perf_counter()
    out = augment.augment_queries(images, jax.random.key(0), FULL).block_until_ready()
    compiled = time.perf_counter() - start
    cache = augment.augment_queries._cache_size()
    start = time.perf_counter()
    again = augment.augment_queries(images, jax.random.key(1), FULL).block_until_ready()
    assert time.perf_counter() - start < 1.0 and compiled < 30.0
    assert augment.augment_queries._cache_size() == cache  # a new key does not recompile
    assert out.shape == images.shape and out.dtype == jnp.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    assert not np.array_equal(np.asarray(out), np.asarray(again))


# Options.


def test_config_reads_the_train_section_and_names_bad_options():
    train = ml_collections.ConfigDict({
        "lr": 1e-5, "brightness": 0.7, "contrast": 0, "saturation": 0.7, "hue": 0.5,
        "rand_perspective": 0.0, "horizontal_flip": True, "random_resized_crop": 0.5,
        "random_rotation": 10})
    config = augment.AugmentConfig.from_config(train)
    assert config == augment.AugmentConfig(brightness=0.7, saturation=0.7, hue=0.5,
                                           horizontal_flip=True, random_resized_crop=0.5,
                                           random_rotation=10.0)
    assert hash(config) == hash(augment.AugmentConfig.from_config(train))  # usable as static
    for option, value in (("hue", 0.6), ("brightness", -0.1), ("rand_perspective", 1.5)):
        with pytest.raises(ValueError, match=option):
            augment.AugmentConfig(**{option: value})


def test_cosplace_color_jitter_follows_each_images_own_order():
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 10, 3)), jnp.float32)
    factors = {"brightness": jnp.array([1.4, 0.6]), "contrast": jnp.array([0.5, 1.5]),
               "saturation": jnp.array([1.3, 0.4]), "hue": jnp.array([0.2, -0.3])}
    orders = jnp.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    got = augment.color_jitter_in_order(images, factors, orders)
    ops = {"brightness": augment.adjust_brightness, "contrast": augment.adjust_contrast,
           "saturation": augment.adjust_saturation, "hue": augment.adjust_hue}
    for b, order in enumerate(([0, 1, 2, 3], [3, 2, 1, 0])):
        x = images[b:b + 1]
        for op in order:
            name = ("brightness", "contrast", "saturation", "hue")[op]
            x = ops[name](x, factors[name][b:b + 1])
        np.testing.assert_allclose(got[b:b + 1], x, atol=1e-6)
    assert not np.allclose(got[0], augment.color_jitter_in_order(images, factors, orders[::-1])[0])


def test_cosplace_augment_shapes_range_and_randomness():
    images = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 32, 32, 3)), jnp.float32)
    out = augment.cosplace_augment(images, jax.random.key(0))
    assert out.shape == images.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not np.allclose(out, augment.cosplace_augment(images, jax.random.key(1)))
    np.testing.assert_array_equal(out, augment.cosplace_augment(images, jax.random.key(0)))

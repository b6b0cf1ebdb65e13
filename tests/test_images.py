"""Host-side image transforms against hand-computed torch/torchvision semantics."""

import warnings

import numpy as np
import pytest
from PIL import Image

from vgjax.data import images
from vgjax.data.pipeline import inference_batches


def _column(values):
    """uint8 [len, 1, 3] image whose rows hold `values` in every channel."""
    return np.repeat(np.asarray(values, np.uint8)[:, None, None], 3, axis=2)


def test_bilinear_upsample_matches_torch_half_pixel_rule():
    # torch (align_corners=False): src = (dst + 0.5) * in/out - 0.5, clamped at 0.
    # 2 -> 4: src = -0.25 (-> 0), 0.25, 0.75, 1.25 (i1 clamped) => 0, 25, 75, 100.
    out = images.resize_bilinear(_column([0, 100]), (4, 1))
    assert out[:, 0, 0].tolist() == [0, 25, 75, 100]


def test_bilinear_downsample_has_no_antialias():
    # 4 -> 2: src = 0.5, 2.5 => mean of pairs; rows 0 and 3 carry no weight beyond that.
    out = images.resize_bilinear(_column([0, 40, 80, 200]), (2, 1))
    assert out[:, 0, 0].tolist() == [20, 140]
    # 6 -> 2: src = 1.0, 4.0 => exactly rows 1 and 4 (an antialiased resize would blend).
    out = images.resize_bilinear(_column([0, 10, 50, 90, 130, 250]), (2, 1))
    assert out[:, 0, 0].tolist() == [10, 130]


def test_bilinear_is_separable_over_width_and_identity_at_same_size():
    image = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    assert images.resize_bilinear(image, (5, 7)) is image
    wide = images.resize_bilinear(image, (5, 14))
    expected = images.resize_bilinear(image.transpose(1, 0, 2), (14, 5)).transpose(1, 0, 2)
    np.testing.assert_array_equal(wide, expected)


@pytest.mark.parametrize("size, shorter, expected", [
    ((480, 640), 480, (480, 640)),
    ((600, 800), 480, (480, 640)),
    ((800, 600), 480, (640, 480)),
    ((3, 7), 2, (2, 4)),  # int() truncation, as torchvision: int(2 * 7 / 3) = 4
    ((5, 5), 3, (3, 3)),
])
def test_shorter_side_size(size, shorter, expected):
    assert images.shorter_side_size(*size, shorter) == expected


def test_nearest_by_scale_picks_floor_of_scaled_index():
    # scale 1.5 on 4 rows: out = floor(6); src = floor(dst / 1.5) = 0,0,1,2,2,3.
    out = images.resize_nearest_by_scale(_column([10, 20, 30, 40]), 1.5)
    assert out.shape == (6, 1, 3)
    assert out[:, 0, 0].tolist() == [10, 10, 20, 30, 30, 40]


def test_center_crop_rounds_offsets_like_torchvision():
    image = np.arange(5 * 4).reshape(5, 4, 1).repeat(3, axis=2).astype(np.uint8)
    # top = round((5 - 2) / 2) = round(1.5) = 2, left = round((4 - 2) / 2) = 1
    np.testing.assert_array_equal(images.center_crop(image, (2, 2)), image[2:4, 1:3])
    with pytest.raises(ValueError, match="larger than image"):
        images.center_crop(image, (6, 2))


def test_five_crops_order_and_positions():
    image = np.arange(3 * 5).reshape(3, 5, 1).repeat(3, axis=2).astype(np.uint8)
    crops = images.five_crops(image, 3)
    assert crops.shape == (5, 3, 3, 3)
    for crop, cols in zip(crops, ([0, 1, 2], [2, 3, 4], [0, 1, 2], [2, 3, 4], [1, 2, 3])):
        np.testing.assert_array_equal(crop, image[:, cols])


def test_load_rgb_converts_and_names_bad_files(tmp_path):
    Image.fromarray(np.full((3, 4), 7, np.uint8), mode="L").save(tmp_path / "gray.jpg")
    rgb = images.load_rgb(tmp_path / "gray.jpg")
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match="cannot read image .*broken.jpg"):
        images.load_rgb(tmp_path / "broken.jpg")


def test_inference_batches_keep_order_and_pad_the_last_batch(tmp_path):
    paths = []
    for i in range(7):
        paths.append(str(tmp_path / f"{i}.png"))  # lossless, so values survive the round trip
        Image.fromarray(np.full((4, 6, 3), 10 * i, np.uint8)).save(paths[-1])
    batches = list(inference_batches(paths, lambda im: images.resize_bilinear(im, (2, 3)), 3))
    assert [b.images.shape for b in batches] == [(3, 2, 3, 3)] * 3
    assert [(b.start, b.num_valid) for b in batches] == [(0, 3), (3, 3), (6, 1)]
    firsts = np.concatenate([b.images[:b.num_valid, 0, 0, 0] for b in batches])
    assert firsts.tolist() == [0, 10, 20, 30, 40, 50, 60]
    assert not batches[-1].images[1:].any()


@pytest.mark.parametrize("side", [11, 15])  # PIL warns above MAX_IMAGE_PIXELS, raises above twice it
def test_load_rgb_refuses_a_decompression_bomb_naming_the_file(tmp_path, monkeypatch, side):
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(tmp_path / "bomb.png")
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "fine.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert images.load_rgb(tmp_path / "fine.png").shape == (10, 10, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL's own, before ours
        with pytest.raises(OSError, match=r"^cannot read image .*bomb.png: .*exceeds .*decompression bomb"):
            images.load_rgb(tmp_path / "bomb.png")


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored landscape with orientation 6 (rotate 90 degrees clockwise to view)
    loads upright, as portrait, whatever its type."""
    stored = np.zeros((10, 20, 3), np.uint8)
    stored[:, :5] = 255  # the left band of the stored image becomes the top band
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[images.EXIF_ORIENTATION] = 6
    for name in ("photo.jpg", "photo.png"):
        image.save(tmp_path / name, exif=exif)
        upright = images.load_rgb(tmp_path / name)
        assert upright.shape == (20, 10, 3)
        assert upright[:4].mean() > 200 and upright[6:].mean() < 50
    Image.fromarray(stored).save(tmp_path / "plain.png")
    np.testing.assert_array_equal(images.load_rgb(tmp_path / "plain.png"), stored)

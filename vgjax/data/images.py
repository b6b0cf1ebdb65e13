"""Image decoding and the benchmark's test-time geometric transforms, on host, uint8 HWC.

The benchmark (reference.md §3.1, §4.2) resizes *normalized float* tensors with torch's bilinear
interpolation (align_corners=False, no antialias) and central_crop uses nearest interpolation.
vgjax ships uint8 images to the device and normalizes there (4x less host->device traffic), so
the same interpolation is computed here in float32 and rounded to uint8. Normalization is affine
per channel and commutes with interpolation, so the only difference from the original is that
rounding: at most 0.5 grey levels before normalization (deliberate, for throughput). When an
image already has the target size no interpolation happens and the result is bit-exact.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps


# What `open_image` raises for a file that cannot be opened (callers name the file).
OPEN_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Opens an image file (PIL, lazily), with PIL's decompression-bomb limit as an error.

    PIL raises DecompressionBombError above 2 * PIL.Image.MAX_IMAGE_PIXELS but only warns above
    MAX_IMAGE_PIXELS; here both are errors (set MAX_IMAGE_PIXELS = None to read any size).

    Raises:
      One of OPEN_ERRORS.
    """
    image = Image.open(path)
    limit, pixels = Image.MAX_IMAGE_PIXELS, image.width * image.height
    if limit is not None and pixels > limit:
        image.close()
        raise Image.DecompressionBombError(
            f"image size ({pixels} pixels) exceeds PIL.Image.MAX_IMAGE_PIXELS = {limit}, could be "
            "a decompression bomb; raise that limit to read it")
    return image


EXIF_ORIENTATION = 0x0112


def is_rotated(image: Image.Image) -> bool:
    """Whether the file's EXIF orientation asks for a rotation or flip."""
    return image.getexif().get(EXIF_ORIENTATION, 1) != 1


def upright_rgb(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] RGB of an opened image, its EXIF orientation applied."""
    if is_rotated(image):
        image = ImageOps.exif_transpose(image)
    return np.asarray(image.convert("RGB"))


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decodes an image file to uint8 [H, W, 3] RGB, upright: an EXIF orientation (phone
    photos) is applied, which the PyTorch originals do not do (VG datasets carry none).

    Raises:
      OSError: naming the file if it cannot be read or decoded, or has more pixels than PIL
        allows (see `open_image`).
    """
    try:
        with open_image(path) as image:
            return upright_rgb(image)
    except OPEN_ERRORS as error:
        raise OSError(f"cannot read image {path}: {error}") from error


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of torch's bilinear resize (align_corners=False, no antialias).

    Returns:
      (i0, i1, w1): int [out], int [out], float32 [out]; out[k] = (1 - w1) * x[i0] + w1 * x[i1].
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (src - i0).astype(np.float32)


def _round_to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes uint8 [H, W, C] to [size[0], size[1], C] as torch's bilinear on tensors does."""
    out_h, out_w = size
    in_h, in_w = image.shape[:2]
    if (in_h, in_w) == (out_h, out_w):
        return image
    x = image.astype(np.float32)
    r0, r1, wr = _bilinear_taps(in_h, out_h)
    x = x[r0] * (1 - wr)[:, None, None] + x[r1] * wr[:, None, None]
    c0, c1, wc = _bilinear_taps(in_w, out_w)
    x = x[:, c0] * (1 - wc)[None, :, None] + x[:, c1] * wc[None, :, None]
    return _round_to_uint8(x)


def resize_pil_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes uint8 [H, W, C] with PIL's bilinear filter (antialiased when shrinking), as the
    benchmark's *training* transform (torchvision Resize on PIL images) does."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def shorter_side_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """Output size of torchvision's `resize(img, int)`: shorter side -> `shorter`, aspect kept."""
    if height <= width:
        return shorter, int(shorter * width / height)
    return int(shorter * height / width), shorter


def resize_shorter_side(image: np.ndarray, shorter: int) -> np.ndarray:
    """Bilinear resize so the shorter side equals `shorter` (aspect kept)."""
    return resize_bilinear(image, shorter_side_size(*image.shape[:2], shorter))


def resize_nearest_by_scale(image: np.ndarray, scale: float) -> np.ndarray:
    """torch `interpolate(scale_factor=scale)` (mode 'nearest'): out = floor(in * scale)."""
    in_h, in_w = image.shape[:2]
    out_h, out_w = int(np.floor(in_h * scale)), int(np.floor(in_w * scale))

    def taps(in_size: int, out_size: int) -> np.ndarray:
        src = np.floor(np.arange(out_size, dtype=np.float32) * np.float32(1.0 / scale))
        return np.minimum(src.astype(np.int64), in_size - 1)

    return image[taps(in_h, out_h)][:, taps(in_w, out_w)]


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """torchvision center_crop: offsets round((in - out) / 2). The crop must fit."""
    out_h, out_w = size
    in_h, in_w = image.shape[:2]
    if out_h > in_h or out_w > in_w:
        raise ValueError(f"crop {size} larger than image {(in_h, in_w)}")
    top, left = int(round((in_h - out_h) / 2.0)), int(round((in_w - out_w) / 2.0))
    return image[top:top + out_h, left:left + out_w]


def five_crops(image: np.ndarray, side: int) -> np.ndarray:
    """torchvision five_crop of squares: uint8 [5, side, side, C] = TL, TR, BL, BR, center."""
    h, w = image.shape[:2]
    if side > h or side > w:
        raise ValueError(f"crop side {side} larger than image {(h, w)}")
    return np.stack([
        image[:side, :side],
        image[:side, w - side:],
        image[h - side:, :side],
        image[h - side:, w - side:],
        center_crop(image, (side, side)),
    ])

"""Synthetic datasets written in the real VG folder format.

Two uses: tests write tiny datasets with hand-made geometry (`write_images`), and the built-in
example renders a small aerial world (`AerialWorld`, `build_aerial_dataset`) so the main job runs
on a machine without any real dataset. Both go through exactly the file names and folders that
`vg_folder.load_split` reads for real datasets.

The aerial world is a procedural north-up map (smooth multi-scale colour noise plus rectangular
"buildings"). A camera at (east, north) sees the square footprint around it. Queries are
rendered at other positions than the database, under other lighting (darker, colour-shifted,
noisy), so retrieval has to bridge a viewpoint shift and an appearance change.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vgjax.data.vg_folder import format_image_name

# The built-in datasets `data.synthetic` names: aerial and cosplace are rendered here, doom (the
# ViZDoom world) by vgjax.data.demo_world.
KINDS = ("aerial", "cosplace", "doom", "gsv")
# A UTM origin in zone 17T (Pittsburgh), so synthetic coordinates look like real ones.
UTM_ORIGIN = (584_000.0, 4_477_000.0)
UTM_ZONE = (17, "T")


def write_images(folder: str | os.PathLike, utm: np.ndarray,
                 render: Callable[[int, float, float], np.ndarray] | None = None,
                 *, image_size: tuple[int, int] = (8, 8), jpeg_quality: int = 95,
                 **fields: Sequence) -> list[str]:
    """Writes one JPEG per position, named in the benchmark's @-field format.

    Args:
      folder: destination (created).
      utm: float [N, 2] east/north in metres.
      render: (i, east, north) -> uint8 [H, W, 3]; default: a flat grey image of `image_size`.
      jpeg_quality: PIL JPEG quality.
      **fields: optional per-image values (length N) for other @-fields, e.g. heading=[...].
        pano_id defaults to the image's index so that names are unique; zone defaults to 17T.

    Returns:
      The written paths, in the order of `utm`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    utm = np.asarray(utm, dtype=np.float64).reshape(-1, 2)
    paths = []
    for i, (east, north) in enumerate(utm):
        per_image = {"zone_number": UTM_ZONE[0], "zone_letter": UTM_ZONE[1], "pano_id": f"{i:06d}"}
        per_image.update({name: values[i] for name, values in fields.items()})
        image = render(i, east, north) if render else np.full((*image_size, 3), 128, np.uint8)
        path = folder / format_image_name(east, north, **per_image)
        if path.exists():
            raise FileExistsError(f"{path} already written: two images share all their fields")
        Image.fromarray(image).save(path, quality=jpeg_quality)
        paths.append(str(path))
    return paths


def write_split(dataset_dir: str | os.PathLike, split: str, database_utm: np.ndarray,
                query_utm: np.ndarray, **kwargs) -> tuple[list[str], list[str]]:
    """Writes `<dataset_dir>/images/<split>/{database,queries}`; kwargs go to `write_images`."""
    folder = Path(dataset_dir) / "images" / split
    return (write_images(folder / "database", database_utm, **kwargs),
            write_images(folder / "queries", query_utm, **kwargs))


# ---------------------------------------------------------------------------------------------
# The aerial world.


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """float32 [size, size, 3] in about [-1, 1]: random colours on a cells x cells grid,
    bilinearly upsampled."""
    grid = rng.uniform(-1, 1, size=(cells, cells, 3)).astype(np.float32)
    channels = [np.asarray(Image.fromarray(grid[..., c], mode="F").resize((size, size), Image.BILINEAR))
                for c in range(3)]
    return np.stack(channels, axis=-1)


@dataclasses.dataclass(frozen=True)
class AerialWorld:
    """A procedural north-up map of `size_m` x `size_m` metres at `metres_per_pixel`.

    Coordinates are metres from the map's south-west corner (add UTM_ORIGIN for UTM).
    """

    seed: int = 0
    size_m: float = 400.0
    metres_per_pixel: float = 0.5
    num_buildings: int = 400

    @property
    def pixels(self) -> int:
        return int(round(self.size_m / self.metres_per_pixel))

    def texture(self) -> np.ndarray:
        """uint8 [P, P, 3], row 0 = north edge."""
        rng = np.random.default_rng(self.seed)
        size = self.pixels
        base = sum(_smooth_noise(rng, size, cells) * weight
                   for cells, weight in ((4, 0.5), (16, 0.3), (64, 0.2)))
        image = (base * 60 + 128).clip(0, 255)
        for _ in range(self.num_buildings):
            h, w = rng.integers(6, 40, size=2)
            top, left = rng.integers(0, size - h), rng.integers(0, size - w)
            image[top:top + h, left:left + w] = rng.uniform(30, 230, size=3)
        return image.astype(np.uint8)


def render_view(texture: np.ndarray, world: AerialWorld, east: float, north: float,
                heading_deg: float, footprint_m: float, image_size: tuple[int, int]) -> np.ndarray:
    """The view of a camera at (east, north) looking down, its image top turned `heading_deg`
    clockwise from north; the footprint is `footprint_m` wide. Returns uint8 [H, W, 3]."""
    height, width = image_size
    scale = footprint_m / world.metres_per_pixel / width  # texture pixels per image pixel
    theta = np.deg2rad(heading_deg)
    cos, sin = np.cos(theta) * scale, np.sin(theta) * scale
    col = east / world.metres_per_pixel
    row = world.pixels - north / world.metres_per_pixel
    # Image pixel (x, y) -> texture (col, row): rotate the centred offsets, then translate.
    cx, cy = width / 2, height / 2
    coefficients = (cos, -sin, col - cos * cx + sin * cy, sin, cos, row - sin * cx - cos * cy)
    view = Image.fromarray(texture).transform((width, height), Image.AFFINE, coefficients,
                                              resample=Image.BILINEAR)
    return np.asarray(view)


def change_appearance(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Query conditions: darker, colour-shifted, noisy."""
    x = image.astype(np.float32) * rng.uniform(0.5, 0.8) + rng.uniform(-25, 25, size=3)
    x += rng.normal(0, 6, size=image.shape)
    return x.clip(0, 255).astype(np.uint8)


def build_aerial_dataset(dataset_dir: str | os.PathLike, *, seed: int = 0,
                         splits: Sequence[str] = ("test",), database_spacing_m: float = 10.0,
                         num_queries: int = 100, query_heading_jitter_deg: float = 60.0,
                         footprint_m: float = 48.0, image_size: tuple[int, int] = (96, 128),
                         size_m: float = 300.0,
                         progress: bool = True) -> Path:
    """Renders an aerial dataset: per split, a north-up database on a regular grid and queries at
    random positions, turned by up to +-query_heading_jitter_deg and under changed appearance.
    Each split is a different world (seed + split index).

    Returns:
      dataset_dir, holding images/<split>/{database,queries}.
    """
    dataset_dir = Path(dataset_dir)
    for split_number, split in enumerate(splits):
        world = AerialWorld(seed=seed + split_number, size_m=size_m)
        texture = world.texture()
        rng = np.random.default_rng([seed, split_number])
        margin = footprint_m / 2
        axis = np.arange(margin, size_m - margin + 1e-9, database_spacing_m)
        database = np.stack(np.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
        queries = rng.uniform(margin, size_m - margin, size=(num_queries, 2))
        bar = tqdm(total=len(database) + len(queries), desc=f"rendering {split}", unit="img",
                   disable=not progress, leave=False)

        headings = rng.uniform(-query_heading_jitter_deg, query_heading_jitter_deg, num_queries) % 360

        def render_database(i: int, east: float, north: float) -> np.ndarray:
            bar.update(1)
            return render_view(texture, world, east - UTM_ORIGIN[0], north - UTM_ORIGIN[1], 0.0,
                               footprint_m, image_size)

        def render_query(i: int, east: float, north: float) -> np.ndarray:
            bar.update(1)
            view = render_view(texture, world, east - UTM_ORIGIN[0], north - UTM_ORIGIN[1],
                               headings[i], footprint_m, image_size)
            return change_appearance(view, rng)

        folder = dataset_dir / "images" / split
        write_images(folder / "database", database + UTM_ORIGIN, render_database,
                     heading=[0.0] * len(database), note=["day"] * len(database))
        write_images(folder / "queries", queries + UTM_ORIGIN, render_query,
                     heading=headings, note=["dusk"] * len(queries))
        bar.close()
    return dataset_dir


def build_cosplace_dataset(root: str | os.PathLike, *, seed: int = 0, cells: int = 6,
                           images_per_cell: int = 3, cell_m: float = 10.0,
                           image_size: tuple[int, int] = (64, 64), progress: bool = True) -> Path:
    """An SF-XL-style dataset for CosPlace: `train/` (flat, `images_per_cell` views around the
    centre of each of cells x cells UTM cells of `cell_m` metres, all looking within +-5 degrees
    of one random 30-degree bin centre per cell, so each cell is one CosPlace class),
    `val/{database,queries}` and `test/{database,queries_v1}` (aerial splits as above).

    Returns:
      root.
    """
    root = Path(root)
    world = AerialWorld(seed=seed, size_m=cells * cell_m + 60.0)
    texture = world.texture()
    rng = np.random.default_rng(seed)
    centres = (np.stack(np.meshgrid(np.arange(cells), np.arange(cells)), -1).reshape(-1, 2) + 0.5) * cell_m + 30.0
    utm = np.repeat(centres, images_per_cell, axis=0) + rng.uniform(-2, 2, (len(centres) * images_per_cell, 2))
    cell_headings = rng.integers(0, 12, len(centres)) * 30.0 + 15.0
    headings = np.repeat(cell_headings, images_per_cell) + rng.uniform(-5, 5, len(utm))

    def render(i: int, east: float, north: float) -> np.ndarray:
        return render_view(texture, world, east - UTM_ORIGIN[0], north - UTM_ORIGIN[1], headings[i],
                           24.0, image_size)

    write_images(root / "train", utm + UTM_ORIGIN, render, heading=headings)
    splits = build_aerial_dataset(root / "eval", seed=seed + 1, splits=("val", "test"), num_queries=20,
                                  size_m=120.0, image_size=image_size, progress=progress)
    (splits / "images" / "val").rename(root / "val")
    (splits / "images" / "test").rename(root / "test")
    (root / "test" / "queries").rename(root / "test" / "queries_v1")
    for folder in (splits / "images", splits):
        folder.rmdir()
    return root

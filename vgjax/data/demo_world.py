"""A geo-tagged place-recognition world rendered from ViZDoom, in the real VG folder format.

`build_demo_world` walks a first-person camera through one Freedoom map per split and writes
`<root>/images/<split>/{database,queries}` with exactly the file names real datasets use, so the
embedded demo runs the same loading code as Pitts30k.

- Database: frames along one exploration walk, in daylight.
- Queries: frames along a different walk (another random stream, restarted every
  QUERY_SEGMENT_FRAMES frames at a random database position with a random heading, so it stays
  in the mapped area but sees it from other places and directions), rendered at "night":
  darkened about x0.5 with a cool colour cast. Retrieval must bridge viewpoint and lighting.
- Walks are random exploration with the game's physics: walk forward (pressing USE, which opens
  doors), turn by up to +-60 degrees with probability TURN_PROBABILITY per frame, and turn round
  by 90..180 degrees when blocked. A frame is taken every TICS_PER_FRAME game tics (~5 m apart
  when walking freely). Monsters are off; the player holds every key, so locked doors open too.
  Deterministic given `seed`: the game seed is fixed and all decisions come from one numpy
  Generator.

Scale: MAP_UNIT_M = 0.25 m per map unit, so 25 m (positives) = 100 units and 10 m (hard
positives) = 40 units. Doom rooms are a few hundred units across, so a query's positives are the
database frames in the same room or corridor stretch. (A "physical" scale from the 56-unit player
height would be ~1/32 m, making 25 m ~800 units: whole map regions, every frame a positive.)
Measured on freedoom2 MAP01/02/03 with the default 600 frames per walk (frames ~5.5 m apart,
database walks spanning 224x144 / 300x362 / 376x322 m): median 48 / 26 / 27 positives within
25 m (97-100% of queries have one), median 10 / 6 / 5 within 10 m (83-99% have one). The counts
exceed a handful because exploration revisits places, as dense street-view databases do.

Positions: east = UTM_ORIGIN east + x * MAP_UNIT_M, north = UTM_ORIGIN north + y * MAP_UNIT_M
(Doom's x points east, y north). Heading field: compass degrees clockwise from north,
(90 - ANGLE) mod 360, since Doom's ANGLE is counter-clockwise from east.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vgjax.data import vg_folder
from vgjax.data.synthetic import UTM_ORIGIN, write_images

MAP_UNIT_M = 0.25
TICS_PER_FRAME = 4
TURN_PROBABILITY = 0.08
QUERY_SEGMENT_FRAMES = 10
NIGHT_GAIN = np.array([0.45, 0.5, 0.62], np.float32)  # per RGB channel: darker, bluish
BLOCKED_UNITS = 4.0  # moved less than this since the last frame = blocked
WARMUP_TICS = 10  # the game ignores input during its first few tics
MANIFEST = "demo_world.json"
DEFAULT_SPLITS = {"train": "MAP01", "val": "MAP02", "test": "MAP03"}


@dataclasses.dataclass(frozen=True)
class Walk:
    """Frames along one walk.

    Attributes:
      positions: float64 [N, 2], map units (x east, y north).
      angles: float64 [N], Doom ANGLE in degrees (counter-clockwise from east).
      frames: uint8 [N, H, W, 3], daylight RGB.
    """

    positions: np.ndarray
    angles: np.ndarray
    frames: np.ndarray


def _start_game(wad: str, doom_map: str, seed: int, config_dir: str):
    """A headless DoomGame on `doom_map`, monsters off, cheats on (for `warp`), input live.
    Its config file and scratch folder go to `config_dir`, not the current directory."""
    import vizdoom as vzd

    game = vzd.DoomGame()
    wad_path = Path(vzd.__file__).parent / wad
    if not wad_path.is_file():
        raise FileNotFoundError(f"wad={wad!r}: {wad_path} does not exist")
    game.set_doom_game_path(str(wad_path))
    game.set_doom_map(doom_map)
    game.set_screen_resolution(vzd.ScreenResolution.RES_320X240)
    game.set_screen_format(vzd.ScreenFormat.RGB24)
    game.set_window_visible(False)
    # Nothing but the world: no HUD, weapon, crosshair, messages or pick-up flashes.
    for hide in (game.set_render_hud, game.set_render_weapon, game.set_render_crosshair,
                 game.set_render_messages, game.set_render_screen_flashes):
        hide(False)
    game.set_available_buttons([vzd.Button.MOVE_FORWARD, vzd.Button.USE, vzd.Button.TURN_LEFT_RIGHT_DELTA])
    game.set_available_game_variables(
        [vzd.GameVariable.POSITION_X, vzd.GameVariable.POSITION_Y, vzd.GameVariable.ANGLE])
    game.set_doom_config_path(str(Path(config_dir) / "vizdoom.ini"))
    game.add_game_args("+sv_cheats 1 -nomonsters")
    game.set_episode_timeout(0)
    game.set_seed(seed)
    with contextlib.chdir(config_dir):  # the engine process makes ./_vizdoom/ in its cwd
        game.init()
    game.new_episode()
    # With every key, locked doors open like the others. Without, walking into one prints "blue
    # key needed for this door" mid-screen for seconds (no ViZDoom switch hides it: con_midtime,
    # con_notifylines, show_messages tried), which was on 427 of MAP03's 600 database frames.
    game.send_game_command("give keys")
    game.advance_action(WARMUP_TICS)
    return game


def _observe(game, image_size: tuple[int, int]) -> tuple[np.ndarray, float, np.ndarray]:
    """(position float [2] map units, ANGLE degrees, frame uint8 [H, W, 3] resized)."""
    state = game.get_state()
    x, y, angle = state.game_variables
    frame = Image.fromarray(state.screen_buffer).resize(image_size[::-1], Image.BILINEAR)
    return np.array([x, y]), float(angle), np.asarray(frame)


def _turn(game, degrees_ccw: float) -> None:
    """Turns the player counter-clockwise (ANGLE grows) in one tic. The delta button turns
    clockwise, and by its value on every tic of an action, hence one-tic actions."""
    game.make_action([0, 0, -degrees_ccw], 1)


def _walk(game, rng: np.random.Generator, num_frames: int, image_size: tuple[int, int],
          restarts: np.ndarray | None, bar) -> Walk:
    """Explores for `num_frames` frames. If `restarts` (float [K, 2] map units) is given, every
    QUERY_SEGMENT_FRAMES frames the player warps to one of them, at a random heading."""
    positions, angles, frames = [], [], []
    previous = None
    for i in range(num_frames):
        if restarts is not None and i % QUERY_SEGMENT_FRAMES == 0:
            x, y = restarts[rng.integers(len(restarts))]
            game.send_game_command(f"warp {x:.3f} {y:.3f}")
            game.advance_action(1)
            _turn(game, rng.uniform(0, 360))
            previous = None
        position, angle, frame = _observe(game, image_size)
        positions.append(position), angles.append(angle), frames.append(frame)
        bar.update(1)
        turn = 0.0
        if previous is not None and np.hypot(*(position - previous)) < BLOCKED_UNITS:
            turn = rng.uniform(90, 180) * rng.choice([-1, 1])
        elif rng.random() < TURN_PROBABILITY:
            turn = rng.uniform(-60, 60)
        previous = position
        _turn(game, turn)
        game.make_action([1, 1, 0.0], TICS_PER_FRAME)
    return Walk(np.array(positions), np.array(angles), np.stack(frames))


def night(frames: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> the same frames darkened by NIGHT_GAIN (about x0.5, bluish)."""
    return (frames.astype(np.float32) * NIGHT_GAIN).round().clip(0, 255).astype(np.uint8)


def render_split(wad: str, doom_map: str, seed: int, frames_per_walk: int,
                 image_size: tuple[int, int], progress: bool = True) -> tuple[Walk, Walk]:
    """The (database, query) walks of one map; the query frames are already at night."""
    rng = np.random.default_rng(seed)
    bar = tqdm(total=2 * frames_per_walk, desc=f"rendering {doom_map}", unit="frame",
               disable=not progress, leave=False)
    with tempfile.TemporaryDirectory() as config_dir:
        game = _start_game(wad, doom_map, seed, config_dir)
        try:
            database = _walk(game, rng, frames_per_walk, image_size, None, bar)
            queries = _walk(game, rng, frames_per_walk, image_size, database.positions, bar)
        finally:
            game.close()
            bar.close()
    return database, dataclasses.replace(queries, frames=night(queries.frames))


def _write_walk(folder: Path, walk: Walk, note: str) -> None:
    utm = walk.positions * MAP_UNIT_M + np.asarray(UTM_ORIGIN)
    write_images(folder, utm, lambda i, east, north: walk.frames[i],
                 heading=(90.0 - walk.angles) % 360.0, note=[note] * len(utm))


def build_demo_world(root: str | os.PathLike, *, seed: int = 0, frames_per_walk: int = 600,
                     image_size: tuple[int, int] = (120, 160),
                     splits: Mapping[str, str] | None = None, wad: str = "freedoom2.wad",
                     progress: bool = True) -> Path:
    """Renders (or finds already rendered) the ViZDoom place-recognition world.

    Args:
      root: dataset folder to hold images/<split>/{database,queries}.
      seed: game seed and decision seed (split k uses seed + k).
      frames_per_walk: frames in each database walk and each query walk.
      image_size: (H, W) of the written JPEGs.
      splits: split name -> map name in `wad`; default train/val/test = MAP01/MAP02/MAP03.
      wad: the IWAD shipped with vizdoom ("freedoom2.wad" or "freedoom1.wad", maps E1M1...).
      progress: show a tqdm bar while rendering.

    Returns:
      root. If root already holds a world with the same parameters (its manifest), nothing is
      rendered. The world is built in `<root>.partial` (any leftover is discarded) and renamed
      to root only when complete, the manifest written last.

    Raises:
      FileExistsError: root exists but is not a world built with these parameters.
    """
    root = Path(root)
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    if frames_per_walk < 1:
        raise ValueError(f"frames_per_walk must be >= 1, got {frames_per_walk}")
    parameters = {"seed": seed, "frames_per_walk": frames_per_walk, "image_size": list(image_size),
                  "splits": splits, "wad": wad, "map_unit_m": MAP_UNIT_M,
                  "tics_per_frame": TICS_PER_FRAME, "turn_probability": TURN_PROBABILITY,
                  "query_segment_frames": QUERY_SEGMENT_FRAMES, "night_gain": NIGHT_GAIN.tolist(),
                  "overlays": "none", "keys": "all"}
    manifest = root / MANIFEST
    if root.exists():
        if manifest.is_file() and json.loads(manifest.read_text()) == parameters:
            return root
        raise FileExistsError(f"root={root} exists but holds no demo world with these parameters "
                              f"({manifest} missing or different); delete it or pick another root")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for k, (split, doom_map) in enumerate(splits.items()):
        database, queries = render_split(wad, doom_map, seed + k, frames_per_walk, image_size, progress)
        _write_walk(partial / "images" / split / "database", database, "day")
        _write_walk(partial / "images" / split / "queries", queries, "night")
    vg_folder.write_manifest(partial, "demo_world")
    (partial / MANIFEST).write_text(json.dumps(parameters, indent=1))
    partial.rename(root)
    return root

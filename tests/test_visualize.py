"""Prediction images, recall plots and maps (vgjax.visualize)."""

import numpy as np
import pytest
from PIL import Image

from vgjax import visualize
from vgjax.data import synthetic, vg_folder

CELL = 128
IMAGE_HW = (48, 64)
# Database images sit 100 m apart along east; each query is 5 m east of database 0, 2, 4, so
# query q's only positive (25 m) is database 2q.
DATABASE_EAST = np.arange(6) * 100.0
QUERY_EAST = np.array([0.0, 200.0, 400.0]) + 5.0
# Distinct colours, none of them close to the green or red frames.
COLOURS = {0: (30, 30, 160), 100: (200, 200, 40), 200: (120, 60, 160), 300: (40, 160, 200),
           400: (90, 90, 90), 500: (230, 140, 240), 5: (250, 250, 250), 205: (0, 0, 0),
           405: (60, 120, 120)}
# q0: top-1 right; q1: top-1 wrong, Pred2 right; q2: all wrong.
PREDICTIONS = np.array([[0, 1, 2], [3, 2, 5], [1, 3, 5]])


def colour_of(east):
    return COLOURS[round(east - synthetic.UTM_ORIGIN[0])]


def render(i, east, north):
    return np.full((*IMAGE_HW, 3), colour_of(east), np.uint8)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    origin = np.array(synthetic.UTM_ORIGIN)
    database = origin + np.stack([DATABASE_EAST, np.zeros(6)], axis=1)
    queries = origin + np.stack([QUERY_EAST, np.full(3, 3.0)], axis=1)
    synthetic.write_split(root, "test", database, queries, render=render)
    loaded = vg_folder.load_split(root, "test")
    assert [list(p) for p in loaded.positives] == [[0], [2], [4]]
    return loaded


def cell_pixel(image, cell, x, y):
    """RGB at (x, y) inside cell `cell` (0 = query) of a prediction row."""
    left = cell * (CELL + visualize.gap_width(CELL))
    return np.asarray(image, dtype=int)[visualize.label_height(CELL) + y, left + x]


def assert_close(rgb, expected, tolerance=40):
    assert np.abs(np.asarray(rgb) - np.asarray(expected)).max() <= tolerance, (rgb, expected)


def test_prediction_rows_have_green_and_red_frames(split, tmp_path):
    paths = visualize.save_predictions(tmp_path, split, PREDICTIONS, num_preds=3, cell_size=CELL)
    assert paths == [tmp_path / "preds" / f"{q:03d}.jpg" for q in range(3)]
    image = Image.open(paths[1])
    gap, strip = visualize.gap_width(CELL), visualize.label_height(CELL)
    assert image.size == (4 * CELL + 3 * gap, strip + CELL)
    # 48x64 images fill a 128-wide cell as 96x128, padded 16 px above and below.
    top, mid, border = 16, CELL // 2, visualize.border_width(CELL)
    assert_close(cell_pixel(image, 0, 2, mid), COLOURS[205])            # query: no frame
    assert_close(cell_pixel(image, 1, 2, mid), visualize.WRONG_RGB)      # db 3: wrong
    assert_close(cell_pixel(image, 2, 2, mid), visualize.CORRECT_RGB)    # db 2: positive
    assert_close(cell_pixel(image, 2, CELL - 3, mid), visualize.CORRECT_RGB)
    assert_close(cell_pixel(image, 2, mid, top + border // 2), visualize.CORRECT_RGB)
    assert_close(cell_pixel(image, 3, 2, mid), visualize.WRONG_RGB)      # db 5: wrong
    for cell, db in ((1, 300), (2, 200), (3, 500)):                      # inside: the image
        assert_close(cell_pixel(image, cell, mid, mid), COLOURS[db])
    for cell in range(4):                                                # padding and gaps: white
        assert_close(cell_pixel(image, cell, mid, 4), (255, 255, 255))
    assert_close(np.asarray(image)[strip + mid, CELL + gap // 2], (255, 255, 255))
    # The label strip holds dark text.
    assert np.asarray(image)[:strip].min() < 100


def test_first_cell_of_a_correct_query_is_green(split, tmp_path):
    [path] = visualize.save_predictions(tmp_path, split, PREDICTIONS, query_indices=[0],
                                        num_preds=2, cell_size=CELL)
    image = Image.open(path)
    assert image.size[0] == 3 * CELL + 2 * visualize.gap_width(CELL)
    assert_close(cell_pixel(image, 0, 2, CELL // 2), COLOURS[5])
    assert_close(cell_pixel(image, 1, 2, CELL // 2), visualize.CORRECT_RGB)
    assert_close(cell_pixel(image, 2, 2, CELL // 2), visualize.WRONG_RGB)


def test_text_file_lists_query_predictions_and_positives(split, tmp_path):
    visualize.save_predictions(tmp_path, split, PREDICTIONS, query_indices=[1], cell_size=CELL)
    lines = (tmp_path / "preds" / "001.txt").read_text().splitlines()
    db = split.database_paths
    assert lines == ["query:", split.query_paths[1], "", "predictions (best first):",
                     db[3], db[2], db[5], "", "positives (1):", db[2]]


def test_only_wrong_skips_correct_queries(split, tmp_path):
    paths = visualize.save_predictions(tmp_path, split, PREDICTIONS, only_wrong=True,
                                       cell_size=CELL)
    assert [p.name for p in paths] == ["001.jpg", "002.jpg"]
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == [
        "001.jpg", "001.txt", "002.jpg", "002.txt"]


def test_missing_prediction_is_an_empty_cell(split, tmp_path):
    predictions = np.array([[0, -1], [2, -1], [4, -1]])
    [path] = visualize.save_predictions(tmp_path, split, predictions, query_indices=[2],
                                        cell_size=CELL)
    image = Image.open(path)
    assert_close(cell_pixel(image, 1, 2, CELL // 2), visualize.CORRECT_RGB)
    assert_close(cell_pixel(image, 2, CELL // 2, 4), visualize.EMPTY_RGB)
    assert (tmp_path / "preds" / "002.txt").read_text().splitlines()[5] == "none"


@pytest.mark.parametrize("predictions, match", [
    (PREDICTIONS[:2], "Q = 3"), (PREDICTIONS.astype(float), "integer"), (PREDICTIONS + 4, "index 9")])
def test_bad_predictions_are_rejected(split, tmp_path, predictions, match):
    with pytest.raises(ValueError, match=match):
        visualize.save_predictions(tmp_path, split, predictions, cell_size=CELL)


def colour_pixels(path, rgb, tolerance=30):
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    return int((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tolerance).sum())


def test_recall_plot_one_and_several_runs(tmp_path):
    one = visualize.save_recall_plot(tmp_path / "one.png", {1: 50.0, 5: 75.0, 10: 80.0, 20: 90.0})
    several = visualize.save_recall_plot(tmp_path / "sub" / "several.png", {
        "netvlad": {1: 50.0, 5: 75.0, 10: 80.0, 20: 90.0},
        "gem": {1: 40.0, 5: 60.0, 10: 70.0, 20: 85.0}})
    for path in (one, several):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (640, 480)
    # Matplotlib's first two default colours: one curve, then two.
    blue, orange = (31, 119, 180), (255, 127, 14)
    assert colour_pixels(one, blue) > 200 and colour_pixels(one, orange) == 0
    assert colour_pixels(several, blue) > 200 and colour_pixels(several, orange) > 200
    with pytest.raises(ValueError, match="not a mix"):
        visualize.save_recall_plot(tmp_path / "bad.png", {"a": {1: 1.0}, 5: 2.0})
    assert visualize.save_recall_plot(tmp_path / "keys.png", {"R@1": 50.0, "R@5": 75.0}).exists()  # as results.json


def test_map_colours_queries_by_top1(split, tmp_path):
    path = visualize.save_map(tmp_path / "map.png", split, PREDICTIONS, title="demo")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (700, 700)
    assert colour_pixels(path, visualize.CORRECT_RGB) > 20
    assert colour_pixels(path, visualize.WRONG_RGB) > 40
    np.testing.assert_array_equal(visualize.top1_correct(split, PREDICTIONS), [True, False, False])


@pytest.mark.parametrize("total, count, expected", [
    (100, 2, [0, 99]), (60, 3, [0, 30, 59]), (5, 10, [0, 1, 2, 3, 4]), (7, 1, [0]), (7, 0, [])])
def test_spread_indices(total, count, expected):
    assert visualize.spread_indices(total, count).tolist() == expected


def test_labels_give_each_prediction_its_distance(split):
    positives = set(split.positives[1].tolist())
    assert visualize.prediction_label(split, 1, 2, 2, positives) == "Pred2 ✓ 6 m"  # 5 m east, 3 m north
    assert visualize.prediction_label(split, 1, 3, 1, positives) == "Pred1 ✗ 95 m"
    assert visualize.prediction_label(split, 1, -1, 3, positives) == "Pred3 - none"


def test_wrong_only_pictures_are_picked_among_the_wrong_queries(split, tmp_path):
    from vgjax.configs import common

    eval_config = common.get_config().eval
    eval_config.update(num_preds_to_save=2, queries_to_save=2, save_only_wrong_preds=True)
    visualize.save_evaluation_pictures(tmp_path, split, PREDICTIONS, {1: 33.3}, eval_config)
    # Two pictures, both wrong queries (spreading over all queries first would give 0 and 2,
    # and then only 2 after dropping the right one).
    assert sorted(p.name for p in (tmp_path / "preds").glob("*.jpg")) == ["001.jpg", "002.jpg"]

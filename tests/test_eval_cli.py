"""The front door: any two folders (any image type, with or without coordinates), predictions.csv,
`vgjax-eval`, and a wheel that works without the repository."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vgjax import eval_cli, evaluate
from vgjax.data import synthetic
from vgjax.data.vg_folder import DatasetFormatError, format_image_name, load_folders

REPO = Path(__file__).resolve().parents[1]


def _image(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 8, 3), value, np.uint8)).save(path)


def _hand_made(tmp_path):
    """Database: 3 images at known positions (one with lat/lon); queries: 2 photos without any."""
    names = [format_image_name(100.0, 200.0, lat=45.5, lon=7.25), format_image_name(130.0, 240.0),
             format_image_name(400.0, 200.0)]
    for name, suffix in zip(names, (".jpg", ".jpeg", ".PNG")):
        _image(tmp_path / "db" / (name.removesuffix(".jpg") + suffix))
    _image(tmp_path / "photos" / "IMG_0001.jpg")
    _image(tmp_path / "photos" / "trip" / "frame.png")
    return tmp_path / "db", tmp_path / "photos"


def test_any_two_folders_any_image_type_with_and_without_labels(tmp_path):
    database, photos = _hand_made(tmp_path)
    split = load_folders(database, photos, labels=False)
    assert split.num_database == 3 and split.num_queries == 2 and not split.has_labels
    assert [Path(p).suffix for p in split.database_paths] == [".jpg", ".jpeg", ".PNG"]
    np.testing.assert_array_equal(split.database_utm, [[100, 200], [130, 240], [400, 200]])
    assert np.isnan(split.query_utm).all() and len(split.positives[0]) == 0
    with pytest.raises(DatasetFormatError, match="IMG_0001.jpg: expected a name.*evaluate without labels"):
        load_folders(database, photos)
    labelled = load_folders(database, database, positive_dist_m=50)
    assert labelled.has_labels and [list(p) for p in labelled.positives] == [[0, 1], [0, 1], [2]]


def test_predictions_csv_of_a_hand_made_example(tmp_path):
    database, photos = _hand_made(tmp_path)
    split = load_folders(database, photos, labels=False)
    path = evaluate.write_predictions_csv(tmp_path / "p.csv", split, np.array([[0, 2], [1, -1]]),
                                          np.array([[0.25, 1.5], [0.125, np.inf]], np.float32))
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["query", "rank", "prediction", "distance", "east", "north", "lat", "lon"]
    assert rows[1][1:] == ["1", split.database_paths[0], "0.25", "100.00", "200.00", "45.500000", "7.250000"]
    assert rows[2][1:] == ["2", split.database_paths[2], "1.5", "400.00", "200.00", "", ""]
    assert rows[3][:2] == [split.query_paths[1], "1"] and len(rows) == 4  # the -1 is left out

    labelled = load_folders(database, database, positive_dist_m=50)
    path = evaluate.write_predictions_csv(tmp_path / "l.csv", labelled, np.array([[1], [2], [0]]),
                                          np.ones((3, 1), np.float32))
    rows = list(csv.reader(path.open()))
    assert rows[0][-2:] == ["metres", "correct"]
    assert [row[-2:] for row in rows[1:]] == [["50.0", "1"], ["272.9", "0"], ["300.0", "0"]]


@pytest.mark.parametrize("argv, message", [
    (["--database_folder", "nowhere", "--queries_folder", "."], "--model is required"),
    (["--model", "x", "--database_folder", "nowhere", "--queries_folder", "."], "--database_folder nowhere: no such folder"),
    (["--model", "x", "--database_folder", ".", "--queries_folder", ".", "--image_size", "1", "2", "3"],
     "--image_size takes H W or one side"),
    (["--model", "x", "--database_folder", ".", "--queries_folder", ".", "--recall_values", "5", "1"],
     "--recall_values must be increasing"),
])
def test_bad_options_are_one_line_errors_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _wheel(tmp_path: Path) -> Path:
    """vgjax built into a wheel from its sources alone (no tests, configs/ or benchmarks/) and
    installed into a folder of its own."""
    source = tmp_path / "source"
    for name in ("vgjax", "setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                           if (REPO / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True)
    wheel, = (tmp_path / "dist").glob("vgjax-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True)
    return tmp_path / "site"


@pytest.mark.slow
def test_the_wheel_evaluates_two_folders_with_and_without_labels(tmp_path):
    site = _wheel(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(site), "VGJAX_CACHE": str(tmp_path / "cache")}
    work = tmp_path / "work"  # far from the repository: nothing of it is importable here
    synthetic.build_aerial_dataset(work / "aerial", num_queries=8, size_m=80.0, image_size=(48, 64), progress=False)
    folders = work / "aerial" / "images" / "test"
    model = subprocess.run(
        [sys.executable, "-c", "import vgjax, sys; from vgjax import models; from vgjax.models import export, zoo; "
         "assert vgjax.__file__.startswith(sys.argv[1]), vgjax.__file__; "
         "c = zoo.model_config({'backbone': 'resnet18conv4', 'aggregation': 'gem', 'pretrain': 'none'}); "
         "export.save('net.vgjax.safetensors', c, models.build(c, image_size=(48, 64)).variables, (48, 64))",
         str(site)], cwd=work, env=env, capture_output=True, text=True)
    assert model.returncode == 0, model.stderr[-2000:]

    def vgjax_eval(*options):
        out = subprocess.run([str(site / "bin" / "vgjax-eval"), "--model", "net.vgjax.safetensors",
                              "--database_folder", str(folders / "database"), "--queries_folder",
                              str(folders / "queries"), "--recall_values", "1", "5", *options],
                             cwd=work, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    out = vgjax_eval("--output", "labelled", "--num_preds_to_save", "2", "--queries_to_save", "2")
    results = json.loads((work / "labelled" / "results.json").read_text())
    recalls = results["results"]["hard_resize"]["recalls"]
    assert f"R@1: {recalls['R@1']:.1f}, R@5: {recalls['R@5']:.1f}" in out.stdout
    method = work / "labelled" / "predictions" / "hard_resize"
    assert len(list((method / "preds").glob("*.jpg"))) == 2 and (method / "map.png").is_file()
    rows = list(csv.DictReader((method / "predictions.csv").open()))
    top1 = [row for row in rows if row["rank"] == "1"]
    assert len(top1) == 8 and 100 * np.mean([row["correct"] == "1" for row in top1]) == pytest.approx(recalls["R@1"])

    vgjax_eval("--output", "unlabelled", "--no_labels", "--save_descriptors")
    results = json.loads((work / "unlabelled" / "results.json").read_text())
    assert results["labels"] is False and results["results"]["hard_resize"]["recalls"] == {}
    unlabelled = list(csv.DictReader((work / "unlabelled" / "predictions" / "hard_resize" / "predictions.csv").open()))
    assert [row["prediction"] for row in unlabelled] == [row["prediction"] for row in rows]  # the same search
    assert "metres" not in unlabelled[0]
    assert (work / "unlabelled" / "descriptors" / "hard_resize" / "queries_descriptors.npy").is_file()

    printed = subprocess.run([str(site / "bin" / "vgjax"), "--mode", "print_config"], cwd=work, env=env,
                             capture_output=True, text=True)
    assert printed.returncode == 0 and "backbone" in printed.stdout, printed.stderr[-2000:]

    # The quickstart notebook, on its own synthetic data, with the local model file.
    notebook = subprocess.run([sys.executable, str(REPO / "notebooks" / "quickstart.py")], cwd=work,
                              env={**env, "VGJAX_QUICKSTART_MODEL": "net.vgjax.safetensors"},
                              capture_output=True, text=True)
    assert notebook.returncode == 0, notebook.stderr[-3000:]
    assert "'R@1'" in notebook.stdout and "IMG_0002.jpg: east 5" in notebook.stdout
    places = list(csv.DictReader((work / "quickstart_out" / "photos" / "predictions" / "hard_resize"
                                  / "predictions.csv").open()))
    assert len(places) == 3 and all(place["rank"] == "1" for place in places)


def test_the_notebook_is_made_from_its_source():
    sys.path.insert(0, str(REPO / "notebooks"))
    try:
        import make_ipynb
    finally:
        sys.path.pop(0)
    source = (REPO / "notebooks" / "quickstart.py").read_text()
    assert json.loads((REPO / "notebooks" / "quickstart.ipynb").read_text()) == make_ipynb.notebook(source), \
        "notebooks/quickstart.ipynb is stale: run python notebooks/make_ipynb.py"
    code = "\n".join(cell["source"] for cell in make_ipynb.cells(source) if cell["cell_type"] == "code")
    assert "vgjax.geolocalize(" in code and "models.load(MODEL)" in code


def test_an_unknown_model_is_one_line_naming_the_closest(tmp_path, capsys):
    database, photos = _hand_made(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--model", "cosplace_resnet18_521", "--database_folder", str(database),
                       "--queries_folder", str(photos), "--no_labels", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert "did you mean cosplace_resnet18_512" in capsys.readouterr().err


def test_several_test_methods_get_one_recall_plot(tmp_path):
    from vgjax import eval_run
    from vgjax.configs import common

    database, _ = _hand_made(tmp_path)
    split = load_folders(database, database, positive_dist_m=50)
    config = common.get_config()
    config.data.update(resize=(8, 8), infer_batch_size=2)
    config.eval.update(test_method="hard_resize,central_crop", recall_values=(1, 2), num_preds_to_save=1,
                       queries_to_save=3)
    embed_fn = lambda images: images.reshape(len(images), -1)[:, :4].astype(np.float32)  # noqa: E731
    results = eval_run.evaluate_split(config, embed_fn, split, tmp_path / "out")
    assert list(results) == ["hard_resize", "central_crop"]
    assert (tmp_path / "out" / "predictions" / "recalls.png").is_file()
    for method in results:
        assert (tmp_path / "out" / "predictions" / method / "map.png").is_file()
        assert not (tmp_path / "out" / "predictions" / method / "recalls.png").exists()

"""Sweeps (vgjax.sweep, vgjax.sweep_table): the plan from config.sweep, data.resize as a
percentage, evaluation axes served from stored descriptors, the mean +- std table, and a killed
sweep that a relaunch completes without running a finished run again."""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vgjax import baselines, eval_run, experiment, sweep, sweep_table
from vgjax.configs import common, validate
from vgjax.data import synthetic, vg_folder
from vgjax.data.vg_folder import load_split
from vgjax.train import checkpoint

REPO = Path(__file__).resolve().parents[1]


def _config(axes="", **sweep_options):
    config = common.get_config()
    config.data.datasets_folder, config.data.dataset_name = "/datasets", "place"
    config.sweep.axes = axes
    config.sweep.update(sweep_options)
    return config


# ---------------------------------------------------------------------------------------------
# The plan.


def test_axes_values_are_read_as_on_the_command_line():
    config = common.get_config()
    for key, text, expected in [("train.lr", "1e-4", 1e-4), ("train.lr", "1", 1.0), ("eval.pca_dim", "None", None),
                                ("eval.pca_dim", "64", 64), ("data.resize", "(240, 320)", (240, 320)),
                                ("data.resize", "80%", "80%"), ("eval.index", "hnsw", "hnsw"),
                                ("eval.recall_values", "(1, 100)", (1, 100)), ("train.horizontal_flip", "True", True)]:
        sweep.set_value(config, key, text)
        value = config
        for part in key.split("."):
            value = value[part]
        assert value == expected and type(value) is type(expected), (key, text, value)
    for key, text, error in [("train.nope", "1", KeyError), ("train.lr", "fast", ValueError),
                             ("data.resize", "0%", ValueError), ("seed", "3", ValueError),
                             ("sweep.seeds", "3", ValueError)]:
        with pytest.raises(error):
            sweep.set_value(config, key, text)


def test_plan_names_runs_by_their_values_and_evaluates_eval_axes_on_each_trained_run():
    config = _config("data.resize=100%|50%; eval.index=flat|hnsw", seeds=2)
    config.seed = 3
    runs = sweep.plan(config, "/sweeps/s")
    assert [run.name for run in runs] == ["resize=100%_seed3", "resize=100%_seed4", "resize=50%_seed3",
                                          "resize=50%_seed4"]
    assert runs[2].folder == Path("/sweeps/s/runs/resize=50%_seed3") and runs[2].seed == 3
    assert [point.name for point in runs[0].points] == ["index=flat", "index=hnsw"]
    run_config = runs[3].config(config, runs[3].points[1])
    assert (run_config.seed, run_config.data.resize, run_config.eval.index, run_config.mode) == (4, "50%", "hnsw", "train")

    zipped = sweep.plan(_config("train.lr=1e-5|1e-4; eval.resize=(240, 320)|(480, 640)", zip=True), "/s")
    assert [(run.name, [p.name for p in run.points]) for run in zipped] == [
        ("lr=1e-5_seed0", ["resize=240x320"]), ("lr=1e-4_seed0", ["resize=480x640"])]
    assert [run.name for run in sweep.plan(_config(seeds=2), "/s")] == ["seed0", "seed1"]
    assert [(r.name, r.points[0].name) for r in sweep.plan(_config("data.resize=(2,3); eval.resize=(4,5)"), "/s")] == [
        ("data.resize=2x3_seed0", "eval.resize=4x5")]  # the same last part: the whole key


def test_a_bad_sweep_is_refused_before_any_work_one_line_each():
    cases = [("train.lr=1e-5|1e-4; eval.index=flat", {"zip": True}, "different numbers of values"),
             ("train.lr=1e-5|", {}, "is not key=value|value"),
             ("train.rate=1e-5", {}, "no config field train.rate"),
             ("train.lr=fast", {}, "train.lr=fast"),
             ("train.lr=1e-5; train.lr=1e-4", {}, "given twice"),
             ("eval.index=flat|annoy", {}, "eval.index='annoy'"),
             ("model.aggregation=gem", {"mode": "fit"}, "sweep.mode='fit'"),
             ("", {"seeds": 0}, "sweep.seeds=0")]
    for axes, options, message in cases:
        with pytest.raises(validate.ConfigError) as error:
            validate.check(_config(axes, **options), "sweep", "/tmp/sweep")
        assert any(message in line for line in error.value.problems), (axes, error.value.problems)
    with pytest.raises(validate.ConfigError, match="run resize=120%_synthetic=doom_seed0 .base.: data.resize=.120%.: a percentage"):  # each run's config for its mode
        validate.check(_config("data.resize=120%; data.synthetic=doom"), "sweep", "/tmp/sweep")
    with pytest.raises(sweep.SweepError, match="runs go to different devices only on GPUs"):
        sweep._device_groups(2)


def test_a_sweep_folder_holding_runs_of_another_config_is_refused(tmp_path):
    config = _config("train.lr=1e-5|1e-4")
    runs = sweep.plan(config, tmp_path)
    runs[1].folder.mkdir(parents=True)
    other = runs[1].config(config)
    other.train.margin = 0.5
    (runs[1].folder / "config.json").write_text(other.to_json_best_effort())
    with pytest.raises(sweep.SweepError, match=r"train.margin=0.1 \(the run's: 0.5\)"):
        sweep.run(config, tmp_path)
    extended = _config("train.lr=1e-5|1e-4|1e-3", seeds=3)  # a grown sweep section is the same config
    (runs[1].folder / "config.json").write_text(runs[1].config(config).to_json_best_effort())
    sweep._check_existing_runs(extended, sweep.plan(extended, tmp_path))


def test_parallel_runs_each_get_their_share_of_the_gpus(monkeypatch):
    monkeypatch.setattr(sweep, "_probe_devices", lambda: ("gpu", 4))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert sweep._device_groups(1) == [None] and sweep._device_groups(2) == ["0,1", "2,3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert sweep._device_groups(4) == ["4", "5", "6", "7"]
    with pytest.raises(sweep.SweepError, match="does not divide the 4 GPUs"):
        sweep._device_groups(3)


# ---------------------------------------------------------------------------------------------
# data.resize as a percentage.


def test_resize_percentage_resolves_against_the_dataset_and_mixed_sizes_are_an_error(tmp_path, capsys):
    assert vg_folder.resize_percentage("80%") == vg_folder.resize_percentage(("80%",)) == 80.0  # as the CLI gives it
    assert vg_folder.resize_percentage((480, 640)) is None
    for bad in ("80", "-5%", "x%"):
        with pytest.raises(ValueError):
            vg_folder.resize_percentage(bad)
    synthetic.build_aerial_dataset(tmp_path / "place", splits=("test",), image_size=(60, 80), num_queries=4,
                                   size_m=60.0, progress=False)
    config = _config()
    config.data.datasets_folder = str(tmp_path)
    sweep.set_value(config, "data.resize", "40%")
    resolved = experiment.resolve_resize(config, "eval", tmp_path / "out")
    assert tuple(resolved.data.resize) == (24, 32) and config.data.resize == "40%"
    assert "data.resize=40% of place's 60x80 images: 24x32" in capsys.readouterr().out
    database = sorted((tmp_path / "place/images/test/database").glob("*.jpg"))
    Image.new("RGB", (90, 60)).save(database[-1])
    with pytest.raises(ValueError, match=f"differ in size .*{database[-1].name}"):
        experiment.resolve_resize(config, "eval", tmp_path / "out")
    with pytest.raises(validate.ConfigError, match="a percentage of the dataset's image size works in modes"):
        validate.check(config, "export", tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Evaluation axes: descriptors are computed once.


class _Counting:
    def __init__(self):
        self.embed, self.calls = baselines.tiny_image_embed(), 0

    def __call__(self, images):
        self.calls += 1
        return self.embed(images)


def test_the_descriptor_store_serves_every_search_option_without_embedding_again(tmp_path):
    synthetic.build_aerial_dataset(tmp_path / "place", splits=("test",), image_size=(48, 64), num_queries=12,
                                   size_m=80.0, progress=False)
    config = _config()
    config.data.datasets_folder, config.data.resize = str(tmp_path), (48, 64)
    config.eval.test_method, config.eval.recall_values = "hard_resize,maj_voting", (1, 5)
    split = load_split(tmp_path / "place", "test")
    embed, store = _Counting(), eval_run.DescriptorStore()
    first = eval_run.evaluate_split(config, embed, split, tmp_path / "a", store=store)
    embedded = embed.calls
    assert embedded == 3  # a batch of 16 database images, of 12 queries, of 12 x 5 crops
    config.eval.index, config.eval.recall_values = "hnsw", (1, 3, 10)
    wider = load_split(tmp_path / "place", "test", 60.0)
    again = eval_run.evaluate_split(config, embed, wider, tmp_path / "b", store=store)
    assert embed.calls == embedded  # nothing embedded for another index, N and positives radius
    fresh = eval_run.evaluate_split(config, _Counting(), wider, tmp_path / "c")
    for method in ("hard_resize", "maj_voting"):
        assert again[method]["recalls"] == fresh[method]["recalls"]
        assert "extraction_images_per_second" not in again[method]["timings"]
    assert first["hard_resize"]["recalls"]["R@1"] <= again["hard_resize"]["recalls"]["R@1"]


# ---------------------------------------------------------------------------------------------
# The table.


def test_the_table_holds_means_and_sample_stds_of_the_seeds(tmp_path):
    rows = []
    for value, recalls in (("100%", [(50.0, 70.0), (54.0, 71.0), (49.0, 75.0)]), ("50%", [(40.0, 60.0), (41.0, 66.0)])):
        for seed, (r1, r5) in enumerate(recalls):
            rows.append({"run": f"resize={value}_seed{seed}", "values": {"data.resize": value}, "dataset": "place",
                         "image_size": "48x64" if value == "100%" else "24x32",
                         "test_method": "hard_resize", "recalls": {"R@1": r1, "R@5": r5},
                         "metrics": {"wall_seconds": 60.0 * (seed + 1), "train_images_per_second": 10.0,
                                     "extraction_images_per_second": None, "matching_ms_per_query": 0.5,
                                     "index_bytes": 2e6, "host_peak_bytes": 1e9, "device_peak_bytes": None}})
    groups = sweep_table.group_rows(rows, ["data.resize"])
    assert [g["values"]["data.resize"] for g in groups] == ["100%", "50%"]
    full = groups[0]["recalls"]["R@1"]
    assert full["mean"] == pytest.approx(51.0) and full["std"] == pytest.approx(np.sqrt(((1 + 9 + 4) / 2)))
    assert groups[1]["recalls"]["R@5"]["std"] == pytest.approx(np.std([60.0, 66.0], ddof=1))
    assert groups[0]["measurements"]["extraction_images_per_second"] is None
    text = sweep_table.markdown(groups, ["data.resize"])
    assert "| 100% | 48x64 | place | hard_resize | 3 | 51.0 ± 2.6 | 72.0 ± 2.6 | 2.00 ± 1.00 | 10.0 ± 0.0 |" in text
    assert "extraction img/s" not in text and "device peak GB" not in text
    sweep_table.write_csv(tmp_path / "t.csv", groups, ["data.resize"])
    header, first, _ = (tmp_path / "t.csv").read_text().splitlines()
    assert header.startswith("data.resize,image_size,dataset,test_method,runs,R@1_mean,R@1_std,R@5_mean")
    assert first.startswith("100%,48x64,place,hard_resize,3,51.0,2.6457513110645")
    assert [sweep_table.numeric(text) for text in ("80%", "1e-4", "(240, 320)", "hnsw", "None")] == [80, 1e-4, 240, None, None]
    paths = sweep_table.save_plots(tmp_path, groups, ["data.resize"])
    assert [p.name for p in paths] == ["recall_vs_resize.png"] and Image.open(paths[0]).size == (640, 480)


# ---------------------------------------------------------------------------------------------
# End to end.


def _sweep_command(workdir, datasets, *overrides):
    return [sys.executable, "launch.py", "--config", "configs/smoke_train.py", "--workdir", str(workdir),
            "--mode", "sweep", f"--config.data.datasets_folder={datasets}", *overrides]


@pytest.mark.slow
def test_an_evaluation_sweep_embeds_each_image_once(tmp_path):
    """sweep.mode=eval of a learning-free network: one run, four points, one embedding."""
    command = _sweep_command(tmp_path / "sweep", tmp_path / "datasets", "--config.sweep.mode=eval",
                             "--config.model.backbone=tiny_image", "--config.data.resize=(48, 64)",
                             "--config.sweep.axes=eval.index=flat|hnsw; eval.positive_dist_threshold=25|60")
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "VGJAX_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    folder = tmp_path / "sweep/runs/seed0/sweep"
    points = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json") if p.stem != "run"}
    assert sorted(points) == ["index=flat_positive_dist_threshold=25", "index=flat_positive_dist_threshold=60",
                              "index=hnsw_positive_dist_threshold=25", "index=hnsw_positive_dist_threshold=60"]
    split = load_split(tmp_path / "datasets/aerial_smoke", "test")
    batches = -(-split.num_database // 8) + -(-split.num_queries // 8)  # the smoke config's batches of 8
    assert points["index=flat_positive_dist_threshold=25"]["embed_calls"] == batches
    assert sum(point["embed_calls"] for point in points.values()) == batches
    recalls = {name: point["results"]["aerial_smoke"]["hard_resize"]["recalls"]["R@5"] for name, point in points.items()}
    assert recalls["index=flat_positive_dist_threshold=60"] >= recalls["index=flat_positive_dist_threshold=25"]
    assert (tmp_path / "sweep/recall_vs_time_memory.png").is_file()
    assert (tmp_path / "sweep/recall_vs_positive_dist_threshold.png").is_file()


_PARALLEL = """
import atexit, sys
from jax._src import xla_bridge
from vgjax import launch, sweep

sweep._device_groups = lambda parallel_runs: ["", ""]  # two slots on this CPU: the scheduling of parallel_runs
atexit.register(lambda: print(f"backends in the sweep's process: {len(xla_bridge._backends)}", file=sys.stderr))
workdir, datasets = sys.argv[1:]
sys.argv = ["vgjax", "--config", "configs/smoke_train.py", "--workdir", workdir, "--mode", "sweep",
            f"--config.data.datasets_folder={datasets}", "--config.data.resize=(48, 64)",
            "--config.model.backbone=tiny_image", "--config.eval.pca_dataset_folder=aerial_smoke/images/test/database",
            "--config.sweep.mode=eval", "--config.sweep.seeds=2", "--config.sweep.parallel_runs=2",
            "--config.sweep.axes=eval.pca_dim=8|1000"]
launch.run()
"""


@pytest.mark.slow
def test_runs_side_by_side_and_a_failed_run_named_with_its_log(tmp_path):
    """Two runs at once, each quiet but for its log.txt; PCA to 1000 of the tiny image's 576
    dimensions fails in both: the sweep names them and keeps what was done. The sweep's own
    process never starts JAX's backend (on GPUs it would take the runs' memory)."""
    out = subprocess.run([sys.executable, "-c", _PARALLEL, str(tmp_path / "sweep"), str(tmp_path / "datasets")],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "VGJAX_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 1, out.stderr[-3000:]
    runs = tmp_path / "sweep/runs"
    assert f"runs failed: seed0 (see {runs / 'seed0/log.txt'}); seed1 (see {runs / 'seed1/log.txt'})" in out.stderr
    assert "Evaluating" not in out.stdout + out.stderr and f"its output: {runs / 'seed1/log.txt'}" in out.stdout
    for run in ("seed0", "seed1"):
        assert (runs / run / "sweep/pca_dim=8.json").is_file() and not (runs / run / "sweep/pca_dim=1000.json").exists()
        assert "pca_dim must be in [1, min(N=" in (runs / run / "log.txt").read_text()
    assert not (tmp_path / "sweep/results.md").exists()
    assert "backends in the sweep's process: 0" in out.stderr


def _wait_until(ready, process: subprocess.Popen, timeout: float = 400) -> None:
    start = time.monotonic()
    while not ready():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_killed_sweep_completes_on_relaunch_and_its_table_is_the_runs_mean_and_std(tmp_path):
    """2 seeds x 2 resolutions of the smoke training; the sweep is killed (SIGKILL) in its second
    run, which dies with it; the relaunch skips the finished run and completes the others."""
    env = {**os.environ, "VGJAX_CACHE": str(tmp_path / "cache")}
    command = _sweep_command(tmp_path / "sweep", tmp_path / "datasets", "--config.sweep.axes=data.resize=100%|50%",
                             "--config.sweep.seeds=2", "--config.train.checkpoint_every_steps=2")
    runs = tmp_path / "sweep/runs"
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_until((runs / "resize=100%_seed0/sweep/run.json").exists, first)
    _wait_until(lambda: checkpoint.run_folder(runs / "resize=100%_seed1") is not None, first)  # a step committed
    first.send_signal(signal.SIGKILL)
    first.communicate()
    finished = runs / "resize=100%_seed0"
    before = {path: path.stat().st_mtime_ns for path in finished.rglob("*") if path.is_file()}
    lock = runs / "resize=100%_seed1/.sweep-lock"
    time.sleep(1)
    with open(lock) as handle:  # the killed sweep's run died with it: nothing holds its lock
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not (runs / "resize=100%_seed1/results.json").exists()

    out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "4 runs (1 done)" in out.stdout
    assert "run resize=100%_seed0 started" not in out.stdout
    assert {path: path.stat().st_mtime_ns for path in finished.rglob("*") if path.is_file()} == before
    assert "Resuming from epoch" in (runs / "resize=100%_seed1/log.txt").read_text()
    sizes = {json.loads((runs / name / "config.json").read_text())["data"]["resize"][0] for name in
             ("resize=100%_seed0", "resize=50%_seed1")}
    assert sizes == {96, 48}  # the synthetic world's 96x128 images, and half of them

    table = json.loads((tmp_path / "sweep/results.json").read_text())
    for group in table["groups"]:
        names = [f"resize={group['values']['data.resize']}_seed{seed}" for seed in (0, 1)]
        assert group["runs"] == names
        points = [json.loads((runs / name / "sweep/base.json").read_text()) for name in names]
        for name, point in zip(names, points):  # the run's own final test, nothing embedded again
            final = json.loads((runs / name / "results.json").read_text())["tests"]
            assert point["results"] == {"aerial_smoke": final} and point["embed_calls"] == 0
        for n in ("R@1", "R@5"):
            values = [point["results"]["aerial_smoke"]["hard_resize"]["recalls"][n] for point in points]
            assert group["recalls"][n]["mean"] == pytest.approx(np.mean(values))
            assert group["recalls"][n]["std"] == pytest.approx(np.std(values, ddof=1))
        walls = [json.loads((runs / name / "sweep/run.json").read_text())["wall_seconds"] for name in names]
        assert group["measurements"]["wall_seconds"]["mean"] == pytest.approx(np.mean(walls))
    markdown = (tmp_path / "sweep/results.md").read_text()
    assert "| data.resize | size | dataset | test method | runs | R@1 | R@5 | wall (min) | train img/s" in markdown
    assert "| 50% | 48x64 | aerial_smoke | hard_resize | 2 |" in markdown
    assert (tmp_path / "sweep/recall_vs_resize.png").is_file() and (tmp_path / "sweep/results.csv").is_file()
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "4 runs (4 done)" in again.stdout and "started" not in again.stdout

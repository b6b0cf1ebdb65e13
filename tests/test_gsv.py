"""GSV-Cities: the published layout read back, the places x K batches, the learning-rate
schedule, and the method end to end through launch.py, killed and resumed."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from run_checkpoints import last_checkpoint
from vgjax.configs import common
from vgjax.data import gsv_cities
from vgjax.data.vg_folder import DatasetFormatError
from vgjax.train import state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = gsv_cities.write_synthetic(tmp_path_factory.mktemp("gsv") / "gsv_cities", places_per_city=12,
                                      image_size=(16, 16))
    return root, gsv_cities.read_places(root, ("Aville", "Btown"), 4)


def test_names_follow_the_published_format():
    row = {"place_id": "1234", "year": "2019", "month": "7", "northdeg": "5", "city_id": "London",
           "lat": "51.5074", "lon": "-0.1278", "panoid": "AbC_d-e"}
    assert gsv_cities.image_name(row) == "London_0001234_2019_07_005_51.5074_-0.1278_AbC_d-e.jpg"
    assert gsv_cities.image_name({**row, "place_id": "301234"}) == gsv_cities.image_name(row)  # offset removed


def test_places_are_read_with_unique_ids_and_small_ones_dropped(dataset):
    root, places = dataset
    counts = {}
    for city in ("Aville", "Btown"):
        with open(root / "Dataframes" / f"{city}.csv") as f:
            for row in csv.DictReader(f):
                counts[(city, int(row["place_id"]))] = counts.get((city, int(row["place_id"])), 0) + 1
    kept = {key: n for key, n in counts.items() if n >= 4}
    assert len(places.paths) == len(kept) and places.dropped == len(counts) - len(kept) > 0
    assert places.num_images == sum(kept.values())
    assert set(places.place_ids[places.city == 1].tolist()) == {100000 + p for (c, p) in kept if c == "Btown"}
    assert all((root / path).is_file() for paths in places.paths for path in paths)


def test_a_missing_image_or_column_is_an_error_naming_it(dataset, tmp_path):
    root, _ = dataset
    (tmp_path / "Dataframes").mkdir()
    (tmp_path / "Dataframes" / "Aville.csv").write_text((root / "Dataframes" / "Aville.csv").read_text())
    with pytest.raises(FileNotFoundError, match="image folder .*Images/Aville does not exist"):
        gsv_cities.read_places(tmp_path, ("Aville",), 4)
    (tmp_path / "Images" / "Aville").mkdir(parents=True)
    first = sorted(os.listdir(root / "Images" / "Aville"))[0]
    os.link(root / "Images" / "Aville" / first, tmp_path / "Images" / "Aville" / first)
    with pytest.raises(DatasetFormatError, match=r"Aville.csv: \d+ of its images are missing"):
        gsv_cities.read_places(tmp_path, ("Aville",), 4)
    (tmp_path / "Dataframes" / "Aville.csv").write_text("place_id,year,month\n1,2,3\n")
    with pytest.raises(DatasetFormatError, match="no column northdeg, city_id, lat, lon, panoid"):
        gsv_cities.read_places(tmp_path, ("Aville",), 4)
    with pytest.raises(FileNotFoundError, match="dataframe .*Nowhere.csv does not exist"):
        gsv_cities.read_places(tmp_path, ("Nowhere",), 4)


def test_places_by_k_batches_are_reproducible_distinct_and_city_by_city(dataset):
    _, places = dataset
    draw = dict(places_per_batch=4, images_per_place=4)
    tuples, labels = gsv_cities.epoch_tuples(places, seed=1, epoch=0, **draw)
    again, labels_again = gsv_cities.epoch_tuples(places, seed=1, epoch=0, **draw)
    assert tuples == again and np.array_equal(labels, labels_again)
    assert len(labels) == gsv_cities.batches_per_epoch(places, 4) * 4 == len(places.paths) // 4 * 4
    assert len(set(labels.tolist())) == len(labels)  # each place at most once an epoch
    assert all(len(set(paths)) == 4 and set(paths) <= set(places.paths[p]) for paths, p in zip(tuples, labels))
    cities = places.city[labels]
    assert list(cities) == sorted(cities)  # GSV-Cities' order: each city's places, shuffled, city after city
    other, other_labels = gsv_cities.epoch_tuples(places, seed=1, epoch=1, **draw)
    assert not np.array_equal(labels, other_labels) or tuples != other
    _, mixed = gsv_cities.epoch_tuples(places, seed=1, epoch=0, shuffle_all=True, **draw)
    assert list(places.city[mixed]) != sorted(places.city[mixed])


def test_learning_rate_warm_up_and_milestones_as_gsv_cities():
    config = common.get_config().train
    config.update(warmup_steps=10, lr_milestones=(2, 3), lr_gamma=0.3)
    lr = state.learning_rate(config, 0.05, steps_per_epoch=20)
    expected = {0: 0.005, 4: 0.025, 9: 0.05, 39: 0.05, 40: 0.015, 60: 0.0045, 1000: 0.0045}
    for step, value in expected.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6)
    config.update(warmup_steps=0, lr_milestones=())
    assert state.learning_rate(config, 0.05, steps_per_epoch=20) == 0.05


def test_salad_and_boq_schedules_and_adamw_as_torch():
    """SALAD's LinearLR(1 -> 0.2 over N steps) and BoQ's warm-up in epochs, step by step against
    torch's schedulers; vgjax's AdamW against torch's AdamW over 3 steps."""
    import torch

    config = common.get_config().train
    config.update(lr_decay_steps=7, lr_end_factor=0.2)
    lr = state.learning_rate(config, 6e-5, steps_per_epoch=5)
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=6e-5)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1, end_factor=0.2, total_iters=7)
    for step in range(12):
        np.testing.assert_allclose(float(lr(step)), optimizer.param_groups[0]["lr"], rtol=1e-6)
        optimizer.step()
        scheduler.step()
    config.update(lr_decay_steps=0, warmup_epochs=2)
    assert state.schedule_in_epochs(config)  # the engine passes the method's steps per epoch
    config.update(lr_milestones=(2, 3), lr_gamma=0.1)
    lr = state.learning_rate(config, 1e-4, steps_per_epoch=5)
    expected = {0: 1e-5, 4: 5e-5, 9: 1e-4, 10: 1e-5, 15: 1e-6}
    for step, value in expected.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6)

    weights = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    gradients = [np.random.default_rng(k).normal(size=(4, 3)).astype(np.float32) for k in range(1, 4)]
    torch_weights = torch.tensor(weights, requires_grad=True)
    torch_adamw = torch.optim.AdamW([torch_weights], lr=1e-2, weight_decay=0.3)
    config = common.get_config().train
    config.update(optim="adamw", lr=1e-2, weight_decay=0.3)
    tx = state.make_optimizer(config, "gem", {"w": weights})
    params, opt_state = {"w": jnp.asarray(weights)}, None
    opt_state = tx.init(params)
    for gradient in gradients:
        torch_weights.grad = torch.tensor(gradient)
        torch_adamw.step()
        updates, opt_state = tx.update({"w": jnp.asarray(gradient)}, opt_state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params["w"]), torch_weights.detach().numpy(), atol=1e-6)


def _launch(workdir, datasets, *options):
    return [sys.executable, "launch.py", "--config=configs/smoke_gsv.py", f"--workdir={workdir}",
            f"--config.data.datasets_folder={datasets}", *options]


@pytest.mark.slow
def test_smoke_run_learns_and_a_killed_run_resumes_exactly(tmp_path):
    datasets = tmp_path / "datasets"
    straight = subprocess.run(_launch(tmp_path / "straight", datasets), cwd=REPO, capture_output=True, text=True,
                              timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    history = results["val_history"]
    assert history[-1]["loss"] < history[0]["loss"]  # the loss falls
    assert max(h["val"]["R@1"] for h in history[1:]) > history[0]["val"]["R@1"]  # and validation recall rises
    assert results["method"] == "gsv_cities" and results["dropped_places"] > 0 and results["steps"] == 15
    logged = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert any("b_acc" in record for record in logged)

    # The same run reading its images packed as raw pixels (built on its first launch; the
    # synthetic images already have the training size, so the pixels are the decoded files),
    # killed mid-epoch 2 (step 7; checkpoints every 2 steps), must end as the straight one.
    workdir = tmp_path / "killed"
    options = ("--config.train.checkpoint_every_steps=2", f"--config.data.packed_folder={tmp_path / 'packed'}",
               "--config.data.packed_encoding=raw")
    process = subprocess.Popen(_launch(workdir, datasets, *options), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (workdir / "checkpoints" / "7" / "commit_success.txt").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its step-7 checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(_launch(workdir, datasets, *options), cwd=REPO, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    pack = tmp_path / "packed" / "gsv_cities"
    assert f"train images read from {pack}" in (workdir / "log.txt").read_text()
    assert "Resuming from epoch 2, round 1/1, batch 2 (step 7)" in resumed.stdout
    a, b = last_checkpoint(tmp_path / "straight"), last_checkpoint(workdir)
    jax.tree.map(np.testing.assert_array_equal, a["train"], b["train"])
    assert json.loads((workdir / "results.json").read_text())["val_history"] == history


# The DINOv2 recipes, shrunk to the synthetic set: ViT-S, 56x56 training and 70x70 evaluation
# images (4 and 5 patches a side), small aggregations, one epoch; the rest as the recipe says
# (bfloat16, AdamW, its schedule, the trained blocks).
_SHRUNK = ("--config.data.datasets_folder={datasets}", "--config.data.synthetic=gsv", "--config.data.dataset_name=gsv_smoke",
           "--config.data.gsv_cities_folder=gsv_cities", "--config.data.gsv_cities=('Aville','Btown')",
           "--config.data.resize=(56,56)", "--config.eval.resize=(70,70)", "--config.model.backbone=dinov2_vits14",
           "--config.model.pretrain=none", "--config.train.train_batch_size=8", "--config.train.epochs_num=1",
           "--config.data.num_workers=2", "--config.data.infer_batch_size=16", "--config.eval.recall_values=(1,5)")
_RECIPES = {"configs/gsv_dinov2_salad.py": ("--config.model.salad_clusters=8", "--config.model.salad_cluster_dim=4",
                                            "--config.model.salad_token_dim=8", "--config.train.lr_decay_steps=3"),
            "configs/gsv_dinov2_boq.py": ("--config.model.boq_proj_channels=64", "--config.model.boq_queries=4",
                                          "--config.model.boq_row_dim=4", "--config.train.lr_milestones=(1,)")}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(_RECIPES))
def test_dinov2_recipes_train_end_to_end(recipe, tmp_path):
    command = [sys.executable, "launch.py", f"--config={recipe}", f"--workdir={tmp_path / 'run'}",
               *(option.format(datasets=tmp_path / "datasets") for option in _SHRUNK), *_RECIPES[recipe]]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 5 and np.isfinite(results["val_history"][0]["loss"])
    assert set(results["test"]) == {"R@1", "R@5"} and results["method"] == "gsv_cities"
    assert "dinov2_vits14 + " in run.stdout and "model.dtype='bfloat16'" in run.stdout

"""CosPlace training: batches, the step, and the workflow end to end with a kill and a resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from configs import smoke_cosplace
from run_checkpoints import last_checkpoint
from vgjax.data import cosplace_groups, synthetic
from vgjax.models import geoloc_net
from vgjax.train import cosplace as train_cosplace, losses, state as train_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    root = synthetic.build_cosplace_dataset(tmp_path_factory.mktemp("cosplace") / "data", progress=False)
    return root / "train"


@pytest.fixture(scope="module")
def partition(train_folder, tmp_path_factory):
    config = cosplace_groups.PartitionConfig(M=10, alpha=30, N=2, L=1, groups_num=2, min_images_per_class=2)
    return cosplace_groups.build_partition(train_folder, config, cache_dir=tmp_path_factory.mktemp("cache"),
                                    progress=False)


def test_epoch_samples_are_distinct_classes_per_batch_and_reproducible(partition):
    paths, labels = train_cosplace.epoch_samples(partition, 1, seed=0, epoch=3, steps=5, batch_size=4)
    assert len(paths) == len(labels) == 20
    per_pass = len(partition.groups[1]) // 4  # 9 classes -> 2 batches a pass, 1 class dropped
    batches = labels.reshape(5, 4)
    assert all(len(set(batch)) == 4 for batch in batches)
    assert len(set(batches[:per_pass].ravel())) == 4 * per_pass  # no class twice within a pass
    for path, label in zip(paths, labels):  # each image belongs to its class
        assert partition.paths.index(path) in partition.groups[1][label]
    again = train_cosplace.epoch_samples(partition, 1, seed=0, epoch=3, steps=5, batch_size=4)
    assert again[0] == paths
    other = train_cosplace.epoch_samples(partition, 1, seed=0, epoch=4, steps=5, batch_size=4)
    assert other[0] != paths
    with pytest.raises(ValueError, match="group 0 has 9 classes, fewer than train.train_batch_size 16"):
        train_cosplace.epoch_samples(partition, 0, seed=0, epoch=0, steps=1, batch_size=16)


def test_cosplace_step_updates_model_and_classifier():
    config = smoke_cosplace.get_config()
    model = geoloc_net.build(config.model, (32, 32))
    state, tx = train_state.create_state(config, geoloc_net.init_variables(model, (32, 32)), seed=0)
    classifier_tx = optax.adam(0.01)
    weight = losses.cosface_init(jax.random.key(0), 6, 32)
    classifier = train_state.Head(weight, classifier_tx.init(weight))
    step = jax.jit(lambda s, c, batch: train_cosplace.cosplace_step(
        s, c, batch, model=model, tx=tx, head_tx=classifier_tx, augmentation=(0.7, 0.7, 0.7, 0.5, 0.5)))
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8)
    before = jax.tree.map(np.asarray, (state.trainable, state.frozen))
    new_state, new_classifier, metrics = step(state, classifier,
                                              {"images": images, "labels": np.array([0, 3, 5, 1], np.int32)})
    assert np.isfinite(float(metrics["loss"])) and bool(metrics["finite"]) and int(new_state.step) == 1
    assert not np.allclose(new_classifier.params, weight)
    jax.tree.map(np.testing.assert_array_equal, before[1], jax.tree.map(np.asarray, new_state.frozen))
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)),
                                            before[0], new_state.trainable)))


def _launch(workdir, datasets):
    return [sys.executable, "launch.py", "--config", "configs/smoke_cosplace.py", "--workdir", str(workdir),
            f"--config.data.datasets_folder={datasets}", "--config.train.checkpoint_every_steps=2"]


def _steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in Path(workdir, "checkpoints").iterdir() if p.name.isdigit())




@pytest.mark.slow
def test_cosplace_end_to_end_killed_and_resumed_equals_uninterrupted(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    datasets = tmp_path / "datasets"
    straight = subprocess.run(_launch(tmp_path / "straight", datasets), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]
    workdir = tmp_path / "killed"
    process = subprocess.Popen(_launch(workdir, datasets), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while 6 not in (_steps(workdir) if (workdir / "checkpoints").is_dir() else []):  # mid-epoch 2
        assert process.poll() is None and time.time() < deadline, "run ended before its 2nd checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(_launch(workdir, datasets), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from epoch 2, round 1/1, batch 2 (step 6), best R@1" in resumed.stdout
    assert "RANDOM weights" not in resumed.stdout + resumed.stderr
    a, b = last_checkpoint(tmp_path / "straight"), last_checkpoint(workdir)
    assert int(a["train"]["step"]) == int(b["train"]["step"]) == 8
    jax.tree.map(np.testing.assert_array_equal, (a["train"]["trainable"], a["classifiers"]),
                 (b["train"]["trainable"], b["classifiers"]))
    results = [json.loads(Path(d, "results.json").read_text()) for d in (tmp_path / "straight", workdir)]
    for key in ("test", "val_history", "best_val_recall", "best_epoch", "steps", "groups"):
        assert results[0][key] == results[1][key], key
    assert results[0]["groups"] == [9, 9] and len(results[0]["val_history"]) == 2
    assert results[0]["method"] == "cosplace" and results[0]["best_metric"] == "R@1"


def test_each_process_loads_its_share_of_every_batch(partition, train_folder, monkeypatch):
    """With 2 processes, process p's batches are rows [p*B/2, (p+1)*B/2) of the one-process
    batches, images and labels (a multi-process run's global batch is the one-process batch)."""
    config = smoke_cosplace.get_config()
    method = object.__new__(train_cosplace.CosPlace)  # only what batches() reads
    method.config, method.partition = config, partition
    method.train_folder = train_folder
    method.run = type("Run", (), {"image_size": (32, 32)})()
    progress = train_cosplace.Progress()

    def batches(index, count):
        monkeypatch.setattr(jax, "process_index", lambda: index)
        monkeypatch.setattr(jax, "process_count", lambda: count)
        return list(method.batches(progress))

    whole, shares = batches(0, 1), [batches(0, 2), batches(1, 2)]
    assert len(whole) == len(shares[0]) == len(shares[1]) == config.cosplace.iterations_per_epoch
    for step, batch in enumerate(whole):
        for key in ("images", "labels"):
            np.testing.assert_array_equal(batch[key], np.concatenate([share[step][key] for share in shares]))


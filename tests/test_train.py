"""Training: the step (freezing, BN, optimizers), tuple batches, data parallelism, and the whole
workflow end to end with a kill and an exact resume."""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from PIL import Image

from configs import common, smoke_train
from vgjax import checkpoint, train_step
from vgjax.data import augment
from vgjax.data.pipeline import triplet_batches
from vgjax.models import geoloc_net

REPO = Path(__file__).resolve().parents[1]


def tiny_config(aggregation="gem", **train):
    config = common.get_config()
    config.model.backbone, config.model.aggregation = "resnet18conv4", aggregation
    config.model.netvlad_clusters = 4
    config.mining.negs_num_per_query = 2
    config.train.update(train)
    return config


def _setup(config, size=(32, 32)):
    model = geoloc_net.build(config.model, size)
    variables = geoloc_net.init_variables(model, size)
    state, tx = train_step.create_state(config, variables, seed=0)
    step = train_step.make_train_step(model, tx, train_step.StepConfig(
        tuple_size=4, criterion="triplet", margin=0.1, augment=augment.AugmentConfig.from_config(config.train)))
    images = np.random.default_rng(0).integers(0, 256, (8, *size, 3), dtype=np.uint8)
    return state, step, images


def test_step_updates_only_trainable_params_and_all_batch_stats():
    state, step, images = _setup(tiny_config(lr=1e-2))
    before = jax.tree.map(np.asarray, (state.trainable, state.frozen, state.batch_stats))
    state, metrics = step(state, images)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
    assert set(state.frozen["backbone"]) == {"conv1", "bn1", "layer1_0", "layer1_1", "layer2_0", "layer2_1"}
    jax.tree.map(np.testing.assert_array_equal, before[1], jax.tree.map(np.asarray, state.frozen))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), before[0], state.trainable)
    assert all(jax.tree.leaves(changed))
    # The benchmark's "frozen" stages still update BatchNorm statistics (frozen_bn=False).
    assert not np.array_equal(before[2]["backbone"]["bn1"]["mean"], state.batch_stats["backbone"]["bn1"]["mean"])


def test_bfloat16_compute_keeps_float32_params_loss_and_optimizer_state():
    config = tiny_config(lr=1e-2)
    config.model.dtype = "bfloat16"
    state, step, images = _setup(config)
    state, metrics = step(state, images)
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    leaves = jax.tree.leaves((state.trainable, state.frozen, state.opt_state))
    assert {leaf.dtype for leaf in leaves if leaf.dtype != jnp.int32} == {jnp.dtype(jnp.float32)}


def test_an_interrupted_checkpoint_is_never_restored(tmp_path):
    checkpoints = checkpoint.Checkpoints(tmp_path)
    state = {"w": np.arange(3.0)}
    checkpoints.save(state, {"epoch": 1})
    checkpoints.close()
    # A save cut short by a crash leaves only orbax's temporary folder (no commit).
    (tmp_path / "last" / "2.orbax-checkpoint-tmp-1234").mkdir()
    (tmp_path / "last" / "2.orbax-checkpoint-tmp-1234" / "state").mkdir()
    restored_state, meta = checkpoint.Checkpoints(tmp_path).restore(state)
    assert meta == {"epoch": 1}
    np.testing.assert_array_equal(restored_state["w"], state["w"])
    assert checkpoint.Checkpoints(tmp_path / "empty").restore(state) is None


def test_frozen_bn_keeps_frozen_stage_statistics():
    config = tiny_config(lr=1e-2)
    config.model.frozen_bn = True
    state, step, images = _setup(config)
    before = np.asarray(state.batch_stats["backbone"]["bn1"]["mean"])
    layer3 = np.asarray(state.batch_stats["backbone"]["layer3_0"]["bn1"]["mean"])
    state, _ = step(state, images)
    np.testing.assert_array_equal(before, state.batch_stats["backbone"]["bn1"]["mean"])
    assert not np.array_equal(layer3, state.batch_stats["backbone"]["layer3_0"]["bn1"]["mean"])


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_optimizers_match_torch(optim):
    config = tiny_config(optim=optim, lr=0.05)
    w0 = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    grads = [np.random.default_rng(i).normal(size=(3, 4)).astype(np.float32) for i in (1, 2, 3)]
    tx = train_step.make_optimizer(config.train, "gem", {"w": w0})
    params, opt_state = {"w": jnp.asarray(w0)}, tx.init({"w": jnp.asarray(w0)})
    weight = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    torch_opt = (torch.optim.Adam([weight], lr=0.05) if optim == "adam"
                 else torch.optim.SGD([weight], lr=0.05, momentum=0.9, weight_decay=1e-3))
    for g in grads:
        updates, opt_state = tx.update({"w": jnp.asarray(g)}, opt_state, params)
        params = {"w": params["w"] + updates["w"]}
        weight.grad = torch.from_numpy(g)
        torch_opt.step()
    np.testing.assert_allclose(params["w"], weight.detach().numpy(), atol=1e-6)


def test_crn_learning_rates():
    config = tiny_config("crn", lr_crn_layer=1.0, lr_crn_net=1e-3, optim="sgd")
    trainable = {"aggregation": {"crn": {"w": jnp.zeros(2)}, "centroids": jnp.zeros(2)}}
    tx = train_step.make_optimizer(config.train, "crn", trainable)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    np.testing.assert_allclose(updates["aggregation"]["crn"]["w"], -1.0, rtol=1e-6)
    np.testing.assert_allclose(updates["aggregation"]["centroids"], -1e-3, rtol=1e-6)


def test_triplet_batches_order_resume_and_process_shares(tmp_path):
    paths = []
    for i in range(12):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(paths[-1])
    tuples = [paths[3 * t:3 * t + 3] for t in range(4)]  # 4 tuples of 3 images
    first = lambda batches: [b[:, 0, 0, 0].tolist() for b in batches]
    assert first(triplet_batches(tuples, 2, (4, 4))) == [[0, 20, 40, 60, 80, 100], [120, 140, 160, 180, 200, 220]]
    assert first(triplet_batches(tuples, 2, (4, 4), start_batch=1)) == [[120, 140, 160, 180, 200, 220]]
    assert first(triplet_batches(tuples, 2, (4, 4), process_index=1, process_count=2)) == [[60, 80, 100], [180, 200, 220]]
    assert first(triplet_batches(tuples[:3], 2, (4, 4))) == [[0, 20, 40, 60, 80, 100]]  # drop_last


def test_two_devices_equal_one_device():
    # Runs in a fresh process with 2 fake CPU devices; every step is blocked on (the CPU
    # collectives deadlock when many steps are queued, see jax_stack.md). SGD, because Adam turns
    # the reduction-order noise of near-zero gradients into updates of about +-lr (m / sqrt(v)),
    # which would hide a real sharding bug behind a loose tolerance.
    script = textwrap.dedent("""
        import sys; sys.path.insert(0, "tests")
        import numpy as np, jax
        from jax.sharding import Mesh
        from test_train import tiny_config, _setup
        from vgjax import sharding
        results = []
        for devices in (jax.devices()[:1], jax.devices()[:2]):
            mesh = Mesh(np.asarray(devices), (sharding.DATA_AXIS,))
            state, step, images = _setup(tiny_config(lr=1e-2, optim="sgd"))
            state = sharding.replicate(state, mesh)
            for _ in range(2):
                state, metrics = step(state, sharding.shard_batch(images, mesh))
                metrics["loss"].block_until_ready()
            results.append(jax.tree.map(np.asarray, (state.trainable, state.batch_stats)))
        errors = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), *results))
        print(len(jax.devices()), max(errors))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    devices, error = out.stdout.split()
    assert devices == "2" and float(error) < 1e-5


# ---------------------------------------------------------------------------------------------
# The whole workflow.


def _launch(workdir, datasets, *overrides):
    return [sys.executable, "launch.py", "--config", "configs/smoke_train.py", "--workdir", str(workdir),
            f"--config.data.datasets_folder={datasets}", "--config.train.checkpoint_every_steps=2",
            *overrides]


def _final_state(workdir):
    last = sorted(glob.glob(f"{workdir}/checkpoints/last/*"), key=lambda p: int(Path(p).name))[-1]
    return ocp.PyTreeCheckpointer().restore(f"{last}/state")["train"]


@pytest.mark.slow
def test_training_end_to_end_packed_killed_and_resumed_equals_uninterrupted(tmp_path):
    datasets = tmp_path / "datasets"
    straight = subprocess.run(_launch(tmp_path / "straight", datasets), cwd=REPO, capture_output=True,
                              text=True, timeout=900)
    assert straight.returncode == 0, straight.stderr[-3000:]
    # The train split packed (mode pack): the images are already 64x64, so the packed JPEGs are
    # the files themselves and training on them must give the same result.
    packed = ["--config.data.packed_folder=" + str(tmp_path / "packed")]
    pack = subprocess.run(_launch(tmp_path / "pack", datasets, *packed, "--mode", "pack"), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert pack.returncode == 0, pack.stderr[-3000:]
    assert (tmp_path / "packed" / "aerial_smoke-train-64x64" / "manifest.json").exists()
    # Same command on the packed split, killed (SIGKILL, no clean-up) once the second checkpoint
    # exists: mid-epoch, two steps into the first round's second half.
    workdir = tmp_path / "killed"
    process = subprocess.Popen(_launch(workdir, datasets, *packed), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (workdir / "checkpoints" / "last" / "2").exists():
        assert process.poll() is None and time.time() < deadline, "run ended before its 2nd checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(_launch(workdir, datasets, *packed), cwd=REPO, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _final_state(tmp_path / "straight"), _final_state(workdir)
    assert int(a["step"]) == int(b["step"]) == 16
    jax.tree.map(np.testing.assert_array_equal, (a["trainable"], a["batch_stats"], a["opt_state"]),
                 (b["trainable"], b["batch_stats"], b["opt_state"]))
    results = [json.loads(Path(d, "results.json").read_text()) for d in (tmp_path / "straight", workdir)]
    for key in ("test", "val_history", "best_val_recall", "steps", "descriptor_dim"):
        assert results[0][key] == results[1][key], key  # (timings differ, of course)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert sum('"val"' in line for line in lines) == 2  # both epochs validated


def test_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path):
    out = subprocess.run(_launch(tmp_path / "run", tmp_path / "datasets", "--config.train.lr=1e30"),
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode != 0
    assert "non-finite loss" in out.stderr and "the last good checkpoint" in out.stderr
    assert (tmp_path / "run" / "checkpoints" / "last").is_dir()


def test_smoke_config_is_valid():
    config = smoke_train.get_config()
    assert config.mining.cache_refresh_rate % config.train.train_batch_size == 0

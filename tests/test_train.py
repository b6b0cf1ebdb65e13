"""Training: the step (freezing, BN, optimizers), tuple batches, data parallelism, and the whole
workflow end to end with a kill and an exact resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from configs import smoke_train
from run_checkpoints import last_checkpoint
from test_models import torch_network
from vgjax import embed, evaluate, models
from vgjax.configs import common
from vgjax.data import augment, synthetic
from vgjax.data.pipeline import triplet_batches
from vgjax.models import geoloc_net
from vgjax.train import checkpoint, loop, runs, state as train_state, triplet

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
    state, tx = train_state.create_state(config, variables, seed=0)
    jitted = triplet.make_step(model, tx, triplet.StepConfig(
        tuple_size=4, criterion="triplet", margin=0.1, augment=augment.AugmentConfig.from_config(config.train)))

    def step(state, images):
        state, _, metrics = jitted(state, None, {"images": images})
        return state, metrics

    images = np.random.default_rng(0).integers(0, 256, (8, *size, 3), dtype=np.uint8)
    return state, step, images


def test_step_updates_only_trainable_params_and_all_batch_stats():
    state, step, images = _setup(tiny_config(lr=1e-2))
    before = jax.tree.map(np.asarray, (state.trainable, state.frozen, state.batch_stats))
    state, metrics = step(state, images)
    assert np.isfinite(float(metrics["loss"])) and bool(metrics["finite"]) and int(state.step) == 1
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
    tx = train_state.make_optimizer(config.train, "gem", {"w": w0})
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
    tx = train_state.make_optimizer(config.train, "crn", trainable)
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
            "--config.train.log_every_steps=3", *overrides]


def _run(*command, **kwargs):
    out = subprocess.run(*command, cwd=REPO, capture_output=True, text=True, timeout=900, **kwargs)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in Path(workdir, "checkpoints").iterdir() if p.name.isdigit())


def _final_state(workdir):
    return last_checkpoint(workdir)["train"]


def _assert_same_run(straight, other):
    a, b = _final_state(straight), _final_state(other)
    assert int(a["step"]) == int(b["step"]) == 16
    jax.tree.map(np.testing.assert_array_equal, (a["trainable"], a["batch_stats"], a["opt_state"]),
                 (b["trainable"], b["batch_stats"], b["opt_state"]))
    results = [json.loads(Path(d, "results.json").read_text()) for d in (straight, other)]
    for key in ("test", "val_history", "best_val_recall", "best_epoch", "steps", "descriptor_dim"):
        assert results[0][key] == results[1][key], key  # (timings differ, of course)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The smoke run, uninterrupted, keeping every checkpoint (cadence every 3 steps)."""
    root = tmp_path_factory.mktemp("train")
    out = _run(_launch(root / "straight", root / "datasets", "--config.train.keep_checkpoints=100"))
    return root, out


@pytest.mark.slow
def test_straight_run_cadence_banner_log_and_best_metric(straight):
    root, out = straight
    workdir = root / "straight"
    # 2 epochs x 2 rounds x 4 steps, every 2 steps: inside rounds (2, 6, 10, 14), round ends
    # but the epoch's last (4, 12), and each validation (8, 16).
    assert _steps(workdir) == [2, 4, 6, 8, 10, 12, 14, 16]
    log = (workdir / "log.txt").read_text()
    for text in ("vgjax training: triplet", "devices: 1 x cpu", "train: ", "val: ", "mining: partial",
                 "network: resnet18conv4 + gem", "config (differences from the defaults): ",
                 "data.resize=(64, 64)", "Compiling the training step...", "Compiled the training step in",
                 "Epoch 1/2 done in", "Epoch 2/2 done in", "aerial_smoke/images/test (hard_resize): R@1: "):
        assert text in log, text
    assert "\r" not in log and "RANDOM weights" in log  # pretrain=none: the one warning that is true
    manifest = json.loads((root / "datasets" / "aerial_smoke" / "vgjax_manifest.json").read_text())["folders"]
    assert manifest["images/train/database"]["tool"].endswith("synthetic aerial")
    results = json.loads((workdir / "results.json").read_text())
    history = [epoch["val"]["R@5"] for epoch in results["val_history"]]
    assert results["best_metric"] == "R@5" and results["best_epoch"] == int(np.argmax(history))
    assert results["best_val_recall"] == max(history)
    assert all(np.isfinite(epoch["loss"]) for epoch in results["val_history"])


@pytest.mark.slow
def test_killed_and_resumed_equals_uninterrupted_also_packed(straight):
    root, _ = straight
    datasets = root / "datasets"
    # The train split packed (mode pack) as raw pixels: the images are already 64x64, so the
    # packed pixels are the decoded files and training on them must give the same result.
    packed = ["--config.data.packed_folder=" + str(root / "packed"), "--config.data.packed_encoding=raw"]
    _run(_launch(root / "pack", datasets, *packed, "--mode", "pack"))
    summary = json.loads((root / "pack" / "results.json").read_text())
    assert summary["packed"] == str(root / "packed" / "vg_folder" / "aerial_smoke-train-64x64-raw" / "1.0.0")
    assert summary["encoding"] == "raw" and set(summary["images"]) == {"train_database", "train_queries"}
    # Same command on the packed split, killed (SIGKILL, no clean-up) once step 6's checkpoint is
    # committed: epoch 1, two steps into its second mining round.
    workdir = root / "killed"
    process = subprocess.Popen(_launch(workdir, datasets, *packed), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while 6 not in (_steps(workdir) if (workdir / "checkpoints").is_dir() else []):
        assert process.poll() is None and time.time() < deadline, "run ended before step 6's checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = _run(_launch(workdir, datasets, *packed))
    assert "Resuming from epoch 1, round 2/2, batch 2 (step 6), not validated yet" in resumed.stdout
    _assert_same_run(root / "straight", workdir)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert sum('"val"' in line for line in lines) == 2  # both epochs validated
    again = _run(_launch(workdir, datasets, *packed))
    assert "Training finished at epoch 2; testing the best checkpoint" in again.stdout


@pytest.mark.slow
def test_lost_last_commit_and_damaged_latest_checkpoint_resume_exactly(straight):
    root, _ = straight
    # A kill right before the final validation's commit: the step-16 checkpoint never existed.
    workdir = root / "lost_commit"
    shutil.copytree(root / "straight", workdir)
    shutil.rmtree(workdir / "checkpoints" / "16")
    (workdir / "results.json").unlink()
    _run(_launch(workdir, root / "datasets"))
    _assert_same_run(root / "straight", workdir)
    # A damaged latest checkpoint (a truncated array file) and an empty newer folder left by an
    # interrupted copy: named, skipped, and the run resumes from step 10.
    workdir = root / "damaged"
    shutil.copytree(root / "straight", workdir)
    for step in (16, 14):
        shutil.rmtree(workdir / "checkpoints" / str(step))
    (workdir / "results.json").unlink()
    data_files = sorted((p for p in (workdir / "checkpoints" / "12" / "state").rglob("*") if p.is_file()),
                        key=lambda p: p.stat().st_size)
    data_files[-1].write_bytes(data_files[-1].read_bytes()[:100])
    (workdir / "checkpoints" / "20").mkdir()
    out = _run(_launch(workdir, root / "datasets"))
    assert str(workdir / "checkpoints" / "12") in out.stderr and str(workdir / "checkpoints" / "20") in out.stderr
    assert "Resuming from epoch 2, round 1/2, batch 2 (step 10), best R@5" in out.stdout
    _assert_same_run(root / "straight", workdir)


def _snapshot(workdir) -> dict:
    """Every file of a run but its eval/ results and log.txt (which every command appends to)."""
    return {str(p.relative_to(workdir)): p.read_bytes() for p in Path(workdir).rglob("*")
            if p.is_file() and "eval" not in p.parts and p.name != "log.txt"}


def _evaluate(workdir, datasets, *overrides):
    """--mode eval of a run with the package defaults (resnet18conv4 + netvlad): architecture keys
    left at their defaults come from the run (gem), so only the data options are given."""
    return [sys.executable, "launch.py", "--config", "vgjax/configs/common.py", "--mode", "eval",
            "--workdir", str(workdir), f"--config.data.datasets_folder={datasets}",
            "--config.data.dataset_name=aerial_smoke", "--config.data.resize=(64, 64)",
            "--config.data.infer_batch_size=8", "--config.eval.recall_values=(1, 5)", *overrides]


@pytest.mark.slow
def test_evaluating_a_run_uses_its_best_checkpoint_and_changes_nothing_of_it(straight):
    root, _ = straight
    workdir = root / "straight"
    before = _snapshot(workdir)
    # The cross-dataset protocol: the run's own test split and a second world, one command.
    synthetic.build_aerial_dataset(root / "datasets" / "aerial_other", seed=1, image_size=(64, 64), progress=False)
    command = _evaluate(workdir, root / "datasets", "--config.eval.datasets=aerial_smoke,aerial_other")
    out = _run(command)
    results = json.loads((workdir / "results.json").read_text())
    best_step = 8 * (results["best_epoch"] + 1)  # 8 steps per epoch, validated at its end
    assert f"Network from the best checkpoint (step {best_step}) of the run in {workdir}" in out.stdout
    evaluation = json.loads((workdir / "eval" / "aerial_smoke_test_hard_resize.json").read_text())
    assert evaluation["recalls"] == results["test"] and evaluation["network"]["aggregation"] == "gem"
    other = json.loads((workdir / "eval" / "aerial_other_test_hard_resize.json").read_text())
    table = json.loads((workdir / "eval" / "table.json").read_text())["tables"]
    assert table == {"hard_resize": {"aerial_smoke": results["test"], "aerial_other": other["recalls"]}}
    row = "| aerial_smoke | " + " | ".join(f"{r:.1f}" for r in results["test"].values()) + " |"
    markdown = (workdir / "eval" / "table.md").read_text()
    assert row in markdown and "| aerial_other | " in markdown and markdown in out.stdout
    assert (workdir / "eval" / "recalls.png").exists()
    assert _snapshot(workdir) == before  # results.json, config.json, metrics, checkpoints
    # An explicitly different network is refused before anything is written.
    refused = subprocess.run(command + ["--config.model.backbone=resnet50conv4"], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "trained with another network: model.backbone='resnet50conv4' (the run's: 'resnet18conv4')" in refused.stderr
    # So is training again in it with another network, before config.json is replaced.
    refused = subprocess.run(_launch(workdir, root / "datasets", "--config.model.aggregation=mac"),
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "holds a run of another network: model.aggregation='mac'" in refused.stderr
    assert _snapshot(workdir) == before


@pytest.mark.slow
def test_the_final_test_honours_the_eval_options_exactly_as_an_evaluation_does(straight):
    root, _ = straight
    options = ["--config.eval.test_method=all", "--config.eval.pca_dim=16", "--config.eval.index=ivf_flat",
               "--config.eval.pca_dataset_folder=aerial_smoke/images/train"]
    # A copy of the finished run, relaunched: training is done, so it tests the best checkpoint
    # again, now with every test method, PCA, an IVF index and the descriptors written.
    workdir = root / "options"
    shutil.copytree(root / "straight", workdir)
    _run(_launch(workdir, root / "datasets", *options, "--config.eval.save_descriptors=True"))
    results = json.loads((workdir / "results.json").read_text())
    tests = results["tests"]
    assert list(tests) == list(evaluate.TEST_METHODS) and results["test_method"] == "hard_resize"
    assert results["test"] == tests["hard_resize"]["recalls"] and results["descriptor_dim"] == 16
    for method, entry in tests.items():
        assert entry["descriptor_dim"] == 16 and entry["index"].startswith("ivf_flat("), method
        assert np.load(workdir / "descriptors" / method / "database_descriptors.npy").shape == (676, 256)
    # The same options in an evaluation of the original run (its second in this module): the
    # same recalls for every test method, and nothing of the run changed.
    before = _snapshot(root / "straight")
    _run(_evaluate(root / "straight", root / "datasets", *options))
    for method, entry in tests.items():
        path = root / "straight" / "eval" / f"aerial_smoke_test_{method}_pca16_ivf_flat.json"
        assert json.loads(path.read_text())["recalls"] == entry["recalls"], method
    assert (root / "straight" / "eval" / "table_pca16_ivf_flat.md").exists()
    assert _snapshot(root / "straight") == before


def _netvlad_run(workdir: Path, config, image_size) -> dict:
    """A vgjax NetVLAD training workdir as the engine leaves one (its config.json, and a best
    checkpoint of the whole TrainState saved by the same checkpoint manager), without the
    training: returns the saved variables."""
    model = geoloc_net.build(config.model, image_size)
    variables = geoloc_net.init_variables(model, image_size, seed=3)
    state, _ = train_state.create_state(config, variables, seed=0)
    workdir.mkdir()
    (workdir / checkpoint.RUN_CONFIG).write_text(config.to_json_best_effort())
    checkpoints = checkpoint.Checkpoints(workdir / checkpoint.CHECKPOINT_FOLDER)
    checkpoints.save(8, {"train": state}, {"epoch": 1}, best=True)
    checkpoints.close()
    return variables


@pytest.mark.slow
def test_crn_starts_from_a_vgjax_netvlad_run(straight):
    root, _ = straight
    netvlad = root / "netvlad"
    # 160x160: conv4 maps of 10x10, the 100 local features per image NetVLAD's k-means init takes.
    options = ["--config.model.netvlad_clusters=4", "--config.train.epochs_num=1", "--config.data.resize=(160, 160)"]
    config = smoke_train.get_config()
    config.model.update(aggregation="netvlad", netvlad_clusters=4)
    config.data.resize = (160, 160)
    trained = _netvlad_run(netvlad, config, (160, 160))
    config.model.update(aggregation="crn", resume=str(netvlad))
    model_config, _, variables = runs.network_from_run(config.model, netvlad, (160, 160), keep_defaults=False)
    assert model_config.aggregation == "crn" and set(variables["params"]["aggregation"]) == {
        "assignment_kernel", "centroids", "crn"}
    for part in ("backbone", "aggregation"):  # the run's backbone and NetVLAD layer, exactly
        jax.tree.map(np.testing.assert_array_equal, trained["params"][part],
                     {k: v for k, v in variables["params"][part].items() if k != "crn"})
    out = _run(_launch(root / "crn", root / "datasets", "--config.model.aggregation=crn",
                       f"--config.model.resume={netvlad}", *options))
    assert f"Network from the best checkpoint (step 8) of the run in {netvlad}: resnet18conv4 + netvlad" in out.stdout
    assert "context module starts from scratch" in out.stdout
    assert json.loads((root / "crn" / "results.json").read_text())["steps"] == 8


@pytest.mark.slow
def test_exporting_a_run_for_torch_and_for_vgjax(straight):
    root, _ = straight
    workdir = root / "straight"
    before = _snapshot(workdir)
    _run([sys.executable, "launch.py", "--config", "vgjax/configs/common.py", "--mode", "export",
          "--workdir", str(workdir), "--config.data.resize=(64, 64)"])
    assert {k: v for k, v in _snapshot(workdir).items() if not k.startswith("export/")} == before
    _, saved, _ = checkpoint.read_run(workdir)
    exported = workdir / "export" / "resnet18conv4_gem_best"
    network, variables, size, embed_fn = models.load(f"{exported}.vgjax.safetensors")
    assert size == (64, 64)
    jax.tree.map(np.testing.assert_array_equal, variables, saved)
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    descriptors = embed_fn(images)
    np.testing.assert_array_equal(descriptors, embed.make_embed_fn(network, saved)(images))
    torch_net = torch_network(smoke_train.get_config().model)
    torch_net.load_state_dict(safetensors.torch.load_file(f"{exported}.safetensors"), strict=True)
    with torch.no_grad():
        expected = torch_net(torch.from_numpy(np.array(augment.normalize_uint8(images))).permute(0, 3, 1, 2))
    np.testing.assert_allclose(descriptors, expected.numpy(), atol=1e-4, rtol=0)
    # The workdir itself by path: its best network at its training size.
    from_run = models.load(workdir)
    assert from_run.image_size == tuple(json.loads((workdir / "config.json").read_text())["data"]["resize"])
    jax.tree.map(np.testing.assert_array_equal, from_run.variables, saved)


def test_non_finite_parameters_are_caught_before_any_save(tmp_path):
    # lr 1e39 overflows float32: the parameters become inf/nan while the first losses are still
    # finite. The loss is read only every 3 steps, but the check before the step-2 save stops it.
    out = subprocess.run(_launch(tmp_path / "run", tmp_path / "datasets", "--config.train.lr=1e39"),
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode != 0
    assert "non-finite loss" in out.stderr and "parameters at step 1" in out.stderr
    assert "the last good checkpoint" in out.stderr
    assert _steps(tmp_path / "run") == []


def test_unknown_best_metric_is_an_error_before_any_work(tmp_path):
    out = subprocess.run(_launch(tmp_path / "run", tmp_path / "datasets", "--config.train.best_metric=R@3"),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "train.best_metric='R@3' is not one of the validation metrics R@1, R@5" in out.stderr
    assert not (tmp_path / "datasets").exists()


def test_step_metrics_name_the_first_non_finite_step():
    class FakeRun:
        workdir = Path("/w")

    metrics = loop.StepMetrics(FakeRun(), "epoch 1/2 round 1/2")
    for loss, finite in ((0.5, True), (0.25, True), (0.1, False)):
        metrics.add({"loss": jnp.float32(loss), "finite": jnp.bool_(finite)})
    with pytest.raises(FloatingPointError, match=r"at step 8 \(epoch 1/2 round 1/2\).*/w/checkpoints is kept"):
        metrics.read(loop.Progress(step=8))
    metrics = loop.StepMetrics(FakeRun(), "")
    metrics.add({"loss": jnp.float32(0.5), "finite": jnp.bool_(True), "b_acc": jnp.float32(0.25)})
    progress = loop.Progress(step=1)
    assert metrics.read(progress) == [{"loss": 0.5, "b_acc": 0.25}]  # a method's own metrics come along
    assert (progress.epoch_loss_sum, progress.epoch_loss_count) == (0.5, 1)


def test_smoke_config_is_valid():
    config = smoke_train.get_config()
    assert config.mining.cache_refresh_rate % config.train.train_batch_size == 0

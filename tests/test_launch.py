"""launch.py and vgjax.experiment: configs, overrides, the eval main job, outputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import aerial_tiny_image
from vgjax.configs import common
from torch_helpers import import_torchvision
from vgjax import evaluate, experiment, index
from vgjax.models import geoloc_net

REPO = Path(__file__).resolve().parents[1]


def _launch(*args, env=None):
    return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_aerial_baseline_eval_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    out = _launch("--config", "configs/aerial_tiny_image.py", "--workdir", str(workdir),
                  f"--config.data.datasets_folder={tmp_path / 'datasets'}",
                  "--config.eval.save_descriptors=True", "--config.eval.num_preds_to_save=3",
                  "--config.eval.queries_to_save=2")
    assert out.returncode == 0, out.stderr[-3000:]
    pictures = workdir / "predictions" / "maj_voting"
    assert sorted(p.name for p in (pictures / "preds").iterdir()) == ["000.jpg", "000.txt", "099.jpg", "099.txt"]  # spread: first and last
    assert (pictures / "map.png").exists() and not (pictures / "recalls.png").exists()
    assert (workdir / "predictions" / "recalls.png").exists()  # one plot of every test method
    results = json.loads((workdir / "results.json").read_text())
    assert list(results["results"]) == list(evaluate.TEST_METHODS)
    for method, entry in results["results"].items():
        recalls = list(entry["recalls"].values())
        assert recalls == sorted(recalls) and 0 < recalls[0] <= 100, method
        assert entry["descriptor_dim"] == 12 * 16 * 3
    # The baseline finds most places despite the changed heading and lighting, far above chance
    # (a random top-1 has about 19 / 676 = 3% chance of being within 25 m).
    assert results["results"]["hard_resize"]["recalls"]["R@1"] > 30
    assert "maj_voting" in out.stdout and "R@20" in out.stdout
    config = json.loads((workdir / "config.json").read_text())
    assert config["eval"]["save_descriptors"] is True and config["data"]["resize"] == [96, 128]
    assert (workdir / "descriptors" / "nearest_crop" / "queries_descriptors.npy").exists()
    assert not list((tmp_path / "datasets").glob("*.partial"))


def test_typos_and_unknown_modes_are_rejected(tmp_path):
    out = _launch("--config", "configs/aerial_tiny_image.py", "--workdir", str(tmp_path), "--config.eval.test_metod=x")
    assert out.returncode != 0 and "test_method" in out.stderr  # "Did you mean"
    out = _launch("--config", "configs/aerial_tiny_image.py", "--workdir", str(tmp_path), "--mode", "fly")
    assert out.returncode != 0 and "--mode" in out.stderr


def test_missing_datasets_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DATASETS_FOLDER", raising=False)
    with pytest.raises(ValueError, match="no datasets folder: set --config.data.datasets_folder"):
        experiment.run(common.get_config(), tmp_path)
    monkeypatch.setenv("DATASETS_FOLDER", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match="dataset folder .*pitts30k does not exist"):
        experiment.run(common.get_config(), tmp_path)


def test_unknown_synthetic_kind_is_named(tmp_path):
    config = aerial_tiny_image.get_config()
    config.data.datasets_folder = str(tmp_path)
    config.data.synthetic = "forest"
    with pytest.raises(ValueError, match="data.synthetic='forest': choose one of aerial, cosplace, doom"):
        experiment.run(config, tmp_path)


def test_offline_imagenet_weights_fail_loudly_instead_of_random_init(tmp_path, monkeypatch):
    monkeypatch.setenv("VGJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VGJAX_OFFLINE", "1")
    config = common.get_config()
    config.model.aggregation = "gem"
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth is not cached and downloads are off"):
        experiment.build_embed_fn(config)


def test_pca_needs_its_folder(tmp_path):
    config = aerial_tiny_image.get_config()
    config.data.datasets_folder = str(tmp_path)
    config.eval.pca_dim = 8
    with pytest.raises(ValueError, match="pca_dim needs config.eval.pca_dataset_folder"):
        experiment.run(config, tmp_path / "run")
    config.eval.pca_dataset_folder = "aerial_demo/images/test/database"
    config.eval.test_method = "hard_resize"
    results = experiment.run(config, tmp_path / "run")
    assert results["results"]["hard_resize"]["descriptor_dim"] == 8


@pytest.mark.parametrize("text, expected", [
    ("", {}),
    ("nlist=1024, nprobe=16", {"nlist": 1024, "nprobe": 16}),
    ("ef_search=64,scale=0.5", {"ef_search": 64, "scale": 0.5}),
])
def test_parse_index_params(text, expected):
    assert index.parse_params(text) == expected


def test_parse_index_params_rejects_malformed_items():
    with pytest.raises(ValueError, match="expected name=value items, got 'nlist'"):
        index.parse_params("nlist")
    with pytest.raises(ValueError, match="nlist='abc' is not a number"):
        index.parse_params("nlist=abc")


def test_common_config_keeps_the_benchmark_defaults():
    config = common.get_config()
    assert tuple(config.data.resize) == (480, 640) and config.data.infer_batch_size == 16
    assert (config.train.train_batch_size, config.train.lr, config.train.margin) == (4, 1e-5, 0.1)
    assert (config.mining.mining, config.mining.cache_refresh_rate) == ("partial", 1000)
    assert config.mining.queries_per_epoch % config.mining.cache_refresh_rate == 0
    assert tuple(config.eval.recall_values) == (1, 5, 10, 20)
    assert config.data.val_positive_dist_threshold == 25 and config.data.train_positives_dist_threshold == 10


def test_profile_mode_prints_the_table_columns(tmp_path):
    out = _launch("--config", "vgjax/configs/common.py", "--workdir", str(tmp_path), "--mode", "profile",
                  "--config.model.aggregation=gem", "--config.model.pretrain=none",
                  "--config.data.resize=(64, 80)", "--config.data.infer_batch_size=2")
    assert out.returncode == 0, out.stderr[-3000:]
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert profile["descriptor_dim"] == 256 and profile["image_size"] == [64, 80]
    # ResNet-18 up to layer3 (2,782,784, of which layer3 has 2,099,712 trained) plus GeM's p.
    assert profile["params_total"] == 2_782_785 and profile["params_trainable"] == 2_099_713
    assert profile["gflops_per_image"] > 0.1 and profile["images_per_second"] > 0
    assert "GFLOPs" in out.stdout and "resnet18conv4" in out.stdout


def test_eval_mode_with_a_network_from_a_benchmark_checkpoint(tmp_path):
    config = common.get_config()
    config.model.aggregation, config.model.netvlad_clusters = "netvlad", 4
    config.data.resize = (96, 128)
    model = geoloc_net.build(config.model, (96, 128))
    variables = geoloc_net.init_variables(model, (96, 128), seed=3)
    # Write the random network in the benchmark's layout (torchvision names -> backbone.<i>).
    children = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6"}
    state = {}
    tv = import_torchvision().models.resnet18()
    for key, value in tv.state_dict().items():
        head, _, rest = key.partition(".")
        if head in children:
            state[f"backbone.{children[head]}.{rest}"] = value.numpy()
    state["aggregation.centroids"] = np.asarray(variables["params"]["aggregation"]["centroids"])
    state["aggregation.conv.weight"] = np.asarray(variables["params"]["aggregation"]["assignment_kernel"]).T[:, :, None, None]
    np.savez(tmp_path / "net.npz", **state)
    out = _launch("--config", "configs/aerial_tiny_image.py", "--workdir", str(tmp_path / "run"),
                  f"--config.data.datasets_folder={tmp_path / 'datasets'}",
                  "--config.model.backbone=resnet18conv4", "--config.model.aggregation=netvlad",
                  "--config.model.netvlad_clusters=4", f"--config.model.resume={tmp_path / 'net.npz'}",
                  "--config.eval.test_method=hard_resize")
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["results"]["hard_resize"]["descriptor_dim"] == 1024
    assert results["backbone"] == "resnet18conv4"


def test_packaged_configs_by_name():
    from vgjax import launch

    common_py = str(launch.PACKAGED_CONFIGS / "common.py")
    assert launch.packaged_config_paths(["vgjax", "--config", "cosplace", "--workdir", "w"]) == [
        "vgjax", "--config", str(launch.PACKAGED_CONFIGS / "cosplace.py"), "--workdir", "w"]
    assert launch.packaged_config_paths(["vgjax", "--config=common"]) == ["vgjax", f"--config={common_py}"]
    assert launch.packaged_config_paths(["vgjax", "--config=configs/demo.py", "--mode", "common"]) == [
        "vgjax", "--config=configs/demo.py", "--mode", "common"]

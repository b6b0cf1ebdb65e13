"""The main job (configs/demo.py, vgjax.demo) in a reduced configuration, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import demo as demo_config
from torch_helpers import import_torchvision
from vgjax import demo
from vgjax.models import places365

REPO = Path(__file__).resolve().parents[1]
REDUCED = ["--config.data.synthetic_frames=60", "--config.data.resize=(48, 64)",
           "--config.data.infer_batch_size=16", "--config.train.epochs_num=1",
           "--config.mining.queries_per_epoch=16", "--config.mining.cache_refresh_rate=16",
           "--config.mining.neg_samples_num=60", "--config.mining.negs_num_per_query=5", "--config.eval.queries_to_save=3"]


def _fill_places365_cache(cache: Path) -> None:
    """A ResNet-18 with a 365-way classifier, where resnet18_file() caches the converted weights."""
    network = import_torchvision().models.resnet18(num_classes=365)
    path = cache / "weights" / places365.CACHE_NAME
    path.parent.mkdir(parents=True)
    np.savez(path, **{k: v.numpy() for k, v in network.state_dict().items()})


@pytest.mark.slow
def test_main_job_reduced_end_to_end(tmp_path):
    _fill_places365_cache(tmp_path / "cache")
    env = {**os.environ, "VGJAX_CACHE": str(tmp_path / "cache"), "VGJAX_OFFLINE": "1"}
    workdir = tmp_path / "run"
    out = subprocess.run([sys.executable, "launch.py", "--config", "configs/demo.py",
                          "--workdir", str(workdir), f"--config.data.datasets_folder={tmp_path / 'data'}",
                          *REDUCED], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((workdir / "results.json").read_text())
    assert list(results["stages"]) == ["random_init", "places365", "trained"]
    assert results["places365_unavailable"] is None and results["num_queries"] == 60
    for name, stage in results["stages"].items():
        recalls = list(stage["test"].values())
        assert list(stage["test"]) == ["R@1", "R@5", "R@10", "R@20"], name
        assert recalls == sorted(recalls) and 0 <= recalls[0] <= 100, name
    assert results["stages"]["trained"]["pretrain"] == "places365"
    assert results["stages"]["trained"]["epochs"] == 1
    for stage in ("random_init", "places365", "trained"):
        pictures = workdir / stage / "predictions" / "hard_resize"
        assert sorted(p.name for p in (pictures / "preds").glob("*.jpg")) == ["000.jpg", "030.jpg", "059.jpg"]
        assert (pictures / "map.png").exists() and (pictures / "recalls.png").exists()
    assert (workdir / "recalls.png").exists()
    assert "(c) trained" in out.stdout and "Training " in out.stdout and "Total time" in out.stdout
    world = tmp_path / "data" / "doom_demo"
    assert json.loads((world / "demo_world.json").read_text())["frames_per_walk"] == 60


def test_without_places365_weights_the_demo_says_so_and_uses_random_init(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VGJAX_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("VGJAX_OFFLINE", "1")
    pretrain, why = demo._backbone_weights(demo_config.get_config())
    assert pretrain == "none" and "downloads are off" in why
    assert "PLACES365 WEIGHTS UNAVAILABLE" in capsys.readouterr().out


def test_report_of_a_run_without_places365():
    recalls = {"R@1": 10.0, "R@5": 20.0, "R@10": 30.0, "R@20": 40.0}
    summary = {"split": "test", "num_database": 5, "num_queries": 4, "minutes": 1.0,
               "places365_unavailable": "offline",
               "stages": {"random_init": {"test": recalls}, "places365": {"skipped": "offline"},
                          "trained": {"test": recalls, "epochs": 1}}}
    text = demo.report(summary, Path("w"))
    assert "skipped: Places365 weights unavailable" in text and "RANDOM weights: offline" in text
    assert "(a) random init                10.0   20.0   30.0   40.0" in text


def test_the_demo_needs_places365_as_its_pretrain():
    config = demo_config.get_config()
    config.model.pretrain = "imagenet"
    with pytest.raises(ValueError, match="model.pretrain='imagenet'"):
        demo._backbone_weights(config)

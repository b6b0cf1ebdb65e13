"""vgjax.configs.validate: every config problem is found before any work, one line naming the
key, the bad value and the allowed ones; launch.py prints them with exit status 2; print_config."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import smoke_cosplace, smoke_train
from vgjax import experiment
from vgjax.configs import validate

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path, **overrides):
    """The smoke training config, its synthetic dataset to be rendered under tmp_path/datasets
    (only if something got that far), with `overrides` ("section.key": value)."""
    config = smoke_train.get_config()
    config.data.datasets_folder = str(tmp_path / "datasets")
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def _refused(config, tmp_path, mode="train", workdir=None) -> str:
    """The ConfigError of experiment.run, after checking that nothing was read or written."""
    workdir = tmp_path / "run" if workdir is None else workdir
    with pytest.raises(validate.ConfigError) as error:
        experiment.run(config, workdir, mode)
    assert not (tmp_path / "datasets").exists() and not (tmp_path / "run").exists()
    return str(error.value)


@pytest.mark.parametrize("overrides, message", [
    # Ranges (the list, and the others the training engine reads).
    ({"train.lr": -1.0}, "train.lr=-1.0: must be a number >= 0"),
    ({"train.epochs_num": 0}, "train.epochs_num=0: must be an integer >= 1"),
    ({"train.patience": -1}, "train.patience=-1: must be an integer >= 0"),
    ({"mining.queries_per_epoch": 0}, "mining.queries_per_epoch=0: must be an integer >= 1"),
    ({"train.train_batch_size": 0}, "train.train_batch_size=0: must be an integer >= 1"),
    ({"train.keep_checkpoints": 0}, "train.keep_checkpoints=0: must be an integer >= 1"),
    ({"mining.cache_refresh_rate": 1}, "mining.cache_refresh_rate=1: smaller than train.train_batch_size=2"),
    ({"data.resize": (0, 64)}, "data.resize=(0, 64): must be two positive integers (height, width)"),
    ({"data.resize": (64,)}, "data.resize=(64,): must be two positive integers"),
    ({"data.resize": (64.5, 64)}, "data.resize=(64.5, 64): must be two positive integers"),
    ({"eval.recall_values": (5, 1)}, "eval.recall_values=(5, 1): must be positive integers in increasing order"),
    ({"eval.pca_dim": 0}, "eval.pca_dim=0: must be an integer >= 1"),
    ({"train.brightness": -1.0}, "train.brightness must be in [0, inf], got -1.0"),
    # Enumerated values: the allowed ones come from the modules that use them.
    ({"model.backbone": "resnet19"}, "model.backbone='resnet19': choose one of alexnet, vgg16, resnet18conv4"),
    ({"model.aggregation": "vlad"}, "unknown model.aggregation 'vlad'; choose one of"),
    ({"model.backbone": "vit"}, "data.resize=(64, 64): backbone vit needs resize (224, 224) or (384, 384)"),
    ({"model.l2": "l3"}, "unknown model.l2 'l3'"),
    ({"model.dtype": "float16"}, "unknown model.dtype 'float16'; choose one of ('float32', 'bfloat16')"),
    ({"mining.mining": "hardest"}, "mining.mining='hardest': choose one of partial, full, random, msls_weighted"),
    ({"train.criterion": "contrastive"}, "train.criterion='contrastive': choose one of triplet"),
    ({"train.optim": "rmsprop"}, "train.optim='rmsprop': choose one of adam, sgd, adamw"),
    ({"eval.test_method": "maj_votin"}, "eval.test_method='maj_votin': choose from hard_resize, single_query"),
    ({"eval.test_method": ""}, "eval.test_method='': choose from hard_resize"),
    ({"eval.index": "lsh"}, "eval.index='lsh': choose one of flat, flat_ip, ivf_flat"),
    ({"data.packed_encoding": "png"}, "data.packed_encoding='png': choose one of jpeg, raw"),
    ({"eval.index": "ivf_flat", "eval.index_params": "nlist=abc"},
     "eval.index_params='nlist=abc': nlist='abc' is not a number"),
    ({"eval.index_params": "nlist=16"},
     "eval.index_params='nlist=16': unknown parameter(s) nlist for index kind 'flat'"),
    ({"train.best_metric": "R@10"}, "train.best_metric='R@10' is not one of the validation metrics R@1, R@5"),
    ({"model.resume_checkpoint": "first"}, "model.resume_checkpoint='first': choose one of best, last"),
    ({"model.resume_format": "onnx"}, "model.resume_format='onnx': choose one of benchmark, cosplace"),
    ({"model.pretrain": "imagenet21k"},
     "model.pretrain='imagenet21k' is neither 'imagenet', 'places365', 'dinov2', 'none', 'random'"),
    ({"model.pretrain": "places365", "model.backbone": "resnet50conv4"}, "model.pretrain=places365 is a ResNet-18"),
    ({"model.resume": "/no/such/net.pth"}, "model.resume='/no/such/net.pth': no such file or folder"),
    ({"data.synthetic": "forest"}, "data.synthetic='forest': choose one of aerial, cosplace, doom"),
    # NetVLAD's k-means initialisation samples 100 features per image: 4x4 conv4 cells at 64x64.
    ({"model.aggregation": "netvlad"},
     "data.resize=(64, 64): too small for NetVLAD's k-means initialisation after resnet18conv4: "
     "cannot sample 100 descriptors per image from 16 positions"),
])
def test_each_config_error_names_its_key_before_any_work(tmp_path, overrides, message):
    assert message in _refused(_config(tmp_path, **overrides), tmp_path)


def test_every_problem_is_listed_one_per_line(tmp_path):
    config = _config(tmp_path, **{"train.lr": -1.0, "train.epochs_num": 0, "eval.test_method": "x"})
    lines = _refused(config, tmp_path).splitlines()
    assert [line.split("=")[0] for line in lines] == ["eval.test_method", "train.epochs_num", "train.lr"]


def test_an_empty_workdir_is_refused(tmp_path):
    assert "--workdir='': name a folder" in _refused(_config(tmp_path), tmp_path, workdir="")


def test_eval_refuses_silent_random_weights(tmp_path):
    config = _config(tmp_path)  # model.pretrain=none, no model.resume, no run in the workdir
    message = _refused(config, tmp_path, mode="eval")
    assert message.startswith("model.pretrain='none': --mode eval") and "model.pretrain=random" in message
    config.model.pretrain = "random"  # on purpose: accepted
    validate.check(config, "eval", tmp_path / "run")
    validate.check(_config(tmp_path), "train", tmp_path / "run")  # training from random init is fine


def test_mode_specific_options(tmp_path):
    assert "data.packed_folder='': --mode pack needs" in _refused(_config(tmp_path), tmp_path, mode="pack")
    config = smoke_cosplace.get_config()
    config.data.datasets_folder = str(tmp_path / "datasets")
    config.cosplace.val_folder = ""
    config.train.horizontal_flip = True
    lines = _refused(config, tmp_path, mode="train_cosplace").splitlines()
    assert lines[0].startswith("train.horizontal_flip=True: CosPlace training does not use")
    assert lines[1] == "cosplace.val_folder='': CosPlace training needs it"
    config = _config(tmp_path, **{"gsv.min_images_per_place": 3, "train.lr_milestones": (5, 2)})
    lines = _refused(config, tmp_path, mode="train_gsv").splitlines()
    assert lines == ["train.lr_milestones=(5, 2): increasing epochs >= 1",
                     "data.gsv_cities_folder='': GSV-Cities training needs the dataset's folder (holding Dataframes/ and Images/)"]
    config.data.gsv_cities_folder, config.train.lr_milestones = "gsv", (2, 5)
    assert _refused(config, tmp_path, mode="train_gsv").startswith("gsv.min_images_per_place=3: below gsv.images_per_place=4")
    assert "triplet training's epochs have no fixed number of steps" in _refused(config, tmp_path, mode="train")
    # Training-only options are not checked where they are not read.
    validate.check(_config(tmp_path, **{"train.lr": -1.0, "model.pretrain": "random"}), "eval", tmp_path)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs").glob("[!_]*.py")))
def test_the_shipped_configs_pass(tmp_path, name):
    config = importlib.import_module(f"configs.{name}").get_config()
    if config.mode == "train_cosplace":
        config.cosplace.update(train_folder="train", val_folder="val", test_folder="test")
    if config.mode == "train_gsv" and not config.data.gsv_cities_folder:  # given on the command line
        config.data.gsv_cities_folder = "/data/gsv_cities"
    validate.check(config, config.mode, tmp_path)


def test_accepted_values(tmp_path):
    config = _config(tmp_path, **{"train.patience": 0, "eval.test_method": "hard_resize, maj_voting",
                                  "eval.index": "ivf_pq", "eval.index_params": "nlist=16,nprobe=4"})
    validate.check(config, "train", tmp_path)  # patience 0: never stop early
    config.eval.test_method = "all"
    validate.check(config, "train", tmp_path)


def test_ignored_options_are_the_ones_the_mode_does_not_read():
    keys = ["train.lr", "train.distributed", "mining.mining", "data.resize", "model.frozen_bn", "eval.index"]
    assert validate.ignored_options("eval", keys) == ["train.lr", "mining.mining", "model.frozen_bn"]
    assert validate.ignored_options("train", keys) == []
    assert validate.ignored_options("profile", keys) == ["train.lr", "mining.mining", "eval.index"]


def test_print_config_writes_nothing(tmp_path, capsys):
    config = _config(tmp_path, **{"train.lr": 0.5})
    result = experiment.run(config, tmp_path / "run", "print_config")
    assert "train.lr=0.5" in result["differences"]
    out = capsys.readouterr().out
    assert json.loads(out[:out.index("\nDifferences")])["train"]["lr"] == 0.5
    assert "  train.lr=0.5\n" in out
    assert not list(tmp_path.iterdir())


def _launch(*args, cwd=REPO) -> subprocess.CompletedProcess:
    """launch.py with the smoke training config and `args`, run in `cwd`."""
    command = [sys.executable, str(REPO / "launch.py"), "--config", str(REPO / "configs" / "smoke_train.py"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("args, lines", [
    (["--config.eval.test_metod=x"],  # a typo'd key: one line with the suggestion
     ["no config field 'test_metod': Did you mean \"test_method\" instead of \"test_metod\"?"]),
    (["--config.eval.test_method=maj_votin"], ["eval.test_method='maj_votin': choose from hard_resize"]),
    (["--config.train.lr=-1", "--config.model.backbone=resnet19"],
     ["model.backbone='resnet19': choose one of", "train.lr=-1.0: must be a number >= 0"]),
])
def test_launch_prints_each_problem_as_one_line_and_exits_2(tmp_path, args, lines):
    out = _launch("--workdir", str(tmp_path / "run"),
                  f"--config.data.datasets_folder={tmp_path / 'datasets'}", *args)
    assert out.returncode == 2 and out.stdout == ""
    printed = out.stderr.splitlines()
    assert len(printed) == len(lines) and "Traceback" not in out.stderr
    for line, expected in zip(printed, lines):
        assert line.startswith(f"{REPO / 'launch.py'}: error: {expected}"), line
    assert not list(tmp_path.iterdir())  # no log.txt, no config.json, no dataset


def test_launch_refuses_an_empty_workdir_and_prints_the_config(tmp_path):
    out = _launch("--workdir", "", cwd=tmp_path)
    assert out.returncode == 2 and "error: --workdir='': name a folder" in out.stderr
    assert not list(tmp_path.iterdir())
    out = _launch("--mode", "print_config", "--config.train.lr=0.5",
                  "--config.mining.mining=full", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # print_config reads every option
    assert json.loads(out.stdout[:out.stdout.index("\nDifferences")])["train"]["lr"] == 0.5
    assert not list(tmp_path.iterdir())  # no --workdir needed, nothing written


def test_launch_warns_once_of_options_the_mode_ignores(tmp_path):
    out = _launch("--mode", "profile", "--workdir", str(tmp_path),
                  "--config.train.lr=0.5", "--config.mining.mining=full", "--config.data.resize=(32, 32)",
                  "--config.data.infer_batch_size=1")
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in out.stderr.splitlines() if "warning:" in line]
    assert warnings == [f"{REPO / 'launch.py'}: warning: --mode profile does not use --config.train.lr, "
                        "--config.mining.mining"]

"""Checks a config before any work: `check` raises a ConfigError listing every problem, one line
each (the key, the bad value, what is allowed), before a dataset is read, a network built or a
file written. `vgjax.experiment.run` calls it first; launch.py calls it before opening its log and
prints each problem as one line (exit status 2).

The allowed values come from the modules that use them (the backbone registry, evaluate's test
methods, the index kinds, the mining methods, losses, optimizers, pretrained weights, ...), and
the rules with a runtime use stay there too (`loop.best_metric_n`, `AugmentConfig`, NetVLAD's
`check_positions`, `index.check_params`): this module lists no value of its own.

A rule applies only where the mode reads the option: training options are checked in the
training modes (train, train_cosplace, train_gsv, demo), eval options wherever a split is evaluated.
`--mode eval` and `--mode export` with neither model.resume nor a training run in the workdir
refuse model.pretrain=none (random weights are never evaluated or exported silently);
model.pretrain=random asks for them on purpose.

`ignored_options` names the command-line overrides the mode does not read. launch.py prints them
as one warning line, not an error: one set of options shared by a training and an evaluation
command is a legitimate use.
"""

from __future__ import annotations

import functools
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from vgjax import baselines
from vgjax import eval_run, evaluate, sharding, sweep
from vgjax import index as index_lib
from vgjax.data import augment, synthetic, tfds_builders, vg_folder
from vgjax.models import geoloc_net, netvlad_init, pretrained, registry
from vgjax.train import checkpoint, cosplace, loop, losses, mining, state

TRAINING_MODES = ("train", "train_cosplace", "train_gsv", "demo")
PERCENT_RESIZE_MODES = ("train", "train_gsv", "eval", "pack")  # the modes that read data.dataset_name
TRIPLET_MODES = ("train", "demo")
EVALUATING_MODES = ("eval",) + TRAINING_MODES  # the modes that test on a split

# The options each mode does not read (a section ends with "."); the multi-process settings are
# read by all.
_GSV_ONLY = ("gsv.", "data.gsv_cities_folder", "data.gsv_cities")
_TRAINING_ONLY = ("train.", "mining.", "cosplace.", *_GSV_ONLY, "data.packed_folder", "data.packed_encoding",
                  "data.train_positives_dist_threshold", "model.freeze_te", "model.frozen_bn")
_IGNORED = {
    "eval": _TRAINING_ONLY,
    "profile": ("train.", "mining.", "cosplace.", *_GSV_ONLY, "eval."),
    "export": ("train.", "mining.", "cosplace.", *_GSV_ONLY, "eval."),
    "pack": ("model.", "train.", "mining.", "cosplace.", "gsv.", "eval."),
    "train": ("cosplace.", *_GSV_ONLY, "eval.datasets"),
    "train_cosplace": ("mining.", *_GSV_ONLY, "train.criterion", "train.margin", "eval.datasets",
                       "data.packed_folder", "data.packed_encoding"),
    "train_gsv": ("mining.", "cosplace.", "train.criterion", "train.margin", "eval.datasets",
                  "data.train_positives_dist_threshold"),
    "demo": ("cosplace.", *_GSV_ONLY, "eval.datasets"),
}
_READ_BY_EVERY_MODE = ("train.distributed", "train.coordinator_address", "train.num_processes",
                       "train.process_id", "train.heartbeat_timeout_seconds")


class ConfigError(ValueError):
    """Problems of a config, one line each; `problems` holds the lines."""

    def __init__(self, problems: Sequence[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def check(config: ml_collections.ConfigDict, mode: str, workdir: str | os.PathLike | None) -> None:
    """Raises ConfigError listing every problem of `config` for `mode` (a vgjax.experiment mode)
    in `workdir`; reads no dataset and writes nothing."""
    if mode == "sweep":  # each run's config is checked for sweep.mode (vgjax.sweep.check)
        problems = [*_check_workdir(workdir, mode), *_check_sweep(config)]
        if problems:
            raise ConfigError(problems)
        return
    problems = [*_check_workdir(workdir, mode), *_check_data(config, mode), *_check_model(config),
                *_check_distributed(config)]
    if mode in EVALUATING_MODES:
        problems += _check_eval(config)
    if mode in TRAINING_MODES:
        problems += _check_training(config)
    if mode in TRIPLET_MODES:
        problems += _check_mining(config)
    if mode == "train_cosplace":
        problems += _check_cosplace(config)
    if mode == "train_gsv":
        problems += _check_gsv(config)
    if mode in (*EVALUATING_MODES, "export") and not problems:
        problems += _check_weights(config, mode, workdir)
    if mode in TRAINING_MODES and not problems:
        problems += _check_netvlad_init_size(config)
    if problems:
        raise ConfigError(problems)


def ignored_options(mode: str, keys: Iterable[str]) -> list[str]:
    """The keys (e.g. "train.lr") among `keys` that `mode` does not read."""
    ignored = _IGNORED.get(mode, ()) + (("sweep.",) if mode != "sweep" else ())
    return [key for key in keys if key not in _READ_BY_EVERY_MODE
            and any(key == name or (name.endswith(".") and key.startswith(name)) for name in ignored)]


# ---------------------------------------------------------------------------------------------
# Generic rules: each returns a list of problem lines (empty when the value is fine).


def _value(config: ml_collections.ConfigDict, key: str):
    return functools.reduce(lambda section, name: section[name], key.split("."), config)


def _one_of(config, key: str, allowed: Iterable) -> list[str]:
    value = _value(config, key)
    if value in allowed:
        return []
    return [f"{key}={value!r}: choose one of {', '.join(map(str, allowed))}"]


def _number(value, low: float, *, integer: bool) -> bool:
    kinds = numbers.Integral if integer else numbers.Real
    return isinstance(value, kinds) and not isinstance(value, bool) and value >= low


def _at_least(config, keys: Iterable[str], low: float, *, integer: bool = True,
              optional: bool = False) -> list[str]:
    """`keys` hold numbers >= low (integers unless told; None allowed with `optional`)."""
    kind = "an integer" if integer else "a number"
    return [f"{key}={value!r}: must be {kind} >= {low}" + (" (or None)" if optional else "")
            for key in keys
            for value in [_value(config, key)]
            if not (optional and value is None) and not _number(value, low, integer=integer)]


def _check_workdir(workdir, mode: str) -> list[str]:
    if mode == "print_config" or (workdir is not None and str(workdir).strip()):
        return []
    if workdir is None:
        return ["--workdir: required (the folder for config.json, results and checkpoints)"]
    return [f"--workdir={str(workdir)!r}: name a folder (an empty name would write into the current folder)"]


# ---------------------------------------------------------------------------------------------
# Sections.


def _check_data(config, mode: str) -> list[str]:
    problems = [*_image_size(config.data.resize, mode, config.data.synthetic),
                *_at_least(config, ("data.infer_batch_size", "data.synthetic_frames"), 1),
                *_at_least(config, ("data.val_positive_dist_threshold",), 0, integer=False),
                *_synthetic(config.data.synthetic)]
    problems += _one_of(config, "data.packed_encoding", tfds_builders.ENCODINGS)
    if mode == "pack" and not config.data.packed_folder:
        problems.append("data.packed_folder='': --mode pack needs the folder to pack into")
    return problems


def _synthetic(kind: str) -> list[str]:
    if not kind or kind in synthetic.KINDS:
        return []
    return [f"data.synthetic={kind!r}: choose one of {', '.join(synthetic.KINDS)} (or '' for a dataset on disk)"]


def _image_size(resize, mode: str | None = None, synthetic_kind: str = "") -> list[str]:
    """A (height, width); for data.resize (with its `mode`) also a percentage of the dataset's
    image size, where the mode reads data.dataset_name (vgjax.experiment.resolve_resize)."""
    try:
        percent = vg_folder.resize_percentage(resize) if mode is not None else None
    except ValueError as error:
        return [f"data.resize={resize!r}: {error}"]
    if percent is not None and mode in (*PERCENT_RESIZE_MODES, "print_config") and synthetic_kind != "doom":
        return []
    if percent is not None:
        return [f"data.resize={resize!r}: a percentage of the dataset's image size works in modes "
                f"{', '.join(PERCENT_RESIZE_MODES)} on a dataset on disk or a synthetic one but doom; give (height, width)"]
    if (isinstance(resize, Sequence) and not isinstance(resize, str) and len(resize) == 2
            and all(_number(side, 1, integer=True) for side in resize)):
        return []
    return [f"data.resize={resize!r}: must be two positive integers (height, width), e.g. (480, 640), "
            "or a percentage of the dataset's image size, e.g. 80%"]


def _percent_resize(config) -> bool:
    """data.resize is a percentage: the size-dependent rules wait for its resolution."""
    try:
        return vg_folder.resize_percentage(config.data.resize) is not None
    except ValueError:
        return True


def _eval_resize(config) -> list[str]:
    """eval.resize: empty, or a size the network takes whose parameters do not depend on it."""
    resize = tuple(config.eval.resize)
    if not resize or resize == tuple(config.data.resize):
        return []
    if _image_size(resize):
        return [f"eval.resize={resize!r}: must be empty (data.resize) or two positive integers (height, width)"]
    entry = registry.backbone(config.model.backbone)
    if entry.image_sizes or config.model.aggregation == "mixvpr":
        return [f"eval.resize={resize!r}: {config.model.backbone} + {config.model.aggregation} has parameters made for "
                f"one input size; evaluate at data.resize={tuple(config.data.resize)!r}"]
    return [f"eval.resize={resize!r}: {line}" for line in
            _model_rule(geoloc_net.check_image_size, config.model.backbone, resize)]


def _check_model(config) -> list[str]:
    """The network's options; a baseline backbone has none."""
    backbones = (*registry.BACKBONES, *baselines.NAMES)
    if config.model.backbone in baselines.NAMES or config.model.backbone not in backbones:
        return _one_of(config, "model.backbone", backbones)
    problems = [*_model_rule(geoloc_net.check_model_config, config.model),
                *_at_least(config, ("model.netvlad_clusters",), 1),
                *_at_least(config, ("model.fc_output_dim",), 1, optional=True),
                *_at_least(config, ("model.trunc_te", "model.freeze_te"), 0, optional=True),
                *_one_of(config, "model.resume_format", pretrained.RESUME_FORMATS),
                *_one_of(config, "model.resume_checkpoint", checkpoint.RUN_CHECKPOINTS)]
    if not _percent_resize(config) and not _image_size(config.data.resize):
        problems += [f"data.resize={tuple(config.data.resize)!r}: {line}" for line in
                     _model_rule(geoloc_net.check_image_size, config.model.backbone, tuple(config.data.resize))]
    problems += _eval_resize(config)
    if config.model.resume and not Path(config.model.resume).exists():
        problems.append(f"model.resume={config.model.resume!r}: no such file or folder")
    return problems


def _model_rule(rule, *args) -> list[str]:
    """A rule of the code that uses the option, raising at its first problem, as a problem list."""
    try:
        rule(*args)
    except (ValueError, FileNotFoundError) as error:
        return [str(error)]
    return []


def _check_eval(config) -> list[str]:
    problems = [*_test_methods(config.eval), *_recall_values(config.eval.recall_values),
                *_one_of(config, "eval.index", index_lib.INDEX_KINDS),
                *_at_least(config, ("eval.pca_dim",), 1, optional=True),
                *_at_least(config, ("eval.positive_dist_threshold",), 0, integer=False, optional=True),
                *_at_least(config, ("eval.num_preds_to_save",), 0),
                *_model_rule(eval_run.check_pca, config.eval)]
    if config.eval.index in index_lib.INDEX_KINDS:
        problems += _index_params(config.eval.index, config.eval.index_params)
    return problems


def _check_sweep(config) -> list[str]:
    """The sweep section, then each run's config for sweep.mode (vgjax.sweep.check)."""
    problems = _at_least(config, ("sweep.seeds", "sweep.parallel_runs"), 1)
    if config.train.distributed:
        problems.append("train.distributed=True: a sweep runs each run as a process on this host; "
                        "launch a multi-host run on its own")
    return problems or sweep.check(config)


def _test_methods(eval_config) -> list[str]:
    """One test method, several separated by commas, or "all" (as eval_run reads them)."""
    methods = eval_run.test_methods(eval_config)
    if methods and all(method in evaluate.TEST_METHODS for method in methods):
        return []
    return [f"eval.test_method={eval_config.test_method!r}: choose from {', '.join(evaluate.TEST_METHODS)} "
            "(one, several separated by commas, or all)"]


def _recall_values(values) -> list[str]:
    if (isinstance(values, Sequence) and values and all(_number(n, 1, integer=True) for n in values)
            and list(values) == sorted(set(values))):
        return []
    return [f"eval.recall_values={values!r}: must be positive integers in increasing order, e.g. (1, 5, 10, 20)"]


def _index_params(kind: str, text: str) -> list[str]:
    try:
        index_lib.check_params(kind, index_lib.parse_params(text))
    except ValueError as error:
        return [f"eval.index_params={text!r}: {error}"]
    return []


def _check_distributed(config) -> list[str]:
    """The multi-process settings, when train.distributed is on."""
    if not config.train.distributed:
        return []
    problems = []
    try:
        sharding.distributed_settings(config.train)
    except ValueError as error:
        problems.append(str(error))
    if config.train.heartbeat_timeout_seconds < 1:
        problems.append(f"train.heartbeat_timeout_seconds={config.train.heartbeat_timeout_seconds}: must be at least 1")
    return problems


def _check_training(config) -> list[str]:
    """The options every training method reads."""
    problems = [*_at_least(config, ("train.epochs_num", "train.train_batch_size", "train.log_every_steps",
                                    "train.keep_checkpoints"), 1),
                *_at_least(config, ("train.patience", "train.checkpoint_every_steps", "train.profile_steps"), 0),
                *_at_least(config, ("train.lr", "train.lr_crn_layer", "train.lr_crn_net"), 0, integer=False),
                *_at_least(config, ("data.train_positives_dist_threshold",), 0, integer=False),
                *_one_of(config, "train.optim", state.OPTIMIZERS),
                *_check_schedule(config),
                *_model_rule(loop.best_metric_n, config)]
    try:
        augment.AugmentConfig.from_config(config.train)
    except (ValueError, TypeError) as error:
        problems.append(f"train.{error}")
    return problems


def _check_mining(config) -> list[str]:
    """The triplet recipe's options: mining rounds, tuples and loss."""
    problems = [*_one_of(config, "mining.mining", mining.METHODS),
                *_one_of(config, "train.criterion", tuple(losses.LOSSES)),
                *_at_least(config, ("mining.queries_per_epoch", "mining.cache_refresh_rate",
                                    "mining.negs_num_per_query", "mining.neg_samples_num"), 1)]
    if state.schedule_in_epochs(config.train):
        key = "lr_milestones" if config.train.lr_milestones else "warmup_epochs"
        problems.append(f"train.{key}={config.train[key]!r}: triplet training's epochs have "
                        "no fixed number of steps (mining decides them); use train.warmup_steps only")
    rate, batch = config.mining.cache_refresh_rate, config.train.train_batch_size
    if not problems and _number(batch, 1, integer=True) and rate < batch:
        problems.append(f"mining.cache_refresh_rate={rate}: smaller than train.train_batch_size={batch}, "
                        "so a mining round would have no batch")
    return problems


def _unsupported_augmentations(config, method: str) -> list[str]:
    return [f"train.{key}={config.train[key]!r}: {method} training does not use the triplet recipe's "
            "augmentations; unset it" for key in cosplace.UNSUPPORTED if config.train[key]]


def _check_cosplace(config) -> list[str]:
    problems = _unsupported_augmentations(config, "CosPlace")
    problems += [f"cosplace.{key}='': CosPlace training needs it"
                 for key in ("train_folder", "val_folder", "test_folder") if not config.cosplace[key]]
    return problems + [*_at_least(config, ("cosplace.iterations_per_epoch",), 1),
                       *_at_least(config, ("cosplace.classifiers_lr",), 0, integer=False)]


def _check_gsv(config) -> list[str]:
    problems = _unsupported_augmentations(config, "GSV-Cities")
    if not config.data.gsv_cities_folder:
        problems.append("data.gsv_cities_folder='': GSV-Cities training needs the dataset's folder "
                        "(holding Dataframes/ and Images/)")
    problems += [*_at_least(config, ("gsv.images_per_place",), 2),
                 *_at_least(config, ("gsv.min_images_per_place",), 1),
                 *_at_least(config, ("gsv.miner_epsilon", "gsv.ms_base"), 0, integer=False),
                 *_at_least(config, ("gsv.ms_alpha", "gsv.ms_beta"), 1e-6, integer=False)]
    if not problems and config.gsv.min_images_per_place < config.gsv.images_per_place:
        problems.append(f"gsv.min_images_per_place={config.gsv.min_images_per_place}: below gsv.images_per_place="
                        f"{config.gsv.images_per_place}, so a place could not give its images")
    return problems


def _check_schedule(config) -> list[str]:
    milestones = tuple(config.train.lr_milestones)
    problems = [*_at_least(config, ("train.warmup_steps", "train.warmup_epochs", "train.lr_decay_steps"), 0),
                *_at_least(config, ("train.lr_gamma", "train.lr_end_factor", "train.weight_decay"), 0, integer=False)]
    if not all(_number(m, 1, integer=True) for m in milestones) or list(milestones) != sorted(set(milestones)):
        problems.append(f"train.lr_milestones={milestones!r}: increasing epochs >= 1")
    return problems


# ---------------------------------------------------------------------------------------------
# Rules that look at the weights and the network.


def _check_weights(config, mode: str, workdir) -> list[str]:
    """Where the weights come from: model.resume, else a training run in the workdir (evaluated,
    or resumed by training), else model.pretrain, checked here as it will be read. --mode eval
    refuses model.pretrain=none: random weights are evaluated only on purpose (random)."""
    model = config.model
    if model.backbone in baselines.NAMES or model.resume or checkpoint.run_folder(workdir) is not None:
        return []
    if mode in ("eval", "export") and model.pretrain != "random" and model.pretrain in pretrained.RANDOM_INIT:
        return [f"model.pretrain={model.pretrain!r}: --mode {mode} with no model.resume and no training run in "
                f"--workdir would {mode} RANDOM weights; give model.resume (a weights file or a vgjax "
                "workdir) or model.pretrain (imagenet, places365 or a weights file), or "
                f"model.pretrain=random to {mode} random weights on purpose"]
    return _model_rule(pretrained.check_pretrain, model)


def _check_netvlad_init_size(config) -> list[str]:
    """Training a new NetVLAD/CRN layer initialises it by k-means over local features of images
    at data.resize (vgjax.models.netvlad_init): the backbone must give enough positions."""
    model = config.model
    if model.aggregation not in ("netvlad", "crn") or model.resume or _percent_resize(config):
        return []
    size = tuple(config.data.resize)
    try:
        netvlad_init.check_positions(_backbone_positions(model, size))
    except ValueError as error:
        return [f"data.resize={size!r}: too small for NetVLAD's k-means initialisation after {model.backbone}: "
                f"{error}; use a larger data.resize or start from model.resume"]
    return []


def _backbone_positions(model_config, image_size: tuple[int, int]) -> int:
    """Map cells (h * w) or tokens T of the backbone's output at `image_size`, from shapes only
    (nothing is computed)."""
    network = geoloc_net.build(model_config, image_size)
    images = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
    features = jax.eval_shape(lambda x: network.init_with_output(
        jax.random.key(0), x, method=geoloc_net.GeoLocalizationNet.backbone_features)[0], images)
    positions = 1
    for side in features.shape[1:-1]:
        positions *= side
    return positions

"""Runs an experiment from a config: what launch.py hands off to.

Modes:
  demo: the main job on the ViZDoom world: random init vs Places365 vs trained (vgjax.demo).
  eval: evaluate a model on `config.eval.split` with `config.eval.test_method` (or "all" of the
    benchmark's test methods), write results.json (and descriptors on request) to the workdir.
    A vgjax training workdir (given as --workdir, or as model.resume) is evaluated with its best
    checkpoint (model.resume_checkpoint) and the architecture it was trained with; results go
    to <workdir>/eval/, and the run's results.json, config.json and checkpoints stay untouched.
  train: triplet training with mining (vgjax.train.triplet) on the shared training engine
    (vgjax.train.loop): validation each epoch, early stopping, exact resume from the workdir's
    checkpoints; then the best network is tested.
  train_cosplace: CosPlace's CosFace training over groups of classes (vgjax.train.cosplace), on
    the same engine.
  pack: packs the train split at config.data.resize into config.data.packed_folder
    (array_record shards, vgjax.data.packed), which training then reads instead of the JPEGs.
  profile: parameters, size, FLOPs, descriptor dim and extraction speed of the configured
    network at config.data.resize (the paper's Table 3 columns), printed and in profile.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import ml_collections

from vgjax import baselines, demo, embed, profiling, sharding, visualize
from vgjax import evaluate as evaluate_lib
from vgjax.configs import common
from vgjax.data import demo_world, packed, synthetic
from vgjax.data.vg_folder import load_split
from vgjax.models import pretrained
from vgjax.train import checkpoint, cosplace, loop, runs, triplet

MODES = ("demo", "train", "train_cosplace", "eval", "profile", "pack")
BASELINES = ("tiny_image",)
SYNTHETIC_DATASETS = ("aerial", "cosplace", "doom")


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, mode: str | None = None) -> dict:
    """Runs `mode` (default: config.mode) in `workdir`; returns what it wrote to results.json."""
    mode = mode or config.mode
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; available: {MODES}")
    workdir = Path(workdir)
    trained_here = checkpoint.run_folder(workdir) is not None
    if trained_here and mode in ("train", "train_cosplace"):
        _check_same_architecture(config, workdir)  # before config.json is replaced
    workdir.mkdir(parents=True, exist_ok=True)
    if not (trained_here and mode == "eval"):
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    if config.train.distributed:
        sharding.initialize_distributed()
    runs = {"demo": run_demo, "train": run_train, "train_cosplace": run_train_cosplace,
            "eval": run_eval, "profile": run_profile, "pack": run_pack}
    return runs[mode](config, workdir)


def datasets_root(data_config: ml_collections.ConfigDict) -> Path:
    """config.data.datasets_folder, else $DATASETS_FOLDER (as the benchmark falls back)."""
    root = data_config.datasets_folder or os.environ.get("DATASETS_FOLDER", "")
    if not root:
        raise ValueError("no datasets folder: set --config.data.datasets_folder=DIR or the "
                         "DATASETS_FOLDER environment variable")
    return Path(root)


def prepare_dataset(config: ml_collections.ConfigDict, splits: tuple[str, ...]) -> Path:
    """The dataset folder; a configured synthetic dataset is rendered there (with `splits`)
    first if missing.

    Rendering goes to a `.partial` folder that is renamed when complete, so an interrupted
    build is never mistaken for a dataset.
    """
    path = datasets_root(config.data) / config.data.dataset_name
    kind = config.data.synthetic
    if kind and kind not in SYNTHETIC_DATASETS:
        raise ValueError(f"unknown config.data.synthetic {kind!r}; available: {SYNTHETIC_DATASETS}")
    if kind == "doom":  # checks its manifest: a world with other parameters is an error
        return demo_world.build_demo_world(path, seed=config.seed, image_size=tuple(config.data.resize),
                                           frames_per_walk=config.data.synthetic_frames)
    if not kind or path.exists():
        return path
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    if kind == "cosplace":
        synthetic.build_cosplace_dataset(partial, seed=config.seed, image_size=tuple(config.data.resize))
    else:
        synthetic.build_aerial_dataset(partial, seed=config.seed, splits=splits,
                                       image_size=tuple(config.data.resize))
    partial.rename(path)
    return path


def _check_same_architecture(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Training again in a workdir that holds a run: the network must be the same."""
    saved = json.loads((workdir / checkpoint.RUN_CONFIG).read_text())
    differences = runs.architecture_differences(config.model, saved["model"], keep_defaults=False)
    if differences:
        raise ValueError(f"{workdir} holds a run of another network: {', '.join(differences)}; "
                         "use a new workdir")


def build_embed_fn(config: ml_collections.ConfigDict) -> evaluate_lib.EmbedFn:
    """An embed function (uint8 [B, H, W, 3] -> [B, D]) for config.model at config.data.resize."""
    if config.model.backbone in BASELINES:
        return baselines.tiny_image_embed()
    model, variables = pretrained.build_and_load(config.model, tuple(config.data.resize), config.seed)
    return embed.make_embed_fn(model, variables)


def parse_index_params(text: str) -> dict[str, int | float]:
    """'nlist=1024,nprobe=16' -> {'nlist': 1024, 'nprobe': 16}."""
    params = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config.eval.index_params: expected key=value items, got {item!r}")
        number = float(value)
        params[key.strip()] = int(number) if number.is_integer() and "." not in value else number
    return params


def _fit_pca(config, embed_fn) -> evaluate_lib.PCA | None:
    if config.eval.pca_dim is None:
        return None
    if not config.eval.pca_dataset_folder:
        raise ValueError("config.eval.pca_dim needs config.eval.pca_dataset_folder "
                         "(relative to the datasets folder, e.g. pitts30k/images/train)")
    folder = datasets_root(config.data) / config.eval.pca_dataset_folder
    return evaluate_lib.fit_pca_on_folder(
        embed_fn, folder, config.eval.pca_dim, resize=tuple(config.data.resize),
        batch_size=config.data.infer_batch_size, seed=config.seed)


def _write_json(path: Path, data: dict) -> None:
    """Writes atomically: a crash never leaves a truncated file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _write_results(workdir: Path, results: dict) -> dict:
    """workdir/results.json (atomically), said on the console; returns `results`."""
    _write_json(workdir / "results.json", results)
    print(f"Wrote {workdir / 'results.json'}")
    return results


def _results_table(results: dict[str, dict]) -> str:
    methods = list(results)
    ns = list(next(iter(results.values()))["recalls"])
    header = f"{'test method':<14}" + "".join(f"{n:>8}" for n in ns) + f"{'ms/img':>9}{'ms/query':>10}"
    lines = [header, "-" * len(header)]
    for method in methods:
        r = results[method]
        lines.append(f"{method:<14}" + "".join(f"{r['recalls'][n]:8.1f}" for n in ns)
                     + f"{r['timings']['extraction_ms_per_image']:9.2f}"
                     + f"{r['timings']['matching_ms_per_query']:10.3f}")
    return "\n".join(lines)


def _eval_output(config: ml_collections.ConfigDict, workdir: Path, method: str) -> Path:
    """Where one test method's results go in a training workdir:
    eval/<dataset>_<split>_<test_method>[_pca<d>][_<index>] (.json, and a folder for pictures)."""
    name = f"{config.data.dataset_name}_{config.eval.split}_{method}"
    if config.eval.pca_dim is not None:
        name += f"_pca{config.eval.pca_dim}"
    if config.eval.index != "flat":
        name += f"_{config.eval.index}"
    return workdir / "eval" / name


def run_eval(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Evaluates the configured model (or a training run's network) on config.eval.split; writes
    workdir/results.json, or workdir/eval/*.json in a training workdir."""
    in_run = checkpoint.run_folder(workdir) is not None
    # model.resume may be a run (a weights file is not); else the workdir's own run, if any.
    run = checkpoint.run_folder(config.model.resume) if config.model.resume else (workdir if in_run else None)
    if run is not None:
        model_config, model, variables = runs.network_from_run(config.model, run, tuple(config.data.resize),
                                                               keep_defaults=True)
        config = config.copy_and_resolve_references()
        config.model = model_config
        embed_fn = embed.make_embed_fn(model, variables)
    split = load_split(prepare_dataset(config, (config.eval.split,)), config.eval.split,
                       config.data.val_positive_dist_threshold)
    print(split)
    if run is None:
        embed_fn = build_embed_fn(config)
    pca = _fit_pca(config, embed_fn)
    method = config.eval.test_method
    methods = evaluate_lib.TEST_METHODS if method == "all" else (method,)
    results, database = {}, None
    for method in methods:
        result = evaluate_lib.evaluate(
            embed_fn, split, test_method=method, resize=tuple(config.data.resize),
            recall_values=tuple(config.eval.recall_values), index_kind=config.eval.index,
            index_params=parse_index_params(config.eval.index_params),
            batch_size=config.data.infer_batch_size, majority_weight=config.eval.majority_weight,
            pca=pca, num_threads=config.data.num_workers, database_descriptors=database,
            keep_descriptors=True)
        database = result.database_descriptors
        print(f"Recalls on {split.folder} ({method}): {result}")
        results[method] = {
            "recalls": {f"R@{n}": r for n, r in result.recalls.items()},
            "descriptor_dim": result.descriptor_dim,
            "index": result.index,
            "timings": result.timings,
        }
        out = _eval_output(config, workdir, method) if in_run else workdir
        if config.eval.num_preds_to_save > 0:
            visualize.save_evaluation_pictures(out / "predictions" / method, split,
                                               result.predictions, result.recalls, config.eval,
                                               title=method)
        if config.eval.save_descriptors:
            evaluate_lib.export_descriptors(
                out / "descriptors" / method, split, result.database_descriptors,
                result.query_descriptors, test_method=method, pca_dim=config.eval.pca_dim)
        if in_run:
            out.parent.mkdir(exist_ok=True)
            _write_json(out.with_suffix(".json"), {"split": str(split.folder), "test_method": method,
                                                   "network": run_description(config, run), **results[method]})
            print(f"Wrote {out.with_suffix('.json')}")
    summary = {"split": str(split.folder), "num_database": split.num_database,
               "num_queries": split.num_queries, "backbone": config.model.backbone,
               "results": results}
    print(_results_table(results))
    return summary if in_run else _write_results(workdir, summary)


def run_description(config: ml_collections.ConfigDict, run: Path | None) -> dict:
    """What was evaluated: the architecture and, for a training run, which checkpoint of which run."""
    network = {key: config.model[key] for key in runs.ARCHITECTURE_KEYS}
    if run is not None:
        network.update(run=str(run), checkpoint=config.model.resume_checkpoint)
    return network


def run_profile(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Profiles config.model at config.data.resize; writes workdir/profile.json."""
    profile = profiling.profile_model(config.model, tuple(config.data.resize),
                                      batch_size=config.data.infer_batch_size)
    print(profiling.format_table([profile]))
    summary = dataclasses.asdict(profile)
    _write_json(workdir / "profile.json", summary)
    return summary


def run_demo(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """The main job (vgjax.demo): random init vs Places365 vs trained on the ViZDoom world."""
    dataset_dir = prepare_dataset(config, ("train", "val", "test"))
    return _write_results(workdir, demo.run(config, workdir, dataset_dir))


def run_pack(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Packs the train split for training (see vgjax.train.triplet.packed_train_loader)."""
    folder = triplet.packed_train_folder(config)
    if folder is None:
        raise ValueError("mode pack needs --config.data.packed_folder=DIR")
    dataset_dir = prepare_dataset(config, ("train", "val", "test"))
    split = load_split(dataset_dir, "train", config.data.val_positive_dist_threshold)
    triplet.packed_train_loader(config, dataset_dir, split)  # packs if missing, then validates
    summary = {"packed": str(folder), "manifest": json.loads((folder / packed.MANIFEST).read_text())}
    _write_json(workdir / "results.json", summary)
    print(f"Packed {split.folder} at {tuple(config.data.resize)} into {folder}")
    return summary


def run_train(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Trains config.model on the dataset's train/val splits, tests the best; results.json."""
    loop.check_train_config(config)  # before any work
    triplet.check_config(config)
    dataset_dir = prepare_dataset(config, ("train", "val", "test"))
    method = triplet.Triplet(config, dataset_dir)
    return _write_results(workdir, loop.train_and_evaluate(config, workdir, method,
                                                           config_diff=config_diff(config)))


def run_train_cosplace(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """CosPlace training on config.cosplace's folders (absolute, or relative to
    <datasets_folder>/<dataset_name> when data.dataset_name is set); results.json."""
    loop.check_train_config(config)  # before any work
    cosplace.check_config(config)
    config = config.copy_and_resolve_references()  # the folders are made absolute below
    if config.data.dataset_name:
        root = prepare_dataset(config, ())
        for key in ("train_folder", "val_folder", "test_folder"):
            config.cosplace[key] = str(root / config.cosplace[key])
    diff = config_diff(config)
    return _write_results(workdir, loop.train_and_evaluate(config, workdir, cosplace.CosPlace(config),
                                                           config_diff=diff))


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_diff(config: ml_collections.ConfigDict) -> list[str]:
    """"key=value" for every config value that differs from vgjax.configs.common's defaults."""
    defaults = _flat(common.get_config())
    return [f"{key}={value!r}" for key, value in _flat(config).items()
            if key not in defaults or defaults[key] != value]


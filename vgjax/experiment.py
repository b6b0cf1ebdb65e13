"""Runs an experiment from a config: what launch.py hands off to.

Modes:
  demo: the main job on the ViZDoom world: random init vs Places365 vs trained (vgjax.demo).
  eval: evaluate a model on `config.eval.split` of each dataset of `config.eval.datasets`
    (default: data.dataset_name) with each of `config.eval.test_method` (one, several, or "all"),
    database descriptors computed once per dataset (vgjax.eval_run); print and write the
    cross-dataset table (vgjax.eval_table) and results.json (descriptors, pictures on request).
    A vgjax training workdir (given as --workdir, or as model.resume) is evaluated with its best
    checkpoint (model.resume_checkpoint) and the architecture it was trained with; results go
    to <workdir>/eval/, and the run's results.json, config.json and checkpoints stay untouched.
  train: triplet training with mining (vgjax.train.triplet) on the shared training engine
    (vgjax.train.loop): validation each epoch, early stopping, exact resume from the workdir's
    checkpoints; then the best network is tested.
  train_cosplace: CosPlace's CosFace training over groups of classes (vgjax.train.cosplace), on
    the same engine.
  train_gsv: GSV-Cities' places x K training with the multi-similarity loss (vgjax.train.gsv;
    MixVPR, Conv-AP), on the same engine.
  pack: packs what training reads (the train split, or GSV-Cities' training cities with
    data.gsv_cities_folder) at config.data.resize into config.data.packed_folder: a
    tensorflow-datasets dataset in array_record of JPEG or raw images (data.packed_encoding;
    vgjax.data.packed), which training then reads instead of the JPEGs.
  export: writes the network of a training run (the workdir's own, or model.resume=<workdir>;
    its model.resume_checkpoint) or of config.model with its weights (model.resume file or
    model.pretrain) into <workdir>/export/: the PyTorch benchmark's state dict (.safetensors)
    and a vgjax model file (vgjax.models.load); a run's own files stay untouched.
  profile: parameters, size, FLOPs, descriptor dim and extraction speed of the configured
    network at config.data.resize (the paper's Table 3 columns), printed and in profile.json.
  sweep: runs of the config over seeds and options (config.sweep), one workdir each, then a
    mean +- std table and plots (vgjax.sweep).
  print_config: prints the resolved config and its differences from the defaults; writes nothing.

Every mode starts by checking the whole config (vgjax.configs.validate): a ConfigError listing
each problem comes before any dataset is read, network built or file written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import ml_collections

from vgjax import baselines, demo, embed, eval_run, eval_table, files, profiling, sharding
from vgjax import evaluate as evaluate_lib
from vgjax.configs import common, validate
from vgjax.data import demo_world, gsv_cities, packed, synthetic, vg_folder
from vgjax.data.vg_folder import Split, load_split
from vgjax.models import export, pretrained
from vgjax.train import checkpoint, cosplace, gsv, loop, runs, triplet

MODES = ("demo", "train", "train_cosplace", "train_gsv", "eval", "export", "profile", "pack", "sweep", "print_config")


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, mode: str | None = None) -> dict:
    """Runs `mode` (default: config.mode) in `workdir`; returns what it wrote to results.json."""
    mode = mode or config.mode
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; available: {MODES}")
    validate.check(config, mode, workdir)
    if mode == "print_config":
        return print_config(config)
    if mode == "sweep":  # runs of this module's modes, each in a process of its own
        from vgjax import sweep

        return sweep.run(config, workdir)
    if config.train.distributed:  # before anything starts jax's backend
        sharding.initialize_distributed(config.train)
    config = resolve_resize(config, mode, workdir)
    workdir = Path(workdir)
    trained_here = checkpoint.run_folder(workdir) is not None
    if trained_here and mode in ("train", "train_cosplace", "train_gsv"):
        _check_same_architecture(config, workdir)  # before config.json is replaced
    if sharding.is_main_process():
        workdir.mkdir(parents=True, exist_ok=True)
        if not (trained_here and mode in ("eval", "export")):
            (workdir / checkpoint.RUN_CONFIG).write_text(config.to_json_best_effort(indent=2) + "\n")
    runs = {"demo": run_demo, "train": run_train, "train_cosplace": run_train_cosplace, "train_gsv": run_train_gsv,
            "eval": run_eval, "export": run_export, "profile": run_profile, "pack": run_pack}
    return runs[mode](config, workdir)


def mode_splits(config: ml_collections.ConfigDict, mode: str) -> tuple[str, ...]:
    """The splits of data.dataset_name `mode` reads (a synthetic dataset is rendered with them)."""
    return {"train": ("train", "val", "test"), "train_gsv": ("val", "test"), "pack": ("train", "val", "test"),
            "train_cosplace": ()}.get(mode, (config.eval.split,))


def resolve_resize(config: ml_collections.ConfigDict, mode: str, workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """`config` with a data.resize given as a percentage ("80%", the benchmark's resize study)
    replaced by that share of the height and width of data.dataset_name's images (rounded), and
    checked again at that size; a (height, width) data.resize leaves `config` as it is.
    validate.check has allowed percentages only in the modes that read data.dataset_name."""
    percent = vg_folder.resize_percentage(config.data.resize)
    if percent is None:
        return config
    splits = mode_splits(config, mode)
    dataset_dir = prepare_dataset(config, splits)
    native = vg_folder.native_image_size(dataset_dir, splits)
    size = tuple(max(1, round(side * percent / 100)) for side in native)
    resolved = config.copy_and_resolve_references()
    with resolved.data.ignore_type():
        resolved.data.resize = size
    print(f"data.resize={percent:g}% of {dataset_dir.name}'s {native[0]}x{native[1]} images: {size[0]}x{size[1]}",
          flush=True)
    validate.check(resolved, mode, workdir)
    return resolved


def _render_size(config: ml_collections.ConfigDict) -> dict:
    """image_size for a synthetic dataset's renderer: data.resize, or with a percentage the
    renderer's own default size (the percentage is then taken of it)."""
    if vg_folder.resize_percentage(config.data.resize) is not None:
        return {}
    return {"image_size": tuple(config.data.resize)}


def prepare_dataset(config: ml_collections.ConfigDict, splits: tuple[str, ...]) -> Path:
    """The dataset folder; a configured synthetic dataset is rendered there (with `splits`)
    first if missing.

    Rendering goes to a `.partial` folder that is renamed when complete, so an interrupted
    build is never mistaken for a dataset. With several processes, the main one prepares it
    first while the others wait, then they prepare theirs (finding it there on a shared disk,
    rendering the same dataset on their own host's otherwise).
    """
    if sharding.is_main_process():
        path = _prepare_dataset(config, splits)
    sharding.barrier("vgjax-dataset-prepared")
    return path if sharding.is_main_process() else _prepare_dataset(config, splits)


def _prepare_dataset(config: ml_collections.ConfigDict, splits: tuple[str, ...]) -> Path:
    path = eval_run.datasets_root(config.data) / config.data.dataset_name
    kind = config.data.synthetic
    if kind == "doom":  # checks its manifest: a world with other parameters is an error
        return demo_world.build_demo_world(path, seed=config.seed, image_size=tuple(config.data.resize),
                                           frames_per_walk=config.data.synthetic_frames)
    if not kind or path.exists():
        return path
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    size = _render_size(config)
    if kind == "cosplace":
        synthetic.build_cosplace_dataset(partial, seed=config.seed, **size)
    elif kind == "gsv":  # GSV-Cities' layout in gsv_cities/, and aerial val/test splits beside it
        gsv_cities.write_synthetic(partial / "gsv_cities", seed=config.seed, **size)
        synthetic.build_aerial_dataset(partial, seed=config.seed, splits=("val", "test"), num_queries=20,
                                       size_m=120.0, **size)
    else:
        synthetic.build_aerial_dataset(partial, seed=config.seed, splits=splits, **size)
    vg_folder.write_manifest(partial, f"synthetic {kind}")
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
    """An embed function (uint8 [B, H, W, 3] -> [B, D]) for config.model at config.data.resize, over
    every device of every process."""
    if config.model.backbone in baselines.NAMES:
        return baselines.tiny_image_embed()
    model, variables = pretrained.build_and_load(config.model, tuple(config.data.resize), config.seed)
    return embed.make_embed_fn(model, variables, sharding.make_mesh())


def _write_results(workdir: Path, results: dict) -> dict:
    """workdir/results.json (atomically; by the main process only), said on the console;
    returns `results`."""
    if sharding.is_main_process():
        files.write_json(workdir / "results.json", results)
        print(f"Wrote {workdir / 'results.json'}")
    return results


def eval_split(config: ml_collections.ConfigDict, dataset: str) -> Split:
    """eval.split of `dataset`: data.dataset_name is prepared (rendered if synthetic and missing),
    any other name must be a dataset folder under the datasets folder."""
    folder = (prepare_dataset(config, (config.eval.split,)) if dataset == config.data.dataset_name
              else eval_run.datasets_root(config.data) / dataset)
    split = load_split(folder, config.eval.split, eval_run.test_positive_dist_m(config))
    print(split)
    return split


def _eval_folder(config: ml_collections.ConfigDict, workdir: Path, in_run: bool, dataset: str,
                 several: bool) -> Path:
    """Where a dataset's pictures and descriptors go: in a training workdir
    eval/<dataset>_<split>[_pca<d>][_<index>]/; else the workdir, or workdir/<dataset> when
    several datasets are evaluated."""
    if in_run:
        return workdir / "eval" / f"{dataset}_{config.eval.split}{eval_run.options_suffix(config.eval)}"
    return workdir / dataset if several else workdir


def _write_run_evaluation(config: ml_collections.ConfigDict, workdir: Path, network: dict, split: Split,
                          dataset: str, results: dict[str, dict]) -> None:
    """In a training workdir, one JSON per test method:
    eval/<dataset>_<split>_<test_method>[_pca<d>][_<index>].json."""
    suffix = eval_run.options_suffix(config.eval)
    (workdir / "eval").mkdir(exist_ok=True)
    for method, result in results.items():
        path = workdir / "eval" / f"{dataset}_{config.eval.split}_{method}{suffix}.json"
        files.write_json(path, {"split": str(split.folder), "test_method": method, "network": network, **result})
        print(f"Wrote {path}")


def _write_table(config: ml_collections.ConfigDict, folder: Path, network: dict,
                 results: dict[str, dict[str, dict]]) -> None:
    """Prints the cross-dataset tables and writes them to folder/table[_pca<d>][_<index>].md and
    .json, and their recall@N curves to folder/recalls[_pca<d>][_<index>].png."""
    suffix, options = eval_run.options_suffix(config.eval), config.eval
    title = (f"Recall@N (%) of {network['backbone']} + {network['aggregation']} on the {options.split} split"
             + (f", PCA to {options.pca_dim}" if options.pca_dim is not None else "")
             + (f", index {options.index}" if options.index != "flat" else ""))
    text = f"{title}\n\n{eval_table.markdown(results)}"
    print(text)
    (folder / f"table{suffix}.md").write_text(text)
    files.write_json(folder / f"table{suffix}.json", {"title": title, "network": network,
                                                 "tables": eval_table.by_method(results)})
    eval_table.save_plot(folder / f"recalls{suffix}.png", results, title=title)
    print(f"Wrote {folder / f'table{suffix}.md'} (and .json), {folder / f'recalls{suffix}.png'}")


def run_eval(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Evaluates the configured model (or a training run's network) on eval.split of each of
    eval.datasets (vgjax.eval_run); writes the table, and workdir/results.json, or in a training
    workdir eval/*.json (see the module doc)."""
    in_run = checkpoint.run_folder(workdir) is not None
    run = _run_to_use(config, workdir)
    if run is not None:
        config, embed_fn = run_embed_fn(config, run)
    splits = {name: eval_split(config, name) for name in eval_run.dataset_names(config)}
    if run is None:
        embed_fn = build_embed_fn(config)
    pca, network, results = eval_run.fit_pca(config, embed_fn), run_description(config, run), {}
    for name, split in splits.items():
        folder = _eval_folder(config, workdir, in_run, name, len(splits) > 1)
        results[name] = eval_run.evaluate_split(config, embed_fn, split, folder, pca=pca)
        if in_run and sharding.is_main_process():
            _write_run_evaluation(config, workdir, network, split, name, results[name])
    if sharding.is_main_process():
        _write_table(config, workdir / "eval" if in_run else workdir, network, results)
    datasets = {name: {"split": str(split.folder), "num_database": split.num_database,
                       "num_queries": split.num_queries, "results": results[name]} for name, split in splits.items()}
    summary = {**next(iter(datasets.values())), "backbone": config.model.backbone, "datasets": datasets}
    return summary if in_run else _write_results(workdir, summary)


def run_embed_fn(config: ml_collections.ConfigDict, run: Path) -> tuple[ml_collections.ConfigDict, evaluate_lib.EmbedFn]:
    """(config with the run's architecture, embed function of the run's model.resume_checkpoint)
    for a vgjax training run, over every device of every process."""
    model_config, model, variables = runs.network_from_run(config.model, run, tuple(config.data.resize),
                                                           keep_defaults=True)
    config = config.copy_and_resolve_references()
    config.model = model_config
    return config, embed.make_embed_fn(model, variables, sharding.make_mesh())


def run_description(config: ml_collections.ConfigDict, run: Path | None) -> dict:
    """What was evaluated: the architecture and, for a training run, which checkpoint of which run."""
    network = {key: config.model[key] for key in runs.ARCHITECTURE_KEYS}
    if run is not None:
        network.update(run=str(run), checkpoint=config.model.resume_checkpoint)
    return network


def _run_to_use(config: ml_collections.ConfigDict, workdir: Path) -> Path | None:
    """The vgjax training run whose network eval and export use: model.resume when it is one
    (a weights file is not), else the workdir's own run, if any."""
    return checkpoint.run_folder(config.model.resume) if config.model.resume else checkpoint.run_folder(workdir)


def run_export(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Exports a training run's network (see the module doc) or config.model with its weights
    into workdir/export/ (vgjax.models.export); returns what was written where."""
    image_size = tuple(config.data.resize)
    run = _run_to_use(config, workdir)
    if run is not None:
        model_config, _, variables = runs.network_from_run(config.model, run, image_size, keep_defaults=True)
        name = f"{model_config.backbone}_{model_config.aggregation}_{model_config.resume_checkpoint}"
        source = {"run": str(run), "checkpoint": model_config.resume_checkpoint}
    else:  # validate.check refused model.pretrain=none here: the weights are asked for
        model_config, name = config.model, f"{config.model.backbone}_{config.model.aggregation}"
        _, variables = pretrained.build_and_load(model_config, image_size, config.seed)
        source = {"weights": config.model.resume or config.model.pretrain}
    files = export.export(workdir / "export", name, model_config, variables, image_size)
    for path in files.values():
        print(f"Wrote {path}")
    network = {**{key: model_config[key] for key in runs.ARCHITECTURE_KEYS}, **source}
    return {"network": network, "image_size": list(image_size),
            **{kind: str(path) for kind, path in files.items()}}


def run_profile(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Profiles config.model at config.data.resize; writes workdir/profile.json."""
    profile = profiling.profile_model(config.model, tuple(config.data.resize),
                                      batch_size=config.data.infer_batch_size)
    print(profiling.format_table([profile]))
    summary = dataclasses.asdict(profile)
    files.write_json(workdir / "profile.json", summary)
    return summary


def run_demo(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """The main job (vgjax.demo): random init vs Places365 vs trained on the ViZDoom world."""
    dataset_dir = prepare_dataset(config, ("train", "val", "test"))
    return _write_results(workdir, demo.run(config, workdir, dataset_dir))


def run_pack(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Packs what training with this config reads (vgjax.data.packed): GSV-Cities' training
    cities when data.gsv_cities_folder is set, else the train split of data.dataset_name."""
    if config.data.gsv_cities_folder:
        dataset_dir = prepare_dataset(config, ("val", "test"))
        source = dataset_dir / config.data.gsv_cities_folder
        builder = gsv.train_pack(config)  # data.packed_folder is set (validate.check)
    else:
        source = prepare_dataset(config, ("train", "val", "test"))
        builder = triplet.train_pack(config, source)
    pack = packed.open_or_build(builder, source)
    summary = {"packed": str(pack.folder), "source": str(pack.source), "image_size": list(pack.image_size),
               "encoding": pack.encoding, "images": {split: len(paths) for split, paths in pack.paths.items()}}
    files.write_json(workdir / "results.json", summary)
    print(f"Pack of {source} at {pack.image_size[0]}x{pack.image_size[1]} ({pack.encoding}): {pack.folder}")
    return summary


def run_train(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """Trains config.model on the dataset's train/val splits, tests the best; results.json."""
    dataset_dir = prepare_dataset(config, ("train", "val", "test"))
    method = triplet.Triplet(config, dataset_dir)
    return _write_results(workdir, loop.train_and_evaluate(config, workdir, method,
                                                           config_diff=config_diff(config)))


def run_train_cosplace(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """CosPlace training on config.cosplace's folders (absolute, or relative to
    <datasets_folder>/<dataset_name> when data.dataset_name is set); results.json."""
    config = config.copy_and_resolve_references()  # the folders are made absolute below
    if config.data.dataset_name:
        root = prepare_dataset(config, ())
        for key in ("train_folder", "val_folder", "test_folder"):
            config.cosplace[key] = str(root / config.cosplace[key])
    diff = config_diff(config)
    return _write_results(workdir, loop.train_and_evaluate(config, workdir, cosplace.CosPlace(config),
                                                           config_diff=diff))


def run_train_gsv(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """GSV-Cities training (places x K, multi-similarity) on data.gsv_cities_folder, validated
    and tested on data.dataset_name's val/test splits; results.json."""
    dataset_dir = prepare_dataset(config, ("val", "test"))
    method = gsv.GSVCities(config, dataset_dir / config.data.gsv_cities_folder, dataset_dir)
    return _write_results(workdir, loop.train_and_evaluate(config, workdir, method, config_diff=config_diff(config)))


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict:
    """{"section.key": value} of a config, or of its JSON (config.json) read back."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def print_config(config: ml_collections.ConfigDict) -> dict:
    """Prints the resolved config (as config.json would hold it) and its differences from the
    defaults; writes nothing. Returns {"differences": config_diff(config)}."""
    differences = config_diff(config)
    print(config.to_json_best_effort(indent=2))
    print("Differences from the defaults (vgjax/configs/common.py):")
    print("\n".join(f"  {line}" for line in differences) or "  none")
    return {"differences": differences}


def config_diff(config: ml_collections.ConfigDict) -> list[str]:
    """"key=value" for every config value that differs from vgjax.configs.common's defaults."""
    defaults = flatten(common.get_config())
    return [f"{key}={value!r}" for key, value in flatten(config).items()
            if key not in defaults or defaults[key] != value]


"""Sweeps (--mode sweep): the benchmark paper's protocol, repeated runs of one config over seeds
and over the values of some options, as one command that ends with a mean +- std table.

config.sweep says what varies:
  axes   "key=value|value|...; key=...": config keys and their values, each written as it would
         be on the command line (`data.resize=100%|80%|60%|40%`, `eval.index=flat|hnsw`,
         `model.aggregation=gem|netvlad`); the runs take every combination of the values
         (product), or with sweep.zip the i-th value of every axis together.
  seeds  runs of each combination, with seeds seed, seed + 1, ...
  mode   what a run does: train, train_cosplace or train_gsv (then it is tested), or eval
         (the configured network, nothing trained).

Axes of the eval section (test method, PCA dimension, index and its parameters, positives
radius, recall values, datasets) need no training: each trained network is evaluated at each of
their values, from descriptors it has computed once (vgjax.eval_run.DescriptorStore): database
and queries per dataset, test method and image size, the PCA sample per folder. Without them,
a run's table entry is its own final test (results.json), nothing embedded again.

Layout of the sweep's workdir:
  sweep.json                      the plan: axes, runs and their overrides
  runs/<run>/                     one vgjax workdir per run (config.json, checkpoints, log.txt,
                                  results.json), named by its values and seed, e.g. resize=80%_seed1
  runs/<run>/sweep/<point>.json   its evaluation at each combination of the evaluation axes
  runs/<run>/sweep/run.json       wall time and peak memory of the launch that completed it
  results.{md,csv,json}, *.png    the table and plots (vgjax.sweep_table)

Each run goes to a process of its own (spawned: a fresh JAX), which holds a lock on its workdir
while it works and dies with the sweep. A run whose results are all there is skipped, a killed
one resumes from its checkpoints, so relaunching the same command completes the sweep. Runs
already in the folder that were made with another config (other than in the sweep section) are
an error, never mixed into a table. With sweep.parallel_runs > 1 on a GPU machine, that many
runs go at once, each on its share of the GPUs (CUDA_VISIBLE_DEVICES), their output in their
log.txt only.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import itertools
import json
import multiprocessing
import os
import re
import resource
import signal
import sys
import time
from pathlib import Path

import ml_collections

from vgjax import files
from vgjax.data import vg_folder

MODES = ("train", "train_cosplace", "train_gsv", "eval")
RUNS_FOLDER = "runs"
RESULTS_FOLDER = "sweep"  # in each run's workdir
RUN_STATS = "run.json"
_LOCK_FILE = ".sweep-lock"
_NAME_CHARACTERS = re.compile(r"[^A-Za-z0-9.%+=-]+")


class SweepError(RuntimeError):
    """A sweep that cannot start or did not complete; the message says which run and why."""


# ---------------------------------------------------------------------------------------------
# The plan: axes, their values applied to a config, runs and evaluation points.


@dataclasses.dataclass(frozen=True)
class Axis:
    key: str  # e.g. "data.resize"
    values: tuple[str, ...]  # each as written on the command line, e.g. "80%"

    @property
    def evaluation_only(self) -> bool:
        """True for the eval section's options: a trained network is evaluated at each value."""
        return self.key.startswith("eval.")


def parse_axes(text: str) -> list[Axis]:
    """"key=v|v; key=v|v" -> Axes (ValueError naming the bad part). Values are split at "|",
    axes at ";"; a key appears once."""
    axes = []
    for part in filter(None, (part.strip() for part in text.split(";"))):
        key, equals, values = part.partition("=")
        key = key.strip()
        values = tuple(value.strip() for value in values.split("|"))
        if not equals or not key or not all(values):
            raise ValueError(f"sweep.axes: {part!r} is not key=value|value|...")
        if key in (axis.key for axis in axes):
            raise ValueError(f"sweep.axes: {key} is given twice")
        axes.append(Axis(key, values))
    return axes


def set_value(config: ml_collections.ConfigDict, key: str, text: str) -> None:
    """Sets config's `key` (e.g. "train.lr") from `text` as the command line would give it: read as
    a Python literal where the option is not a string ("1e-4", "(240, 320)", "None"), kept as
    text where it is; data.resize also takes a percentage ("80%"). KeyError for a key the config
    lacks, ValueError for a value the option cannot take."""
    *path, name = key.split(".")
    section = functools.reduce(lambda node, part: node[part], path, config)
    if not isinstance(section, ml_collections.ConfigDict) or name not in section:
        raise KeyError(f"no config field {key}")
    if key in ("mode", "seed") or key.startswith("sweep."):
        raise ValueError(f"{key} cannot be an axis (the sweep sets it)")
    if key == "data.resize" and text.endswith("%"):
        vg_folder.resize_percentage(text)  # a ValueError if it is not one
        with section.ignore_type():
            section[name] = text
        return
    kind = _field_type(section, name, key)
    value = text if kind is str else _literal(text)
    if isinstance(value, list):
        value = tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        section[name] = value
    except TypeError as error:
        raise ValueError(f"{key}={text}: not a value of this option ({getattr(kind, '__name__', kind)})") from error


def _field_type(section: ml_collections.ConfigDict, name: str, key: str) -> type | None:
    """The option's type; for one holding None (a copied config's placeholders lose their
    type), the type of vgjax's default placeholder, if any."""
    if section[name] is not None:
        return section.get_ref(name).get_type()
    from vgjax.configs import common

    *path, name = key.split(".")
    defaults = functools.reduce(lambda node, part: node.get(part, {}), path, common.get_config())
    if isinstance(defaults, ml_collections.ConfigDict) and name in defaults and defaults[name] is None:
        return defaults.get_ref(name).get_type()
    return None


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # e.g. a word for an option that is not a string: the type check names it


def _labels(axes: list[Axis]) -> dict[str, str]:
    """Each axis key's label in run names: its last part, unless two axes share it."""
    last = [axis.key.rsplit(".", 1)[-1] for axis in axes]
    return {axis.key: name if last.count(name) == 1 else axis.key for axis, name in zip(axes, last)}


def _name(values: tuple[tuple[str, str], ...], labels: dict[str, str]) -> str:
    """A folder name for (key, value) pairs: "resize=80%_lr=0.0001"; tuples as 240x320."""
    parts = []
    for key, text in values:
        value = re.sub(r"\s*,\s*", "x", text.strip().strip("()[]").strip())
        parts.append(f"{labels[key]}={_NAME_CHARACTERS.sub('-', value).strip('-') or 'empty'}")
    return "_".join(parts)


@dataclasses.dataclass(frozen=True)
class Point:
    """One combination of the evaluation axes' values (possibly none: "base")."""

    name: str
    values: tuple[tuple[str, str], ...]

    def result_path(self, run_folder: Path) -> Path:
        return run_folder / RESULTS_FOLDER / f"{self.name}.json"


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: a combination of the training axes' values and a seed, and the evaluation
    points it is evaluated at."""

    name: str
    folder: Path
    seed: int
    values: tuple[tuple[str, str], ...]
    points: tuple[Point, ...]

    def config(self, base: ml_collections.ConfigDict, point: Point | None = None) -> ml_collections.ConfigDict:
        """`base` with this run's values and seed (and a point's evaluation values), mode sweep.mode."""
        config = base.copy_and_resolve_references()
        config.seed = self.seed
        config.mode = base.sweep.mode
        for key, text in self.values + (point.values if point else ()):
            set_value(config, key, text)
        return config

    def trained(self, mode: str) -> bool:
        return mode == "eval" or (self.folder / "results.json").is_file()

    def done(self, mode: str) -> bool:
        return (self.trained(mode) and all(point.result_path(self.folder).is_file() for point in self.points)
                and (self.folder / RESULTS_FOLDER / RUN_STATS).is_file())


def combinations(axes: list[Axis], zipped: bool) -> list[tuple[tuple[str, str], ...]]:
    """Every combination of the axes' values as ((key, value), ...), in axis order; with
    `zipped`, the i-th values together (the axes must have as many values)."""
    if not axes:
        return [()]
    if zipped:
        lengths = {len(axis.values) for axis in axes}
        if len(lengths) > 1:
            raise ValueError("sweep.zip: the axes have different numbers of values ("
                             + ", ".join(f"{axis.key}: {len(axis.values)}" for axis in axes) + ")")
        rows = zip(*(axis.values for axis in axes))
    else:
        rows = itertools.product(*(axis.values for axis in axes))
    return [tuple((axis.key, value) for axis, value in zip(axes, row)) for row in rows]


def plan(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[Run]:
    """The sweep's runs, in order (ValueError for a bad sweep section, naming it)."""
    if config.sweep.mode not in MODES:
        raise ValueError(f"sweep.mode={config.sweep.mode!r}: choose one of {', '.join(MODES)}")
    axes = parse_axes(config.sweep.axes)
    labels, evaluation_keys = _labels(axes), {axis.key for axis in axes if axis.evaluation_only}
    grouped: dict[tuple, list[tuple]] = {}  # training values -> their evaluation values
    for combination in combinations(axes, config.sweep.zip):
        training = tuple((key, value) for key, value in combination if key not in evaluation_keys)
        evaluation = tuple((key, value) for key, value in combination if key in evaluation_keys)
        grouped.setdefault(training, [])
        if evaluation not in grouped[training]:
            grouped[training].append(evaluation)
    runs, names = [], set()
    for training, evaluations in grouped.items():
        points = tuple(Point(_name(values, labels) or "base", values) for values in evaluations)
        for offset in range(config.sweep.seeds):
            seed = config.seed + offset
            name = "_".join(filter(None, (_name(training, labels), f"seed{seed}")))
            if name in names or len({point.name for point in points}) < len(points):
                raise ValueError(f"sweep.axes: two values give the same folder name {name!r}; write them apart")
            names.add(name)
            runs.append(Run(name, Path(workdir) / RUNS_FOLDER / name, seed, training, points))
    return runs


def check(config: ml_collections.ConfigDict) -> list[str]:
    """Problems of the sweep section, one line each; then each run's config, for sweep.mode, by
    vgjax.configs.validate (the first run showing a problem names it)."""
    from vgjax.configs import validate  # validate imports this module

    try:
        runs = plan(config, "sweep")
        configs = [(run.name, point.name, run.config(config, point)) for run in runs for point in run.points]
    except (KeyError, ValueError) as error:
        return [str(error.args[0]) if isinstance(error, KeyError) else str(error)]
    for run_name, point_name, run_config in configs:
        try:
            validate.check(run_config, config.sweep.mode, "sweep")
        except validate.ConfigError as error:
            return [f"run {run_name} ({point_name}): {line}" for line in error.problems]
    return []


# ---------------------------------------------------------------------------------------------
# Running.


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Runs what is missing of the sweep in `workdir`, then writes its table (vgjax.sweep_table);
    returns the table as written to results.json. SweepError when a run failed."""
    from vgjax import sweep_table

    workdir = Path(workdir)
    runs = plan(config, workdir)
    _check_existing_runs(config, runs)
    workdir.mkdir(parents=True, exist_ok=True)
    _write_plan(config, workdir, runs)
    mode, pending = config.sweep.mode, [run for run in runs if not run.done(config.sweep.mode)]
    points = len(runs[0].points) if runs else 0
    print(f"Sweep in {workdir}: {len(runs)} runs ({len(runs) - len(pending)} done), "
          f"{points} evaluation{'s' if points != 1 else ''} each, mode {mode}", flush=True)
    slots = _device_groups(config.sweep.parallel_runs)
    if len(slots) > 1 and pending and config.data.synthetic:  # rendered once, not by runs side by side
        _in_fresh_process(_prepare_dataset, pending[0].config(config))
    failed = _launch(config, pending, slots)
    if failed:
        raise SweepError("runs failed: " + "; ".join(f"{run.name} (see {run.folder / 'log.txt'})" for run in failed)
                         + "; relaunch the same command to retry them: finished runs are kept")
    return sweep_table.write(config, workdir, runs)


def _write_plan(config: ml_collections.ConfigDict, workdir: Path, runs: list[Run]) -> None:
    plan_json = {"mode": config.sweep.mode, "seeds": config.sweep.seeds, "zip": config.sweep.zip,
                 "axes": {axis.key: list(axis.values) for axis in parse_axes(config.sweep.axes)},
                 "runs": [{"name": run.name, "folder": str(run.folder), "seed": run.seed, "values": dict(run.values),
                           "points": {point.name: dict(point.values) for point in run.points}} for run in runs]}
    files.write_json(workdir / "sweep.json", plan_json)


def _check_existing_runs(config: ml_collections.ConfigDict, runs: list[Run]) -> None:
    """A run folder already there must hold a run of the same config (the sweep section, the mode
    and a data.resize percentage, resolved by the run, aside): SweepError otherwise."""
    from vgjax import experiment
    from vgjax.train import checkpoint

    for run in runs:
        saved_path = run.folder / checkpoint.RUN_CONFIG
        if not saved_path.is_file():
            continue
        planned = experiment.flatten(json.loads(run.config(config).to_json_best_effort()))
        saved = experiment.flatten(json.loads(saved_path.read_text()))
        skip = {"mode"} | ({"data.resize"} if vg_folder.resize_percentage(planned["data.resize"]) else set())
        differences = [f"{key}={planned.get(key)!r} (the run's: {saved.get(key)!r})"
                       for key in sorted(set(planned) | set(saved))
                       if key not in skip and not key.startswith("sweep.") and planned.get(key) != saved.get(key)]
        if differences:
            raise SweepError(f"{run.folder} holds a run of another config: {', '.join(differences[:5])}"
                             + (", ..." if len(differences) > 5 else "") + "; use a new sweep workdir")


def _device_groups(parallel_runs: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each of the parallel slots; [None] (one slot, the process's own
    devices) for one run at a time. SweepError unless the GPUs split evenly."""
    if parallel_runs == 1:
        return [None]
    platform, count = _probe_devices()
    if platform != "gpu":
        raise SweepError(f"sweep.parallel_runs={parallel_runs}: runs go to different devices only on GPUs, and "
                         f"JAX's devices here are {count} x {platform}; set sweep.parallel_runs=1")
    if count % parallel_runs:
        raise SweepError(f"sweep.parallel_runs={parallel_runs} does not divide the {count} GPUs")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(count)]
    share = count // parallel_runs
    return [",".join(ids[i * share:(i + 1) * share]) for i in range(parallel_runs)]


def _probe_devices() -> tuple[str, int]:
    """(platform, device count) as a fresh process sees them."""
    return _in_fresh_process(_local_devices)


def _in_fresh_process(function, *args):
    """function(*args) in a spawned process: the sweep's own process never starts JAX's backend,
    which would hold GPU memory the runs need."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def _local_devices() -> tuple[str, int]:
    import jax

    return jax.default_backend(), jax.local_device_count()


def _prepare_dataset(config: ml_collections.ConfigDict) -> None:
    from vgjax import experiment

    experiment.prepare_dataset(config, experiment.mode_splits(config, config.sweep.mode))


def _launch(config: ml_collections.ConfigDict, pending: list[Run], slots: list[str | None]) -> list[Run]:
    """Runs each pending run in a spawned process, len(slots) at a time; returns the failed ones
    (in the plan's order)."""
    context = multiprocessing.get_context("spawn")
    cache, quiet = _compilation_cache_dir(), len(slots) > 1
    queue, active, failed = list(pending), {}, []  # active: process -> (slot, run)
    while queue or active:
        while queue and len(active) < len(slots):
            slot = min(set(range(len(slots))) - {slot for slot, _ in active.values()})
            run = queue.pop(0)
            with _environment(CUDA_VISIBLE_DEVICES=slots[slot]):
                process = context.Process(target=_run_in_process, name=f"sweep {run.name}",
                                          args=(config, run, os.getpid(), cache, quiet))
                process.start()
            active[process] = slot, run
            where = f" on GPUs {slots[slot]}" if slots[slot] is not None else ""
            print(f"[sweep] run {run.name} started{where}" + (f"; its output: {run.folder / 'log.txt'}" if quiet else ""),
                  flush=True)
        process = _wait_any(list(active))
        _, run = active.pop(process)
        if process.exitcode == 0:
            print(f"[sweep] run {run.name} finished", flush=True)
        else:
            failed.append(run)
            print(f"[sweep] run {run.name} failed (exit status {process.exitcode}); see {run.folder / 'log.txt'}",
                  file=sys.stderr, flush=True)
    return [run for run in pending if run in failed]


def _wait_any(processes: list) -> multiprocessing.Process:
    from multiprocessing.connection import wait

    ready = wait([process.sentinel for process in processes])
    done = next(process for process in processes if process.sentinel in ready)
    done.join()  # reaps it: exitcode is set
    return done


@contextlib.contextmanager
def _environment(**values: str | None):
    """Sets (None: leaves) environment variables while a child process is started."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update({name: value for name, value in values.items() if value is not None})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _compilation_cache_dir() -> str | None:
    """The persistent compilation cache this process has on (launch.py's), for the runs."""
    if "jax" not in sys.modules:
        return None
    return sys.modules["jax"].config.jax_compilation_cache_dir or None


# ---------------------------------------------------------------------------------------------
# One run, in its own process.


def _run_in_process(config: ml_collections.ConfigDict, run: Run, parent: int, cache: str | None, quiet: bool) -> None:
    """Process target: dies with the sweep, locks the run's folder, trains (unless done) and
    evaluates each point not yet evaluated; exit status 1 on an error (in its log.txt)."""
    _die_with(parent)
    from vgjax import logs, runtime, xla_flags

    xla_flags.apply_backbone_defaults(run.config(config).model.backbone)
    if quiet:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    if cache:
        runtime.enable_compilation_cache(cache)
    run.folder.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(run.folder), logs.RunLog(run.folder):
            run_one(config, run)
    except BaseException:  # logged to the run's log.txt by RunLog, and to the console
        if not quiet:
            import traceback

            traceback.print_exc()
        sys.exit(1)


def _die_with(parent: int) -> None:
    """The kernel kills this process when the sweep's process dies (Linux), so that a killed
    sweep leaves no run training on; an orphan at once exits."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


@contextlib.contextmanager
def _locked(folder: Path):
    """Holds an exclusive lock on folder/.sweep-lock (released by the kernel if killed)."""
    with open(folder / _LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"another process is running {folder} (it holds {folder / _LOCK_FILE})") from None
        yield


def run_one(config: ml_collections.ConfigDict, run: Run) -> None:
    """Trains `run` (resuming; unless it is done or sweep.mode is eval), then evaluates it at each
    of its points not yet evaluated; writes its wall time and peak memory."""
    from vgjax import experiment

    mode, start = config.sweep.mode, time.perf_counter()
    run_config = experiment.resolve_resize(run.config(config), mode, run.folder)
    if mode == "eval":  # what _check_existing_runs compares (training writes its own)
        files.write_json(run.folder / "config.json", json.loads(run_config.to_json_best_effort()))
    elif not run.trained(mode):
        experiment.run(run_config, run.folder, mode)
    todo = [point for point in run.points if not point.result_path(run.folder).is_file()]
    for point in list(todo):
        tested = _final_test(run_config, run, point)
        if tested is not None:
            files.write_json(point.result_path(run.folder), _point_record(run, point, tested, embed_calls=0))
            todo.remove(point)
    if todo:
        evaluate_points(run, todo, _network(run_config, run, mode))
    _write_stats(run.folder, time.perf_counter() - start)


def _final_test(run_config: ml_collections.ConfigDict, run: Run, point: Point) -> dict | None:
    """{dataset: results} of the run's own final test (results.json) when `point` asks for
    exactly that test: no evaluation values, a triplet or GSV-Cities run (tested on the test
    split of data.dataset_name), eval.split test and no other dataset; else None."""
    from vgjax import eval_run

    if (point.values or run_config.sweep.mode not in ("train", "train_gsv") or run_config.eval.split != "test"
            or eval_run.dataset_names(run_config) != (run_config.data.dataset_name,)):
        return None
    return {run_config.data.dataset_name: json.loads((run.folder / "results.json").read_text())["tests"]}


def _point_record(run: Run, point: Point, results: dict, *, embed_calls: int) -> dict:
    return {"run": run.name, "seed": run.seed, "point": point.name, "values": dict(run.values + point.values),
            "results": results, "embed_calls": embed_calls}


def _network(run_config: ml_collections.ConfigDict, run: Run, mode: str):
    """(config with the network's architecture, embed function): the run's best checkpoint; for
    sweep.mode eval, the configured network (model.resume may name a vgjax training run)."""
    from vgjax import experiment
    from vgjax.train import checkpoint

    if mode != "eval":
        return experiment.run_embed_fn(run_config, run.folder)
    trained = checkpoint.run_folder(run_config.model.resume) if run_config.model.resume else None
    if trained is not None:
        return experiment.run_embed_fn(run_config, trained)
    return run_config, experiment.build_embed_fn(run_config)


class CountingEmbed:
    """An embed function that counts its calls (`calls`: batches given to the network)."""

    def __init__(self, embed_fn):
        self.embed_fn, self.calls = embed_fn, 0

    def __call__(self, images):
        self.calls += 1
        return self.embed_fn(images)

    def __getattr__(self, name):
        return getattr(self.embed_fn, name)


def evaluate_points(run: Run, points: list[Point], network) -> None:
    """Evaluates the network (from `_network`: the run's resolved config and embed function) at
    each point, on each dataset the point's config names, every descriptor computed once (a
    DescriptorStore); writes each point's JSON with the number of batches it embedded (0 for a
    point served by descriptors computed before)."""
    from vgjax import eval_run, experiment

    network_config, embed_fn = network
    counting, store = CountingEmbed(embed_fn), eval_run.DescriptorStore()
    for point in points:
        point_config = network_config.copy_and_resolve_references()
        for key, text in point.values:
            set_value(point_config, key, text)
        print(f"Evaluating {run.name} at {point.name}", flush=True)
        before, results = counting.calls, {}
        pca = eval_run.fit_pca(point_config, counting, store=store)
        for dataset in eval_run.dataset_names(point_config):
            split = experiment.eval_split(point_config, dataset)
            results[dataset] = eval_run.evaluate_split(point_config, counting, split,
                                                       run.folder / RESULTS_FOLDER / point.name / dataset,
                                                       pca=pca, store=store)
        files.write_json(point.result_path(run.folder),
                    _point_record(run, point, results, embed_calls=counting.calls - before))


def _write_stats(folder: Path, seconds: float) -> None:
    """folder/sweep/run.json: this launch's wall time, the process's peak host memory and, where
    JAX reports it (GPU, TPU), the first device's peak memory."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    record = {"wall_seconds": seconds,
              "host_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "device_peak_bytes": int(peak) if peak is not None else None}
    files.write_json(folder / RESULTS_FOLDER / RUN_STATS, record)

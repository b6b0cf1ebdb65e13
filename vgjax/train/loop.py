"""The training engine shared by every method: set-up, resume, the asynchronous step loop,
validation by a named metric, patience, checkpoints and the final test.

A method (vgjax.train.triplet, vgjax.train.cosplace) is a `Method` subclass that says only what
differs: its data, its rounds (a mining round, a CosPlace group), its batches, its jitted step
and its extra checkpointed state. The engine runs, for epoch e and round r of the epoch:

    method.prepare_round(progress)            # e.g. mine (only when the round starts)
    for batch in method.batches(progress):    # host numpy arrays, from progress.batch on
        state, head, metrics = step(state, head, device batch)   # queued, not awaited

The host reads nothing back from the device inside the step loop except every
`train.log_every_steps` steps, at the end of a round, and right before each checkpoint save;
each step reports whether its loss and updated parameters are finite, and a non-finite one
stops the run before anything is saved, so the last good checkpoint stays intact. The next
batch is put on the device while the current step runs; the state buffers are donated.

Checkpoints (vgjax.train.checkpoint) are written every `train.checkpoint_every_steps` steps
inside a round, at the end of every round but the epoch's last, and after each validation
(marked best when `train.best_metric` improved), in folders named by training step. Relaunching
the same command resumes from the newest good checkpoint: bit for bit on CPU, because every
step's randomness is a function of (seed, step) and every batch a function of the position.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import re
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vgjax import embed, eval_run, evaluate, profiling, sharding
from vgjax.data.vg_folder import Split
from vgjax.metrics import MetricWriter
from vgjax.models import geoloc_net, netvlad_init, pretrained
from vgjax.train import checkpoint, runs
from vgjax.train import state as state_lib
from vgjax.train.state import Head, TrainState, create_state

# Steps queued on the device at most: enough to keep it busy while the host prepares the next
# ones, and a bound on what waits in host memory. (XLA:CPU's cross-device all-reduce also
# deadlocks with fake CPU devices once some 20-50 steps are queued; see jax_stack.md.)
MAX_STEPS_IN_FLIGHT = 4


@dataclasses.dataclass
class Progress:
    """Where the run is; stored as JSON in every checkpoint."""

    epoch: int = 0
    round: int = 0  # round within the epoch (a mining round; CosPlace: one per epoch)
    batch: int = 0  # next batch of the round; 0 = the round is not prepared yet
    step: int = 0  # training steps done (= state.step)
    best: float = -1.0  # best validation value of train.best_metric
    best_epoch: int = -1
    not_improved: int = 0
    epoch_loss_sum: float = 0.0  # the epoch's losses so far (a resumed epoch's mean is exact)
    epoch_loss_count: int = 0
    method: dict = dataclasses.field(default_factory=dict)  # the method's own JSON state
    history: list = dataclasses.field(default_factory=list)  # per epoch: mean loss, val recalls
    train_images_per_second: list = dataclasses.field(default_factory=list)  # one per round


class Method:
    """What a training method supplies to the engine. Subclasses set `name` and override the
    methods below; `setup` is called once the network and its optimizer exist."""

    name = ""
    train_all_layers = False  # True: no frozen layers (else the benchmark's freezing)

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    # Data and description.
    val_split: Split

    def test_split(self) -> Split:
        """The test split of the final test (tested as config.eval says, vgjax.eval_run)."""
        raise NotImplementedError

    def describe(self) -> list[str]:
        """Lines for the start banner: the data the method trains and validates on."""
        raise NotImplementedError

    def netvlad_init_paths(self) -> list[str]:
        """Images whose local features initialise NetVLAD/CRN."""
        raise NotImplementedError

    # Rounds, batches and the step.
    def setup(self, run: Run) -> None:
        raise NotImplementedError

    def rounds_per_epoch(self) -> int:
        return 1

    def prepare_round(self, run: Run, progress: Progress) -> None:
        """Called when a round starts (progress.batch == 0), e.g. to mine."""

    def batches_per_round(self) -> int:
        raise NotImplementedError

    def images_per_batch(self) -> int:
        raise NotImplementedError

    def steps_per_epoch(self) -> int:
        """Training steps in an epoch, known before any round starts (it places the learning-rate
        milestones and an epochs-long warm-up, state.schedule_in_epochs)."""
        return self.batches_per_round() * self.rounds_per_epoch()

    def batches(self, progress: Progress) -> Iterator[dict]:
        """This process's share of the round's batches from progress.batch on (numpy)."""
        raise NotImplementedError

    step_fn: Any  # jitted (state, head, batch) -> (state, head, metrics), state and head donated

    def head(self, progress: Progress) -> Head | None:
        """The head the round's steps train (on the device), or None."""
        return None

    def keep_head(self, head: Head | None, progress: Progress) -> None:
        """Takes the trained head back (before a save and at the end of a round)."""

    # Checkpointed state beside the TrainState.
    def checkpoint_items(self) -> dict:
        return {}

    def restore_items(self, items: dict) -> None:
        pass

    def results(self) -> dict:
        """Extra entries for results.json."""
        return {}


def best_metric_n(config: ml_collections.ConfigDict) -> int:
    """N of train.best_metric ("R@N"); an error before any work when it is not one of
    eval.recall_values."""
    name, ns = config.train.best_metric, tuple(config.eval.recall_values)
    match = re.fullmatch(r"R@(\d+)", str(name))
    if not match or int(match.group(1)) not in ns:
        raise ValueError(f"train.best_metric={name!r} is not one of the validation metrics "
                         f"{', '.join(f'R@{n}' for n in ns)} (eval.recall_values)")
    return int(match.group(1))


class Run:
    """One training run: the method, network, state, checkpoints and writers."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path, method: Method):
        self.config, self.workdir, self.method = config, Path(workdir), method
        self.image_size = tuple(config.data.resize)
        self.mesh = sharding.make_mesh()
        self.checkpoints = checkpoint.Checkpoints(self.workdir / checkpoint.CHECKPOINT_FOLDER,
                                                  keep_last=config.train.keep_checkpoints)
        resuming = self.checkpoints.latest_step() is not None
        source_run = None if resuming or not config.model.resume else checkpoint.run_folder(config.model.resume)
        if source_run is not None:  # model.resume is another vgjax run (e.g. NetVLAD for CRN)
            _, self.model, variables = runs.network_from_run(config.model, source_run, self.image_size,
                                                             keep_defaults=False, seed=config.seed)
        else:
            self.model, variables = pretrained.build_and_load(config.model, self.image_size, config.seed,
                                                              weights_from_checkpoint=resuming)
        if config.model.aggregation in ("netvlad", "crn") and not config.model.resume and not resuming:
            variables = self._initialize_netvlad(variables)
        steps_per_epoch = method.steps_per_epoch() if state_lib.schedule_in_epochs(config.train) else 1
        self.lr = state_lib.learning_rate(config.train, config.train.lr, steps_per_epoch)  # what is logged
        state, self.tx = create_state(config, variables, config.seed, train_all_layers=method.train_all_layers,
                                      steps_per_epoch=steps_per_epoch)
        self.state: TrainState = sharding.replicate(state, self.mesh)
        self.embed = embed.make_sharded_embed_fn(self.model, self.mesh)
        self.embed_fn = self._make_embed_fn()
        self.metrics = MetricWriter(self.workdir, enabled=sharding.is_main_process())
        self.tracer = profiling.StepTracer(self.workdir / "profile", config.train.profile_steps)
        self._compiled: dict = {}
        method.setup(self)

    def _initialize_netvlad(self, variables: dict) -> dict:
        features_fn = embed.make_features_fn(self.model, variables)
        return netvlad_init.initialize_netvlad(
            features_fn, variables, self.method.netvlad_init_paths(), self.image_size,
            self.config.model.netvlad_clusters, batch_size=self.config.data.infer_batch_size,
            seed=self.config.seed)

    def _make_embed_fn(self) -> embed.EmbedFn:
        """uint8 images -> descriptors with the current params (joining every process, as
        self.embed does)."""
        def embed_fn(images: np.ndarray) -> np.ndarray:
            return self.embed(self.state.variables(), images)

        embed_fn.process_count = self.embed.process_count
        return embed_fn

    def learning_rate(self, step: int) -> float:
        """train.lr at training step `step` (0 = the first), on its schedule (state.learning_rate)."""
        return float(self.lr(step)) if callable(self.lr) else float(self.lr)

    def validate(self, split: Split) -> evaluate.EvaluationResult:
        """Recalls on `split` with the current params: hard_resize, flat index, no PCA (as the
        benchmark validates)."""
        config = self.config
        return evaluate.evaluate(self.embed_fn, split, resize=eval_run.eval_image_size(config),
                                 recall_values=tuple(config.eval.recall_values),
                                 batch_size=config.data.infer_batch_size,
                                 majority_weight=config.eval.majority_weight,
                                 num_threads=config.data.num_workers)

    def compiled_step(self, head, batch):
        """The method's step compiled for these shapes; says how long compiling took."""
        key = str(jax.tree.map(lambda x: (x.shape, x.dtype), (head, batch)))
        if key not in self._compiled:
            print("Compiling the training step...", flush=True)
            start = time.perf_counter()
            self._compiled[key] = self.method.step_fn.lower(self.state, head, batch).compile()
            print(f"Compiled the training step in {time.perf_counter() - start:.1f} s", flush=True)
        return self._compiled[key]

    # Checkpoints.
    def _items(self) -> dict:
        return {"train": self.state, **self.method.checkpoint_items()}

    def save(self, progress: Progress, *, best: bool = False) -> None:
        self.checkpoints.save(progress.step, self._items(), dataclasses.asdict(progress), best=best)

    def restore(self, which: str = "last") -> Progress | None:
        restored = self.checkpoints.restore(self._items(), which)
        if restored is None:
            return None
        items, meta, _ = restored
        self.state = items.pop("train")
        self.method.restore_items(items)
        meta.pop("best_step", None)
        return Progress(**meta)

    def close(self) -> None:
        self.tracer.stop()
        self.checkpoints.close()
        self.metrics.close()


class StepMetrics:
    """Device metrics of the steps since the last read; read (one transfer) only when asked."""

    def __init__(self, run: Run, where: str):
        self.run, self.where = run, where
        self.pending: list[dict] = []

    def add(self, metrics: dict) -> None:
        self.pending.append(metrics)

    def read(self, progress: Progress) -> list[dict[str, float]]:
        """The pending steps' metrics (their losses also added to the epoch's in `progress`);
        raises FloatingPointError naming the first step whose loss or updated parameters are
        not finite."""
        values = jax.device_get(self.pending)
        first = progress.step - len(values)
        for i, value in enumerate(values):
            if not bool(value["finite"]):
                raise FloatingPointError(
                    f"non-finite loss ({float(value['loss'])}) or parameters at step {first + i + 1} "
                    f"({self.where}); stopped without saving: the last good checkpoint in "
                    f"{self.run.workdir / checkpoint.CHECKPOINT_FOLDER} is kept")
        self.pending = []
        records = [{name: float(v) for name, v in value.items() if name != "finite"} for value in values]
        progress.epoch_loss_sum += sum(record["loss"] for record in records)
        progress.epoch_loss_count += len(records)
        return records


def prefetch_to_device(batches: Iterator[dict], mesh, size: int = 2) -> Iterator[dict]:
    """Yields the batches as global device arrays, `size` batches put on the device ahead, so
    the next batch is transferring while the current step runs."""
    queue = collections.deque()
    for batch in batches:
        queue.append(jax.tree.map(lambda x: sharding.shard_batch(x, mesh), batch))
        if len(queue) == size:
            yield queue.popleft()
    yield from queue


def _train_round(run: Run, progress: Progress) -> None:
    """Runs the round's steps from progress.batch on, logging and checkpointing as configured."""
    config, method = run.config, run.method
    num_batches, every = method.batches_per_round(), config.train.checkpoint_every_steps
    log_every, rounds = config.train.log_every_steps, method.rounds_per_epoch()
    where = f"epoch {progress.epoch + 1}/{config.train.epochs_num} round {progress.round + 1}/{rounds}"
    metrics = StepMetrics(run, where)
    head = method.head(progress)
    batches = prefetch_to_device(method.batches(progress), run.mesh)
    first = next(batches, None)
    if first is None:
        return
    step_fn = run.compiled_step(head, first)  # every batch of a round has the same shapes
    bar = tqdm(total=num_batches, initial=progress.batch, unit="step", desc=where)
    steps, start, in_flight = 0, time.perf_counter(), collections.deque()
    for batch in itertools.chain([first], batches):
        run.tracer.before_step()
        run.state, head, step_metrics = step_fn(run.state, head, batch)
        run.tracer.after_step(step_metrics)
        metrics.add(step_metrics)
        in_flight.append(step_metrics["loss"])
        if len(in_flight) > MAX_STEPS_IN_FLIGHT:
            in_flight.popleft().block_until_ready()
        progress.batch, progress.step, steps = progress.batch + 1, progress.step + 1, steps + 1
        bar.update(1)
        if progress.batch % log_every == 0:
            _log_losses(run, progress, metrics.read(progress), bar)
        if every and progress.batch % every == 0 and progress.batch < num_batches:
            _log_losses(run, progress, metrics.read(progress), bar)
            method.keep_head(head, progress)
            run.save(progress)
    _log_losses(run, progress, metrics.read(progress), bar)
    bar.close()
    method.keep_head(head, progress)
    rate = steps * method.images_per_batch() / (time.perf_counter() - start)
    progress.train_images_per_second.append(rate)


def _log_losses(run: Run, progress: Progress, records: list[dict[str, float]], bar) -> None:
    """The mean of each metric of the steps read (the loss, and any the method's loss reports),
    and the learning rate of the last one."""
    if not records:
        return
    means = {name: float(np.mean([record[name] for record in records])) for name in records[0]}
    bar.set_postfix({name: f"{value:.4f}" for name, value in means.items()})
    run.metrics.write(progress.step, {**means, "lr": run.learning_rate(progress.step - 1),
                                      "epoch": progress.epoch, "round": progress.round}, prefix="train/")


def _validate(run: Run, progress: Progress, seconds: float) -> bool:
    """Validates, saves (best when improved), updates patience; returns True to stop early."""
    config, n = run.config, best_metric_n(run.config)
    result = run.validate(run.method.val_split)
    value = result.recalls[n]
    improved = value > progress.best
    if improved:
        progress.best, progress.best_epoch, progress.not_improved = value, progress.epoch, 0
    else:
        progress.not_improved += 1
    count = progress.epoch_loss_count
    record = {"epoch": progress.epoch, "loss": progress.epoch_loss_sum / count if count else None,
              "val": {f"R@{k}": r for k, r in result.recalls.items()}}
    progress.history.append(record)
    run.metrics.write(progress.step, {"val": record["val"], "epoch": progress.epoch})
    progress.epoch, progress.round, progress.batch = progress.epoch + 1, 0, 0
    progress.epoch_loss_sum, progress.epoch_loss_count = 0.0, 0
    run.save(progress, best=improved)
    patience = config.train.patience
    loss = "n/a" if record["loss"] is None else f"{record['loss']:.4f}"
    print(f"Epoch {progress.epoch}/{config.train.epochs_num} done in {seconds:.0f} s: mean loss {loss}; "
          f"val {result}; {'improved' if improved else 'not improved'}, best R@{n} {progress.best:.1f} "
          f"(epoch {progress.best_epoch + 1})"
          + (f", {progress.not_improved}/{patience} without improvement" if patience else ""), flush=True)
    return bool(patience) and progress.not_improved >= patience


def _finished(config: ml_collections.ConfigDict, progress: Progress) -> bool:
    patience = config.train.patience
    return progress.epoch >= config.train.epochs_num or (bool(patience) and progress.not_improved >= patience)


def _resume_message(config: ml_collections.ConfigDict, progress: Progress, rounds: int) -> str:
    n = best_metric_n(config)
    best = f"best R@{n} {progress.best:.1f}" if progress.best_epoch >= 0 else "not validated yet"
    if _finished(config, progress):
        return f"Training finished at epoch {progress.epoch}; testing the best checkpoint ({best})"
    return (f"Resuming from epoch {progress.epoch + 1}, round {progress.round + 1}/{rounds}, batch "
            f"{progress.batch} (step {progress.step}), {best}")


def _banner(run: Run, config_diff: list[str]) -> str:
    config, devices = run.config, jax.devices()
    variables = run.state.variables()
    lines = [
        f"vgjax training: {run.method.name}, workdir {run.workdir}",
        f"devices: {len(devices)} x {devices[0].platform} ({devices[0].device_kind}), "
        f"mesh {dict(run.mesh.shape)}, {jax.process_count()} process(es)",
        *run.method.describe(),
        f"network: {config.model.backbone} + {config.model.aggregation}, "
        f"{profiling.count_params(variables['params']) / 1e6:.2f} M params "
        f"({profiling.count_params(run.state.trainable) / 1e6:.2f} M trainable), "
        f"{geoloc_net.descriptor_dim(config.model)}-D descriptors, {run.image_size[0]}x{run.image_size[1]}, "
        f"{config.model.dtype}",
        "config (differences from the defaults): " + (", ".join(config_diff) or "none"),
        f"outputs: {run.workdir}/{{{checkpoint.CHECKPOINT_FOLDER},metrics.jsonl,tensorboard,log.txt,results.json}}",
    ]
    return "\n".join(lines)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path, method: Method, *,
                       config_diff: list[str] = ()) -> dict:
    """Trains with `method` (resuming from workdir's checkpoints), validating every epoch, then
    tests the best checkpoint; returns what goes into results.json. The caller has checked
    `config` (vgjax.configs.validate, as experiment.run does)."""
    start = time.perf_counter()
    run = Run(config, workdir, method)
    try:
        print(_banner(run, list(config_diff)), flush=True)
        progress = run.restore()
        if progress is None:
            progress = Progress()
        else:
            print(_resume_message(config, progress, method.rounds_per_epoch()), flush=True)
        _train(run, progress)
        results = _test_best(run, progress)
        print(f"Total time: {(time.perf_counter() - start) / 60:.1f} min", flush=True)
        return results
    finally:
        run.close()


def _train(run: Run, progress: Progress) -> None:
    config, method = run.config, run.method
    while not _finished(config, progress):
        start = time.perf_counter()
        while progress.round < method.rounds_per_epoch():
            if progress.batch == 0:
                method.prepare_round(run, progress)
            _train_round(run, progress)
            progress.round, progress.batch = progress.round + 1, 0
            if progress.round < method.rounds_per_epoch():  # the epoch's last: validation saves
                run.save(progress)
        if _validate(run, progress, time.perf_counter() - start):
            print(f"Stopping early: {config.train.best_metric} did not improve for "
                  f"{config.train.patience} epochs", flush=True)


def _pictures(folder: Path) -> dict[str, np.ndarray]:
    """The prediction pictures, maps and plots under `folder` as {"test/<name>": uint8 HxWx3}."""
    return {f"test/{path.relative_to(folder).with_suffix('')}": np.asarray(Image.open(path).convert("RGB"))
            for path in sorted(folder.rglob("*")) if path.suffix in (".jpg", ".png")}


def _test_best(run: Run, progress: Progress) -> dict:
    """Restores the best checkpoint and tests it on the method's test split as config.eval says
    (vgjax.eval_run, the code of --mode eval: every test method, PCA, index; pictures and
    descriptors under the workdir); returns the results, the first test method's on top."""
    config = run.config
    run.restore("best")
    split = run.method.test_split()
    tests = eval_run.evaluate_split(config, run.embed_fn, split, run.workdir,
                                    pca=eval_run.fit_pca(config, run.embed_fn), title="trained")
    (test_method, first), *others = tests.items()
    run.metrics.write(progress.step, {"test": first["recalls"],
                                      **{f"test_{method}": entry["recalls"] for method, entry in others}})
    if config.eval.num_preds_to_save > 0:
        run.metrics.write_images(progress.step, _pictures(run.workdir / "predictions"))
    images = np.zeros((1, *run.image_size, 3), np.uint8)
    rates = progress.train_images_per_second
    return {"method": run.method.name, "val_history": progress.history, "best_metric": config.train.best_metric,
            "best_val_recall": progress.best, "best_epoch": progress.best_epoch,
            "test": first["recalls"], "test_method": test_method, "descriptor_dim": first["descriptor_dim"],
            "steps": progress.step,
            "params_total": profiling.count_params(run.state.params),
            "params_trainable": profiling.count_params(run.state.trainable),
            "gflops_per_image": profiling.xla_flops(run.embed.jitted, run.state.variables(), images) / 1e9,
            "train_images_per_second": float(np.median(rates)) if rates else None,
            "extraction_images_per_second": first["timings"]["extraction_images_per_second"],
            "test_timings": first["timings"], "tests": tests, **run.method.results()}

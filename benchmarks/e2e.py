"""The whole training job, end to end, timed by phase: vgjax's launch.py, and with --reference
the PyTorch benchmark's own train.py on the same data in the same run.

  python benchmarks/e2e.py                            # vgjax alone (about 3-4 minutes on 2 cores)
  python benchmarks/e2e.py --reference ~/deep-visual-geo-localization-benchmark
  python benchmarks/e2e.py --quick [--reference DIR]  # a few steps: checks that it works (< 3 minutes)

The job (issue 14): ResNet-18 conv4 + GeM from random weights, partial mining, images resized to
120x160, 300 training queries per epoch in one mining round, 300 sampled negatives, 2 epochs
of steps of 4 x (1 query + 1 positive + 10 negatives) images, validation and test on 100
queries each, inference batches of 16, 2 loader workers, both programs confined to --cores
CPUs (2). The data is a synthetic aerial dataset in the VG folder format (vgjax.data.synthetic;
JPEGs of --source-size, by default 120x160 as launch.py renders a synthetic world at
data.resize; 480 640 gives pitts30k's size and adds the decoding of larger images), rendered
once into --workdir and reused.

Each program runs as one subprocess whose output (stdout and stderr) is read as it arrives and
timestamped by this script; the lines each program prints mark its phases:
- start-up: launch until the first mining round starts (imports, data, network; vgjax: its
  init compile);
- mining: embedding the round's images and selecting the triplets (vgjax: "caching database"
  bar; train.py: its "Start training epoch" line and its first two progress bars of a round);
- step compile (vgjax only): "Compiling the training step..." to "Compiled ...";
- training steps: the round's step loop (vgjax: its "epoch e/E round r/R" bar; train.py: the
  round's third progress bar), with its images/s;
- validation + test: every validation, checkpoint save and the final test;
- finishing: after the test's recalls until the process exits (vgjax: results.json).
CPU seconds are the process's and its waited-for children's (getrusage; per phase from
/proc/PID/stat at each phase change). The ratio per phase is train.py's seconds / vgjax's
(above 1: vgjax is faster). Prints a Markdown table and writes benchmarks/results/e2e.json.

--reference DIR runs DIR/train.py through benchmarks/reference_shims.py, which adapts it at run
time to today's numpy/torch/torchvision (listed in benchmarks/README.md); it needs torch and
torchvision (pip install -e '.[test]').
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]

STARTUP, MINING, COMPILE, TRAINING, EVALUATION, FINISH = (
    "start-up", "mining", "step compile", "training steps", "validation + test", "finishing")
PHASES = (STARTUP, MINING, COMPILE, TRAINING, EVALUATION, FINISH)


@dataclasses.dataclass(frozen=True)
class Job:
    """The training job both programs run, and the dataset it runs on."""

    train_queries: int  # queries of the rendered train split
    eval_queries: int  # queries of each of the val and test splits
    size_m: float  # side of each split's square world: its database is a 10 m grid in it
    queries_per_epoch: int  # = cache_refresh_rate: one mining round per epoch
    neg_samples_num: int
    epochs: int
    train_batch_size: int = 4
    negs_num_per_query: int = 10
    resize: tuple[int, int] = (120, 160)
    source_size: tuple[int, int] = (120, 160)  # of the rendered JPEGs (H, W)
    infer_batch_size: int = 16
    num_workers: int = 2

    @property
    def dataset_name(self) -> str:
        return (f"e2e_aerial_{self.train_queries}q_{self.eval_queries}q_{self.size_m:g}m_"
                f"{self.source_size[0]}x{self.source_size[1]}")

    @property
    def train_images(self) -> int:
        """Images through the training steps, all epochs (incomplete batches are dropped)."""
        steps = self.queries_per_epoch // self.train_batch_size
        return self.epochs * steps * self.train_batch_size * (2 + self.negs_num_per_query)


FULL = Job(train_queries=400, eval_queries=100, size_m=300, queries_per_epoch=300, neg_samples_num=300, epochs=2)
QUICK = Job(train_queries=30, eval_queries=20, size_m=120, queries_per_epoch=20, neg_samples_num=50, epochs=2)


@dataclasses.dataclass
class RunTiming:
    """One program's run: its wall and CPU seconds, whole and per phase."""

    command: list[str]
    output: str  # the file holding everything it printed
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    phases: dict = dataclasses.field(default_factory=dict)  # phase -> {"wall_seconds", "cpu_seconds"}
    changes: list = dataclasses.field(default_factory=list)  # (seconds since launch, phase)
    train_images_per_second: float | None = None
    test_recalls: str = ""


def ensure_dataset(job: Job, workdir: Path) -> Path:
    """<workdir>/datasets/<job.dataset_name>, rendered on first use; returns the datasets folder.
    The train split is one world, val and test two others (seed 1: worlds 1 and 2)."""
    folder = workdir / "datasets"
    path = folder / job.dataset_name
    if path.exists():
        return folder
    from vgjax.data import synthetic

    print(f"Rendering the synthetic dataset into {path} (once)", flush=True)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    common = dict(image_size=job.source_size, size_m=job.size_m, progress=sys.stderr.isatty())
    synthetic.build_aerial_dataset(partial, seed=0, splits=("train",), num_queries=job.train_queries, **common)
    synthetic.build_aerial_dataset(partial, seed=1, splits=("val", "test"), num_queries=job.eval_queries, **common)
    partial.rename(path)
    return folder


def vgjax_command(job: Job, datasets: Path, run_dir: Path, compilation_cache: bool) -> list[str]:
    """launch.py on the defaults of vgjax/configs/common.py (the benchmark's) and the job."""
    options = {
        "data.datasets_folder": datasets, "data.dataset_name": job.dataset_name, "data.synthetic": "",
        "data.resize": job.resize, "data.infer_batch_size": job.infer_batch_size,
        "data.num_workers": job.num_workers, "model.backbone": "resnet18conv4", "model.aggregation": "gem",
        "model.pretrain": "none", "train.train_batch_size": job.train_batch_size,
        "train.epochs_num": job.epochs, "mining.mining": "partial",
        "mining.queries_per_epoch": job.queries_per_epoch, "mining.cache_refresh_rate": job.queries_per_epoch,
        "mining.neg_samples_num": job.neg_samples_num, "mining.negs_num_per_query": job.negs_num_per_query,
    }
    return [sys.executable, "-u", str(REPO / "launch.py"), f"--config={REPO / 'vgjax/configs/common.py'}",
            "--mode=train", f"--workdir={run_dir}", f"--{'' if compilation_cache else 'no'}compilation_cache",
            *(f"--config.{key}={value}" for key, value in options.items())]


def reference_command(job: Job, datasets: Path, reference: Path) -> list[str]:
    """The benchmark's train.py with the job's options, through benchmarks/reference_shims.py."""
    options = {
        "datasets_folder": datasets, "dataset_name": job.dataset_name, "resize": job.resize,
        "backbone": "resnet18conv4", "aggregation": "gem", "mining": "partial",
        "queries_per_epoch": job.queries_per_epoch, "cache_refresh_rate": job.queries_per_epoch,
        "neg_samples_num": job.neg_samples_num, "negs_num_per_query": job.negs_num_per_query,
        "epochs_num": job.epochs, "train_batch_size": job.train_batch_size,
        "infer_batch_size": job.infer_batch_size, "num_workers": job.num_workers, "device": "cpu",
        "save_dir": "e2e",
    }
    arguments = [item for key, value in options.items()
                 for item in (f"--{key}", *map(str, value if isinstance(value, tuple) else (value,)))]
    return [sys.executable, "-u", str(REPO / "benchmarks/reference_shims.py"), str(reference), *arguments]


# vgjax's phase markers: (what starts a line or progress-bar redraw, the phase it starts).
VGJAX_MARKERS = (
    (re.compile(r"caching database"), MINING),
    (re.compile(r"Compiling the training step"), COMPILE),
    (re.compile(r"Compiled the training step|epoch \d+/\d+ round \d+/\d+"), TRAINING),
    (re.compile(r"database:|queries \(hard_resize\):"), EVALUATION),
    (re.compile(r"Recalls on .* \(hard_resize\)"), FINISH),
)


def vgjax_phase(segment: str) -> str | None:
    """The phase a line of launch.py's output starts, or None."""
    return next((phase for pattern, phase in VGJAX_MARKERS if pattern.match(segment)), None)


class ReferencePhases:
    """train.py's phases from its log lines and progress bars: a round shows three bars (the
    cache's extraction, the triplet selection, the training steps); validation follows
    "Finished epoch"; the test's recalls line ends the job."""

    BAR_START = re.compile(r"\s*0%\|.*\| 0/\d+ ")

    def __init__(self):
        self.bars = None  # progress bars started since the epoch started; None outside epochs

    def __call__(self, segment: str) -> str | None:
        if "Start training epoch" in segment:
            self.bars = 0
            return MINING
        if "Finished epoch" in segment:
            self.bars = None
            return EVALUATION
        if re.search(r"Recalls on (?!val set)", segment):
            return FINISH
        if self.bars is not None and self.BAR_START.match(segment):
            self.bars += 1
            return {1: MINING, 0: TRAINING}.get(self.bars % 3)
        return None


def process_cpu_seconds(pid: int) -> float:
    """User + system seconds of a process and its waited-for children, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_timed(label: str, command: list[str], *, cwd: Path, env: dict, phase_of: Callable[[str], str | None],
              cores: set[int], output: Path) -> RunTiming:
    """Runs `command`, timestamping each line (or progress-bar redraw) of its output as it
    arrives; phase_of(line) names the phase a line starts. Exits on a failed run."""
    timing = RunTiming(command=command, output=str(output))
    cpu_before, start = children_cpu_seconds(), time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               preexec_fn=lambda: os.sched_setaffinity(0, cores))
    marks = [(0.0, STARTUP, 0.0)]  # (seconds, phase, process CPU seconds so far)
    print(f"{label}: {' '.join(command)}", flush=True)
    with open(output, "wb") as log:
        for seconds, segment in output_segments(process.stdout, log, start):
            phase = phase_of(segment)
            if phase is not None and phase != marks[-1][1]:
                marks.append((seconds, phase, process_cpu_seconds(process.pid)))
                print(f"  {label} {seconds:7.1f} s  {phase}", flush=True)
    status = process.wait()
    timing.wall_seconds = time.perf_counter() - start
    timing.cpu_seconds = children_cpu_seconds() - cpu_before
    if status != 0:
        print("".join(output.read_text(errors="replace").splitlines(keepends=True)[-15:]), file=sys.stderr)
        sys.exit(f"e2e.py: error: {label} exited with status {status}; its whole output is in {output}")
    timing.changes = [(round(seconds, 2), phase) for seconds, phase, _ in marks]
    timing.phases = phase_totals(marks, timing.wall_seconds, timing.cpu_seconds)
    return timing


def output_segments(stream, log, start: float):
    """Yields (seconds since `start`, text) for each line or '\\r' redraw of a byte stream as
    it arrives, copying the bytes to `log`."""
    decoder, pending = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    for chunk in iter(lambda: os.read(stream.fileno(), 1 << 16), b""):
        seconds = time.perf_counter() - start
        log.write(chunk)
        *segments, pending = re.split(r"[\r\n]", pending + decoder.decode(chunk))
        for segment in segments:
            if segment.strip():
                yield seconds, segment.strip()


def phase_totals(marks: list[tuple[float, str, float]], wall: float, cpu: float) -> dict:
    """{phase: {"wall_seconds", "cpu_seconds"}} summed over the intervals between phase changes."""
    totals = {phase: {"wall_seconds": 0.0, "cpu_seconds": 0.0} for phase in PHASES}
    for (seconds, phase, cpu_then), (next_seconds, _, next_cpu) in zip(marks, [*marks[1:], (wall, "", cpu)]):
        totals[phase]["wall_seconds"] += next_seconds - seconds
        totals[phase]["cpu_seconds"] += next_cpu - cpu_then
    return totals


def run_vgjax(job: Job, datasets: Path, run_dir: Path, cores: set[int], cache: Path | None) -> RunTiming:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cache is not None:
        env["VGJAX_CACHE"] = str(cache.resolve())
    timing = run_timed("vgjax", vgjax_command(job, datasets, run_dir / "vgjax", cache is not None),
                       cwd=REPO, env=env, phase_of=vgjax_phase, cores=cores, output=run_dir / "vgjax_output.txt")
    results = json.loads((run_dir / "vgjax" / "results.json").read_text())
    timing.test_recalls = ", ".join(f"{name}: {value:.1f}" for name, value in results["test"].items())
    return with_training_rate(timing, job)


def run_reference(job: Job, datasets: Path, run_dir: Path, cores: set[int], reference: Path) -> RunTiming:
    cwd = run_dir / "reference"  # train.py writes its logs and checkpoints under ./logs
    cwd.mkdir(parents=True)
    timing = run_timed("train.py", reference_command(job, datasets, reference), cwd=cwd,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"}, phase_of=ReferencePhases(), cores=cores,
                       output=run_dir / "reference_output.txt")
    recalls = re.findall(r"Recalls on (?!val set).*>: (.*)", Path(timing.output).read_text(errors="replace"))
    timing.test_recalls = recalls[-1].strip() if recalls else ""
    return with_training_rate(timing, job)


def with_training_rate(timing: RunTiming, job: Job) -> RunTiming:
    """Adds the training phase's images/s."""
    seconds = timing.phases[TRAINING]["wall_seconds"]
    timing.train_images_per_second = job.train_images / seconds if seconds else None
    return timing


def table(job: Job, runs: dict[str, RunTiming]) -> str:
    """A Markdown table: per phase, each program's wall and CPU seconds, and the ratio."""
    names = list(runs)
    header = "| phase | " + " | ".join(f"{name} s | {name} CPU s" for name in names)
    header += " | train.py / vgjax |" if len(runs) == 2 else " |"
    lines = [header, "|---" * (1 + 2 * len(names) + (len(runs) == 2)) + "|"]
    rows = [("whole process", {n: (r.wall_seconds, r.cpu_seconds) for n, r in runs.items()})]
    for phase in PHASES:
        rows.append((phase, {n: (r.phases[phase]["wall_seconds"], r.phases[phase]["cpu_seconds"])
                             for n, r in runs.items()}))
    for phase, values in rows:
        cells = [phase_label(phase, job)]
        for name in names:
            wall, cpu = values[name]
            rate = runs[name].train_images_per_second if phase == TRAINING else None
            cells += [f"{wall:.1f}" + (f" ({rate:.0f} img/s)" if rate else ""), f"{cpu:.1f}"]
        if len(runs) == 2:
            cells.append(ratio(values["train.py"][0], values["vgjax"][0]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def phase_label(phase: str, job: Job) -> str:
    return {MINING: f"mining ({job.epochs} rounds)", STARTUP: "start-up (until mining)"}.get(phase, phase)


def ratio(reference: float, vgjax: float) -> str:
    return f"{reference / vgjax:.2f}x" if reference > 0 and vgjax > 0 else "-"


def speed_ratios(reference: RunTiming, vgjax: RunTiming) -> dict[str, float]:
    """train.py's wall seconds / vgjax's, whole and per phase (where both spent time)."""
    pairs = {"whole process": (reference.wall_seconds, vgjax.wall_seconds),
             **{phase: (reference.phases[phase]["wall_seconds"], vgjax.phases[phase]["wall_seconds"])
                for phase in PHASES}}
    return {name: ref / own for name, (ref, own) in pairs.items() if ref > 0 and own > 0}


def describe(job: Job, dataset: Path) -> str:
    tuple_size = 2 + job.negs_num_per_query
    return (f"Job: ResNet-18 conv4 + GeM from random weights, partial mining, {job.resize[0]}x{job.resize[1]} "
            f"(from {job.source_size[0]}x{job.source_size[1]} JPEGs), "
            f"{job.epochs} epochs of {job.queries_per_epoch} queries ({job.neg_samples_num} sampled negatives), "
            f"steps of {job.train_batch_size} x {tuple_size} images, validation and test on "
            f"{job.eval_queries} queries; {dataset}")


def check_reference(parser: argparse.ArgumentParser, reference: Path) -> None:
    """One-line errors before any work: not a checkout, or torch/torchvision missing."""
    if not (reference / "train.py").is_file():
        parser.error(f"--reference {reference} is not a checkout of deep-visual-geo-localization-benchmark: "
                     f"no {reference / 'train.py'}")
    missing = [name for name in ("torch", "torchvision") if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"--reference needs {' and '.join(missing)}: pip install -e '.[test]'")


def choose_cores(parser: argparse.ArgumentParser, count: int) -> set[int]:
    available = sorted(os.sched_getaffinity(0))
    if not 1 <= count <= len(available):
        parser.error(f"--cores {count}: this process may use {len(available)} CPUs")
    return set(available[:count])


def parse_args() -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a tiny job (30 training queries, 64 database images, 5 steps per epoch)")
    parser.add_argument("--reference", type=Path, metavar="DIR",
                        help="a checkout of gmberton/deep-visual-geo-localization-benchmark: also run its train.py")
    parser.add_argument("--source-size", type=int, nargs=2, default=(120, 160), metavar=("H", "W"),
                        help="size of the rendered JPEGs (default: the training size, as launch.py renders "
                             "a synthetic world; 480 640: pitts30k's)")
    parser.add_argument("--cores", type=int, default=2, help="CPUs both programs may use (their affinity mask)")
    parser.add_argument("--compilation-cache", type=Path, metavar="DIR",
                        help="vgjax uses JAX's persistent compilation cache in DIR (run twice to time a "
                             "relaunch); default: off, every compilation is timed")
    parser.add_argument("--workdir", type=Path, default=REPO / "workdirs/e2e",
                        help="the rendered dataset (kept) and the last run's outputs (replaced)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/e2e.json")
    return parser.parse_args(), parser


def main() -> None:
    args, parser = parse_args()
    if args.reference is not None:
        check_reference(parser, args.reference)
    cores = choose_cores(parser, args.cores)
    job = dataclasses.replace(QUICK if args.quick else FULL, source_size=tuple(args.source_size))
    load = os.getloadavg()[0]
    datasets = ensure_dataset(job, args.workdir.resolve())
    run_dir = args.workdir.resolve() / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    runs = {"vgjax": run_vgjax(job, datasets, run_dir, cores, args.compilation_cache)}
    if args.reference is not None:
        runs["train.py"] = run_reference(job, datasets, run_dir, cores, args.reference.resolve())
    print(f"\n{describe(job, datasets / job.dataset_name)}; {len(cores)} CPUs; load average before: {load:.2f}")
    print(table(job, runs))
    for name, run in runs.items():
        print(f"{name}: test {run.test_recalls}; its output: {run.output}")
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick, "job": dataclasses.asdict(job),
               "cores": len(cores), "load_average_before": load, "dataset": str(datasets / job.dataset_name),
               "runs": {name: dataclasses.asdict(run) for name, run in runs.items()}}
    if args.reference is not None:
        results["train.py / vgjax"] = speed_ratios(runs["train.py"], runs["vgjax"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()

"""Accelerator throughput in one run: extraction, the training step, a real training run and
evaluation at 100k database images, with MFU.

  python benchmarks/accelerator.py                  # on one GPU/TPU: about 8 minutes, half compiling
  python benchmarks/accelerator.py --quick          # tiny sizes: checks that it works, on CPU too
  python benchmarks/accelerator.py --peak-tflops 700 --sections extraction,train_step

Sections (each a table row group, and a key in the JSON written to --out after every row, so
a run cut short keeps what it measured):
  extraction  ResNet-50 conv4 + GeM and + NetVLAD at 480x640, bf16 and fp32, batch 16/64/256:
              img/s of the jitted uint8 -> descriptor function on device-resident images, GFLOPs
              per image from XLA's cost analysis of that compiled function, and MFU.
  train_step  the triplet step (forward in train mode, loss, backward, Adam; the benchmark's
              frozen layers) of ResNet-50 conv4 + GeM on the benchmark's batch of 4 tuples x 12
              images and a large batch of 16 tuples, bf16 and fp32: img/s and MFU.
  eval_100k   evaluation at 100k database images: extraction (uint8 batches from host memory,
              transfer and read-back included, no JPEG decoding: see benchmarks/pipeline.py
              for the host's decoding rates) and faiss flat search of 10k queries.
  training    a real `launch.py`-style run (vgjax.experiment, mode pack then train) on a
              synthetic aerial dataset rendered and packed at 480x640: mining, 2 rounds of steps,
              validation and test. Reports the fraction of time the device is idle during the
              training steps, from the loop's own img/s (its step timestamps) against the same
              step timed alone on a device-resident batch (goal: < 5%), and the whole call's
              wall time against the steps' device time (start-up, compilation, mining,
              validation and test are the rest).

MFU = achieved FLOP/s / the device's dense peak for the compute dtype. Float32 convolutions and
matmuls run as XLA runs them by default: TF32 on NVIDIA GPUs since Ampere, bf16 passes on TPU,
so their peak is the TF32 one. The peaks (PEAK_TFLOPS) are the vendors' datasheet figures;
--peak-tflops overrides both dtypes. Weights are random; timings are after compilation.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root

import vgjax  # noqa: E402,F401  (sets vgjax's XLA CPU flags before jax starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vgjax import embed, experiment, index as index_lib, profiling, sharding  # noqa: E402
from vgjax.configs import common  # noqa: E402
from vgjax.data import packed, pipeline, synthetic  # noqa: E402
from vgjax.models import geoloc_net  # noqa: E402
from vgjax.train import triplet  # noqa: E402
from benchmarks import train_step  # noqa: E402

# Dense TFLOP/s per chip: (bfloat16, float32 as XLA computes it by default). device_kind
# substrings, most specific first. Sources: NVIDIA H100/H200/A100/L4 datasheets (SXM parts
# unless named; TF32 without sparsity), Google Cloud TPU system architecture pages.
PEAK_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0)),
    ("H100 NVL", (835.0, 418.0)),
    ("H200 NVL", (835.0, 418.0)),
    ("H200", (989.4, 494.7)),
    ("H100", (989.4, 494.7)),
    ("A100", (312.0, 156.0)),
    ("L4", (121.0, 60.0)),
    ("TPU v4", (275.0, 275.0)),
    ("TPU v5 lite", (197.0, 197.0)),
    ("TPU v5e", (197.0, 197.0)),
    ("TPU v5p", (459.0, 459.0)),
    ("TPU v5", (459.0, 459.0)),
    ("TPU v6 lite", (918.0, 918.0)),
)
SECTIONS = ("extraction", "train_step", "eval_100k", "training")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of every section: the full run, or --quick's tiny one."""

    backbone: str = "resnet50conv4"
    size: tuple[int, int] = (480, 640)
    extraction_batches: tuple[int, ...] = (16, 64, 256)
    step_tuples: tuple[int, ...] = (4, 16)
    dtypes: tuple[str, ...] = ("bfloat16", "float32")
    min_timed_seconds: float = 0.75  # each throughput figure times at least this long
    train_queries: int = 600  # training run: queries per epoch, in 2 mining rounds
    infer_batch_size: int = 64
    eval_database: int = 100_000
    eval_queries: int = 10_000
    eval_batch_size: int = 256


QUICK = Plan(backbone="resnet18conv4", size=(64, 80), extraction_batches=(2, 4, 8), step_tuples=(1, 2),
             min_timed_seconds=0.2, train_queries=16, infer_batch_size=8, eval_database=1000,
             eval_queries=200, eval_batch_size=16)


def device_peak(dtype: str, override: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s of the default device for `dtype`, where the figure comes from)."""
    if override:
        return override, "--peak-tflops"
    kind = jax.devices()[0].device_kind
    for name, (bf16, fp32) in PEAK_TFLOPS:
        if name.lower() in kind.lower():
            return (bf16 if dtype == "bfloat16" else fp32), name
    return None, f"unknown device kind {kind!r}: pass --peak-tflops"


def model_config(backbone: str, aggregation: str, dtype: str):
    config = common.get_config()
    config.model.update(backbone=backbone, aggregation=aggregation, dtype=dtype, pretrain="none")
    return config


def throughput(call, min_seconds: float) -> tuple[float, int]:
    """(seconds per call, calls timed): `call()` returns a tree to block on. Calls are
    dispatched back to back (as a training loop does) and timed until the last one finished,
    after two warm-up calls; the count grows until the timing lasts `min_seconds`."""
    for _ in range(2):
        jax.block_until_ready(call())
    count = 1
    while True:
        tick = time.perf_counter()
        out = None
        for _ in range(count):
            out = call()
        jax.block_until_ready(out)
        seconds = time.perf_counter() - tick
        if seconds >= min_seconds or count >= 1000:
            return seconds / count, count
        count = min(1000, max(count * 2, math.ceil(count * min_seconds / max(seconds, 1e-6))))


def mfu(flops_per_second: float, dtype: str, args) -> float | None:
    peak, _ = device_peak(dtype, args.peak_tflops)
    return flops_per_second / (peak * 1e12) if peak else None


def extraction_rows(plan: Plan, args):
    """One row per (aggregation, dtype, batch): device-resident uint8 images -> descriptors."""
    rng = np.random.default_rng(0)
    for aggregation in ("gem", "netvlad"):
        variables = None
        for dtype in plan.dtypes:
            model = geoloc_net.build(model_config(plan.backbone, aggregation, dtype).model, plan.size)
            variables = variables or geoloc_net.init_variables(model, plan.size, 0)
            forward = embed.make_sharded_embed_fn(model, sharding.make_mesh()).jitted
            for batch_size in plan.extraction_batches:
                images = jnp.asarray(rng.integers(0, 256, (batch_size, *plan.size, 3), np.uint8))
                lowered = forward.lower(variables, images)
                tick = time.perf_counter()
                compiled = lowered.compile()
                compile_seconds = time.perf_counter() - tick
                seconds, calls = throughput(lambda: compiled(variables, images), plan.min_timed_seconds)
                flops = profiling.lowered_flops(lowered)
                yield {"network": f"{plan.backbone}+{aggregation}", "dtype": dtype, "batch": batch_size,
                       "images_per_second": batch_size / seconds, "gflops_per_image": flops / batch_size / 1e9,
                       "tflops_per_second": flops / seconds / 1e12, "mfu": mfu(flops / seconds, dtype, args),
                       "compile_seconds": compile_seconds, "timed_calls": calls}


def time_train_step(config, size: tuple[int, int], tuples: int, min_seconds: float) -> dict:
    """The triplet step of `config` on `tuples` x (2 + negatives) random images, alone."""
    state, step = train_step.triplet_step(config, size)
    tuple_size = 2 + config.mining.negs_num_per_query
    rng = np.random.default_rng(0)
    batch = {"images": jnp.asarray(rng.integers(0, 256, (tuples * tuple_size, *size, 3), np.uint8))}
    lowered = step.lower(state, None, batch)
    tick = time.perf_counter()
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - tick
    flops = profiling.lowered_flops(lowered)
    holder = [state]

    def call():
        holder[0], _, metrics = compiled(holder[0], None, batch)
        return metrics["loss"]

    seconds, calls = throughput(call, min_seconds)
    images = tuples * tuple_size
    return {"images": images, "seconds_per_step": seconds, "images_per_second": images / seconds,
            "gflops_per_image": flops / images / 1e9, "tflops_per_second": flops / seconds / 1e12,
            "compile_seconds": compile_seconds, "timed_calls": calls}


def train_step_rows(plan: Plan, args):
    for dtype in plan.dtypes:
        for tuples in plan.step_tuples:
            config = model_config(plan.backbone, "gem", dtype)
            row = time_train_step(config, plan.size, tuples, plan.min_timed_seconds)
            args.step_seconds[dtype, tuples] = row["seconds_per_step"]
            yield {"network": f"{plan.backbone}+gem", "dtype": dtype, "tuples": tuples, **row,
                   "mfu": mfu(row["tflops_per_second"] * 1e12, dtype, args)}


def training_config(plan: Plan, root: Path):
    """The training run: the benchmark's recipe (4 tuples of 1 + 1 + 10, partial mining) at
    plan.size in bf16 on device, reading the train split packed at that size."""
    config = model_config(plan.backbone, "gem", plan.dtypes[0])
    config.data.update(datasets_folder=str(root / "datasets"), dataset_name="aerial_accelerator",
                       resize=plan.size, infer_batch_size=plan.infer_batch_size,
                       num_workers=os.cpu_count() or 2, packed_folder=str(root / "packed"))
    config.train.update(epochs_num=1, lr=1e-5, log_every_steps=50)
    config.mining.update(queries_per_epoch=plan.train_queries, cache_refresh_rate=plan.train_queries // 2,
                         neg_samples_num=200)
    config.eval.recall_values = (1, 5, 10, 20)
    return config


def render_dataset(config, plan: Plan) -> None:
    """The synthetic aerial world at the training size (enough train queries for one epoch),
    its three splits rendered in parallel processes."""
    folder = Path(config.data.datasets_folder) / config.data.dataset_name
    if folder.exists():
        return
    splits = {"train": plan.train_queries, "val": 50, "test": 50}
    spawn = multiprocessing.get_context("spawn")  # JAX is running: no fork
    with concurrent.futures.ProcessPoolExecutor(len(splits), mp_context=spawn) as pool:
        jobs = [pool.submit(synthetic.build_aerial_dataset, folder / f".{split}", seed=number, splits=(split,),
                            num_queries=queries, image_size=plan.size, size_m=200.0, progress=False)
                for number, (split, queries) in enumerate(splits.items())]
        for job in jobs:
            job.result()
    (folder / "images").mkdir()
    for split in splits:
        (folder / f".{split}" / "images" / split).rename(folder / "images" / split)


def training_rows(plan: Plan, args):
    root = Path(args.workdir)
    config = training_config(plan, root)
    tick = time.perf_counter()
    render_dataset(config, plan)
    experiment.run(config, root / "pack", "pack")
    prepare_seconds = time.perf_counter() - tick
    feed = pipeline_rate(config, plan.min_timed_seconds)
    print(f"  the training loader alone: {feed:.1f} img/s with {config.data.num_workers} threads", flush=True)
    tick = time.perf_counter()
    results = experiment.run(config, root / f"run_{time.strftime('%H%M%S')}", "train")
    wall = time.perf_counter() - tick
    key = (config.model.dtype, config.train.train_batch_size)
    if key not in args.step_seconds:  # the same step as train_step's row, unless that did not run
        args.step_seconds[key] = time_train_step(config, plan.size, key[1], plan.min_timed_seconds)["seconds_per_step"]
    images_per_step = key[1] * (2 + config.mining.negs_num_per_query)
    alone = {"seconds_per_step": args.step_seconds[key], "images_per_second": images_per_step / args.step_seconds[key]}
    loop_rate = results["train_images_per_second"]
    yield {"network": f"{plan.backbone}+gem", "dtype": config.model.dtype, "size": list(plan.size),
           "render_and_pack_seconds": prepare_seconds, "train_call_seconds": wall, "steps": results["steps"],
           "loop_images_per_second": loop_rate, "step_alone_images_per_second": alone["images_per_second"],
           "idle_during_steps": max(0.0, 1 - loop_rate / alone["images_per_second"]),
           "steps_device_seconds": results["steps"] * alone["seconds_per_step"],
           "pipeline_alone_images_per_second": feed, "loader_threads": config.data.num_workers,
           "test_recalls": results["test"]}


def pipeline_rate(config, min_seconds: float) -> float:
    """img/s of the training loader alone (no device): batches of the run's tuple shape read
    from the packed train split with data.num_workers threads, as the loop reads them (the
    first batch, which starts the threads, not counted)."""
    pack = packed.open_pack(triplet.train_pack(config, Path(config.data.datasets_folder) / config.data.dataset_name))
    paths = [str(pack.source / path) for split in pack.paths.values() for path in split]
    tuple_size = 2 + config.mining.negs_num_per_query
    tuples = [[paths[(i * tuple_size + j) % len(paths)] for j in range(tuple_size)]
              for i in range(max(len(paths), 64 * config.train.train_batch_size))]
    batches = pipeline.triplet_batches(tuples, config.train.train_batch_size, tuple(config.data.resize),
                                       num_threads=config.data.num_workers, loader=pack.loader())
    next(batches)  # starts the threads
    tick, images = time.perf_counter(), 0
    for batch in batches:
        images += len(batch)
        if time.perf_counter() - tick >= min_seconds and images >= 4 * len(batch):
            break
    return images / (time.perf_counter() - tick)


def eval_rows(plan: Plan, args):
    """Evaluation at plan.eval_database images: extraction from host memory, then faiss."""
    config = model_config(plan.backbone, "gem", plan.dtypes[0]).model
    model = geoloc_net.build(config, plan.size)
    embed_fn = embed.make_embed_fn(model, geoloc_net.init_variables(model, plan.size, 0))
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 256, (plan.eval_batch_size, *plan.size, 3), np.uint8) for _ in range(4)]
    embed_fn(pool[0])  # compiles
    num_batches = math.ceil(plan.eval_database / plan.eval_batch_size)
    tick = time.perf_counter()
    database = np.concatenate([embed_fn(pool[i % len(pool)]) for i in range(num_batches)])
    extraction_seconds = time.perf_counter() - tick
    # Extraction of identical images gives identical rows; the search is timed on spread ones.
    database = rng.standard_normal((plan.eval_database, database.shape[1])).astype(np.float32)
    queries = rng.standard_normal((plan.eval_queries, database.shape[1])).astype(np.float32)
    index = index_lib.build_index(database, "flat")
    tick = time.perf_counter()
    index_lib.search(index, queries, 20)
    search_seconds = time.perf_counter() - tick
    yield {"network": f"{plan.backbone}+gem", "dtype": config.dtype, "database_images": plan.eval_database,
           "extraction_seconds": extraction_seconds,
           "extraction_images_per_second": num_batches * plan.eval_batch_size / extraction_seconds,
           "descriptor_dim": database.shape[1], "queries": plan.eval_queries,
           "faiss_add_seconds": index.add_seconds, "faiss_search_seconds": search_seconds,
           "ms_per_query": 1000 * search_seconds / plan.eval_queries}


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_row(section: str, row: dict) -> str:
    if "error" in row:
        return f"  FAILED: {row['error']}"
    if section == "extraction":
        return (f"  {row['network']:<22}{row['dtype']:>9}{row['batch']:>6}{row['images_per_second']:>10.1f} img/s"
                f"{row['gflops_per_image']:>8.1f} GFLOP/img{row['tflops_per_second']:>8.1f} TFLOP/s"
                f"  MFU {_percent(row['mfu']):>6}  (compile {row['compile_seconds']:.0f} s)")
    if section == "train_step":
        return (f"  {row['network']:<22}{row['dtype']:>9}{row['images']:>5} img{row['seconds_per_step'] * 1000:>9.1f} ms"
                f"{row['images_per_second']:>9.1f} img/s{row['tflops_per_second']:>8.1f} TFLOP/s"
                f"  MFU {_percent(row['mfu']):>6}  (compile {row['compile_seconds']:.0f} s)")
    if section == "training":
        return (f"  {row['steps']} steps: loop {row['loop_images_per_second']:.1f} img/s, step alone "
                f"{row['step_alone_images_per_second']:.1f} img/s -> device idle during steps "
                f"{_percent(row['idle_during_steps'])}; the loader alone {row['pipeline_alone_images_per_second']:.1f} "
                f"img/s ({row['loader_threads']} threads); whole train call {row['train_call_seconds']:.1f} s, of "
                f"which the steps' device time {row['steps_device_seconds']:.1f} s; render+pack "
                f"{row['render_and_pack_seconds']:.1f} s")
    return (f"  {row['database_images']} images: extraction {row['extraction_seconds']:.1f} s "
            f"({row['extraction_images_per_second']:.0f} img/s, {row['descriptor_dim']}-D); faiss flat add "
            f"{row['faiss_add_seconds']:.2f} s, {row['queries']} queries in {row['faiss_search_seconds']:.2f} s "
            f"({row['ms_per_query']:.3f} ms/query)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (ResNet-18 conv4 at 64x80): a check, on CPU too")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    parser.add_argument("--workdir", default=None, help="training run's data and workdir (default: a temp folder)")
    parser.add_argument("--out", default="benchmarks/results/accelerator.json")
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}; available: {', '.join(SECTIONS)}")
    plan = QUICK if args.quick else Plan()
    args.step_seconds = {}  # (dtype, tuples) -> the train step alone, shared by two sections
    temp = None
    if args.workdir is None:
        temp = tempfile.TemporaryDirectory()
        args.workdir = temp.name
    device = jax.devices()[0]
    peaks = {dtype: device_peak(dtype, args.peak_tflops) for dtype in plan.dtypes}
    report = {"device": f"{device.platform}:{device.device_kind}", "devices": jax.device_count(),
              "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "quick": args.quick,
              "cpu_cores": os.cpu_count(), "plan": dataclasses.asdict(plan),
              "peak_tflops": {d: {"value": v, "source": s} for d, (v, s) in peaks.items()}}
    print(f"{report['device']} ({report['devices']} device(s), jax {jax.__version__}, {os.cpu_count()} CPU cores); "
          + ", ".join(f"peak {d} {v} TFLOP/s ({s})" for d, (v, s) in peaks.items()), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    makers = {"extraction": extraction_rows, "train_step": train_step_rows, "training": training_rows,
              "eval_100k": eval_rows}
    start = time.perf_counter()
    for section in sections:
        print(f"{section}:", flush=True)
        rows = report.setdefault(section, [])
        try:
            for row in makers[section](plan, args):
                rows.append(row)
                print(format_row(section, row), flush=True)
                out.write_text(json.dumps(report, indent=2) + "\n")
        except Exception as error:  # noqa: BLE001  (a failed section must not lose the others)
            traceback.print_exc()
            rows.append({"error": f"{type(error).__name__}: {' '.join(str(error).split())[:500]}"})
            print(format_row(section, rows[-1]), flush=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    report["wall_seconds"] = time.perf_counter() - start
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Done in {report['wall_seconds']:.0f} s; wrote {out}")
    failed = [s for s in sections if any("error" in row for row in report[s])]
    if temp is not None:
        temp.cleanup()
    if failed:
        sys.exit(f"sections that failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

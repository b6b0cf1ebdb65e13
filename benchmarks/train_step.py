"""Training step throughput: vgjax's jitted step against the benchmark's torch step, same run.

  python benchmarks/train_step.py --torch            # 480x640, ResNet-18 conv4 + GeM, 4 x (1+1+10)
  python benchmarks/train_step.py --quick --torch    # 120x160: < 2 minutes
  python benchmarks/train_step.py --backbone resnet50conv4 --aggregation netvlad --torch
  python benchmarks/train_step.py --cosplace         # CosPlace's step: 32 x 512x512, GeM + FC 512
  python benchmarks/train_step.py --overhead         # host overhead per step of the whole training loop
  python benchmarks/train_step.py --gsv --torch      # MixVPR's step: ResNet-50 conv4 + MixVPR 4096-D, 320x320
  python benchmarks/train_step.py --gsv --quick --torch   # 8 places x 4 images of 160x160

--gsv: GSV-Cities' step as configs/gsv_resnet50_mixvpr_4096.py trains it (multi-similarity
miner and loss, SGD, the first two ResNet stages frozen) on 16 places x 4 images (a tenth of
the recipe's 120 x 4, which takes minutes per step on a laptop CPU), in float32 on the CPU (the
recipe computes in bfloat16 on accelerators); --torch times the same network, loss (with
pytorch-metric-learning) and batch in torch.

One step = forward in train mode, triplet loss, backward, Adam, on the reference batch of
`train_batch_size` (4) tuples of (query, positive, 10 negatives) = 48 images, with the stages
the benchmark freezes (train_all_layers=False: a ResNet's layers before layer3) frozen: no
gradients, BatchNorm statistics still updating. Reports seconds/step, images/s and triplets/s
(tuples x negatives per second) after compilation (median of the timed steps), the compile
time and the first step, XLA's train-step GFLOPs and GFLOP/s. --torch times the benchmark's torch
step (eager, channels-last, same threads) on the same images; ratio = vgjax images/s / torch's.
Prints a table and writes benchmarks/results/train_step.json. Weights are random.

--overhead: steps/s of the whole training loop (grain pipeline + engine loop + step, as
`launch.py` runs it: the smoke world's triplet training at 32x32, 1 tuple of 4 images per
step, 3 rounds of 100 steps) against the same step timed alone on a fixed batch; the
difference is the host's overhead per step, in ms.
"""

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for configs/

import vgjax  # noqa: E402,F401  (sets vgjax's XLA CPU flags before jax starts)
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import cosplace_resnet18_512, smoke_train  # noqa: E402
from vgjax.configs import common  # noqa: E402
from vgjax import experiment, profiling  # noqa: E402
from vgjax.data import augment  # noqa: E402
from vgjax.models import geoloc_net  # noqa: E402
from vgjax.train import cosplace, gsv, losses, state as train_state, triplet  # noqa: E402


def _timed(step, args, iterations: int) -> tuple[float, float]:
    """(first call seconds, median seconds of `iterations` more calls); step returns new args."""
    times = []
    for _ in range(iterations + 1):
        tick = time.perf_counter()
        args = step(*args)
        jax.block_until_ready(args)
        times.append(time.perf_counter() - tick)
    return times[0], float(np.median(times[1:]))


def triplet_step(config, size: tuple[int, int]):
    """(the initial TrainState of config.model at `size`, random weights; the jitted triplet
    step of `config`, state donated)."""
    model = geoloc_net.build(config.model, size)
    state, tx = train_state.create_state(config, geoloc_net.init_variables(model, size), seed=0)
    step = triplet.make_step(model, tx, triplet.StepConfig(
        2 + config.mining.negs_num_per_query, config.train.criterion, config.train.margin,
        augment.AugmentConfig.from_config(config.train)))
    return state, step


def time_vgjax_step(config, images: np.ndarray, iterations: int) -> dict:
    state, step = triplet_step(config, images.shape[1:3])
    batch = {"images": images}
    tick = time.perf_counter()
    lowered = step.lower(state, None, batch)
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - tick
    flops = profiling.lowered_flops(lowered)
    first, seconds = _timed(lambda s: (compiled(s, None, batch)[0],), (state,), iterations)
    tuple_size = 2 + config.mining.negs_num_per_query
    tuples = len(images) // tuple_size
    return {"seconds_per_step": seconds, "images_per_second": len(images) / seconds,
            "triplets_per_second": tuples * (tuple_size - 2) / seconds, "first_step_seconds": first,
            "compile_seconds": compile_seconds, "gflops_per_step": flops / 1e9,
            "gflops_per_second": flops / 1e9 / seconds}


def time_torch_step(config, images: np.ndarray, iterations: int) -> dict:
    from benchmarks import torch_side  # noqa: PLC0415 (torch is optional)

    torch_side.use_xla_threads()
    net = torch_side.network(config.model)
    torch_side.freeze_like_the_benchmark(net, config.model.backbone)
    negs = config.mining.negs_num_per_query
    return torch_side.time_train_step(net, images, len(images) // (2 + negs), negs, iterations,
                                      margin=config.train.margin, lr=config.train.lr)


def time_cosplace_step(size, iterations: int, batch_size: int = 32) -> dict:
    """CosPlace's step: model + a 1000-class CosFace classifier, on-device augmentation."""
    config = cosplace_resnet18_512.get_config()
    model = geoloc_net.build(config.model, size)
    state, tx = train_state.create_state(config, geoloc_net.init_variables(model, size), seed=0)
    classifier_tx = optax.adam(0.01)
    weight = losses.cosface_init(jax.random.key(0), 1000, config.model.fc_output_dim)
    classifier = train_state.Head(weight, classifier_tx.init(weight))
    step = jax.jit(functools.partial(cosplace.cosplace_step, model=model, tx=tx, head_tx=classifier_tx,
                                     augmentation=(0.7, 0.7, 0.7, 0.5, 0.5)), donate_argnums=(0, 1))
    batch = {"images": np.random.default_rng(0).integers(0, 256, (batch_size, *size, 3), np.uint8),
             "labels": np.arange(batch_size, dtype=np.int32)}
    first, seconds = _timed(lambda s, c: step(s, c, batch)[:2], (state, classifier), iterations)
    return {"seconds_per_step": seconds, "images_per_second": batch_size / seconds, "first_step_seconds": first}


def time_gsv_step(size, places: int, iterations: int, with_torch: bool) -> dict:
    """MixVPR's GSV-Cities step (vgjax, and torch with `with_torch`) on places x 4 random images."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))
    import gsv_resnet50_mixvpr_4096  # noqa: PLC0415

    config = gsv_resnet50_mixvpr_4096.get_config()
    config.model.update(dtype="float32", pretrain="none")
    model = geoloc_net.build(config.model, size)
    state, tx = train_state.create_state(config, geoloc_net.init_variables(model, size), seed=0)
    step = jax.jit(functools.partial(gsv.gsv_step, model=model, tx=tx, augmentation=(0.0,) * 5, epsilon=0.1,
                                     alpha=1.0, beta=50.0, base=0.0), donate_argnums=(0,))
    k = config.gsv.images_per_place
    batch = {"images": np.random.default_rng(0).integers(0, 256, (places * k, *size, 3), np.uint8),
             "labels": np.repeat(np.arange(places, dtype=np.int32), k)}
    tick = time.perf_counter()
    compiled = step.lower(state, None, batch).compile()
    compile_seconds = time.perf_counter() - tick
    first, seconds = _timed(lambda s: (compiled(s, None, batch)[0],), (state,), iterations)
    results = {"network": "resnet50conv4+mixvpr (4096-D)", "image_size": size, "images_per_step": places * k,
               "vgjax": {"seconds_per_step": seconds, "images_per_second": places * k / seconds,
                         "first_step_seconds": first, "compile_seconds": compile_seconds}}
    if with_torch:
        from benchmarks import torch_side  # noqa: PLC0415 (torch is optional)

        torch_side.use_xla_threads()
        net = torch_side.gsv_network(config.model, (size[0] // 16, size[1] // 16))
        torch_side.freeze_like_the_benchmark(net, config.model.backbone)
        results["torch"] = torch_side.time_gsv_step(net, batch["images"], batch["labels"], iterations, lr=config.train.lr)
        results["ratio"] = results["vgjax"]["images_per_second"] / results["torch"]["images_per_second"]
    return results


def measure_overhead(iterations: int) -> dict:
    """Host overhead per step: the training loop's steps/s against the step alone (32x32)."""
    config = smoke_train.get_config()
    config.data.resize = (32, 32)
    config.train.update(train_batch_size=1, epochs_num=1)
    config.mining.update(cache_refresh_rate=100, queries_per_epoch=300, neg_samples_num=50)
    with tempfile.TemporaryDirectory() as tmp:
        config.data.datasets_folder = f"{tmp}/datasets"
        results = experiment.run(config, f"{tmp}/run", "train")
    loop_images_per_second = results["train_images_per_second"]
    images_per_step = 2 + config.mining.negs_num_per_query
    images = np.random.default_rng(0).integers(0, 256, (images_per_step, 32, 32, 3), np.uint8)
    step = time_vgjax_step(config, images, max(iterations, 50))
    loop_ms = 1000 * images_per_step / loop_images_per_second
    step_ms = 1000 * step["seconds_per_step"]
    return {"loop_ms_per_step": loop_ms, "step_alone_ms": step_ms, "host_overhead_ms_per_step": loop_ms - step_ms}


def _print_steps(results: dict) -> None:
    """One line per framework (s/step, img/s, triplets/s where measured, first step, compile)
    and their ratio."""
    for name in ("vgjax", "torch"):
        if name in results:
            r = results[name]
            triplets = f"{r['triplets_per_second']:7.2f} triplets/s" if "triplets_per_second" in r else ""
            print(f"  {name:<6} {r['seconds_per_step']:7.2f} s/step {r['images_per_second']:7.2f} img/s {triplets} "
                  f"first step {r['first_step_seconds']:.1f} s"
                  + (f" (+ compile {r['compile_seconds']:.1f} s)" if "compile_seconds" in r else ""))
    if "ratio" in results:
        print(f"  ratio vgjax/torch: {results['ratio']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="120x160 images")
    parser.add_argument("--torch", action="store_true", help="also time the benchmark's torch step")
    parser.add_argument("--backbone", default="resnet18conv4")
    parser.add_argument("--aggregation", default="gem")
    parser.add_argument("--size", type=int, nargs=2, default=None, help="H W")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--cosplace", action="store_true", help="only CosPlace's train step")
    parser.add_argument("--overhead", action="store_true", help="only the training loop's host overhead")
    parser.add_argument("--gsv", action="store_true", help="only GSV-Cities' MixVPR train step")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parser.parse_args()
    iterations = args.iterations or (2 if args.quick else 3)
    if args.overhead:
        overhead = measure_overhead(iterations)
        print(f"training loop at 32x32, 4 images/step: {overhead['loop_ms_per_step']:.1f} ms/step; the step "
              f"alone {overhead['step_alone_ms']:.1f} ms; host overhead {overhead['host_overhead_ms_per_step']:.1f} "
              "ms/step")
        return
    if args.gsv:
        size = tuple(args.size or ((160, 160) if args.quick else (320, 320)))
        results = time_gsv_step(size, 8 if args.quick else 16, iterations, args.torch)
        print(f"GSV-Cities step, {results['network']}, {results['images_per_step']} images of {size[0]}x{size[1]}:")
        _print_steps(results)
        return
    if args.cosplace:
        size = tuple(args.size or ((128, 128) if args.quick else (512, 512)))
        step = time_cosplace_step(size, iterations)
        print(f"CosPlace step (32 images, {size[0]}x{size[1]}, ResNet-18 + GeM + FC 512): "
              f"{step['seconds_per_step']:.2f} s/step, {step['images_per_second']:.2f} img/s "
              f"(first step incl. compile {step['first_step_seconds']:.1f} s)")
        return
    config = common.get_config()
    config.model.backbone, config.model.aggregation = args.backbone, args.aggregation
    size = tuple(args.size or ((120, 160) if args.quick else (480, 640)))
    num_images = config.train.train_batch_size * (2 + config.mining.negs_num_per_query)
    images = np.random.default_rng(0).integers(0, 256, (num_images, *size, 3), np.uint8)
    results = {"device": str(jax.devices()[0]), "date": time.strftime("%Y-%m-%d"),
               "network": f"{args.backbone}+{args.aggregation}", "image_size": size,
               "images_per_step": num_images, "vgjax": time_vgjax_step(config, images, iterations)}
    if args.torch:
        results["torch"] = time_torch_step(config, images, iterations)
        results["ratio"] = results["vgjax"]["images_per_second"] / results["torch"]["images_per_second"]
    print(f"train step, {results['network']}, {num_images} images of {size[0]}x{size[1]}:")
    _print_steps(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()

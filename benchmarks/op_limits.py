"""The two ops under the CPU training step, each alone, XLA:CPU against torch in the same run.

  python benchmarks/op_limits.py                  # ResNet-18's layers at 120x160 and 480x640
  python benchmarks/op_limits.py --quick          # 120x160 only (< 1 minute)

The triplet step of ResNet-18 conv4 spends its time in convolutions and in BatchNorm's batch
statistics (benchmarks/README.md, "Where the step's time goes"). This measures each op alone,
without flax or the loss, on a batch of 48 at the feature-map sizes of the step (layer1,
layer2, layer3 at the image size):
- conv: a 3x3, stride-1 convolution, forward only (the frozen stages) and forward + backward
  for the input and the kernel (layer3): `lax.conv_general_dilated` (NHWC x HWIO) against
  `F.conv2d` (channels-last);
- bn: a train-mode BatchNorm forward (batch mean and variance over N, H, W, then normalize,
  scale and shift), written as flax computes it (mean of x and of x^2) against
  `F.batch_norm(training=True)`.
Float32; each JAX function jitted, torch eager with the same threads. JAX runs in one child
process per XLA:CPU convolution back end, since XLA reads its flags once:

- vgjax: vgjax's default (`--xla_cpu_experimental_ynn_fusion_type=reduce`, vgjax/xla_flags.py:
  YNNPACK for reductions, XLA's Eigen kernels for convolutions);
- eigen: no YNNPACK fusions (`--xla_cpu_experimental_ynn_fusion_type=`);
- ynnpack: jax's own default (YNNPACK fusions, convolutions included; VGJAX_XLA_DEFAULTS=0);
- onednn: eigen plus `--xla_cpu_use_onednn=true`.

Prints ms and GFLOP/s (a multiply-add counts 2) or GB/s per case and back end, and vgjax's
speed (its default back end) over torch's; writes benchmarks/results/op_limits.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BATCH = 48
YNN = "--xla_cpu_experimental_ynn_fusion_type"
BACKENDS = {  # name -> the environment of its child (replacing the caller's XLA_FLAGS)
    "vgjax": {"XLA_FLAGS": ""},
    "eigen": {"XLA_FLAGS": f"{YNN}="},
    "ynnpack": {"XLA_FLAGS": "", "VGJAX_XLA_DEFAULTS": "0"},
    "onednn": {"XLA_FLAGS": f"{YNN}= --xla_cpu_use_onednn=true"},
}


def cases(image_sizes) -> list[dict]:
    """ResNet-18's 3x3 stride-1 convs of layer1-3 at each image size (feature map /4, /8, /16)."""
    out = []
    for height, width in image_sizes:
        for layer, channels, stride in (("layer1", 64, 4), ("layer2", 128, 8), ("layer3", 256, 16)):
            out.append({"image": f"{height}x{width}", "layer": layer, "channels": channels,
                        "height": -(-height // stride), "width": -(-width // stride),
                        "backward": layer == "layer3"})
    return out


def work(case: dict, key: str) -> tuple[float, str]:
    """(amount, unit) of one timed op: GFLOP for convs (a multiply-add counts 2; the backward
    adds the input and kernel gradients, 2x the forward), GB of one pass over x for BN."""
    elements = BATCH * case["height"] * case["width"] * case["channels"]
    if key == "bn_ms":
        return 4 * elements / 1e9, "GB"
    forward = 2 * elements * case["channels"] * 9 / 1e9
    return forward * (3 if key == "conv_backward_ms" else 1), "GFLOP"


def median_ms(fn, iterations: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(iterations):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return 1000 * float(np.median(times))


def inputs(case: dict):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, case["height"], case["width"], case["channels"]), np.float32)
    w = rng.standard_normal((3, 3, case["channels"], case["channels"]), np.float32) * 0.05
    return x, w


def time_jax(case_list: list[dict], iterations: int) -> list[dict]:
    import vgjax  # noqa: F401,PLC0415  (sets vgjax's XLA flags before jax starts)
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from jax import lax  # noqa: PLC0415

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def conv_forward_backward(x, w, g):  # returns the output too, so XLA cannot drop the forward
        y, pullback = jax.vjp(conv, x, w)
        return y, pullback(g)

    def batch_norm(x, scale, bias):  # flax.linen.BatchNorm's train-mode forward (fast variance)
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.maximum(jnp.mean(x * x, axis=(0, 1, 2)) - mean * mean, 0.0)
        return (x - mean) * (scale * lax.rsqrt(var + 1e-5)) + bias, mean, var

    forward, backward, bn = jax.jit(conv), jax.jit(conv_forward_backward), jax.jit(batch_norm)
    rows = []
    for case in case_list:
        x, w = map(jax.device_put, inputs(case))
        ones = jnp.ones((case["channels"],), jnp.float32)
        row = {"conv_forward_ms": median_ms(lambda: forward(x, w).block_until_ready(), iterations),
               "bn_ms": median_ms(lambda: jax.block_until_ready(bn(x, ones, ones)), iterations)}
        if case["backward"]:
            g = jax.device_put(np.ones(x.shape, np.float32))
            row["conv_backward_ms"] = median_ms(lambda: jax.block_until_ready(backward(x, w, g)), iterations)
        rows.append(row)
    return rows


def time_torch(case_list: list[dict], iterations: int) -> list[dict]:
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    from benchmarks import torch_side  # noqa: PLC0415

    torch_side.use_xla_threads()
    rows = []
    for case in case_list:
        x_np, w_np = inputs(case)
        x = torch.from_numpy(x_np).permute(0, 3, 1, 2)  # NCHW view of NHWC memory = channels-last
        w = torch.from_numpy(w_np).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
        ones, running = torch.ones(case["channels"]), torch.zeros(case["channels"])

        def forward():
            with torch.no_grad():
                F.conv2d(x, w, padding=1)

        def bn():
            with torch.no_grad():
                F.batch_norm(x, running, running + 1, ones, ones, training=True)

        row = {"conv_forward_ms": median_ms(forward, iterations), "bn_ms": median_ms(bn, iterations)}
        if case["backward"]:
            xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()

            def backward():
                F.conv2d(xg, wg, padding=1).backward(torch.ones_like(xg))
                xg.grad = wg.grad = None

            row["conv_backward_ms"] = median_ms(backward, iterations)
        rows.append(row)
    return rows


def child(args) -> None:
    """In a child process: times JAX on the cases, prints them as JSON."""
    print(json.dumps(time_jax(cases(args.sizes), args.iterations)))


def run_backend(name: str, args) -> list[dict]:
    env = {**os.environ, **BACKENDS[name]}
    command = [sys.executable, __file__, "--child", "--iterations", str(args.iterations),
               "--sizes", *(str(v) for size in args.sizes for v in size)]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"op_limits.py: error: the {name} child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


OPS = (("conv_forward_ms", "conv fwd"), ("conv_backward_ms", "conv fwd+bwd"), ("bn_ms", "BN train fwd"))


def table(case_list: list[dict], results: dict) -> list[str]:
    names = list(results)
    lines = ["| image | feature map | op | " + " | ".join(f"{n} ms (per s)" for n in names) + " | vgjax speed / torch |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    for i, case in enumerate(case_list):
        for key, label in OPS:
            if key not in results[names[0]][i]:
                continue
            amount, unit = work(case, key)
            ms = {n: results[n][i][key] for n in names}
            cells = " | ".join(f"{ms[n]:.1f} ({1000 * amount / ms[n]:.0f} {unit})" for n in names)
            lines.append(f"| {case['image']} | {case['layer']} {case['height']}x{case['width']}x{case['channels']} "
                         f"| {label} | {cells} | {ms['torch'] / ms['vgjax']:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="120x160 only")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="H W [H W ...]")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS),
                        help="XLA:CPU back ends to time (vgjax's default always)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/op_limits.json")
    args = parser.parse_args()
    flat = args.sizes or ([120, 160] if args.quick else [120, 160, 480, 640])
    args.sizes = [tuple(flat[i:i + 2]) for i in range(0, len(flat), 2)]
    if args.child:
        return child(args)
    sys.path.insert(0, str(REPO))
    case_list = cases(args.sizes)
    results = {}
    for name in dict.fromkeys(["vgjax", *args.backends]):
        print(f"timing XLA:CPU ({name})...", flush=True)
        results[name] = run_backend(name, args)
    print("timing torch...", flush=True)
    results["torch"] = time_torch(case_list, args.iterations)
    print("\n".join(table(case_list, results)))
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cases": case_list, "results": results, "batch": BATCH}, indent=1))
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()

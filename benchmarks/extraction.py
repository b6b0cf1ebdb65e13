"""Descriptor extraction speed of the paper's Table 3 networks, optionally side by side with torch.

  python benchmarks/extraction.py                # 8 networks x 4 resolutions x fp32/bf16 (~40 min)
  python benchmarks/extraction.py --torch        # + the same networks in torch, and the ratio
  python benchmarks/extraction.py --quick --torch  # ResNet-18 conv4 + GeM/NetVLAD, 2 sizes: < 2 min
  python benchmarks/extraction.py --only resnet50conv4:gem --scales 1.0 --dtypes float32

Networks: ResNet-18/50/101 conv4 x GeM/NetVLAD, VGG16 + GeM, CCT-384 + NetVLAD (CCT only at its
384x384), DINOv2 ViT-B/14 + SALAD / BoQ and MegaLoc (at 322x322, as their authors test; a row
with an empty aggregation, "megaloc:", is a zoo name). Resolutions: 480x640 scaled by 1.0, 0.8, 0.6, 0.4 (as the paper's resolution study).
For each: ms/img and img/s of the jitted uint8 -> descriptor function (normalization included)
at batch 8 after compilation (median of the timed batches), XLA's GFLOPs per image and the
achieved GFLOP/s. With --torch, the benchmark's torch network (eager, channels-last, the same
threads; bf16 via CPU autocast) is timed in the same run, and `ratio` = vgjax img/s / torch img/s.
Prints a table and writes benchmarks/results/extraction.json. Weights are random.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for configs/

import vgjax  # noqa: E402,F401  (sets vgjax's XLA CPU flags before jax starts)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from vgjax.configs import common  # noqa: E402
from vgjax import profiling  # noqa: E402
from vgjax.models import zoo  # noqa: E402

NETWORKS = [(f"resnet{d}conv4", a) for d in (18, 50, 101) for a in ("gem", "netvlad")] + [
    ("vgg16", "gem"), ("cct384", "netvlad"), ("dinov2_vitb14", "salad"), ("dinov2_vitb14", "boq"), ("megaloc", "")]
# Networks evaluated at one size only: CCT's position embeddings; DINOv2 at SALAD's and BoQ's 322x322.
FIXED_SIZES = {"cct384": (384, 384), "dinov2_vitb14": (322, 322), "megaloc": (322, 322)}
QUICK = [("resnet18conv4", "gem"), ("resnet18conv4", "netvlad")]
FULL_SIZE = (480, 640)


def scaled(scale: float) -> tuple[int, int]:
    return round(FULL_SIZE[0] * scale), round(FULL_SIZE[1] * scale)


def model_config(backbone: str, aggregation: str, dtype: str):
    """A row's model config; aggregation "" makes `backbone` a zoo name (megaloc)."""
    if aggregation:
        config = common.get_config().model
        config.backbone, config.aggregation = backbone, aggregation
    else:
        config = zoo.model_config(zoo.ENTRIES[backbone].model)
    config.dtype = dtype
    return config


def time_vgjax(config, size, batch_size, iterations) -> dict:
    """Timings of the jitted inference (vgjax.profiling, compile excluded) and GFLOP/s."""
    profile = profiling.profile_model(config, size, batch_size=batch_size, iterations=iterations)
    return {"ms_per_image": profile.ms_per_image, "images_per_second": profile.images_per_second,
            "compile_seconds": profile.compile_seconds, "gflops_per_image": profile.gflops_per_image,
            "gflops_per_second": profile.gflops_per_image * profile.images_per_second}


def time_torch(config, size, batch_size, iterations) -> dict:
    from benchmarks import torch_side  # noqa: PLC0415 (torch is optional)

    images = np.random.default_rng(0).integers(0, 256, (batch_size, *size, 3), np.uint8)
    return torch_side.time_inference(torch_side.network(config), images, iterations,
                                     bfloat16=config.dtype == "bfloat16")


def rows(args):
    networks = QUICK if args.quick else NETWORKS
    only = {tuple(pair.split(":")) for pair in args.only.split(",") if pair}
    for backbone, aggregation in networks:
        if only and (backbone, aggregation) not in only:
            continue
        sizes = [FIXED_SIZES[backbone]] if backbone in FIXED_SIZES else [scaled(s) for s in args.scales]
        for size in sizes:
            for dtype in args.dtypes:
                yield model_config(backbone, aggregation, dtype), size


def format_row(row: dict) -> str:
    torch_part = (f"{row['torch']['images_per_second']:>9.2f}{row['ratio']:>7.2f}" if "torch" in row else "")
    return (f"{row['backbone']:<15}{row['aggregation']:<9}{row['size']:>9}{row['dtype']:>9}"
            f"{row['gflops_per_image']:>8.1f}{row['ms_per_image']:>9.1f}{row['images_per_second']:>8.2f}"
            f"{row['gflops_per_second']:>8.0f}{torch_part}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ResNet-18 conv4 only, 2 sizes, fp32")
    parser.add_argument("--torch", action="store_true", help="also time the torch networks")
    parser.add_argument("--only", default="", help="comma-separated backbone:aggregation pairs")
    parser.add_argument("--scales", type=float, nargs="+", default=None)
    parser.add_argument("--dtypes", nargs="+", default=None, choices=("float32", "bfloat16"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/extraction.json")
    args = parser.parse_args()
    args.scales = args.scales or ([1.0, 0.4] if args.quick else [1.0, 0.8, 0.6, 0.4])
    args.dtypes = args.dtypes or (["float32"] if args.quick else ["float32", "bfloat16"])
    iterations = args.iterations or (2 if args.quick else 3)
    if args.torch:
        from benchmarks import torch_side  # noqa: PLC0415
        print(f"torch threads: {torch_side.use_xla_threads()}")
    header = (f"{'backbone':<15}{'agg':<9}{'size':>9}{'dtype':>9}{'GFLOPs':>8}{'ms/img':>9}"
              f"{'img/s':>8}{'GFLOP/s':>8}" + (f"{'torch/s':>9}{'ratio':>7}" if args.torch else ""))
    print(header + "\n" + "-" * len(header), flush=True)
    results = []
    for config, size in rows(args):
        row = {"backbone": config.backbone, "aggregation": config.aggregation, "dtype": config.dtype,
               "size": f"{size[0]}x{size[1]}", "batch_size": args.batch_size,
               **time_vgjax(config, size, args.batch_size, iterations)}
        if args.torch:
            row["torch"] = time_torch(config, size, args.batch_size, iterations)
            row["ratio"] = row["images_per_second"] / row["torch"]["images_per_second"]
        results.append(row)
        print(format_row(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(jax.devices()[0]), "machine": platform.processor() or platform.machine(),
                               "date": time.strftime("%Y-%m-%d"), "rows": results}, indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()

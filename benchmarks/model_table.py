"""Profiles the paper's Table 3 networks, and DINOv2 + SALAD / BoQ and ResNet-50 + BoQ: params,
size, FLOPs, descriptor dim, extraction speed.

  python benchmarks/model_table.py            # 480x640 (ViT 224, CCT 384, DINOv2 322x322), batch 8
  python benchmarks/model_table.py --quick    # 120x160, batch 2, fewer networks: ~1 minute
  python benchmarks/model_table.py --only resnet18conv4:gem,vit:cls,megaloc:   # a zoo name: "name:"

Prints a table and writes benchmarks/results/model_table.json. Weights are random (speed and
FLOPs do not depend on them).
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for configs/

from vgjax.configs import common  # noqa: E402
from vgjax import profiling  # noqa: E402
from vgjax.models import zoo  # noqa: E402

NETWORKS = [(b, a) for b in ("vgg16", "resnet18conv4", "resnet18conv5", "resnet50conv4",
                             "resnet50conv5", "resnet101conv4", "resnet101conv5")
            for a in ("gem", "netvlad")] + [("cct384", "netvlad"), ("cct384", "seqpool"),
                                            ("vit", "cls"), ("vit", "netvlad")] + [
    ("dinov2_vitb14", "salad"), ("dinov2_vitb14", "boq"), ("resnet50conv4", "boq"), ("megaloc", "")]
QUICK = [("resnet18conv4", "gem"), ("resnet18conv4", "netvlad"), ("vgg16", "gem"),
         ("resnet50conv4", "gem"), ("dinov2_vits14", "salad")]


def image_size(backbone: str, default: tuple[int, int], quick: bool = False) -> tuple[int, int]:
    """ViT 224, CCT 384; DINOv2 322x322 (SALAD's and BoQ's test size; --quick: 126x126, 81
    patches, more than SALAD's 64 clusters)."""
    if backbone.startswith("dinov2_"):
        return (126, 126) if quick else (322, 322)
    return {"vit": (224, 224), "cct384": (384, 384)}.get(backbone, default)


def network_config(backbone: str, aggregation: str):
    """The model config of a (backbone, aggregation) row, or of a zoo name ("megaloc", "")."""
    if not aggregation:
        return zoo.model_config(zoo.ENTRIES[backbone].model)
    config = common.get_config().model
    config.backbone, config.aggregation = backbone, aggregation
    config.boq_proj_channels = 512 if backbone.startswith("resnet") else 384  # the BoQ releases'
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small images, a few networks")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--only", default="", help="comma-separated backbone:aggregation pairs")
    parser.add_argument("--out", default="benchmarks/results/model_table.json")
    args = parser.parse_args()
    only = {tuple(pair.split(":")) for pair in args.only.split(",") if pair}
    size = (120, 160) if args.quick else (480, 640)
    batch = args.batch_size or (2 if args.quick else 8)
    profiles = []
    for backbone, aggregation in QUICK if args.quick else NETWORKS:
        if only and (backbone, aggregation) not in only:
            continue
        config = network_config(backbone, aggregation)
        config.dtype = args.dtype
        shape = image_size(config.backbone, size, args.quick)
        if args.quick and backbone in ("vit", "cct384"):
            continue
        profiles.append(profiling.profile_model(config, shape, batch_size=batch, iterations=3))
        print(profiling.format_table(profiles[-1:]).splitlines()[2], flush=True)
    print(profiling.format_table(profiles))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([dataclasses.asdict(p) for p in profiles], indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()

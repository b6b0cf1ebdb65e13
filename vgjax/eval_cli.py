"""`vgjax-eval`: any network on any two folders of images, in one command.

  vgjax-eval --model cosplace_resnet50_2048 --database_folder DB --queries_folder Q
  vgjax-eval --model workdirs/run --database_folder DB --queries_folder Q --no_labels

The options follow VPR-methods-evaluation's. With labels (the default), every file name carries
its position in the VG format and the recalls are printed; with --no_labels the queries are
geolocalized: predictions.csv gives each query's top-k database images with their positions
(where the database's names carry them) and descriptor distances. Everything goes to --output
(default vgjax_eval/<model>/<time>): results.json, predictions/<method>/ (predictions.csv, and
pictures with --num_preds_to_save), descriptors/<method>/ with --save_descriptors.

Folders and options are checked before any network is loaded: each problem is one line on
stderr, exit status 2; a model or image that cannot be read is one line and exit status 1.
vgjax.folders holds what it runs, for Python.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vgjax import evaluate, xla_flags


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vgjax-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", help="a zoo name (--list_models), a vgjax model file, a vgjax "
                        "training workdir, or a weights file with --model_config")
    parser.add_argument("--model_config", default="", help="for a benchmark or CosPlace weights file: its "
                        "network as key=value pairs separated by commas, e.g. backbone=resnet50conv5,"
                        "aggregation=gem,fc_output_dim=2048,resume_format=cosplace")
    parser.add_argument("--database_folder", help="images (.jpg/.jpeg/.png, searched recursively)")
    parser.add_argument("--queries_folder", help="images (.jpg/.jpeg/.png, searched recursively)")
    parser.add_argument("--image_size", type=int, nargs="+", default=None, metavar="N",
                        help="H W, or one side for a square; default: the model's")
    parser.add_argument("--recall_values", type=int, nargs="+", default=[1, 5, 10, 20], metavar="N")
    parser.add_argument("--test_method", default="hard_resize", choices=evaluate.TEST_METHODS)
    parser.add_argument("--positive_dist_threshold", type=float, default=25.0,
                        help="metres: a database image this close to a query is a positive")
    parser.add_argument("--num_preds_to_save", type=int, default=0,
                        help="pictures of queries with their top-N predictions (0: none)")
    parser.add_argument("--queries_to_save", type=int, default=20, help="how many queries get a picture")
    parser.add_argument("--save_only_wrong_preds", action="store_true",
                        help="pictures only of queries whose top-1 prediction is wrong")
    parser.add_argument("--save_descriptors", action="store_true", help="write the descriptors as .npy")
    parser.add_argument("--no_labels", action="store_true",
                        help="the queries have no coordinates: geolocalize them instead of computing recalls")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=2, help="image-decoding threads")
    parser.add_argument("--output", default=None, help="output folder (default vgjax_eval/<model>/<time>)")
    parser.add_argument("--offline", action="store_true", help="never download: zoo files must be cached")
    parser.add_argument("--list_models", action="store_true", help="list the zoo's names and exit")
    return parser


def _model_config(text: str, parser: argparse.ArgumentParser) -> dict | None:
    """"backbone=resnet50conv5,fc_output_dim=2048" -> {"backbone": "resnet50conv5", "fc_output_dim": 2048}."""
    if not text:
        return None
    config = {}
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        if not sep:
            parser.error(f"--model_config: {pair!r} is not key=value")
        config[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return config


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every option and folder, before anything is loaded."""
    if not args.model:
        parser.error("--model is required (a zoo name: see --list_models)")
    for option in ("database_folder", "queries_folder"):
        value = getattr(args, option)
        if not value:
            parser.error(f"--{option} is required")
        if not Path(value).is_dir():
            parser.error(f"--{option} {value}: no such folder")
    if args.image_size is not None and len(args.image_size) not in (1, 2):
        parser.error(f"--image_size takes H W or one side, got {len(args.image_size)} numbers")
    if sorted(set(args.recall_values)) != args.recall_values or min(args.recall_values) < 1:
        parser.error("--recall_values must be increasing positive numbers")
    for option in ("batch_size", "num_workers"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")


def _list_models() -> None:
    from vgjax import models

    for entry in models.available(include_unavailable=True):
        status = f"  [not available: {entry.unavailable}]" if entry.unavailable else ""
        print(f"{entry.name:34s} {entry.description}{status}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list_models:
        _list_models()
        return 0
    _check(args, parser)
    model_config = _model_config(args.model_config, parser)
    from vgjax import folders  # jax and the networks: after the options are checked
    from vgjax.models import zoo

    if args.model in zoo.ENTRIES:  # a transformer's own CPU defaults, before jax starts
        xla_flags.apply_backbone_defaults(zoo.ENTRIES[args.model].model.get("backbone", ""))

    size = None if args.image_size is None else tuple(args.image_size * (3 - len(args.image_size)))
    try:
        folders.evaluate_folders(
            args.model, args.database_folder, args.queries_folder, labels=not args.no_labels,
            output=args.output, image_size=size, model_config=model_config, test_method=args.test_method,
            recall_values=args.recall_values, positive_dist_m=args.positive_dist_threshold,
            num_preds_to_save=args.num_preds_to_save, queries_to_save=args.queries_to_save,
            save_only_wrong_preds=args.save_only_wrong_preds, save_descriptors=args.save_descriptors,
            batch_size=args.batch_size, num_workers=args.num_workers, offline=args.offline or None)
    except (OSError, ValueError) as error:  # a folder's images, a model name or file: named
        parser.exit(1, f"vgjax-eval: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

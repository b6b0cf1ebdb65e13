"""The main job (configs/demo.py): visual geo-localization learned and measured on a laptop CPU.

1. The ViZDoom world (vgjax.data.demo_world) is rendered into the datasets folder, once.
2. (a) random init: the configured network with random weights is evaluated on the test split.
3. (b) Places365: the same network with the Places365 ResNet-18 backbone, untrained.
4. (c) trained: (b) trained with triplets and partial mining by vgjax.train.triplet (validated every
   epoch on val; the best epoch is tested), resumed from <workdir>/trained if interrupted.

Every stage writes pictures of its predictions and a map to
<workdir>/<stage>/predictions/<test method>, and <workdir>/recalls.png compares the three. The
console and <workdir>/results.json give the test recalls of each stage. If the Places365 weights cannot be had (offline with an empty cache, no
pip access, or no torch for the one-time conversion), (b) is skipped and (c) trains from random
weights, and both the console and results.json say so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections

from vgjax import embed, eval_run, visualize
from vgjax.data.vg_folder import Split, load_split
from vgjax.models import places365, pretrained
from vgjax.train import loop, triplet

STAGES = {"random_init": "(a) random init", "places365": "(b) Places365, untrained",
          "trained": "(c) trained"}


def run(config: ml_collections.ConfigDict, workdir: Path, dataset_dir: Path) -> dict:
    """Runs the three stages on the world in dataset_dir; returns the results.json content."""
    start = time.perf_counter()
    test = load_split(dataset_dir, "test", eval_run.test_positive_dist_m(config))
    print(f"Demo world {dataset_dir}: {test}")
    pretrain, unavailable = _backbone_weights(config)
    stages = {"random_init": _evaluate_stage(config, "none", test, workdir / "random_init")}
    if unavailable:
        stages["places365"] = {"skipped": unavailable}
    else:
        stages["places365"] = _evaluate_stage(config, pretrain, test, workdir / "places365")
    train_config = _with_pretrain(config, pretrain)
    trained = loop.train_and_evaluate(train_config, workdir / "trained", triplet.Triplet(train_config, dataset_dir))
    stages["trained"] = {"test": trained["test"], "pretrain": pretrain, "epochs": len(trained["val_history"]),
                         "best_val_recall": trained["best_val_recall"],
                         "train_images_per_second": trained["train_images_per_second"]}
    curves = {STAGES[name]: stage["test"] for name, stage in stages.items() if "test" in stage}
    visualize.save_recall_plot(workdir / "recalls.png", curves, title=f"Demo world, {test.name}")
    summary = {"world": str(dataset_dir), "split": test.name, "num_database": test.num_database,
               "num_queries": test.num_queries, "places365_unavailable": unavailable,
               "stages": stages, "minutes": (time.perf_counter() - start) / 60}
    print(report(summary, workdir))
    return summary


def _backbone_weights(config) -> tuple[str, str | None]:
    """("places365", None), or ("none", why) after saying loudly that training starts from random."""
    if config.model.pretrain != "places365":
        raise ValueError(f"the demo compares random init with Places365 weights; got "
                         f"model.pretrain={config.model.pretrain!r}")
    try:
        places365.resnet18_file()
    except places365.Places365Unavailable as error:
        banner = "!" * 100
        print(f"{banner}\nPLACES365 WEIGHTS UNAVAILABLE: {error}\nThe demo goes on with RANDOM "
              f"INIT: stage (b) is skipped and (c) trains from random weights.\n{banner}")
        return "none", str(error)
    return "places365", None


def _with_pretrain(config: ml_collections.ConfigDict, pretrain: str) -> ml_collections.ConfigDict:
    config = config.copy_and_resolve_references()
    config.model.pretrain = pretrain
    return config


def _evaluate_stage(config, pretrain: str, split: Split, out_dir: Path) -> dict:
    """Evaluates the untrained network with `pretrain` weights as config.eval says (vgjax.eval_run,
    as the trained stage is tested); pictures into out_dir/predictions/<test method>."""
    config = _with_pretrain(config, pretrain)
    model, variables = pretrained.build_and_load(config.model, tuple(config.data.resize), config.seed)
    embed_fn = embed.make_embed_fn(model, variables)
    print(f"{pretrain} weights, untrained:")
    tests = eval_run.evaluate_split(config, embed_fn, split, out_dir, pca=eval_run.fit_pca(config, embed_fn),
                                    title=f"{pretrain} init")
    first = next(iter(tests.values()))
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = {"test": first["recalls"], "pretrain": pretrain,
             "extraction_images_per_second": first["timings"]["extraction_images_per_second"]}
    (out_dir / "results.json").write_text(json.dumps(stage, indent=2) + "\n")
    return stage


def report(summary: dict, workdir: Path) -> str:
    """The console summary: a recall table of the stages, what training changed, where pictures are."""
    stages = summary["stages"]
    ns = list(stages["random_init"]["test"])
    header = f"{'stage':<28}" + "".join(f"{n:>7}" for n in ns)
    lines = [f"Test recalls (%) on {summary['split']}: {summary['num_database']} database images, "
             f"{summary['num_queries']} queries", header, "-" * len(header)]
    for name, stage in stages.items():
        if "test" in stage:
            lines.append(f"{STAGES[name]:<28}" + "".join(f"{stage['test'][n]:7.1f}" for n in ns))
        else:
            lines.append(f"{STAGES[name]:<28}  skipped: Places365 weights unavailable")
    if "test" in stages["places365"]:
        gains = [stages["trained"]["test"][n] - stages["places365"]["test"][n] for n in ns[:2]]
        verdict = "improved" if gains[0] > 0 and gains[1] >= 0 else "did NOT improve"
        lines.append(f"Training {verdict} on (b): {ns[0]} {gains[0]:+.1f}, {ns[1]} {gains[1]:+.1f} "
                     f"({stages['trained']['epochs']} epochs)")
    if summary["places365_unavailable"]:
        lines.append(f"NOTE: (c) started from RANDOM weights: {summary['places365_unavailable']}")
    lines.append(f"Pictures: {workdir / 'trained' / 'predictions'}/<test method> (preds/*.jpg, map.png), "
                 f"{workdir / 'recalls.png'}")
    lines.append(f"Total time: {summary['minutes']:.1f} min")
    return "\n".join(lines)

"""Runs the PyTorch benchmark's train.py (gmberton/deep-visual-geo-localization-benchmark) on
today's numpy, torch and torchvision, without copying or editing any of its files:

  python benchmarks/reference_shims.py DIR [train.py options...]

DIR is a checkout of the benchmark. Its train.py was written for numpy 1.19, torch 1.7 and
torchvision 0.8; this launcher patches the few library functions it needs in this process
(and so in its fork()ed DataLoader workers), then runs DIR/train.py as __main__ with the given
options. Each adaptation is one function below, listed in benchmarks/README.md ("e2e.py"):

- numpy.delete of a list of arrays of different lengths: numpy >= 1.24 refuses to build the
  ragged array; here it becomes a 1-D object array, as numpy 1.19 made it.
- numpy.in1d (removed in numpy 2.4): numpy.isin on the flattened first argument.
- torch.load: weights_only defaults to False again (torch >= 2.6 made it True, which refuses
  the benchmark's own checkpoints, dicts holding numpy arrays).
- torchvision.models.<net>(pretrained=True): random initialisation instead of a download
  (offline; the job trains from random weights).
- torchvision itself: imported through tests/torch_helpers.py's shim (the PyPI wheel is a CUDA
  build; on CPU torch its operator library does not load).
- Modules train.py imports but this job never uses (the ViT/CCT backbones' transformers and
  timm, the Google-Drive downloader, torchscan's FLOP count in one log line): stand-ins, only
  where the package is not installed.
- sklearn.neighbors.NearestNeighbors (the positives within a radius), only where scikit-learn
  is not installed: a stand-in on scipy's cKDTree with the same radius_neighbors result.
- torch's intra-op threads: as many as CPUs in this process's affinity mask (XLA's count).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import runpy
import sys
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PRETRAINED_BUILDERS = ("alexnet", "vgg16", "resnet18", "resnet50", "resnet101")


def ragged_delete(delete):
    """numpy.delete that turns a list of arrays of different lengths into a 1-D object array
    first (numpy 1.19 did so, with a deprecation warning; numpy >= 1.24 raises ValueError)."""
    @functools.wraps(delete)
    def wrapper(arr, obj, axis=None):
        if isinstance(arr, list) and len({np.shape(item) for item in arr}) > 1:
            ragged = np.empty(len(arr), dtype=object)
            for i, item in enumerate(arr):
                ragged[i] = item
            arr = ragged
        return delete(arr, obj, axis=axis)
    return wrapper


def in1d(ar1, ar2, assume_unique=False, invert=False):
    """numpy.in1d as numpy 1.x had it: a flat boolean array."""
    return np.isin(np.ravel(ar1), ar2, assume_unique=assume_unique, invert=invert)


def patch_numpy() -> None:
    np.delete = ragged_delete(np.delete)
    if not hasattr(np, "in1d"):
        np.in1d = in1d


def patch_torch() -> None:
    """torch.load with weights_only=False by default; intra-op threads = affinity-mask CPUs."""
    import torch

    load = torch.load

    @functools.wraps(load)
    def load_full_pickle(*args, weights_only=False, **kwargs):
        return load(*args, weights_only=weights_only, **kwargs)

    torch.load = load_full_pickle
    torch.set_num_threads(len(os.sched_getaffinity(0)))


def random_init(builder):
    """A torchvision model builder that ignores `pretrained`/`weights`: random weights."""
    @functools.wraps(builder)
    def wrapper(*args, pretrained=False, weights=None, **kwargs):
        return builder(*args, **kwargs)
    return wrapper


def patch_torchvision() -> None:
    """Imports torchvision as the tests do; its model builders then ignore `pretrained`."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from torch_helpers import import_torchvision
    finally:
        sys.path.remove(str(REPO / "tests"))
    models = import_torchvision().models
    for name in PRETRAINED_BUILDERS:
        setattr(models, name, random_init(getattr(models, name)))


def unused(name: str):
    """A stand-in for something the job never calls: calling it says so."""
    def fail(*args, **kwargs):
        raise RuntimeError(f"{name} is a stand-in of benchmarks/reference_shims.py; install the real package")
    return fail


def register(module_name: str, attributes: dict) -> None:
    """Puts a module with `attributes` (and any parent package missing) into sys.modules."""
    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            if depth > 1:
                setattr(sys.modules[".".join(parts[:depth - 1])], parts[depth - 1], sys.modules[name])
    vars(sys.modules[module_name]).update(attributes)


class RadiusNeighbors:
    """The part of sklearn.neighbors.NearestNeighbors the benchmark uses: fit(points), then
    radius_neighbors(queries, radius, return_distance=False) -> object array of index arrays
    (every point within `radius`, boundary included)."""

    def __init__(self, **unused_options):
        self.tree = None

    def fit(self, points):
        from scipy.spatial import cKDTree

        self.tree = cKDTree(np.asarray(points, dtype=np.float64))
        return self

    def radius_neighbors(self, queries, radius, return_distance=True):
        if return_distance:
            raise NotImplementedError("the stand-in NearestNeighbors returns indices only")
        found = self.tree.query_ball_point(np.asarray(queries, dtype=np.float64), r=radius)
        result = np.empty(len(found), dtype=object)
        for i, indices in enumerate(found):
            result[i] = np.asarray(sorted(indices), dtype=np.int64)
        return result


def flop_report(module_info) -> str:
    """torchscan.utils.format_info's stand-in: the one line the benchmark reads."""
    return "Floating Point Operations on forward: not counted (torchscan not installed)\n"


def stand_ins() -> dict[str, dict]:
    """{module: its attributes} for the imports of the benchmark's modules that may be missing."""
    return {
        "transformers": {"ViTModel": types.SimpleNamespace(from_pretrained=unused("transformers.ViTModel"))},
        "timm.models.registry": {"register_model": lambda function: function},
        "google_drive_downloader": {"GoogleDriveDownloader": types.SimpleNamespace(
            download_file_from_google_drive=unused("GoogleDriveDownloader"))},
        "torchscan": {"crawl_module": lambda model, input_shape: None},
        "torchscan.utils": {"format_info": flop_report},
        "sklearn.neighbors": {"NearestNeighbors": RadiusNeighbors},
        "sklearn.decomposition": {"PCA": unused("sklearn.decomposition.PCA")},
    }


def add_stand_ins() -> list[str]:
    """Registers the stand-ins of the packages that are not installed; returns those packages."""
    modules = stand_ins()
    missing = sorted({name.split(".")[0] for name in modules
                      if importlib.util.find_spec(name.split(".")[0]) is None})
    for name, attributes in modules.items():
        if name.split(".")[0] in missing:
            register(name, attributes)
    return missing


def usage_error(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1 and argv[1] in ("-h", "--help"):
        print(__doc__)
        return
    if len(argv) < 2:
        usage_error(f"usage: {__doc__.split(chr(10) * 2)[1].strip()}")
    train = Path(argv[1]) / "train.py"
    if not train.is_file():
        usage_error(f"{argv[0]}: error: {argv[1]} is not a checkout of deep-visual-geo-localization-benchmark: "
                    f"no {train}")
    patch_numpy()
    patch_torch()
    patch_torchvision()
    missing = add_stand_ins()
    if missing:
        print(f"reference_shims: stand-ins for {', '.join(missing)} (not installed)", file=sys.stderr, flush=True)
    sys.path.insert(0, str(train.parent.resolve()))
    sys.argv = [str(train), *argv[2:]]
    runpy.run_path(str(train), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv)

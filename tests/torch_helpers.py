"""Test helpers for torch parity (torch is a test-only dependency)."""

import glob
import importlib.util
import os

import numpy as np
import torch

_TORCHVISION = None
_OPERATOR_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                     "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def torchvision_library_loads() -> bool:
    """Whether torchvision's C++ library (which defines torchvision::nms and qnms) loads with
    this torch, as it does for a matching torch/torchvision pair."""
    spec = importlib.util.find_spec("torchvision")
    libraries = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")) if spec else []
    try:
        torch.ops.load_library(libraries[0])
    except (IndexError, OSError):
        return False
    return True


def import_torchvision():
    """torchvision, also where its PyPI wheel (a CUDA build) meets CPU torch: there its C++
    library fails to load, and torchvision imports only once its two operator schemas exist,
    so they are declared here (see ../shared/spec/data_and_weights.md). Where the library
    loads, it declares them itself, and declaring them again would be an error."""
    global _TORCHVISION
    if _TORCHVISION is None:
        if not torchvision_library_loads():
            lib = torch.library.Library("torchvision", "DEF")
            for schema in _OPERATOR_SCHEMAS:
                lib.define(schema)
            import_torchvision.library = lib  # the registration lives as long as this object
        import torchvision
        _TORCHVISION = torchvision
    return _TORCHVISION


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def randomize_batch_norm(module: torch.nn.Module, seed: int = 0) -> None:
    """Gives every BatchNorm non-trivial affine params and running stats (a fresh one is identity)."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def nhwc(x_nchw: torch.Tensor) -> np.ndarray:
    return x_nchw.detach().permute(0, 2, 3, 1).numpy()

"""Test helpers for torch parity (torch is a test-only dependency)."""

import numpy as np
import torch

_TORCHVISION = None


def import_torchvision():
    """torchvision's PyPI wheel is a CUDA build; with CPU torch it imports only after its two
    custom operator schemas are defined (see ../shared/spec/data_and_weights.md)."""
    global _TORCHVISION
    if _TORCHVISION is None:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
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

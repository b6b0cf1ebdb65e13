"""XLA settings vgjax applies by default, before jax creates its CPU backend.

On jaxlib 0.10.x, XLA:CPU routes convolutions to YNNPACK fusions, which on the AVX-512 CPUs we
measured are 15-25% slower for inference and about 2x slower for training than XLA's Eigen
convolutions; but YNNPACK's reductions are 5-10x faster than XLA's own (tree-rewritten into
reduce-windows), and BatchNorm's batch statistics are reductions (benchmarks/README.md,
`benchmarks/op_limits.py`). `apply_cpu_defaults()` (run by `import vgjax`) therefore adds
`--xla_cpu_experimental_ynn_fusion_type=reduce` (YNNPACK for reductions only) to $XLA_FLAGS:
the ResNet-18 conv4 training step is 1.2x (120x160) and 1.15x (480x640) faster than with no
YNNPACK fusions, extraction unchanged. Transformers (DINOv2, ViT, CCT) are faster with no
YNNPACK fusions at all: `apply_backbone_defaults(backbone)` switches to that once the network
is known (launch.py, vgjax-eval), before jax starts.

- Only where jax will run on the CPU: $JAX_PLATFORMS names cpu first, or is unset and no GPU
  or TPU plugin (jax-cuda*/jax-rocm*/libtpu) is installed. On a GPU or TPU machine importing
  vgjax changes nothing and says nothing.
- A value already in $XLA_FLAGS wins (e.g. `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`
  for no YNNPACK fusions at all; XLA's flag help lists the types); `VGJAX_XLA_DEFAULTS=0` keeps
  jax's own defaults.
- Only applied for the jaxlib versions it was measured on (an unknown flag aborts XLA).
- XLA reads $XLA_FLAGS once, when the first backend is created: importing vgjax after running a
  jax computation is too late, and a warning says so.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_DEFAULTS = (f"{YNN_FLAG}=reduce",)  # YNNPACK for reductions, XLA (Eigen) for the rest
# Transformer backbones have no BatchNorm, and YNNPACK's reductions split their LayerNorm and
# softmax fusions: without any YNNPACK fusion, extraction measured 2026-12-01 (fp32, 2 cores)
# DINOv2 ViT-B/14 + SALAD at 322x322 1.60 -> 1.92 img/s, ViT-B/16 + GeM at 224x224 5.75 ->
# 6.60, CCT-384 + NetVLAD 3.94 -> 4.03; a ViT-S/14 + SALAD gradient step 3.59 vs 3.47 img/s.
TRANSFORMER_CPU_DEFAULTS = (f"{YNN_FLAG}=",)
TRANSFORMER_FAMILIES = ("dinov2", "vit", "cct")  # vgjax.models.backbones modules
_applied: list[str] = []  # the flags vgjax put into $XLA_FLAGS
MEASURED_JAXLIB = ("0.10.",)  # version prefixes where the flag exists and was measured to help
ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")  # distribution name prefixes


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _runs_on_cpu() -> bool:
    """Whether jax's default backend will be the CPU, decided without starting jax."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    names = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
    return not any(name.lower().startswith(ACCELERATOR_PLUGINS) for name in names)


def _backend_started() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))


def apply_cpu_defaults() -> list[str]:
    """Adds CPU_DEFAULTS to $XLA_FLAGS where the user has not set them; returns what it added."""
    if os.environ.get("VGJAX_XLA_DEFAULTS", "1") == "0":
        return []
    if not _jaxlib_version().startswith(MEASURED_JAXLIB) or not _runs_on_cpu():
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = [flag for flag in CPU_DEFAULTS if flag.split("=")[0] + "=" not in current]
    if not added:
        return []
    if _backend_started():
        warnings.warn(f"vgjax was imported after jax started its backend, so XLA will not see "
                      f"{' '.join(added)} (faster CPU convolutions and reductions); import vgjax first or set "
                      "XLA_FLAGS yourself", stacklevel=3)
        return []
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [current, *added]))
    _applied[:] = added
    return added


def apply_backbone_defaults(backbone: str) -> list[str]:
    """For a process about to run `backbone` (launch.py and vgjax-eval call it once they know the
    network, before jax starts): where vgjax set its CPU defaults on import and `backbone` is a
    transformer, replaces them with TRANSFORMER_CPU_DEFAULTS; returns the flags it put in their
    place ([] when nothing changed: a convolutional network, a user's own XLA_FLAGS value, an
    accelerator, or a backend already started)."""
    if not _applied or not _is_transformer(backbone) or _backend_started():
        return []
    kept = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if flag not in _applied]
    os.environ["XLA_FLAGS"] = " ".join([*kept, *TRANSFORMER_CPU_DEFAULTS])
    _applied[:] = TRANSFORMER_CPU_DEFAULTS
    return list(TRANSFORMER_CPU_DEFAULTS)


def _is_transformer(backbone: str) -> bool:
    from vgjax.models import registry  # here: importing vgjax must not build the registry first

    return (backbone in registry.BACKBONES
            and registry.backbone(backbone).family.__name__.rsplit(".", 1)[-1] in TRANSFORMER_FAMILIES)

"""vgjax's default XLA CPU flags: set on import, overridable, never after the backend started."""

import os
import subprocess
import sys

import pytest

from vgjax import xla_flags

_PRINT_FLAGS = "import vgjax, os; print(os.environ.get('XLA_FLAGS', ''))"


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "VGJAX_XLA_DEFAULTS", "JAX_PLATFORMS")}
    return subprocess.run([sys.executable, "-c", code], env={**environ, **env}, capture_output=True,
                          text=True, check=True)


def test_import_keeps_only_ynn_reductions_on_measured_jaxlib():
    assert xla_flags._jaxlib_version().startswith(xla_flags.MEASURED_JAXLIB)  # the pinned jaxlib
    assert _run(_PRINT_FLAGS).stdout.strip() == "--xla_cpu_experimental_ynn_fusion_type=reduce"


def test_other_flags_are_kept_and_a_users_value_wins():
    out = _run(_PRINT_FLAGS, XLA_FLAGS="--xla_force_host_platform_device_count=2").stdout.strip()
    assert out == "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type=reduce"
    mine = "--xla_cpu_experimental_ynn_fusion_type=-ynn_fusion"
    assert _run(_PRINT_FLAGS, XLA_FLAGS=mine).stdout.strip() == mine


def test_opt_out_keeps_jax_defaults():
    assert _run(_PRINT_FLAGS, VGJAX_XLA_DEFAULTS="0").stdout.strip() == ""


def test_import_after_backend_start_warns_instead_of_pretending():
    result = _run("import jax; jax.devices(); import vgjax, os; print(os.environ.get('XLA_FLAGS', ''))")
    assert result.stdout.strip() == ""
    assert "too late" in result.stderr or "will not see" in result.stderr


def test_the_flag_is_accepted_by_xla():
    """An unknown or malformed XLA flag aborts the process; this one must compile and run."""
    code = "import vgjax, jax.numpy as jnp; print(float(jnp.ones((2, 2)).sum()))"
    assert _run(code).stdout.strip() == "4.0"


@pytest.mark.parametrize("version", ["0.11.0", ""])
def test_unmeasured_jaxlib_gets_nothing(monkeypatch, version):
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: version)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla_flags.apply_cpu_defaults() == []
    assert "XLA_FLAGS" not in os.environ


@pytest.mark.parametrize("platforms", ["cuda", "gpu", "tpu", "cuda,cpu"])
def test_a_gpu_or_tpu_backend_gets_nothing_and_no_message(platforms):
    """JAX_PLATFORMS names the backend jax will use: with an accelerator first, vgjax leaves
    XLA_FLAGS alone (the accelerator itself is not needed to check that)."""
    result = _run("import vgjax, os; print(repr(os.environ.get('XLA_FLAGS', '')))", JAX_PLATFORMS=platforms)
    assert result.stdout.strip() == "''" and result.stderr == ""


def test_cpu_named_first_gets_the_default():
    assert _run(_PRINT_FLAGS, JAX_PLATFORMS="cpu").stdout.strip() == "--xla_cpu_experimental_ynn_fusion_type=reduce"


def test_an_installed_accelerator_plugin_means_not_cpu(monkeypatch):
    class Dist:
        metadata = {"Name": "jax-cuda12-plugin"}

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(xla_flags.importlib.metadata, "distributions", lambda: [Dist()])
    assert not xla_flags._runs_on_cpu()
    monkeypatch.setattr(xla_flags.importlib.metadata, "distributions", lambda: [])
    assert xla_flags._runs_on_cpu()


_BACKBONE_FLAGS = ("import vgjax, os, sys; from vgjax import xla_flags; added = xla_flags.apply_backbone_defaults(sys.argv[1]); "
                   "import jax.numpy as jnp; assert float(jnp.ones(3).sum()) == 3.0; print(os.environ.get('XLA_FLAGS', ''), added)")


@pytest.mark.parametrize(("backbone", "flags"), [("dinov2_vitb14_reg", "--xla_cpu_experimental_ynn_fusion_type="),
                                                 ("vit", "--xla_cpu_experimental_ynn_fusion_type="),
                                                 ("resnet50conv4", "--xla_cpu_experimental_ynn_fusion_type=reduce")])
def test_transformers_run_without_ynnpack_fusions(backbone, flags):
    """Once the network is known and before jax starts, a transformer's defaults replace
    vgjax's (and XLA accepts them); a convolutional network keeps YNNPACK's reductions."""
    out = subprocess.run([sys.executable, "-c", _BACKBONE_FLAGS, backbone], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "VGJAX_XLA_DEFAULTS")})
    printed, added = out.stdout.strip().split(" ", 1)
    assert printed == flags and (added == "[]") == (backbone == "resnet50conv4")


def test_a_users_flags_and_a_started_backend_are_left_alone():
    mine = "--xla_cpu_experimental_ynn_fusion_type=reduce"
    code = "import os, vgjax; from vgjax import xla_flags; print(xla_flags.apply_backbone_defaults('dinov2_vits14'), os.environ['XLA_FLAGS'])"
    assert _run(code, XLA_FLAGS=mine).stdout.strip() == f"[] {mine}"
    started = ("import vgjax, jax, os; from vgjax import xla_flags; jax.devices(); "
               "print(xla_flags.apply_backbone_defaults('dinov2_vits14'), os.environ['XLA_FLAGS'])")
    assert _run(started).stdout.strip() == "[] --xla_cpu_experimental_ynn_fusion_type=reduce"

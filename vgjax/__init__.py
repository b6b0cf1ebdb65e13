"""vgjax: visual geo-localization in JAX/Flax.

Submodules are imported on demand so that `import vgjax` stays cheap:
  vgjax.data.vg_folder  dataset folders in the VPR-datasets-downloader format -> Split
  vgjax.index           faiss indexes (exact and approximate) by name
  vgjax.evaluate        recall@N, the benchmark's query test methods, PCA, `evaluate()`
  vgjax.metrics         a run's metrics.jsonl and TensorBoard events (MetricWriter)
  vgjax.logs            a run's log.txt: its console output, progress bars in their final state
  vgjax.runtime         the cache folder and JAX's persistent compilation cache
  vgjax.models          networks by name or path (`vgjax.models.load`)
  vgjax.folders         any network on any two folders: `vgjax.evaluate_folders`, `vgjax.geolocalize`

Importing vgjax sets vgjax's default XLA CPU flags (vgjax.xla_flags) before jax starts.
"""

from vgjax import xla_flags as _xla_flags

_xla_flags.apply_cpu_defaults()

__version__ = "0.1.0"


def __getattr__(name: str):
    """vgjax.evaluate_folders and vgjax.geolocalize, imported on first use (they import jax)."""
    if name in ("evaluate_folders", "geolocalize"):
        from vgjax import folders

        return getattr(folders, name)
    raise AttributeError(f"module 'vgjax' has no attribute {name!r}")

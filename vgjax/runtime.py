"""Process-wide runtime settings: vgjax's cache folder and JAX's persistent compilation cache.

With the compilation cache on, a jitted program compiled once (a training step, the descriptor
extraction) is read back from disk by later processes with the same program, jax/jaxlib version
and devices, instead of being compiled again.
"""

from __future__ import annotations

import os
from pathlib import Path

# Programs that compile faster than this are not written to the cache (they would only add
# files); jax's default, 1 s, would skip most of vgjax's programs on CPU.
MIN_COMPILE_SECONDS = 0.1


def cache_dir() -> Path:
    """$VGJAX_CACHE, else ~/.cache/vgjax."""
    return Path(os.environ.get("VGJAX_CACHE", Path.home() / ".cache" / "vgjax"))


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path:
    """Turns on JAX's persistent compilation cache in `directory` (default:
    cache_dir()/jax_compilation_cache), for every backend (CPU included); returns the folder."""
    import jax  # here: importing this module (launch.py --help) does not import jax

    directory = Path(directory) if directory is not None else cache_dir() / "jax_compilation_cache"
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # any size
    return directory

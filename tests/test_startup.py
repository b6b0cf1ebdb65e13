"""Start-up: what `import vgjax` and launch.py load, launch.py's flag errors, and the persistent
compilation cache (vgjax.runtime) that spares later processes the compile time."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, **kwargs)


def _imported(importtime_log: str) -> set[str]:
    """The modules a `python -X importtime` run imported, from its stderr."""
    return {line.split("|")[-1].strip() for line in importtime_log.splitlines()
            if line.startswith("import time:")}


def test_import_vgjax_is_cheap():
    out = _python("-X", "importtime", "-c", "import vgjax")
    assert out.returncode == 0, out.stderr
    assert not {"torch", "jax", "tensorboardX"} & _imported(out.stderr)


def test_launch_help_loads_neither_the_experiment_nor_torch():
    out = _python("-X", "importtime", "launch.py", "--help")
    assert "--config" in out.stdout and "--workdir" in out.stdout
    assert not {"torch", "jax", "vgjax.experiment"} & _imported(out.stderr)


def test_a_config_key_typo_is_one_line_and_exit_status_2(tmp_path):
    out = _python("launch.py", "--config", "configs/smoke_train.py", "--workdir",
                  str(tmp_path / "run"), "--config.train.lrr=1")
    assert out.returncode == 2
    assert out.stderr == "launch.py: error: no config field 'lrr': Did you mean \"lr\" instead of \"lrr\"?\n"
    assert not (tmp_path / "run").exists()


def test_other_flag_errors_are_one_line_too(tmp_path):
    for args in (["--config", "configs/no_such_file.py"],
                 ["--config", "configs/smoke_train.py", "extra"],
                 ["--config", "configs/smoke_train.py", "--config.train.lr=fast"]):
        out = _python("launch.py", "--workdir", str(tmp_path), *args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr


_COMPILE = """if True:
    import json, sys
    from vgjax import runtime
    runtime.enable_compilation_cache(sys.argv[1])
    import jax, jax.numpy as jnp
    from jax import monitoring
    events = []
    monitoring.register_event_listener(lambda name, **kwargs: events.append(name))

    def loss(x):
        for i in range(5):
            x = jnp.tanh(x @ x.T + i)
        return x.sum()

    jax.jit(jax.grad(loss)).lower(jnp.ones((32, 32))).compile()
    print(json.dumps([name.rsplit("/", 1)[-1] for name in events if "compilation_cache" in name]))
"""


def test_a_second_process_reads_the_compiled_program_from_the_cache(tmp_path):
    cache = tmp_path / "cache"
    runs = []
    for _ in range(2):
        out = _python("-c", _COMPILE, str(cache), env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert out.returncode == 0, out.stderr
        runs.append((json.loads(out.stdout), sorted(path.name for path in cache.iterdir())))
    (first_events, first_files), (second_events, second_files) = runs
    assert "cache_misses" in first_events and "cache_hits" not in first_events and first_files
    assert "cache_hits" in second_events and "cache_misses" not in second_events
    assert second_files == first_files

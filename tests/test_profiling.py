"""train.profile_steps: the step tracer writes a JAX profiler trace of the asked steps."""

import jax
import jax.numpy as jnp
import pytest

from vgjax import profiling


def _step(x):
    return jax.jit(lambda v: v @ v)(x)


def test_trace_covers_the_steps_after_the_compiling_one(tmp_path, capsys):
    tracer = profiling.StepTracer(tmp_path / "profile", num_steps=2)
    x = jnp.ones((64, 64))
    for _ in range(5):
        tracer.before_step()
        out = _step(x)
        tracer.after_step(out)
        assert tracer.active == (tracer.steps_seen == 2)  # traces steps 2 and 3 of 5
    traces = list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert "trace of 2 steps" in capsys.readouterr().out


def test_a_short_run_still_closes_its_trace(tmp_path, capsys):
    tracer = profiling.StepTracer(tmp_path / "profile", num_steps=10)
    for _ in range(3):
        tracer.before_step()
        tracer.after_step(_step(jnp.ones((8, 8))))
    tracer.stop()
    assert not tracer.active and "trace of 2 steps" in capsys.readouterr().out
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))


def test_zero_steps_traces_nothing_and_negative_is_an_error(tmp_path):
    tracer = profiling.StepTracer(tmp_path / "profile", num_steps=0)
    for _ in range(3):
        tracer.before_step()
        tracer.after_step(None)
    tracer.stop()
    assert not (tmp_path / "profile").exists()
    with pytest.raises(ValueError, match="profile_steps must be >= 0"):
        profiling.StepTracer(tmp_path, num_steps=-1)

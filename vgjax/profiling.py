"""Model profile: parameters, size, FLOPs (XLA cost analysis), descriptor dim, extraction speed.

The columns of the paper's Table 3, measured on the default device with the compiled function
of the inference path every stage uses (`vgjax.embed`: uint8 images, normalization on device).
FLOPs are what XLA counts for it on one image (a multiply-add counts 2), so they include every
op, not only convs.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vgjax import embed, sharding
from vgjax.models import geoloc_net


@dataclasses.dataclass
class Profile:
    backbone: str
    aggregation: str
    image_size: tuple[int, int]
    dtype: str
    descriptor_dim: int
    params_total: int
    params_trainable: int
    size_mb: float  # float32 parameters and batch statistics
    gflops_per_image: float
    batch_size: int
    ms_per_image: float
    images_per_second: float
    compile_seconds: float
    device: str


def count_params(tree) -> int:
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(tree)))


def _trainable_count(config, params) -> int:
    mask = geoloc_net.trainable_mask(config, params)
    return int(sum(np.prod(np.shape(p)) for p, m in zip(jax.tree_util.tree_leaves(params),
                                                          jax.tree_util.tree_leaves(mask)) if m))


def xla_flops(fn, *args) -> float:
    """FLOPs of `fn(*args)` (arrays or jax.ShapeDtypeStruct), from XLA's cost analysis."""
    return lowered_flops(jax.jit(fn).lower(*args))


def lowered_flops(lowered: jax.stages.Lowered) -> float:
    """FLOPs of a lowered computation, from XLA's HLO cost analysis before optimization: the
    same count on every platform (after compilation, GPU convolutions are cuDNN custom calls
    that the analysis does not count)."""
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax returns one dict per computation
        analysis = analysis[0]
    return float((analysis or {}).get("flops", float("nan")))


def _time_forward(forward, variables, images, iterations: int) -> tuple[float, float]:
    """(compile + first call seconds, median seconds per batch over `iterations` calls)."""
    tick = time.perf_counter()
    jax.block_until_ready(forward(variables, images))
    compile_seconds = time.perf_counter() - tick
    times = []
    for _ in range(iterations):
        tick = time.perf_counter()
        jax.block_until_ready(forward(variables, images))
        times.append(time.perf_counter() - tick)
    return compile_seconds, float(np.median(times))


def profile_model(config: ml_collections.ConfigDict, image_size: tuple[int, int] = (480, 640),
                  batch_size: int = 8, iterations: int = 5, seed: int = 0) -> Profile:
    """Builds the network of `config` (a model section) and measures it on the default device."""
    model = geoloc_net.build(config, image_size)
    variables = geoloc_net.init_variables(model, image_size, seed)
    # The embed function's compiled core, timed on device-resident images of the default device.
    forward = embed.make_sharded_embed_fn(model, sharding.make_mesh()).jitted
    one = jnp.zeros((1, *image_size, 3), jnp.uint8)
    batch = jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch_size, *image_size, 3), np.uint8))
    compile_seconds, seconds = _time_forward(forward, variables, batch, iterations)
    return Profile(
        backbone=config.backbone,
        aggregation=config.aggregation + (f"+fc{config.fc_output_dim}" if config.fc_output_dim else ""),
        image_size=tuple(image_size),
        dtype=config.dtype,
        descriptor_dim=geoloc_net.descriptor_dim(config),
        params_total=count_params(variables["params"]),
        params_trainable=_trainable_count(config, variables["params"]),
        size_mb=4 * count_params(variables) / 2 ** 20,
        gflops_per_image=xla_flops(forward, variables, one) / 1e9,
        batch_size=batch_size,
        ms_per_image=1000 * seconds / batch_size,
        images_per_second=batch_size / seconds,
        compile_seconds=compile_seconds,
        device=f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
    )


def format_table(profiles: list[Profile]) -> str:
    """A text table with the paper's Table 3 columns."""
    header = (f"{'backbone':<16}{'aggregation':<14}{'dim':>7}{'params M':>10}{'train M':>9}"
              f"{'MB':>8}{'GFLOPs':>9}{'ms/img':>9}{'img/s':>8}")
    lines = [header, "-" * len(header)]
    for p in profiles:
        lines.append(f"{p.backbone:<16}{p.aggregation:<14}{p.descriptor_dim:>7}"
                     f"{p.params_total / 1e6:>10.2f}{p.params_trainable / 1e6:>9.2f}{p.size_mb:>8.1f}"
                     f"{p.gflops_per_image:>9.2f}{p.ms_per_image:>9.1f}{p.images_per_second:>8.2f}")
    size = profiles[0].image_size if profiles else ()
    lines.append(f"({profiles[0].device if profiles else ''}, {size[0] if size else ''}x"
                 f"{size[1] if size else ''}, batch {profiles[0].batch_size if profiles else ''})")
    return "\n".join(lines)


class StepTracer:
    """`train.profile_steps`: a JAX profiler trace of N training steps of this process.

    The trace starts before the second step the process runs (the first one compiles) and
    stops after N steps, blocking on the last step's output so that its device work is inside
    the trace. It goes to <log_dir>/plugins/profile/<time>/ (an .xplane.pb and a Chrome
    .trace.json.gz): open it with TensorBoard's profile plugin or xprof, or the .json.gz in
    Perfetto (ui.perfetto.dev).
    """

    def __init__(self, log_dir, num_steps: int, skip_steps: int = 1):
        if num_steps < 0:
            raise ValueError(f"train.profile_steps must be >= 0, got {num_steps}")
        self.log_dir, self.num_steps, self.skip_steps = str(log_dir), num_steps, skip_steps
        self.steps_seen, self.active = 0, False

    def before_step(self) -> None:
        if self.num_steps and self.steps_seen == self.skip_steps:
            jax.profiler.start_trace(self.log_dir)
            self.active = True

    def after_step(self, outputs) -> None:
        self.steps_seen += 1
        if self.active and self.steps_seen == self.skip_steps + self.num_steps:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        """Ends a running trace (also when the run has fewer steps than asked for)."""
        if not self.active:
            return
        jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self.active = False
        print(f"Wrote a profiler trace of {self.steps_seen - self.skip_steps} steps to {self.log_dir}")

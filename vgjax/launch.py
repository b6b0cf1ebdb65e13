"""Entry point: python launch.py --config configs/<exp>.py --workdir DIR [--mode MODE], or the
`vgjax` command of an installed vgjax (the same flags; --config defaults to the packaged
defaults, vgjax/configs/common.py, so a pip install needs no repository).

Any config value can be overridden: --config.eval.test_method=maj_voting,
--config.data.resize='(240, 320)'. The config is checked before anything runs or is written
(vgjax.configs.validate): each problem is one line on stderr, exit status 2; overrides the mode
does not read are named in one warning line. Logs below WARNING are hidden unless --verbosity is given.
The run's output is also kept in DIR/log.txt (vgjax.logs), and compiled programs in JAX's
persistent compilation cache (vgjax.runtime). Everything else lives in vgjax.experiment, imported
only once the flags are parsed, so that --help and flag errors are quick.
"""

import contextlib
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from vgjax import logs, runtime, xla_flags

PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
PACKAGED_CONFIG_NAMES = ("common", "cosplace")  # the defaults; CosPlace's recipe
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(PACKAGED_CONFIGS / "common.py"), "Experiment config file (configs/*.py), or the name "
    "of a config packaged with vgjax (common, cosplace); default: common, vgjax's defaults.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, results and checkpoints "
                               "(required except with --mode print_config).")
_MODE = flags.DEFINE_string("mode", None, "What to run (default: config.mode); the modes are "
                            "listed in vgjax/experiment.py.")
_COMPILATION_CACHE = flags.DEFINE_bool(
    "compilation_cache", True, "Keep compiled programs in $VGJAX_CACHE/jax_compilation_cache "
    "(default ~/.cache/vgjax/...) for later runs.")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, except that a flag error (a config key typo, a missing config file
    included) is one line on stderr and exit status 2, as with argparse."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.get("mode")  # config_flags defers a config file's loading error to first use
    except flags.Error as error:
        _usage_error(str(error))
    except OSError as error:
        _usage_error(str(error.__cause__ or error))
    except (AttributeError, KeyError) as error:
        missing = _innermost(error)
        if not isinstance(missing, KeyError):
            raise
        _usage_error("no config field " + ": ".join(str(missing.args[0]).splitlines()))
    if len(rest) > 1:
        _usage_error(f"unexpected arguments: {' '.join(rest[1:])}")
    return rest


def _innermost(error: BaseException) -> BaseException:
    """ConfigDict reports a missing field as AttributeError(KeyError("'key'\\nDid you mean ...?"))."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return error


def _usage_error(*messages: str) -> None:
    """Each message as one line on stderr, then exit status 2."""
    for message in messages:
        print(f"{sys.argv[0]}: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(2)


def _check(config, mode: str) -> None:
    """validate.check's problems are usage errors; overrides the mode ignores, one warning line."""
    from vgjax.configs import validate

    try:
        validate.check(config, mode, _WORKDIR.value)
    except validate.ConfigError as error:
        _usage_error(*error.problems)
    ignored = validate.ignored_options(mode, flags.FLAGS["config"].override_values)
    if ignored:
        print(f"{sys.argv[0]}: warning: --mode {mode} does not use "
              f"{', '.join(f'--config.{key}' for key in ignored)}", file=sys.stderr)


def main(argv):
    del argv  # parse_flags rejects positional arguments
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    from vgjax import experiment, sharding, sweep

    mode = _MODE.value or _CONFIG.value.mode
    if mode not in experiment.MODES:
        _usage_error(f"--mode={mode}: unknown mode; available: {', '.join(experiment.MODES)}")
    _check(_CONFIG.value, mode)
    if mode == "print_config":  # writes nothing, not even the log
        experiment.print_config(_CONFIG.value)
        return
    if mode != "sweep":  # before jax starts; a sweep's runs do it in their own processes
        xla_flags.apply_backbone_defaults(_CONFIG.value.model.backbone)
    if _COMPILATION_CACHE.value:
        runtime.enable_compilation_cache()
    if _CONFIG.value.train.distributed:  # first, to know whether this process writes log.txt
        sharding.initialize_distributed(_CONFIG.value.train)
    # A sweep's own process never starts JAX's backend (it would hold GPU memory its runs need).
    writes_log = mode == "sweep" or sharding.is_main_process()
    try:
        with logs.RunLog(_WORKDIR.value) if writes_log else contextlib.nullcontext():
            experiment.run(_CONFIG.value, _WORKDIR.value, mode)
    except sweep.SweepError as error:  # which runs failed and where their logs are: no traceback
        print(f"{sys.argv[0]}: error: {error}", file=sys.stderr)
        sys.exit(1)
    except Exception:
        if _CONFIG.value.train.distributed:
            print(f"{sys.argv[0]}: process {sharding.process_description()} stopped on the error above; if "
                  "another process died first, relaunch every process: training resumes from the last "
                  "checkpoint", file=sys.stderr, flush=True)
        raise


def packaged_config_paths(argv: list[str]) -> list[str]:
    """`argv` with `--config NAME` (or --config=NAME), NAME not a file but a config packaged with
    vgjax (vgjax/configs/NAME.py), replaced by that file's path."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            name, prefix = arg[len("--config="):], "--config="
        elif arg == "--config" and i + 1 < len(out):
            name, prefix, i = out[i + 1], "", i + 1
        else:
            continue
        if name in PACKAGED_CONFIG_NAMES and not Path(name).exists():
            out[i] = prefix + str(PACKAGED_CONFIGS / f"{name}.py")
    return out


def run() -> None:
    """The `vgjax` command (and launch.py): flags from sys.argv. --workdir is required except for
    --mode print_config (vgjax.configs.validate)."""
    app.run(main, argv=packaged_config_paths(sys.argv), flags_parser=parse_flags)


if __name__ == "__main__":
    run()

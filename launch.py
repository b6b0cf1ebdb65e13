"""Entry point: python launch.py --config configs/<exp>.py --workdir DIR [--mode MODE].

Any config value can be overridden: --config.eval.test_method=maj_voting,
--config.data.resize='(240, 320)'. Logs below WARNING are hidden unless --verbosity is given.
Everything else lives in vgjax.experiment.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from vgjax import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, results and checkpoints.")
_MODE = flags.DEFINE_enum("mode", None, list(experiment.MODES), "What to run (default: config.mode).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    experiment.run(_CONFIG.value, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)

"""A training workdir's last checkpoint, read the way vgjax restores it (explicit shardings, on
this process's device whatever the devices it was saved from): shared by the training tests."""

from pathlib import Path

import jax

from vgjax.train import checkpoint


def last_checkpoint(workdir) -> dict:
    """Every item of the last checkpoint of `workdir` ("train": the state; the method's items),
    as numpy."""
    checkpoints = checkpoint.Checkpoints(Path(workdir) / checkpoint.CHECKPOINT_FOLDER)
    try:
        items, _, _ = checkpoints.restore(None, "last")
    finally:
        checkpoints.close()
    return jax.device_get(items)

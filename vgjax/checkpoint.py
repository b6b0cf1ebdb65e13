"""Checkpoints (orbax): the last one and the best one, with everything needed to resume.

Layout: <workdir>/checkpoints/{last,best}/<n>/ (n counts saves) with two items: "state" (a pytree of arrays:
params, batch stats, optimizer state, step, PRNG key, the current mining round's triplets, the
full-mining negative cache) and "meta" (JSON: epoch, loop, position in the loop, best recall,
patience counter, the numpy RNG state, ...). orbax writes into a temporary folder and renames it
when complete, and removes the previous checkpoint only after that, so a crash at any moment
leaves the last complete checkpoint in place and an interrupted one is never restored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """Saves and restores the "last" and "best" checkpoints of a run."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
        self._managers = {name: ocp.CheckpointManager(directory / name, options=options)
                          for name in ("last", "best")}

    def exists(self, which: str = "last") -> bool:
        return self._managers[which].latest_step() is not None

    def save(self, state: Any, meta: dict, *, best: bool = False) -> None:
        """Saves `last` (and `best` if asked) and waits until they are complete on disk."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        names = ("last", "best") if best else ("last",)
        for name in names:
            manager = self._managers[name]
            number = (manager.latest_step() or 0) + 1
            manager.save(number, args=args, force=True)
        for name in names:
            self._managers[name].wait_until_finished()

    def restore(self, target_state: Any, which: str = "last") -> tuple[Any, dict] | None:
        """(state, meta) of the newest complete checkpoint, or None if there is none.

        `target_state` is a pytree of the same structure (e.g. the freshly initialised state);
        restored arrays take its shapes, dtypes and shardings.
        """
        manager = self._managers[which]
        step = manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def close(self) -> None:
        for manager in self._managers.values():
            manager.close()

"""Checkpoints (orbax) of a training run: resume from the last one, test the best one.

Layout: <workdir>/checkpoints/<step>/, one folder per save named by the training step, written by
ONE orbax CheckpointManager in one commit, with two items:
  state/  the arrays (StandardSave): params, batch stats, optimizer state, step, PRNG key, ...
  meta/   JSON: where the run is (epoch, position in the loop, best recall, numpy RNG state, ...)
          plus "best_step" (a reserved key), the step of the best checkpoint as of this save.
The last checkpoint is the newest step folder that restores; the best one is the folder its
"best_step" names. Workdirs of the previous layout (checkpoints/last/, checkpoints/best/) are
refused: they cannot be resumed.

How orbax 0.12.8 commits a step on a local filesystem (orbax/checkpoint/_src/path/atomicity.py,
AtomicRenameTemporaryPath.finalize): everything is written into <step>.orbax-checkpoint-tmp/, the
commit time is recorded in its _CHECKPOINT_METADATA, commit_success.txt is written, and the folder
is renamed to <step>/. orbax itself takes any step-named folder for a checkpoint
(validate_final in atomicity.py, _StandardNameFormat in _src/path/step.py); here a folder is
committed only if it is named by a step number and holds commit_success.txt and a
_CHECKPOINT_METADATA with a commit time.

Guarantees:
- (last, best) is consistent whenever the process dies: both come from one atomic commit, and
  a half-written checkpoint (a tmp folder) is never restored.
- `save` returns once the checkpoint is committed: orbax runs synchronously, so no background
  thread or barrier outlives a save, and a failed write raises CheckpointError naming the folder
  at once. Then every step folder is deleted except the `keep_last` newest good ones and the
  best steps they name. A folder is un-committed (commit_success.txt removed) before it is
  deleted, so an interrupted deletion leaves a folder that reads as uncommitted.
- `restore("last")` takes the newest step folder that restores; each one skipped (tmp,
  uncommitted, empty, damaged) is reported on stderr with the reason, and is deleted by the
  next save. `restore("best")` raises CheckpointError if the best folder is damaged rather
  than testing another network.

Contract: steps increase from save to save, and a run that finds checkpoints in its directory
calls restore("last") before its first save (best_step goes on from the restored one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vgjax import sharding
from vgjax.train.state import merge_params

_COMMIT_FILE = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE  # "commit_success.txt"
# orbax's step names without prefix or padding ("16"), and their tmp folders
# ("16.orbax-checkpoint-tmp"; older orbax versions append "-<timestamp>").
_FOLDER_NAME = re.compile(r"(0|[1-9]\d*)(" + re.escape(ocp.path.atomicity_types.TMP_DIR_SUFFIX) + ".*)?")
_UNKNOWN = object()
_META_ONLY = object()  # _restore: no state


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be written or restored (the message names it)."""


class Checkpoints:
    """The step folders of one run under `directory`."""

    def __init__(self, directory: str | os.PathLike, *, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.directory = Path(directory).absolute()
        self.keep_last = keep_last
        old = [name for name in ("last", "best") if (self.directory / name).is_dir()]
        if old:
            raise CheckpointError(
                f"{self.directory} holds checkpoints of the old layout ({', '.join(old)}): "
                "workdirs of the old layout cannot be resumed; start a new workdir")
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, lightweight_initialize=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._damaged: set[Path] = set()  # folders whose restore failed
        self._best_step: Any = _UNKNOWN  # best_step of the last save or restore("last")

    def save(self, step: int, state: Any, meta: dict, *, best: bool) -> None:
        """Commits (state, meta + best_step) as folder `step`, then deletes the folders not kept.

        ValueError if `step` is not newer than the last checkpoint; CheckpointError if the write
        (or a deletion) fails.
        """
        self._check_save(step, meta)
        meta = {**meta, "best_step": step if best else self._best_step}
        self._delete([folder for number, folder in self._folders() if not self._good(number, folder)])
        folder = self.directory / str(step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as error:
            raise CheckpointError(f"writing checkpoint {folder} failed: {_describe(error)}") from error
        self._best_step = meta["best_step"]
        keep = self._kept(step)
        self._delete([folder for number, folder in self._folders() if number not in keep])

    def restore(self, target: Any, which: str = "last") -> tuple[Any, dict, int] | None:
        """(state, meta, step) of the last or best checkpoint; None if there is none.

        `target` is a pytree of the same structure as saved (e.g. the freshly initialised state);
        restored arrays take its shapes, dtypes and shardings (None: as saved, on this
        process's first device), so a checkpoint restores onto any number of devices and
        processes. meta includes "best_step"; "best" is None while no save was marked best. Folders skipped are reported on stderr;
        CheckpointError if step folders exist but none restores, or if the best one does not.
        """
        if which not in ("last", "best"):
            raise ValueError(f'which must be "last" or "best", got {which!r}')
        last = self._restore_last(target)
        if which == "last" or last is None:
            return last
        _, meta, step = last
        best_step = meta["best_step"]
        if best_step is None:
            return None
        if best_step == step:
            return last
        try:
            best = self._restore(best_step, target)
        except CheckpointError as error:
            raise CheckpointError(f"the best checkpoint, named by {self.directory / str(step)}, "
                                  f"cannot be restored: {error}") from error
        return best["state"], best["meta"], best_step

    def latest_step(self) -> int | None:
        """The newest committed step folder (not known to be damaged), without restoring it."""
        return next((number for number, folder in self._folders() if self._good(number, folder)), None)

    def close(self) -> None:
        self._manager.close()

    def _check_save(self, step: int, meta: dict) -> None:
        if "best_step" in meta:
            raise ValueError('meta key "best_step" is reserved: the checkpoints add it')
        if self._best_step is _UNKNOWN:
            if self._folders():
                raise ValueError(f"{self.directory} holds checkpoints: call restore('last') before "
                                 "saving, so that the run continues from them")
            self._best_step = None
        newest = self.latest_step()
        if newest is not None and step <= newest:
            raise ValueError(f"cannot save step {step}: {self.directory} already holds step {newest} "
                             "(steps must increase)")

    def _restore_last(self, target: Any) -> tuple[Any, dict, int] | None:
        """The newest step folder that restores, reporting the ones skipped."""
        folders = self._folders()
        skipped = []
        for number, folder in folders:
            try:
                if folder.name != str(number):
                    raise CheckpointError(f"{folder}: orbax temporary folder (the write was not committed)")
                restored = self._restore(number, target)
            except CheckpointError as error:
                print(f"checkpoint warning: skipping {error}", file=sys.stderr, flush=True)
                skipped.append(str(error))
                self._damaged.add(folder)
                continue
            self._best_step = restored["meta"]["best_step"]
            return restored["state"], restored["meta"], number
        if any(folder.name == str(number) for number, folder in folders):
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored:\n  " + "\n  ".join(skipped))
        self._best_step = None
        return None

    def _restore(self, step: int, target: Any = _META_ONLY) -> ocp.args.Composite:
        """meta (and state, shaped as `target`; None: as saved, on this process's first device)
        restored from folder `step`; CheckpointError if damaged."""
        folder = self.directory / str(step)
        problem = _commit_problem(step, folder)
        if problem:
            raise CheckpointError(f"{folder}: {problem}")
        items = {} if target is _META_ONLY else {"state": ocp.args.StandardRestore(_abstract(folder, target))}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items))
        except Exception as error:
            raise CheckpointError(f"{folder}: restore failed: {_describe(error)}") from error
        meta = restored["meta"]
        if not isinstance(meta, dict) or "best_step" not in meta:
            raise CheckpointError(f"{folder}: meta is not a dict with best_step: {str(meta)[:200]}")
        return restored

    def _kept(self, step: int) -> set[int]:
        """`step`, the keep_last - 1 good folders before it, and the best steps they name."""
        keep = {step, self._best_step}
        older = [number for number, folder in self._folders() if number < step and self._good(number, folder)]
        for number in older[:self.keep_last - 1]:
            try:
                keep |= {number, self._restore(number)["meta"]["best_step"]}
            except CheckpointError:
                pass  # damaged: not kept
        return keep

    def _folders(self) -> list[tuple[int, Path]]:
        """(step, folder) of the step folders and orbax tmp folders, newest first."""
        try:
            entries = list(self.directory.iterdir())
        except OSError as error:
            raise CheckpointError(f"cannot list checkpoints in {self.directory}: {_describe(error)}") from error
        matches = [(int(match[1]), match[2] is None, entry) for entry in entries
                   if (match := _FOLDER_NAME.fullmatch(entry.name))]
        return [(number, entry) for number, _, entry in sorted(matches, reverse=True)]

    def _good(self, step: int, folder: Path) -> bool:
        return folder.name == str(step) and folder not in self._damaged and not _commit_problem(step, folder)

    def _delete(self, folders: list[Path]) -> None:
        """Deletes folders, un-committing each first; then refreshes the manager's step list.
        With several processes, every process calls it with the same folders, the main one
        deletes, and all wait for each other before (every process has listed the folders)
        and after (none lists them half-deleted)."""
        sharding.barrier("vgjax-checkpoint-delete-start")
        for folder in folders if sharding.is_main_process() else []:
            try:
                if folder.is_dir() and not folder.is_symlink():
                    (folder / _COMMIT_FILE).unlink(missing_ok=True)
                    shutil.rmtree(folder)
                else:
                    folder.unlink()
            except OSError as error:
                raise CheckpointError(f"deleting {folder} failed: {_describe(error)}") from error
        sharding.barrier("vgjax-checkpoint-delete-end")
        self._damaged.difference_update(folders)
        if folders:
            self._manager.reload()


def _abstract(folder: Path, target: Any) -> Any:
    """What orbax restores the state of `folder` as, always with explicit shardings, so that a
    checkpoint restores onto any number of devices and processes: `target`'s numpy leaves as
    numpy (host data such as the mining state), its jax.Arrays with their own shardings; with no
    target, every array as saved, on this process's first device."""
    if target is not None:
        return jax.tree.map(lambda leaf: leaf if isinstance(leaf, np.ndarray) else ocp.utils.to_shape_dtype_struct(leaf),
                            target)
    try:
        saved = ocp.StandardCheckpointHandler().metadata(epath.Path(folder / "state")).tree
    except Exception as error:
        raise CheckpointError(f"{folder}: unreadable metadata: {_describe(error)}") from error
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), saved)


def _commit_problem(step: int, folder: Path) -> str | None:
    """Why `folder` is not a committed orbax step folder, or None if it is."""
    if not folder.is_dir():
        return "missing" if not os.path.lexists(folder) else "not a folder"
    if not any(folder.iterdir()):
        return "empty folder"
    if not (folder / _COMMIT_FILE).is_file():
        return f"not committed (no {_COMMIT_FILE})"
    if ocp.path.step.Metadata(step=step, path=folder).commit_timestamp_nsecs is None:
        return "not committed (_CHECKPOINT_METADATA missing, unreadable or without commit time)"
    return None


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# ---------------------------------------------------------------------------------------------
# A finished (or running) training run's network, for evaluation elsewhere.

RUN_CONFIG = "config.json"  # what experiment.run writes into every workdir
CHECKPOINT_FOLDER = "checkpoints"
RUN_CHECKPOINTS = ("best", "last")  # which checkpoint of a run read_run reads (model.resume_checkpoint)


def run_folder(path: str | os.PathLike) -> Path | None:
    """The workdir when `path` is a vgjax training workdir (or its checkpoints/ folder): a
    config.json beside a checkpoints/ folder holding at least one committed step; else None."""
    path = Path(path)
    workdir = path.parent if path.name == CHECKPOINT_FOLDER else path
    folder = workdir / CHECKPOINT_FOLDER
    if not (workdir / RUN_CONFIG).is_file() or not folder.is_dir():
        return None
    committed = any(_FOLDER_NAME.fullmatch(child.name) and (child / _COMMIT_FILE).is_file()
                    for child in folder.iterdir())
    return workdir if committed else None


def read_run(path: str | os.PathLike, which: str = "best") -> tuple[dict, dict, int]:
    """(the run's config.json as a dict, its network's variables {"params", "batch_stats"} as
    numpy arrays, the checkpoint's step) from the `which` ("best" or "last") checkpoint of a
    vgjax training workdir."""
    workdir = run_folder(path)
    if workdir is None:
        raise CheckpointError(f"{path} is not a vgjax training workdir (config.json beside "
                              f"{CHECKPOINT_FOLDER}/ with a committed checkpoint)")
    if which not in RUN_CHECKPOINTS:
        raise ValueError(f"which checkpoint of {workdir}: one of {RUN_CHECKPOINTS}, got {which!r}")
    checkpoints = Checkpoints(workdir / CHECKPOINT_FOLDER)
    try:
        restored = checkpoints.restore(None, which)
    finally:
        checkpoints.close()
    if restored is None:
        raise CheckpointError(f"{workdir / CHECKPOINT_FOLDER} holds no {which} checkpoint yet")
    items, _, step = restored
    train = jax.device_get(items["train"])
    variables = {"params": merge_params(train["trainable"], train["frozen"]),
                 "batch_stats": train["batch_stats"]}
    return json.loads((workdir / RUN_CONFIG).read_text()), variables, step

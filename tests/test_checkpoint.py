"""vgjax.train.checkpoint with real orbax: layout, retention, (last, best) consistency, kills,
damaged folders and failed writes."""

import errno
import gc
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgjax.train.checkpoint import CheckpointError, Checkpoints

REPO = Path(__file__).resolve().parents[1]

# Restoring a damaged folder makes orbax drop coroutines it created but never awaited (an
# asyncio.gather in orbax/checkpoint/_src/serialization/serialization.py fails first); Python
# reports them when they are collected: the tests that do it collect afterwards.
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning",
                                        "ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def collect_dropped_coroutines():
    yield
    gc.collect()


def state_of(step: int) -> dict:
    """A small pytree whose every value tells the step it was saved at."""
    return {"params": np.random.default_rng(step).random(4096, dtype=np.float32),
            "opt": {"count": jnp.asarray(step, jnp.int32), "mu": jnp.full((3, 4), step, jnp.float32)}}


def assert_state(state: dict, step: int) -> None:
    expected = state_of(step)
    np.testing.assert_array_equal(state["params"], expected["params"])
    assert int(state["opt"]["count"]) == step
    np.testing.assert_array_equal(state["opt"]["mu"], expected["opt"]["mu"])


def folders(directory: Path) -> list[str]:
    return sorted((path.name for path in directory.iterdir()), key=lambda name: (len(name), name))


def saved(directory: Path, steps_best: list[tuple[int, bool]], keep_last: int = 2) -> Checkpoints:
    checkpoints = Checkpoints(directory, keep_last=keep_last)
    for step, best in steps_best:
        checkpoints.save(step, state_of(step), {"epoch": step // 2}, best=best)
    return checkpoints


def test_roundtrip_layout_and_retention(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep_last=2)
    assert checkpoints.restore(state_of(0)) is None and checkpoints.latest_step() is None
    expected_folders = {2: ["2"], 4: ["2", "4"], 6: ["2", "4", "6"], 8: ["6", "8"], 10: ["6", "8", "10"],
                        12: ["10", "12"]}
    for step, best in [(2, True), (4, False), (6, True), (8, False), (10, True), (12, False)]:
        checkpoints.save(step, state_of(step), {"epoch": step // 2, "rng": [1, 2]}, best=best)
        # keep_last=2 keeps the previous folder and the best steps both name: after 6, 4 and 4's
        # best 2; after 10, 8 and 8's best 6; after 12 (best 10), 10.
        assert folders(tmp_path) == [str(n) for n in expected_folders[step]], step
    assert {p.name for p in (tmp_path / "12").iterdir()} >= {"state", "meta", "commit_success.txt",
                                                              "_CHECKPOINT_METADATA"}
    assert checkpoints.latest_step() == 12
    state, meta, step = checkpoints.restore(state_of(0))
    assert step == 12 and meta == {"epoch": 6, "rng": [1, 2], "best_step": 10}
    assert_state(state, 12)
    assert isinstance(state["opt"]["mu"], jax.Array) and isinstance(state["params"], np.ndarray)
    assert state["opt"]["mu"].sharding == state_of(0)["opt"]["mu"].sharding
    assert state["opt"]["count"].dtype == jnp.int32
    checkpoints.close()


def test_best_is_none_until_a_save_is_marked_best(tmp_path):
    checkpoints = saved(tmp_path, [(1, False), (2, False)])
    assert checkpoints.restore(state_of(0), "best") is None
    assert checkpoints.restore(state_of(0))[1]["best_step"] is None


def test_best_consistent_after_a_kill_right_after_a_commit(tmp_path):
    saved(tmp_path, [(2, True), (4, False), (6, True), (8, False)])  # never closed: "killed"
    relaunched = Checkpoints(tmp_path)
    state, meta, step = relaunched.restore(state_of(0), "best")
    assert step == 6 and meta == {"epoch": 3, "best_step": 6}
    assert_state(state, 6)
    state, meta, step = relaunched.restore(state_of(0), "last")
    assert step == 8 and meta["best_step"] == 6
    assert_state(state, 8)


_KILLED_RUN = """
import os, random, signal, sys, time
import numpy as np
from vgjax.train.checkpoint import Checkpoints

directory, kills, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)

def state_of(step):
    return {"a": np.full(4096, step, np.float32), "b": {"c": np.arange(7) + step}}

def expected_best(step):
    return step // 3 * 3 or None  # every third save is the best

def check(restored, step, best_step):
    state, meta, restored_step = restored
    assert restored_step == step == meta["step"], (restored_step, meta)
    assert meta["best_step"] == best_step, (meta, best_step)
    for got, want in zip((state["a"], state["b"]["c"]), (state_of(step)["a"], state_of(step)["b"]["c"])):
        np.testing.assert_array_equal(got, want)

def resume_and_save(write):
    checkpoints = Checkpoints(directory)
    last = checkpoints.restore(state_of(0))
    step = 0 if last is None else last[2]
    if last is not None:
        check(last, step, expected_best(step))
        best = checkpoints.restore(state_of(0), "best")
        if expected_best(step) is not None:
            check(best, expected_best(step), expected_best(step))
    while True:
        step += 1
        checkpoints.save(step, state_of(step), {"step": step}, best=step % 3 == 0)
        if write is not None:  # the kill comes after the first save, at a random moment
            os.write(write, f"{step - 1}\\n".encode())
            write = None

for _ in range(kills):
    read, write = os.pipe()
    pid = os.fork()  # jax is imported but its backend not started: each child starts its own
    if pid == 0:
        try:
            os.close(read)
            resume_and_save(write)
        finally:
            os._exit(1)
    os.close(write)
    resumed = os.read(read, 100).decode().strip()
    os.close(read)
    time.sleep(rng.uniform(0.0, 0.5))
    os.kill(pid, signal.SIGKILL)
    status = os.waitpid(pid, 0)[1]
    print(f"resumed at step {resumed!r}, killed: {os.WIFSIGNALED(status)}", flush=True)
    if not os.WIFSIGNALED(status):
        sys.exit(f"the child failed before the kill (status {status})")
"""


def test_kills_at_random_moments_leave_a_consistent_pair(tmp_path):
    seed = random.randrange(2**31)
    result = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(tmp_path), "4", str(seed)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"seed {seed}\n{result.stdout}\n{result.stderr[-3000:]}"
    resumed = [int(line.split("'")[1]) for line in result.stdout.splitlines()]
    assert resumed[0] == 0 and all(a < b for a, b in zip(resumed, resumed[1:])), result.stdout
    checkpoints = Checkpoints(tmp_path)
    target = {"a": np.zeros(4096, np.float32), "b": {"c": np.zeros(7, int)}}
    state, meta, step = checkpoints.restore(target)
    assert step > resumed[-1] and meta == {"step": step, "best_step": step // 3 * 3}
    best_state, best_meta, best_step = checkpoints.restore(target, "best")
    assert best_step == step // 3 * 3 and best_meta == {"step": best_step, "best_step": best_step}
    for restored, number in ((state, step), (best_state, best_step)):
        np.testing.assert_array_equal(restored["a"], np.full(4096, number, np.float32))
        np.testing.assert_array_equal(restored["b"]["c"], np.arange(7) + number)


def _truncate_array_file(folder: Path) -> Path:
    data = max((p for p in (folder / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(data, data.stat().st_size // 2)
    return folder


def _truncate_meta(folder: Path) -> Path:
    meta = folder / "meta" / "metadata"
    meta.write_text(meta.read_text()[:10])
    return folder


def _garble_checkpoint_metadata(folder: Path) -> Path:
    (folder / "_CHECKPOINT_METADATA").write_text('{"commit_timestamp_nsecs": 17')
    return folder


def _uncommitted_copy(folder: Path) -> Path:
    """An interrupted copy of folder 6 into 10: all but orbax's commit marker."""
    copy = folder.parent / "10"
    shutil.copytree(folder, copy)
    (copy / "commit_success.txt").unlink()
    return copy


def _empty_larger_step(folder: Path) -> Path:
    (folder.parent / "12").mkdir()
    return folder.parent / "12"


def _stray_tmp_folder(folder: Path) -> Path:
    """A kill between orbax's commit_success.txt and its rename of the tmp folder."""
    tmp = folder.parent / "8.orbax-checkpoint-tmp"
    shutil.copytree(folder, tmp)
    return tmp


@pytest.mark.parametrize("damage, fallback, reason", [
    (_truncate_array_file, 4, "restore failed"),
    (_truncate_meta, 4, "restore failed: JSONDecodeError"),
    (_garble_checkpoint_metadata, 4, "_CHECKPOINT_METADATA"),
    (_uncommitted_copy, 6, "not committed (no commit_success.txt)"),
    (_empty_larger_step, 6, "empty folder"),
    (_stray_tmp_folder, 6, "orbax temporary folder"),
])
@pytest.mark.usefixtures("collect_dropped_coroutines")
def test_damaged_latest_falls_back_to_the_previous_good_one(tmp_path, capfd, damage, fallback, reason):
    saved(tmp_path, [(2, True), (4, False), (6, False)], keep_last=3)
    damaged = damage(tmp_path / "6")
    capfd.readouterr()
    checkpoints = Checkpoints(tmp_path)
    assert checkpoints.restore(state_of(0), "best")[2] == 2
    state, meta, step = checkpoints.restore(state_of(0))
    assert step == fallback and meta["best_step"] == 2
    assert_state(state, fallback)
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("checkpoint warning")]
    assert warnings and all(f"skipping {damaged}: " in line and reason in line for line in warnings)
    # The run goes on from the fallback and reaches the damaged folder's step again: it is replaced.
    new_step = int(damaged.name.split(".")[0])
    checkpoints.save(new_step, state_of(new_step), {"epoch": 0}, best=False)
    assert_state(Checkpoints(tmp_path).restore(state_of(0))[0], new_step)
    assert not any(".orbax-checkpoint-tmp" in name for name in folders(tmp_path))


@pytest.mark.usefixtures("collect_dropped_coroutines")
def test_all_damaged_raises_naming_them(tmp_path):
    saved(tmp_path, [(2, True), (4, False)])
    _truncate_meta(tmp_path / "2")
    _truncate_array_file(tmp_path / "4")
    (tmp_path / "5").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be restored") as raised:
        Checkpoints(tmp_path).restore(state_of(0))
    assert all(str(tmp_path / name) in str(raised.value) for name in ("2", "4", "5"))


def test_only_a_tmp_folder_means_no_checkpoint(tmp_path, capfd):
    (tmp_path / "3.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    checkpoints = Checkpoints(tmp_path)
    assert checkpoints.restore(state_of(0)) is None
    assert "3.orbax-checkpoint-tmp" in capfd.readouterr().err
    checkpoints.save(3, state_of(3), {}, best=True)
    assert folders(tmp_path) == ["3"]


@pytest.mark.usefixtures("collect_dropped_coroutines")
def test_damaged_best_raises_instead_of_testing_another_network(tmp_path):
    saved(tmp_path, [(2, True), (4, False)])
    _truncate_array_file(tmp_path / "2")
    with pytest.raises(CheckpointError, match="best checkpoint") as raised:
        Checkpoints(tmp_path).restore(state_of(0), "best")
    assert f"{tmp_path / '2'}: restore failed" in str(raised.value)


@pytest.mark.parametrize("unwritable", ["2.orbax-checkpoint-tmp", "state.orbax-checkpoint-tmp"])
def test_failed_write_names_the_folder(tmp_path, monkeypatch, unwritable):
    """A read-only folder: orbax cannot create the step's tmp folder, or the state item's inside
    it (as root, chmod would not stop the write, so os.makedirs fails as it would for a user)."""
    checkpoints = saved(tmp_path, [(1, True)])
    makedirs = os.makedirs

    def read_only(path, *args, **kwargs):
        if Path(path).name == unwritable:
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        makedirs(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", read_only)
    threads = set(threading.enumerate())
    with pytest.raises(CheckpointError, match=f"writing checkpoint {tmp_path / '2'} failed: PermissionError"):
        checkpoints.save(2, state_of(2), {}, best=False)
    for thread in set(threading.enumerate()) - threads:  # orbax's asyncio workers wind down
        thread.join(timeout=5)
        assert not thread.is_alive(), thread
    assert Checkpoints(tmp_path).restore(state_of(0))[2] == 1
    monkeypatch.undo()  # writable again: the same object saves
    checkpoints.save(2, state_of(2), {}, best=False)
    assert Checkpoints(tmp_path).restore(state_of(0))[1]["best_step"] == 1


_FULL_DISK = """
import resource, signal, sys, threading, time
import numpy as np
from vgjax.train.checkpoint import CheckpointError, Checkpoints

checkpoints = Checkpoints(sys.argv[1])
checkpoints.save(1, {"a": np.zeros(8, np.float32)}, {}, best=True)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))  # no file beyond 4 KiB
start = time.monotonic()
try:
    checkpoints.save(2, {"a": np.random.default_rng(0).random(100_000, np.float32)}, {}, best=False)
except CheckpointError as error:
    print(f"CheckpointError after {time.monotonic() - start:.1f} s: {error}")
for thread in threading.enumerate():  # orbax's asyncio workers wind down, within seconds
    if thread is not threading.main_thread():
        thread.join(timeout=5)
print("threads:", [thread.name for thread in threading.enumerate()])
"""


def test_failed_write_exits_promptly(tmp_path):
    """A full disk (a file size limit, which binds root too) fails orbax's array write; the
    process must end at once, no orbax thread or barrier waiting for minutes."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"writing checkpoint {tmp_path / '2'} failed" in result.stdout, result.stdout
    assert "File too large" in result.stdout
    assert "threads: ['MainThread']" in result.stdout
    assert time.monotonic() - start < 30


def test_old_layout_is_refused(tmp_path):
    (tmp_path / "last" / "1").mkdir(parents=True)
    (tmp_path / "best" / "1").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="old layout .*cannot be resumed; start a new workdir"):
        Checkpoints(tmp_path)


def test_saving_an_existing_or_older_step_is_a_programming_error(tmp_path):
    checkpoints = saved(tmp_path, [(2, True), (4, False)])
    for step in (4, 3):
        with pytest.raises(ValueError, match="already holds step 4"):
            checkpoints.save(step, state_of(step), {}, best=False)
    with pytest.raises(ValueError, match="reserved"):
        checkpoints.save(6, state_of(6), {"best_step": 6}, best=False)
    with pytest.raises(ValueError, match=r"call restore\('last'\) before saving"):
        Checkpoints(tmp_path).save(6, state_of(6), {}, best=False)
    assert folders(tmp_path) == ["2", "4"]

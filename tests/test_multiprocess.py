"""Multi-process training for real: two processes on this machine, joined by jax.distributed on
loopback (gloo collectives between CPU processes), against one process with the same two
devices, through a SIGKILL of one process and a relaunch; then an evaluation across both
processes and a resume on one device; a one-device CosPlace run resumed by two processes
against its own uninterrupted end. The README's multi-process recipe is what they run."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from run_checkpoints import last_checkpoint
from vgjax import sharding

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600

# A short triplet run of the smoke config: 1 epoch of 2 rounds of 4 steps (2 tuples of 4 images each).
TRIPLET = ("--config.train.epochs_num=1", "--config.train.log_every_steps=2",
           "--config.mining.queries_per_epoch=16", "--config.mining.cache_refresh_rate=8")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(devices: int, **extra: str) -> dict:
    environ = {key: value for key, value in os.environ.items()
               if key not in ("XLA_FLAGS", *sharding.DISTRIBUTED_ENV.values())}
    return {**environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **extra}


def _command(workdir: Path, datasets: Path, *options: str, config: str = "smoke_train") -> list[str]:
    return [sys.executable, "launch.py", f"--config=configs/{config}.py", f"--workdir={workdir}",
            f"--config.data.datasets_folder={datasets}", "--nocompilation_cache", *options]


def _one_process(workdir: Path, datasets: Path, *options: str, devices: int = 2,
                 config: str = "smoke_train") -> subprocess.CompletedProcess:
    out = subprocess.run(_command(workdir, datasets, *options, config=config), cwd=REPO,
                         env=_environment(devices), capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _start_two_processes(workdir: Path, datasets: Path, *options: str,
                         config: str = "smoke_train") -> list[subprocess.Popen]:
    """Both processes of one run, launched the README's way (environment variables)."""
    address = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen(
        _command(workdir, datasets, "--config.train.distributed=True", *options, config=config), cwd=REPO,
        env=_environment(1, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]


def _finish(processes: list[subprocess.Popen], expect_success: bool = True) -> list[subprocess.CompletedProcess]:
    outputs = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        outputs.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    for rank, out in enumerate(outputs):
        assert not expect_success or out.returncode == 0, f"process {rank}:\n{out.stderr[-3000:]}"
    return outputs


def _two_processes(workdir: Path, datasets: Path, *options: str,
                   config: str = "smoke_train") -> list[subprocess.CompletedProcess]:
    return _finish(_start_two_processes(workdir, datasets, *options, config=config))


def _kill_after_first_checkpoint(workdir: Path, processes: list[subprocess.Popen], rank: int) -> None:
    """SIGKILL for process `rank` once the run has committed a checkpoint."""
    deadline = time.monotonic() + TIMEOUT
    while not any((folder / "commit_success.txt").exists()
                  for folder in (workdir / "checkpoints").glob("[0-9]*")):
        assert all(process.poll() is None for process in processes), "a process ended before any checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.2)
    processes[rank].send_signal(signal.SIGKILL)


def _final_state(workdir: Path) -> dict:
    return last_checkpoint(workdir)["train"]


@pytest.mark.slow
def test_two_processes_killed_and_relaunched_train_as_one_process_with_two_devices(tmp_path):
    datasets = tmp_path / "datasets"
    _one_process(tmp_path / "one", datasets, *TRIPLET)  # also renders the dataset both runs use
    # Two processes, one of them killed after the first checkpoint: the other stops within the
    # heartbeat timeout (10 s) and says to relaunch; relaunched, both resume and finish.
    processes = _start_two_processes(tmp_path / "two", datasets, *TRIPLET, "--config.train.heartbeat_timeout_seconds=10")
    _kill_after_first_checkpoint(tmp_path / "two", processes, rank=1)
    killed_at = time.monotonic()
    survivor = _finish(processes, expect_success=False)[0]
    assert survivor.returncode != 0 and time.monotonic() - killed_at < 60
    assert "process 0 of 2 stopped" in survivor.stderr and "relaunch every process" in survivor.stderr
    outputs = _two_processes(tmp_path / "two", datasets, *TRIPLET)
    assert "Resuming" in outputs[0].stdout

    one, two = _final_state(tmp_path / "one"), _final_state(tmp_path / "two")
    assert int(one["step"]) == int(two["step"]) == 8
    # The same global batches and the same mining decisions; the gradients' all-reduce runs
    # through gloo between processes instead of inside one process, so sums may round
    # differently: Adam's first steps amplify that to about lr (1e-4) on near-zero gradients.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=3e-4, rtol=1e-3),
                 (one["trainable"], one["batch_stats"]), (two["trainable"], two["batch_stats"]))
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two")]
    assert results[0]["steps"] == results[1]["steps"]
    assert abs(results[0]["test"]["R@1"] - results[1]["test"]["R@1"]) <= 10.0  # 20 test queries: 5% each
    # Only process 0 writes the run's files; process 1 says what it did on its own console.
    assert "Wrote" in outputs[0].stdout and "Wrote" not in outputs[1].stdout
    assert sum(1 for line in (tmp_path / "two" / "log.txt").read_text().splitlines()
               if line.startswith("=====")) == 2  # process 0's two launches
    assert "mesh {'data': 2}, 2 process(es)" in outputs[0].stdout + outputs[1].stdout

    # Evaluating across the two processes: each embeds its share, both get every descriptor.
    evaluation = _two_processes(tmp_path / "one", datasets, "--mode=eval")
    printed = [re.findall(r"R@(\d+): ([\d.]+)", next(line for line in out.stdout.splitlines()
                                                      if line.startswith("Recalls on"))) for out in evaluation]
    assert printed[0] == printed[1]
    assert {f"R@{n}": float(value) for n, value in printed[0]} == {
        key: round(value, 1) for key, value in results[0]["test"].items()}  # printed with one decimal

    # The 2-device checkpoint resumes in one process with one device, for a second epoch.
    out = _one_process(tmp_path / "two", datasets, *TRIPLET[1:], "--config.train.epochs_num=2", devices=1)
    assert "Resuming" in out.stdout and "different topology" not in out.stderr
    assert int(_final_state(tmp_path / "two")["step"]) == 16


@pytest.mark.slow
def test_cosplace_resumed_from_one_device_by_two_processes_trains_as_one_process(tmp_path):
    datasets = tmp_path / "datasets"
    # Two epochs in one process with one device; its epoch-1 checkpoint (1 device) resumed by two
    # processes with one device each for epoch 2.
    _one_process(tmp_path / "one", datasets, devices=1, config="smoke_cosplace")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "8")  # back to the end of epoch 1 (step 4)
    resumed = _two_processes(tmp_path / "two", datasets, config="smoke_cosplace")
    assert all("Resuming from epoch 2" in out.stdout and "different topology" not in out.stderr for out in resumed)
    assert "mesh {'data': 2}, 2 process(es)" in resumed[0].stdout

    one, two = last_checkpoint(tmp_path / "one"), last_checkpoint(tmp_path / "two")
    assert int(one["train"]["step"]) == int(two["train"]["step"]) == 8
    # Group 2's batches were split between the processes and their gradients summed through gloo;
    # the tolerance is the triplet test's.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=3e-4, rtol=1e-3),
                 (one["train"]["trainable"], one["classifiers"]), (two["train"]["trainable"], two["classifiers"]))
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two")]
    assert results[0]["groups"] == results[1]["groups"] and results[0]["steps"] == results[1]["steps"]


@pytest.mark.parametrize("train, message", [
    ({"distributed": True, "coordinator_address": "127.0.0.1:1234"}, "train.num_processes (or $JAX_NUM_PROCESSES)"),
    ({"distributed": True, "coordinator_address": "localhost", "num_processes": 2, "process_id": 0}, "is not host:port"),
    ({"distributed": True, "coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "is not in [0, 2)"),
])
def test_incomplete_or_wrong_settings_are_one_line_errors(train, message):
    from vgjax.configs import common

    config = common.get_config()
    config.train.update(train)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")
                       .replace("[", r"\[")):
        sharding.distributed_settings(config.train)


def test_settings_come_from_the_environment_and_keys_win(monkeypatch):
    from vgjax.configs import common

    config = common.get_config()
    assert sharding.distributed_settings(config.train) == {}
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:8476")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert sharding.distributed_settings(config.train) == {
        "coordinator_address": "10.0.0.1:8476", "num_processes": 4, "process_id": 3}
    config.train.process_id = 1
    assert sharding.distributed_settings(config.train)["process_id"] == 1


@pytest.mark.parametrize("num, batch, processes", [(10, 4, 2), (7, 4, 2), (5, 3, 2), (9, 8, 3), (2, 8, 4), (6, 6, 1)])
def test_process_rows_cover_every_row_once_in_order(num, batch, processes):
    from vgjax import embed

    shares = [embed.process_rows(num, batch, processes, index) for index in range(processes)]
    local = -(-batch // processes)
    assert all(len(rows) == len(shares[0][0]) for rows, _ in shares)  # the same number of batches
    gathered = []
    for g, counts in enumerate(shares[0][1]):
        for q, count in enumerate(counts):
            gathered += shares[q][0][g * local:g * local + count]
    assert gathered == list(range(num))


def test_without_settings_jax_detects_the_cluster(monkeypatch):
    """No address, count or id: jax.distributed.initialize gets none of them (SLURM/TPU
    detection), only the heartbeat timeout."""
    from vgjax.configs import common

    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    config = common.get_config()
    config.train.distributed = True
    sharding.initialize_distributed(config.train)
    assert calls == [{"heartbeat_timeout_seconds": 100}]

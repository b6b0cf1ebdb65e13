"""A run's outputs for people: log.txt (vgjax.logs.RunLog) and metrics (vgjax.metrics)."""

import contextlib
import logging
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from absl import logging as absl_logging
from tqdm import tqdm

from vgjax import logs, metrics

REPO = Path(__file__).resolve().parents[1]
ORBAX_FILE = str(Path(logs._orbax_dirs()[0]) / "checkpoint" / "some_module.py")


def _log_from_orbax(statement: str) -> None:
    """Runs `statement` as if it were a line of orbax (a log record names its caller's file)."""
    exec(compile(statement, ORBAX_FILE, "exec"), {"logging": logging, "absl_logging": absl_logging})


@contextlib.contextmanager
def _console_logging():
    """A console handler on the root logger, as an absl app or logging.basicConfig installs
    (made in the test, where sys.stderr is capsys's)."""
    handler = logging.StreamHandler(sys.stderr)
    logging.root.addHandler(handler)
    try:
        yield handler
    finally:
        logging.root.removeHandler(handler)


def _runs(log_text: str) -> list[list[str]]:
    """The lines of each run in log.txt (each run starts with a '=====' line)."""
    runs = []
    for line in log_text.splitlines():
        if line.startswith("===== "):
            runs.append([])
        else:
            runs[-1].append(line)
    return runs


def test_lines_are_logged_once_and_a_bar_only_in_its_final_state(tmp_path, capsys):
    with logs.RunLog(tmp_path):
        print("first line")
        assert (tmp_path / "log.txt").read_text().endswith("\nfirst line\n")  # on disk already
        for _ in tqdm(range(5), desc="steps", mininterval=0, ascii=True):  # on sys.stderr
            pass
        print("last", "line")
        sys.stdout.write("no newline")
    console = capsys.readouterr()
    assert console.err.count("\r") > 5 and console.out == "first line\nlast line\nno newline"
    [run] = _runs((tmp_path / "log.txt").read_text())
    assert run[0] == "first line" and run[-2:] == ["last line", "no newline"]
    [bar] = run[1:-2]
    assert bar.startswith("steps: 100%|##########| 5/5 [") and "\r" not in bar


def test_final_state_of_redrawn_lines():
    assert logs.final_state("\r 10%\r 50%\r100%  ") == "100%"
    assert logs.final_state("done\r") == "done"  # "\r\n" line ends
    assert logs.final_state("bar\r     \r") == ""  # a bar that erased itself


def test_orbax_warnings_go_to_the_file_only(tmp_path, capsys):
    named = logging.getLogger("orbax.checkpoint.x")  # (orbax 0.12.8 logs with absl and the root logger)
    with _console_logging(), logs.RunLog(tmp_path):
        _log_from_orbax("absl_logging.warning('orbax absl warning')")
        _log_from_orbax("logging.warning('orbax root warning')")
        named.error("orbax named error")
        logging.getLogger("vgjax.somewhere").warning("our warning")
    assert capsys.readouterr().err == "our warning\n"
    [run] = _runs((tmp_path / "log.txt").read_text())
    assert run[-1] == "our warning"
    assert [line.split("] ")[-1] for line in run[:-1]] == [
        "orbax absl warning", "orbax root warning", "orbax named error"]
    assert run[0].startswith("WARNING ") and "some_module:1]" in run[0]


def test_logging_and_streams_are_restored(tmp_path, capsys):
    with _console_logging() as handler:
        stdout, stderr, stream = sys.stdout, sys.stderr, handler.stream
        with pytest.raises(RuntimeError), logs.RunLog(tmp_path):
            raise RuntimeError("boom")
        assert (sys.stdout, sys.stderr, handler.stream) == (stdout, stderr, stream)
        assert not logging.getLogger("absl").filters and not logging.root.filters
        _log_from_orbax("logging.warning('orbax after the run')")
    assert capsys.readouterr().err == "orbax after the run\n"
    assert (tmp_path / "log.txt").read_text().rstrip().endswith("RuntimeError: boom")


def test_runs_append_with_separators(tmp_path):
    for word in ("one", "two"):
        with logs.RunLog(tmp_path):
            print(word)
    text = (tmp_path / "log.txt").read_text()
    assert _runs(text) == [["one"], ["two"]]
    assert text.startswith("===== 20")  # the date and time


def _events(folder: Path) -> list:
    """The Event protos of a TensorBoard folder (TFRecord framing: length, crc, data, crc)."""
    event_pb2 = metrics._tensorboardx().proto.event_pb2
    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
            offset += 12 + length + 4
    return events


def test_metric_writer_writes_jsonl_and_tensorboard_without_torch(tmp_path):
    script = """if True:
        import sys
        import numpy as np
        from vgjax.metrics import MetricWriter
        writer = MetricWriter(sys.argv[1])
        writer.write(7, {"loss": 0.5, "val": {"R@1": 40.0}, "note": "text"}, prefix="train/")
        writer.write_images(7, {"predictions/0": np.full((6, 8, 3), 200, np.uint8)})
        writer.write_text(7, {"config": "lr = 1e-4"})
        writer.close()
        assert "torch" not in sys.modules
    """
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == (
        '{"step": 7, "loss": 0.5, "val": {"R@1": 40.0}, "note": "text"}\n')
    events = _events(tmp_path / "tensorboard")
    values = {value.tag: value for event in events for value in event.summary.value}
    assert values["train/loss"].simple_value == 0.5 and values["train/val/R@1"].simple_value == 40.0
    image = values["predictions/0"].image
    assert (image.height, image.width) == (6, 8) and image.encoded_image_string.startswith(b"\x89PNG")
    assert "config/text_summary" in values and "train/note" not in values

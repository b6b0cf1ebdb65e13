"""The plain-text run log, <workdir>/log.txt: what a run printed, readable after the fact.

`with RunLog(workdir):` copies everything written to sys.stdout and sys.stderr (prints, tqdm
bars, logging) into log.txt as well as to the console, except:
- progress-bar redraws: a line rewritten with '\\r' is kept in its final state only, so a tqdm
  bar leaves one line (its state when it closed), not one per update;
- orbax's logging warnings (checkpoint housekeeping, of no use on the console) go to log.txt
  only.
Each line is flushed when it completes, so a killed run loses at most the line in progress.
Output that bypasses sys.stdout/sys.stderr (C++ libraries, subprocesses) is not copied.
"""

from __future__ import annotations

import datetime
import functools
import importlib.util
import logging
import os
import sys
import threading
import traceback
from pathlib import Path

from absl import logging as absl_logging

_RECORD_FORMAT = logging.Formatter("%(levelname)s %(asctime)s %(module)s:%(lineno)d] %(message)s")


class RunLog:
    """Context manager: while active, the process's output is also appended to <workdir>/log.txt."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / "log.txt"

    def __enter__(self) -> RunLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _LineFile(self.path)
        self._file.write(f"===== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} {' '.join(sys.argv)}")
        self._consoles = sys.stdout, sys.stderr
        self._tees = tuple(_Tee(stream, self._file) for stream in self._consoles)
        sys.stdout, sys.stderr = self._tees
        self._rebound = _rebind_console_handlers({id(c): t for c, t in zip(self._consoles, self._tees)})
        self._filtered = _loggers_orbax_uses()
        for logger in self._filtered:
            logger.addFilter(self._divert_orbax_warnings)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for logger in self._filtered:
            logger.removeFilter(self._divert_orbax_warnings)
        for handler, stream in self._rebound:
            handler.setStream(stream)
        sys.stdout, sys.stderr = self._consoles
        for tee in self._tees:
            tee.close_line()
        if exc_type is not None and not issubclass(exc_type, SystemExit):
            self._file.write("".join(traceback.format_exception(exc_type, exc, tb)).rstrip("\n"))
        self._file.close()

    def _divert_orbax_warnings(self, record: logging.LogRecord) -> bool:
        """A logging filter: writes orbax's warnings to log.txt and stops them (False)."""
        if record.levelno < logging.WARNING or not _from_orbax(record):
            return True
        self._file.write(_RECORD_FORMAT.format(record))
        return False


class _LineFile:
    """A text file written in whole lines, each flushed at once; thread-safe. Lines written after
    close() are dropped (e.g. a progress bar left open, closed later by the garbage collector)."""

    def __init__(self, path: Path):
        self._file = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.write(text + "\n")
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _Tee:
    """A text stream that writes to `console` and sends each completed line, in its final
    state (see final_state), to `log`; other attributes are the console's."""

    def __init__(self, console, log: _LineFile):
        self._console, self._log = console, log
        self._pending = ""  # the line in progress
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        self._console.write(text)
        with self._lock:
            *lines, last = (self._pending + text).split("\n")
            self._pending = _compact(last)
            for line in lines:
                self._log.write(final_state(line))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def close_line(self) -> None:
        """Logs the line in progress, if it shows anything."""
        with self._lock:
            line, self._pending = final_state(self._pending), ""
        if line:
            self._log.write(line)

    def __getattr__(self, name):
        return getattr(self._console, name)


def final_state(line: str) -> str:
    """What a terminal shows of `line` once its '\\r' redraws are done (each overwrites the start
    of the previous one), without trailing spaces (progress bars pad with spaces to erase)."""
    shown = ""
    for redraw in line.split("\r"):
        shown = redraw + shown[len(redraw):]
    return shown.rstrip()


def _compact(pending: str) -> str:
    """`pending`, a line in progress, with its completed redraws merged into one."""
    shown, sep, current = pending.rpartition("\r")
    return f"{final_state(shown)}{sep}{current}"


def _rebind_console_handlers(tees: dict[int, _Tee]) -> list[tuple[logging.StreamHandler, object]]:
    """Points each logging handler that writes to a console stream at that stream's tee (`tees`:
    id(console stream) -> tee); returns (handler, previous stream) pairs."""
    return [(h, h.setStream(tees[id(h.stream)])) for h in _stream_handlers() if id(h.stream) in tees]


def _stream_handlers() -> list[logging.StreamHandler]:
    """The StreamHandlers of all loggers, and absl's (which the root logger has in absl apps)."""
    loggers = [logging.root, *logging.Logger.manager.loggerDict.values()]  # (and PlaceHolders)
    handlers = {h for logger in loggers for h in getattr(logger, "handlers", ())}
    handlers.add(absl_logging.get_absl_handler().python_handler)
    return [h for h in handlers if isinstance(h, logging.StreamHandler)]


def _loggers_orbax_uses() -> list[logging.Logger]:
    """Where orbax's records start: absl's logger (orbax logs with absl.logging), the root logger
    (a few orbax modules call logging.warning) and any logger named orbax.*."""
    named = [name for name in logging.Logger.manager.loggerDict if name.startswith("orbax")]
    return [logging.getLogger("absl"), logging.root, *map(logging.getLogger, named)]


@functools.cache
def _orbax_dirs() -> tuple[str, ...]:
    """The orbax package's folders (a namespace package may have several), each ending in a '/'."""
    spec = importlib.util.find_spec("orbax")
    return tuple(os.path.join(d, "") for d in spec.submodule_search_locations) if spec else ()


def _from_orbax(record: logging.LogRecord) -> bool:
    return record.name.startswith("orbax") or record.pathname.startswith(_orbax_dirs())
